"""The sync loop's rules: how a send's outcome is classified (CONTRACT §8), and the engine that sends one
payment, drains the queue oldest first (one drain at a time), backs off, and expires old payments.

No Textual here: every method is a plain blocking call, made from a worker thread, that returns the events it
produced (`Finished`, `Deferred`, `WentOffline`, `LoginRequired`) for the UI to show.

Two clocks. The wall clock (`clock`, time.time) stamps records and is all that survives a restart; anyone can
set it, and NTP steps it. Timing decisions run on `monotonic` (`boot_clock`), which nobody can set: a backoff
deadline and a payment's age for expiry are counted on it from the moment this wallet first sees the payment,
so a wall-clock step neither stalls a resend nor expires (or keeps alive) a payment. What a restart must carry
over is read from wall time once, clamped (see `SyncEngine._timing`).
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc

from wallet_tui.gateway import Gateway, GatewayError, PaymentReply
from wallet_tui.outbox import Outbox, OutboxEntry

# No final answer: the payment may or may not have run. Resend later with the same key; the gateway replays
# the stored outcome if it ran, or runs it (once) if it did not.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED})
# These mean the gateway (or the link to it) is gone, not that this payment is busy.
CONNECTIVITY = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                          grpc.StatusCode.CANCELLED})
BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
JITTER = (0.8, 1.2)
# A drain marks this many of the oldest queued payments "may have been sent" in one outbox write, sends them one
# by one, then records their final outcomes in one write. A crash mid-batch costs only the ability to cancel
# the batch's unsent payments, and a resend (same key, replayed by the gateway) of those whose outcome was not
# yet written. Larger batches mean fewer whole-file rewrites per payment, but more payments at stake.
DRAIN_BATCH = 16


@dataclass(frozen=True)
class Classified:
    kind: str          # "final" | "retry" | "login"
    status: str = ""   # for final: succeeded | declined | failed
    message: str = ""
    code: grpc.StatusCode | None = None  # the error's status code, None for a response


def classify(result: PaymentReply | GatewayError) -> Classified:
    """CONTRACT §8: a response is final; UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, CANCELLED → resend later;
    UNAUTHENTICATED → pending until the user logs in again; any other error is a final failure (the gateway
    refused the request before running it, e.g. INVALID_ARGUMENT, PERMISSION_DENIED, FAILED_PRECONDITION)."""
    if isinstance(result, PaymentReply):
        return Classified("final", result.status if result.status in ("succeeded", "declined") else "failed",
                          result.message)
    if result.code in TRANSIENT:
        return Classified("retry", message=f"{result.code.name.lower()}: {result.message}", code=result.code)
    if result.code is grpc.StatusCode.UNAUTHENTICATED:
        return Classified("login", message=result.message or "session expired", code=result.code)
    return Classified("final", "failed", result.message or result.code.name, result.code)


def _backoff(attempts: int) -> float:
    return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(0, attempts - 1))


def backoff_delay(attempts: int) -> float:
    """1 s, 2 s, 4 s … capped at 60 s, ±20 % jitter so many wallets do not resend in step."""
    return _backoff(attempts) * random.uniform(*JITTER)


def longest_backoff(attempts: int) -> float:
    """The most `backoff_delay(attempts)` can be."""
    return _backoff(attempts) * JITTER[1]


def boot_clock() -> float:
    """Seconds on a clock nobody can set. CLOCK_BOOTTIME where there is one: unlike time.monotonic it keeps
    counting while the machine sleeps, so a queued payment still ages on a laptop that was shut for days."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


# ---- events for the UI -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Finished:
    entry: OutboxEntry          # status is final; replayed: the gateway had it already
    queued: bool = False        # it had waited in the queue (sent by a drain, not straight from the form)
    replayed: bool = False


@dataclass(frozen=True)
class Deferred:
    entry: OutboxEntry
    reason: str


@dataclass(frozen=True)
class WentOffline:
    reason: str


@dataclass(frozen=True)
class LoginRequired:
    reason: str


Event = Finished | Deferred | WentOffline | LoginRequired


@dataclass
class DrainReport:
    events: list[Event] = field(default_factory=list)
    sent: int = 0               # queued payments that reached a final outcome in this drain
    skipped: bool = False       # another drain was running


