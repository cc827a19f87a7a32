"""The completer leaves alone what a request is delivering, even when the delivery ends while it looks.

Found by bench.replicas on PostgreSQL: the completer read this process's unfinished payments, and while that
query ran a request finished one of them (and stopped marking it as being delivered). The query's snapshot still
showed it unfinished, so the completer sent its decision again and, on PostgreSQL, its finish then failed the
fence (LostOwnership, logged as an error). The real stores cannot be held between a query's snapshot and its
answer on demand, so this store is a stand-in that can.
"""
from __future__ import annotations

import asyncio

from servers.gateway.coordinator import Coordinator
from servers.gateway.store.records import Payment, Point

DECIDED = Payment(7, "txn-7", "alice", "key-7", "SBI-1001", "HDFC-2001", 100, Point.COMMIT_DECIDED, b"", 1)


class HeldStore:
    """Answers `owned_unfinished` from a snapshot taken when asked, but only once `answer` is set."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.answer = asyncio.Event()
        self.finished: list[Payment] = []

    def is_live(self) -> bool:
        return True

    async def take_over_abandoned(self, limit: int) -> list[Payment]:
        return []

    async def owned_unfinished(self) -> list[Payment]:
        snapshot = [DECIDED]
        self.asked.set()
        await self.answer.wait()
        return snapshot

    async def finish(self, payment: Payment) -> None:
        self.finished.append(payment)


class NoBanks:
    links: dict = {}

    def __contains__(self, bank: str) -> bool:
        return False


async def test_a_payment_whose_delivery_ends_during_the_completers_query_is_not_delivered_again() -> None:
    store = HeldStore()
    coordinator = Coordinator(store, NoBanks(), 1.0, asyncio.Event())  # type: ignore[arg-type]
    sent: list[str] = []

    async def send_decision(payment: Payment, decided: Point, banks: set[str], timeout: float) -> set[str]:
        sent.append(payment.txn_id)
        return banks
    coordinator._send_decision = send_decision  # type: ignore[method-assign]

    coordinator._delivering.add(DECIDED.id)  # a request is pushing it to the banks
    completing = asyncio.ensure_future(coordinator.complete_abandoned())
    await asyncio.wait_for(store.asked.wait(), 5)
    coordinator._delivering.discard(DECIDED.id)  # ... and its finish lands while the completer's query runs
    store.answer.set()
    assert await asyncio.wait_for(completing, 5) == 0
    assert sent == [] and store.finished == []
