"""Taking over abandoned payments (start-up recovery and the completer): a dead owner's payments are always
reached, however many payments live owners have in flight, and a live owner's are never taken."""
from __future__ import annotations

import os
from pathlib import Path

from servers.gateway.store.sqlite_payments import Payment, PaymentStore
from servers.gateway.store.owners import Owner
from servers.sqlite_store import SQLiteStore


def gateway(directory: Path) -> PaymentStore:
    """One gateway process's view of the shared store: a connection and an owner of its own."""
    return PaymentStore(SQLiteStore(directory / "gateway.sqlite3", ""), Owner(directory))


def kill(store: PaymentStore) -> None:
    """What `kill -9` does to an owner: the kernel closes its fd (dropping the flock); the lock file stays."""
    os.close(store.owner._fd)  # noqa: SLF001 - simulating the kernel, not using the API
    store.owner._fd = -1  # noqa: SLF001


def claim(store: PaymentStore, user: str, count: int) -> list[Payment]:
    return [store.claim(user, f"{user}-{i}", "SBI-1001", "HDFC-2001", 100 + i).payment for i in range(count)]


def test_regression_a_live_peers_many_payments_never_hide_a_dead_owners(tmp_path: Path) -> None:
    """The take-over once read the oldest `limit` unfinished payments and only then skipped live owners':
    with more than `limit` older payments in flight at a live peer, a dead owner's were never reached."""
    live, dead, recovering = gateway(tmp_path), gateway(tmp_path), gateway(tmp_path)
    busy = claim(live, "alice", 150)          # in flight at a live gateway, older than the dead one's
    let_go = busy[7]
    live.release(let_go)                      # a payment its (live) owner let go of: anyone may continue it
    orphans = claim(dead, "bob", 120)
    kill(dead)

    first = recovering.take_over_abandoned(limit=100)
    second = recovering.take_over_abandoned(limit=100)
    third = recovering.take_over_abandoned(limit=100)

    # Oldest first, `limit` at a time, until every abandoned payment is taken; the live peer's stay its own.
    assert [p.id for p in first] == [let_go.id] + [p.id for p in orphans[:99]]
    assert [p.id for p in second] == [p.id for p in orphans[99:]]
    assert third == []
    assert [p.txn_id for p in live.owned_unfinished()] == [p.txn_id for p in busy if p is not let_go]
    assert {p.id for p in recovering.owned_unfinished()} == {let_go.id} | {p.id for p in orphans}
    assert not (tmp_path / "owners" / f"{dead.owner.id}.lock").exists()  # the dead owner is forgotten


def test_a_live_owners_payments_are_taken_only_once_it_dies(tmp_path: Path) -> None:
    live, recovering = gateway(tmp_path), gateway(tmp_path)
    claim(live, "alice", 3)
    assert recovering.take_over_abandoned() == []
    kill(live)
    assert len(recovering.take_over_abandoned()) == 3
