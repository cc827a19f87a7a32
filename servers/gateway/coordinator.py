"""Two-phase commit across the banks, and the life of one payment: claim → prepare → decide → commit → finish.

Failure handling (CONTRACT §6):
- Prepare goes to every participant in parallel under one deadline (`--txn-timeout`). Any NO, error or
  timeout decides ABORT; all YES decides COMMIT. The decision and the client's response are stored durably
  (`GatewayStore.decide`, awaited) before any bank hears of it.
- A decided COMMIT is never turned into an abort: Commit is retried until every bank acknowledges; if a bank
  stays away, the payment is released to the completer, which keeps retrying (holds keep the money reserved).
- Abort is sent to every participant; a bank that does not acknowledge is retried by the completer, so no
  hold is left behind. A bank remembers an Abort for an id it never saw, so a late Prepare votes NO.
- On start, and every `--completer-interval`, the completer takes over payments whose owner died: undecided
  ones are aborted, decided ones are pushed to their decision.
- A process that has lost its liveness (a replica whose PostgreSQL session is gone: another may be taking its
  payments over) tells no bank anything until it has it back; its store writes are fenced anyway.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable

import grpc

from protofiles import payment_pb2
from servers import serving
from servers.certs import GATEWAY_CN
from servers.faults import crash_point, delay_at
from servers.gateway.banklink import BankCallError, BankLink
from servers.gateway.metrics import GatewayMetrics, GatewayMetricsOff
from servers.gateway.store.errors import StoreUnavailable
from servers.gateway.store.interface import GatewayStore
from servers.gateway.store.records import LostOwnership, Payment, Point
from servers.money import bank_of, format_paise, paise_to_rupees

log = logging.getLogger("strife.coordinator")

SUCCEEDED, DECLINED, FAILED = "succeeded", "declined", "failed"
STATUS_ENUM = {SUCCEEDED: payment_pb2.PAYMENT_STATUS_SUCCEEDED, DECLINED: payment_pb2.PAYMENT_STATUS_DECLINED,
               FAILED: payment_pb2.PAYMENT_STATUS_FAILED, "processing": payment_pb2.PAYMENT_STATUS_PROCESSING}


class Banks:
    """One long-lived mutual-TLS channel (and 2PC stream) per bank, reused for every call."""

    def __init__(self, addresses: dict[str, str], certs_dir: Path) -> None:
        credentials = serving.client_credentials(certs_dir, GATEWAY_CN)
        # Each channel pins its bank's name: a server holding another bank's (CA-signed) certificate at this
        # address fails the handshake, so it can never vote on, or learn of, this bank's payments.
        self.links = {name: BankLink(name, grpc.aio.secure_channel(addr, credentials, options=serving.pinned(name)))
                      for name, addr in addresses.items()}

    def __contains__(self, bank: str) -> bool:
        return bank in self.links

    async def close(self) -> None:
        for link in self.links.values():
            if link.stats.frames:
                log.info("bank link %s: %d messages in %d frames (%.1f per frame)", link.name, link.stats.messages,
                         link.stats.frames, link.stats.messages / link.stats.frames)
            await link.close()


@dataclass(frozen=True)
class Decision:
    commit: bool
    status: str
    message: str


def _in_background(write: Awaitable[None], what: str) -> "asyncio.Future[None]":
    """A store write nobody waits for: its failure is logged (the completer makes up for it), never lost."""
    future = asyncio.ensure_future(write)

    def report(done: "asyncio.Future[None]") -> None:
        if not done.cancelled() and done.exception() is not None:
            log.warning("%s failed: %s (the completer will see to it)", what, done.exception())
    future.add_done_callback(report)
    return future


def describe_error(bank: str, exc: Exception, timeout: float) -> str:
    code = exc.code() if isinstance(exc, (grpc.RpcError, BankCallError)) else None
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"bank {bank} did not answer within {timeout:g} s"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"bank {bank} is unreachable"
    details = exc.details() if isinstance(exc, (grpc.RpcError, BankCallError)) else str(exc)
    return f"bank {bank} failed: {code.name if code else 'error'}: {details}"


class Coordinator:
    def __init__(self, store: GatewayStore, banks: Banks, txn_timeout: float, stop: asyncio.Event,
                 metrics: GatewayMetrics | None = None) -> None:
        self.store = store
        self.metrics = metrics or GatewayMetricsOff()
        self.banks = banks
        self.txn_timeout = txn_timeout
        self._stop = stop
        self._delivering: set[int] = set()  # payments a request is pushing to their decision right now

    def _check_live(self, payment: Payment) -> None:
        if not self.store.is_live():
            raise StoreUnavailable(f"this gateway lost its store session; payment {payment.txn_id} is left to"
                                   " whichever gateway takes it over")

    @staticmethod
    def participants(payment: Payment) -> list[str]:
        return sorted({bank_of(payment.from_account), bank_of(payment.to_account)})

    # ---- the life of a payment -------------------------------------------------------------------------------
    async def run(self, payment: Payment, refusal: str | None = None) -> payment_pb2.PaymentResponse:
        """Execute a claimed (or resumed, still undecided) payment to its decision and return the response.

        `refusal`: why today's configuration would not accept this payment (a resumed one: its dead owner
        accepted it under another configuration, e.g. with a bank since removed). It is then decided as failed
        without asking any bank (a vote it may have cast is released by the Abort that follows)."""
        started = time.perf_counter()
        try:
            crash_point("after_claim")
            if refusal is not None:
                decision = Decision(False, FAILED, f"could not complete: {refusal}; no money moved")
            else:
                decision = await self._prepare(payment)
            crash_point("after_prepare")
            if delay := delay_at("after_prepare"):  # tests: the votes are in, the decision is not stored yet
                await asyncio.sleep(delay)
            response = self.response_for(payment, decision)
            try:
                await self.store.decide(payment, decision.commit, decision.status, decision.message,
                                        response.SerializeToString())
            except LostOwnership as exc:
                # The store's fence refused our decision: this replica lost its store session, or the payment
                # was taken over. Its outcome is whatever its owner now decides, so the caller must not take
                # this for a final answer: UNAVAILABLE, and a retry with the key gets that outcome.
                raise StoreUnavailable(f"this gateway replica lost payment {payment.txn_id} to another replica"
                                       f" ({exc}); retry with the same idempotency key for its outcome") from None
        except BaseException:
            # Undecided and unable to go on (e.g. the store failed): let go so a retry or the completer
            # continues it instead of finding it "in flight" for as long as this process lives.
            _in_background(self.store.release(payment), f"releasing payment {payment.txn_id}")
            raise
        self.metrics.decided(decision.status)
        crash_point("after_decide")
        decided = Point.COMMIT_DECIDED if decision.commit else Point.ABORT_DECIDED
        patience = self.txn_timeout if decision.commit else min(0.5, self.txn_timeout / 4)
        self._delivering.add(payment.id)
        try:
            delivered = await self._deliver(payment, decided, patience)
        except BaseException:
            self._delivering.discard(payment.id)
            raise
        if delivered:
            crash_point("after_deliver")
            # Not awaited, and lazily batched: nothing remote follows, and if it is lost the completer re-sends
            # the decision (idempotent at the banks) and finishes it then.
            done = _in_background(self.store.finish_later(payment), f"finishing payment {payment.txn_id}")
        else:
            done = _in_background(self.store.release(payment), f"releasing payment {payment.txn_id}")
        done.add_done_callback(lambda _: self._delivering.discard(payment.id))
        self.metrics.replied(started)
        return response

    async def _prepare(self, payment: Payment) -> Decision:
        self._check_live(payment)
        request = payment_pb2.PrepareRequest(transaction_id=payment.txn_id, from_account=payment.from_account,
                                             to_account=payment.to_account, amount=paise_to_rupees(payment.amount))
        banks = self.participants(payment)
        results = await asyncio.gather(*(self.banks.links[b].send("prepare", request, self.txn_timeout)
                                         for b in banks), return_exceptions=True)
        refusals: list[str] = []
        errors: list[str] = []
        for bank, result in zip(banks, results):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                errors.append(describe_error(bank, result, self.txn_timeout))
            elif not result.vote.vote:
                refusals.append(f"{bank}: {result.vote.reason or 'refused'}")
        if refusals:
            return Decision(False, DECLINED, "declined by " + "; ".join(refusals) + "; no money moved")
        if errors:
            return Decision(False, FAILED, "could not complete: " + "; ".join(errors) + "; no money moved")
        return Decision(True, SUCCEEDED,
                        f"paid ₹{format_paise(payment.amount)} from {payment.from_account} to {payment.to_account}")

    @staticmethod
    def response_for(payment: Payment, decision: Decision) -> payment_pb2.PaymentResponse:
        return payment_pb2.PaymentResponse(
            success=decision.commit, transaction_id=payment.txn_id, status=STATUS_ENUM[decision.status],
            message=decision.message, replayed=False, idempotency_key=payment.idem_key,
            from_account=payment.from_account, to_account=payment.to_account,
            amount=paise_to_rupees(payment.amount), amount_paise=payment.amount)

    async def _deliver(self, payment: Payment, decided: Point, patience: float) -> bool:
        """Send Commit or Abort to every participant until each acknowledges or `patience` runs out."""
        pending = set(self.participants(payment))
        give_up = time.monotonic() + patience
        delay = 0.05
        while True:
            pending -= await self._send_decision(payment, decided, pending, min(2.0, max(0.2, patience)))
            if not pending:
                return True
            if time.monotonic() + delay > give_up or self._stop.is_set() or not self.store.is_live():
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _send_decision(self, payment: Payment, decided: Point, banks: set[str], timeout: float) -> set[str]:
        kind = "commit" if decided is Point.COMMIT_DECIDED else "abort"
        if not self.store.is_live():
            return set()  # maybe no longer ours: the survivor that takes it over tells the banks
        body = (payment_pb2.CommitRequest if kind == "commit" else payment_pb2.AbortRequest)(
            transaction_id=payment.txn_id)
        for bank in sorted(b for b in banks if b not in self.banks):
            # Removed from banks.json while this payment was open: the decision waits until the bank is back
            # in the configuration (the completer retries), and any hold stays there until then.
            log.warning("%s of %s at %s not sent: bank %s is not configured (banks.json)", kind, payment.txn_id,
                        bank, bank)
        order = sorted(b for b in banks if b in self.banks)
        results = await asyncio.gather(*(self.banks.links[b].send(kind, body, timeout) for b in order),
                                       return_exceptions=True)
        acked: set[str] = set()
        for bank, result in zip(order, results):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                log.warning("%s of %s at %s not acknowledged: %s", kind, payment.txn_id, bank,
                            describe_error(bank, result, timeout))
            elif result.ack.success:
                acked.add(bank)
            else:
                # A participant contradicting a durable decision is a bug or a lost ledger: keep the payment
                # open and shout, never flip the decision.
                log.error("bank %s refused %s of %s: %s", bank, kind, payment.txn_id, result.ack.message)
        return acked

    # ---- the completer ---------------------------------------------------------------------------------------
    async def complete_abandoned(self) -> int:
        """One pass: finish what dead owners (or released requests) left. Returns how many were finished."""
        if not self.store.is_live():
            return 0
        taken = await self.store.take_over_abandoned(100)
        taken_ids = {p.id for p in taken}
        work = taken + [p for p in await self._own_stuck() if p.id not in taken_ids]
        done = 0
        try:
            for payment in work:
                if self._stop.is_set() or not self.store.is_live():
                    break
                if payment.id in self._delivering:
                    continue  # a request has been pushing it since this pass began
                try:
                    done += await self._complete(payment)
                except LostOwnership as exc:
                    # This replica lost its store session mid-pass, or another took the payment over: its
                    # owner now completes it (decisions are idempotent at the banks). Expected: one line.
                    log.info("left to the payment's current owner: %s", exc)
                except StoreUnavailable:
                    raise  # the store went away mid-pass: the completer loop says so in one line, then retries
                except Exception:  # noqa: BLE001 - one bad payment must not stop the others
                    log.exception("completing payment %s failed; will retry", payment.txn_id)
        finally:
            self.metrics.completer_pass(left=len(work) - done)
        return done

    async def _own_stuck(self) -> list[Payment]:
        # Those a request was delivering when the query started are left out too: the query's snapshot may be
        # older than a finish that lands (and leaves `_delivering`) while it runs — found by bench.replicas: the
        # completer re-sent such decisions, and on PostgreSQL its finish then failed the fence.
        delivering = set(self._delivering)
        owned = await self.store.owned_unfinished()
        delivering |= self._delivering
        return [p for p in owned if p.recovery_point is not Point.STARTED and p.id not in delivering]

    async def recover_at_start(self) -> int:
        """Before serving: decide ABORT, durably, for every undecided payment a dead gateway left, so that no
        retry arriving first can resume it instead (CONTRACT §6: a restarted gateway aborts what it had not
        decided). Telling the banks is left to the completer, so a bank that is down cannot delay start-up."""
        taken = await self.store.take_over_abandoned(1_000_000)
        aborted = 0
        for payment in taken:
            if payment.recovery_point is Point.STARTED:
                await self._abort_undecided(payment)
                aborted += 1
        return aborted

    async def _abort_undecided(self, payment: Payment) -> None:
        # Its owner died before deciding: we cannot know every vote, so abort (CONTRACT §6).
        decision = Decision(False, FAILED, "interrupted before completion (the gateway restarted); no money moved")
        await self.store.decide(payment, False, decision.status, decision.message,
                                self.response_for(payment, decision).SerializeToString())
        self.metrics.decided(decision.status)
        log.info("aborted undecided payment %s left by a dead gateway", payment.txn_id)

    async def _complete(self, payment: Payment) -> int:
        point = payment.recovery_point
        if point is Point.STARTED:
            await self._abort_undecided(payment)
            point = Point.ABORT_DECIDED
        if await self._deliver(payment, point, patience=0.0):
            await self.store.finish(payment)
            log.info("finished %s payment %s", point.value, payment.txn_id)
            return 1
        return 0