@dataclass
class _Timing:
    """One pending payment as this wallet times it, on the monotonic clock."""
    seen_at: float       # when this wallet first saw it
    age_then: float      # its age at that moment (from the wall clock, never negative)
    not_before: float    # not resent before this (backoff); 0: due

    def age(self, now: float) -> float:
        return self.age_then + (now - self.seen_at)


class SyncEngine:
    def __init__(self, gateway: Gateway, outbox: Outbox, token: Callable[[], str], *,
                 max_age: float, clock: Callable[[], float],
                 monotonic: Callable[[], float] = boot_clock) -> None:
        self.gateway = gateway
        self.outbox = outbox
        self.token = token
        self.max_age = max_age
        self.clock = clock
        self.monotonic = monotonic
        self._timings: dict[str, _Timing] = {}   # pending payments this wallet has seen (under _state)
        self.online = True             # a successful call (or health check) is the proof
        self.login_required = False
        self._state = threading.Lock()
        self._drain_lock = threading.Lock()
        self._in_flight: set[str] = set()   # being sent right now (at most one by a drain)
        self._reserved: set[str] = set()    # claimed by a drain's current batch, waiting for their turn

    @property
    def in_flight(self) -> frozenset[str]:
        """Payments being sent: the one whose request is out, and the rest of the drain's current batch."""
        with self._state:
            return frozenset(self._in_flight | self._reserved)

    def _timing(self, entry: OutboxEntry, now: float, wall: float) -> _Timing:
        """The payment's timing, made the first time this wallet sees it (call under `_state`). Its wall-clock
        fields are read this once: its age from `created_at`, and a not-before an earlier run persisted, which
        is honoured only while it is no further ahead than the payment's longest backoff. Further ahead, the
        clock was stepped back since it was written, and waiting for it would stall the resend by the step."""
        timing = self._timings.get(entry.key)
        if timing is None:
            wait = entry.next_attempt_at - wall
            if not 0 < wait <= longest_backoff(entry.attempts):
                wait = 0.0
            timing = _Timing(now, max(0.0, wall - entry.created_at), now + wait if wait else 0.0)
            self._timings[entry.key] = timing
        return timing

    def saw(self, entry: OutboxEntry) -> None:
        """Start timing a payment now (this wallet just queued it), not at the next poll."""
        now, wall = self.monotonic(), self.clock()
        with self._state:
            self._timing(entry, now, wall)

    def _track(self, pending: list[OutboxEntry]) -> dict[str, _Timing]:
        """The timing of each pending payment; the payments no longer pending are forgotten."""
        now, wall = self.monotonic(), self.clock()
        with self._state:
            self._timings = {e.key: self._timing(e, now, wall) for e in pending}
            return dict(self._timings)

    def set_online(self, online: bool, reason: str = "") -> list[Event]:
        with self._state:
            changed, self.online = self.online != online, online
        return [WentOffline(reason)] if changed and not online else []

    # ---- one payment ---------------------------------------------------------------------------------------
    def send(self, key: str, *, queued: bool = False) -> list[Event]:
        """Send one pending payment (with its stored key) and record what came of it."""
        with self._state:
            if key in self._in_flight or key in self._reserved:
                return []              # someone else is sending it right now
            self._in_flight.add(key)
        try:
            entry = self.outbox.record_attempt(key)   # durable before the request leaves
            if entry is None:
                return []
            outcome, replayed, transaction_id = self._pay(entry)
            return self._record(entry, outcome, queued, replayed, transaction_id)
        finally:
            with self._state:
                self._in_flight.discard(key)

    def _pay(self, entry: OutboxEntry) -> tuple[Classified, bool, str]:
        """One request with the entry's stored key: (outcome, replayed, transaction id). Records nothing."""
        try:
            result: PaymentReply | GatewayError = self.gateway.pay(
                self.token(), entry.key, entry.from_account, entry.to_account, entry.amount_paise)
        except GatewayError as exc:
            result = exc
        if isinstance(result, PaymentReply):
            return classify(result), result.replayed, result.transaction_id
        return classify(result), False, ""

    def _record(self, entry: OutboxEntry, outcome: Classified, queued: bool, replayed: bool,
                transaction_id: str) -> list[Event]:
        if outcome.kind == "final":
            self.set_online(True)
            done = self.outbox.finish(entry.key, outcome.status, outcome.message, transaction_id)
            return [Finished(done, queued, replayed)] if done else []
        return self._defer(entry, outcome)

    def _defer(self, entry: OutboxEntry, outcome: Classified) -> list[Event]:
        """No final outcome: the payment stays pending, to be resent later with the same key."""
        events: list[Event] = []
        if outcome.kind == "login":
            with self._state:
                first, self.login_required = not self.login_required, True
            if first:
                events.append(LoginRequired(outcome.message))
            self._set_not_before(entry, 0.0)
            deferred = self.outbox.defer(entry.key, "waiting for you to log in again", 0.0)
        else:
            if outcome.code in CONNECTIVITY:
                events += self.set_online(False, outcome.message)
            delay = backoff_delay(entry.attempts)
            self._set_not_before(entry, delay)
            # persisted for a restart only (see `_timing`); this run goes by the monotonic deadline
            deferred = self.outbox.defer(entry.key, outcome.message, self.clock() + delay)
        if deferred:
            events.append(Deferred(deferred, outcome.message))
        return events

    def _set_not_before(self, entry: OutboxEntry, delay: float) -> None:
        now = self.monotonic()
        with self._state:
            self._timing(entry, now, self.clock()).not_before = now + delay if delay else 0.0

    # ---- the queue -----------------------------------------------------------------------------------------
    def expire(self) -> list[Event]:
        """Pending payments older than max_age are not sent any more; each becomes `expired` (one write)."""
        pending = self.outbox.pending()
        timings = self._track(pending)
        now = self.monotonic()
        busy = self.in_flight
        expiring: list[tuple[str, str, str, str]] = []
        for entry in pending:
            if timings[entry.key].age(now) < self.max_age or entry.key in busy:
                continue
            note = ("it may have reached the gateway before expiring; check the history" if entry.maybe_sent
                    else "it was never sent")
            expiring.append((entry.key, "expired", f"older than the maximum age; {note}", ""))
        return [Finished(done, queued=True) for done in self.outbox.finish_many(expiring)]

    def drain(self, *, force: bool = False) -> DrainReport:
        """Send the queue oldest first, one payment at a time, in batches of DRAIN_BATCH (see there). `force`
        ignores backoff (the gateway just came back). Only one drain runs at a time; a final outcome never
        stops it, losing the gateway or the session does."""
        if not self._drain_lock.acquire(blocking=False):
            return DrainReport(skipped=True)
        report = DrainReport()
        try:
            report.events += self.expire()
            pending = self.outbox.pending()
            timings = self._track(pending)
            now = self.monotonic()
            due = [e for e in pending if force or timings[e.key].not_before <= now]
            for start in range(0, len(due), DRAIN_BATCH):
                if not self._may_send():
                    break
                self._drain_batch(due[start:start + DRAIN_BATCH], report)
        finally:
            self._drain_lock.release()
        return report

    def _may_send(self) -> bool:
        return self.online and not self.login_required

    def _drain_batch(self, batch: list[OutboxEntry], report: DrainReport) -> None:
        """Claim → send each → record the finals. The claim is one write that makes every payment of the batch
        uncancellable before the first of them leaves; the finals are one write after the last, and the user
        is told of them only once they are durable. If the wallet dies before that write, those payments are
        still pending with attempts > 0 and the next drain resends them with the same keys: the gateway
        replays the stored outcomes, nothing is paid twice, and the user is told then."""
        with self._state:
            keys = [e.key for e in batch if e.key not in self._in_flight and e.key not in self._reserved]
            self._reserved.update(keys)
        finals: list[tuple[str, str, str, str]] = []
        replayed: dict[str, bool] = {}
        try:
            claimed = self.outbox.record_attempts(keys)
            for i, entry in enumerate(claimed):
                if not self._may_send():
                    # never sent: give back their cancellability (an exception mid-send keeps it taken)
                    self.outbox.release_attempts(claimed[i:])
                    break
                with self._state:
                    self._reserved.discard(entry.key)
                    self._in_flight.add(entry.key)
                try:
                    outcome, was_replayed, transaction_id = self._pay(entry)
                finally:
                    with self._state:
                        self._in_flight.discard(entry.key)
                if outcome.kind == "final":
                    self.set_online(True)
                    finals.append((entry.key, outcome.status, outcome.message, transaction_id))
                    replayed[entry.key] = was_replayed
                else:
                    report.events += self._defer(entry, outcome)
        finally:
            try:
                done = self.outbox.finish_many(finals)
            finally:
                with self._state:
                    self._reserved.difference_update(keys)
        report.events += [Finished(entry, queued=True, replayed=replayed[entry.key]) for entry in done]
        report.sent += len(done)
