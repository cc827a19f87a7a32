"""Two-phase commit across the banks, and the life of one payment: claim → prepare → decide → commit → finish.

Failure handling (CONTRACT §6):
- Prepare goes to every participant in parallel under one deadline (`--txn-timeout`). Any NO, error or
  timeout decides ABORT; all YES decides COMMIT. The decision and the client's response are stored durably
  (`PaymentStore.decide`) before any bank hears of it.
- A decided COMMIT is never turned into an abort: Commit is retried until every bank acknowledges; if a bank
  stays away, the payment is released to the completer, which keeps retrying (holds keep the money reserved).
- Abort is sent to every participant; a bank that does not acknowledge is retried by the completer, so no
  hold is left behind. A bank remembers an Abort for an id it never saw, so a late Prepare votes NO.
- On start, and every few seconds, the completer takes over payments whose owner died: undecided ones are
  aborted, decided ones are pushed to their decision.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from protofiles import payment_pb2, payment_pb2_grpc
from servers import serving
from servers.certs import GATEWAY_CN
from servers.faults import crash_point
from servers.idempotency import Payment, PaymentStore, Point
from servers.money import bank_of, format_paise, paise_to_rupees

log = logging.getLogger("strife.coordinator")

SUCCEEDED, DECLINED, FAILED = "succeeded", "declined", "failed"
STATUS_ENUM = {SUCCEEDED: payment_pb2.PAYMENT_STATUS_SUCCEEDED, DECLINED: payment_pb2.PAYMENT_STATUS_DECLINED,
               FAILED: payment_pb2.PAYMENT_STATUS_FAILED, "processing": payment_pb2.PAYMENT_STATUS_PROCESSING}


class Banks:
    """One long-lived mutual-TLS channel per bank, reused for every call."""

    def __init__(self, addresses: dict[str, str], certs_dir: Path) -> None:
        credentials = serving.client_credentials(certs_dir, GATEWAY_CN)
        self._channels = {name: grpc.secure_channel(addr, credentials, options=serving.CHANNEL_OPTIONS)
                          for name, addr in addresses.items()}
        self.stubs = {name: payment_pb2_grpc.BankStub(ch) for name, ch in self._channels.items()}

    def __contains__(self, bank: str) -> bool:
        return bank in self.stubs

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


@dataclass(frozen=True)
class Decision:
    commit: bool
    status: str
    message: str


def _describe_error(bank: str, exc: grpc.RpcError, timeout: float) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"bank {bank} did not answer within {timeout:g} s"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"bank {bank} is unreachable"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"bank {bank} failed: {code.name if code else 'error'}: {details}"


class Coordinator:
    def __init__(self, store: PaymentStore, banks: Banks, txn_timeout: float, stop: threading.Event) -> None:
        self.store = store
        self.banks = banks
        self.txn_timeout = txn_timeout
        self._stop = stop
        self._delivering: set[int] = set()  # payments a request thread is pushing to their decision right now
        self._lock = threading.Lock()

    @staticmethod
    def participants(payment: Payment) -> list[str]:
        return sorted({bank_of(payment.from_account), bank_of(payment.to_account)})

    # ---- the life of a payment -------------------------------------------------------------------------------
    def run(self, payment: Payment) -> payment_pb2.PaymentResponse:
        """Execute a claimed (or resumed, still undecided) payment to its decision and return the response."""
        try:
            crash_point("after_claim")
            decision = self._prepare(payment)
            crash_point("after_prepare")
            response = self.response_for(payment, decision)
            self.store.decide(payment, commit=decision.commit, status=decision.status, message=decision.message,
                              response=response.SerializeToString())
        except BaseException:
            # Undecided and unable to go on (e.g. the store failed): let go so a retry or the completer
            # continues it instead of finding it "in flight" for as long as this process lives.
            self._release_quietly(payment)
            raise
        crash_point("after_decide")
        decided = Point.COMMIT_DECIDED if decision.commit else Point.ABORT_DECIDED
        patience = self.txn_timeout if decision.commit else min(0.5, self.txn_timeout / 4)
        with self._lock:
            self._delivering.add(payment.id)
        try:
            if self._deliver(payment, decided, patience):
                crash_point("after_deliver")
                self.store.finish(payment)
            else:
                self.store.release(payment)
        finally:
            with self._lock:
                self._delivering.discard(payment.id)
        return response

    def _prepare(self, payment: Payment) -> Decision:
        request = payment_pb2.PrepareRequest(transaction_id=payment.txn_id, from_account=payment.from_account,
                                             to_account=payment.to_account, amount=paise_to_rupees(payment.amount))
        deadline = time.monotonic() + self.txn_timeout
        calls = {bank: self.banks.stubs[bank].Prepare.future(request, timeout=self.txn_timeout)
                 for bank in self.participants(payment)}
        refusals: list[str] = []
        errors: list[str] = []
        for bank, call in calls.items():
            try:
                vote = call.result(timeout=max(0.0, deadline - time.monotonic()) + 0.5)
            except grpc.RpcError as exc:
                errors.append(_describe_error(bank, exc, self.txn_timeout))
                continue
            except (futures.TimeoutError, grpc.FutureTimeoutError):
                # Normally the RPC deadline fires first; not when this process was frozen (or starved) past
                # deadline and grace: then the wait ends first, and grpc raises its own FutureTimeoutError.
                call.cancel()
                errors.append(f"bank {bank} did not answer within {self.txn_timeout:g} s")
                continue
            if not vote.vote:
                refusals.append(f"{bank}: {vote.reason or 'refused'}")
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

    def _deliver(self, payment: Payment, decided: Point, patience: float) -> bool:
        """Send Commit or Abort to every participant until each acknowledges or `patience` runs out."""
        pending = set(self.participants(payment))
        give_up = time.monotonic() + patience
        delay = 0.05
        while True:
            pending -= self._send_decision(payment, decided, pending, min(2.0, max(0.2, patience)))
            if not pending:
                return True
            if time.monotonic() + delay > give_up or self._stop.wait(delay):
                return False
            delay = min(delay * 2, 1.0)

    def _send_decision(self, payment: Payment, decided: Point, banks: set[str], timeout: float) -> set[str]:
        acked: set[str] = set()
        if decided is Point.COMMIT_DECIDED:
            request = payment_pb2.CommitRequest(transaction_id=payment.txn_id)
            calls = {b: self.banks.stubs[b].Commit.future(request, timeout=timeout) for b in banks}
        else:
            request = payment_pb2.AbortRequest(transaction_id=payment.txn_id)
            calls = {b: self.banks.stubs[b].Abort.future(request, timeout=timeout) for b in banks}
        for bank, call in calls.items():
            try:
                ack = call.result()
            except grpc.RpcError as exc:
                log.warning("%s of %s at %s not acknowledged: %s", decided.value, payment.txn_id, bank,
                            _describe_error(bank, exc, timeout))
                continue
            if ack.success:
                acked.add(bank)
            else:
                # A participant contradicting a durable decision is a bug or a lost ledger: keep the payment
                # open and shout, never flip the decision.
                log.error("bank %s refused %s of %s: %s", bank, decided.value, payment.txn_id, ack.message)
        return acked

    def _release_quietly(self, payment: Payment) -> None:
        try:
            self.store.release(payment)
        except Exception:  # noqa: BLE001 - best effort while another error propagates
            log.exception("could not release payment %s", payment.txn_id)

    # ---- the completer ---------------------------------------------------------------------------------------
    def complete_abandoned(self) -> int:
        """One pass: finish what dead owners (or released requests) left. Returns how many were finished."""
        done = 0
        for payment in self.store.take_over_abandoned() + self._own_stuck():
            if self._stop.is_set():
                break
            try:
                done += self._complete(payment)
            except Exception:  # noqa: BLE001 - one bad payment must not stop the others
                log.exception("completing payment %s failed; will retry", payment.txn_id)
        return done

    def _own_stuck(self) -> list[Payment]:
        with self._lock:
            busy = set(self._delivering)
        return [p for p in self.store.owned_unfinished()
                if p.recovery_point is not Point.STARTED and p.id not in busy]

    def _complete(self, payment: Payment) -> int:
        point = payment.recovery_point
        if point is Point.STARTED:
            # Its owner died before deciding: we cannot know every vote, so abort (CONTRACT §6).
            decision = Decision(False, FAILED, "interrupted before completion (the gateway restarted);"
                                               " no money moved")
            self.store.decide(payment, commit=False, status=decision.status, message=decision.message,
                              response=self.response_for(payment, decision).SerializeToString())
            point = Point.ABORT_DECIDED
            log.info("aborted undecided payment %s left by a dead gateway", payment.txn_id)
        if self._deliver(payment, point, patience=0.0):
            self.store.finish(payment)
            log.info("finished %s payment %s", point.value, payment.txn_id)
            return 1
        return 0
