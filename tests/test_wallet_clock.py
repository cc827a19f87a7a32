"""Wall-clock steps (NTP, a user setting the clock) do not govern the wallet's timing: a resend deferred after
ABORTED happens after its backoff even when the clock is stepped back; a not-before persisted by an earlier
run is honoured only while it is plausible; a payment's age for expiry counts real time, so a step neither
expires it early nor keeps it alive."""
from __future__ import annotations

from pathlib import Path

import grpc
import pytest

import wallet_tui.sync as sync
from tests.harness import wait_until
from tests.wallet_support import Clocks
from wallet_tui.gateway import GatewayError, PaymentReply
from wallet_tui.outbox import Outbox
from wallet_tui.sync import SyncEngine, longest_backoff

HOUR = 3600.0


class AbortsFirst:
    """A gateway that answers ABORTED (payment busy, try again) the first `aborts` times, then pays. A real
    gateway gives ABORTED only under a race, not on demand."""

    def __init__(self, aborts: int = 1) -> None:
        self.aborts = aborts
        self.sent: list[str] = []

    def pay(self, token: str, key: str, from_account: str, to_account: str, amount_paise: int) -> PaymentReply:
        self.sent.append(key)
        if len(self.sent) <= self.aborts:
            raise GatewayError(grpc.StatusCode.ABORTED, "another request with this key is in progress")
        return PaymentReply("succeeded", f"txn-{len(self.sent)}", "paid", False)


def engine_for(outbox: Outbox, gateway: AbortsFirst, clocks: Clocks | None = None,
               max_age: float = 72 * HOUR) -> SyncEngine:
    if clocks is None:
        return SyncEngine(gateway, outbox, lambda: "token", max_age=max_age, clock=outbox.clock)  # type: ignore
    return SyncEngine(gateway, outbox, lambda: "token", max_age=max_age, clock=clocks.wall,  # type: ignore
                      monotonic=clocks.monotonic)


def test_resend_after_aborted_happens_after_the_backoff_though_the_clock_steps_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against the real monotonic clock: a short backoff, and the wall clock stepped back an hour."""
    monkeypatch.setattr(sync, "BACKOFF_BASE", 0.05)
    wall = [1_900_000_000.0]
    outbox = Outbox(tmp_path, "alice", clock=lambda: wall[0])
    key = outbox.add("SBI-1001", "HDFC-2001", 700).key
    gateway = AbortsFirst()
    engine = engine_for(outbox, gateway)
    engine.drain()
    assert gateway.sent == [key] and outbox.get(key).status == "pending"   # ABORTED: deferred, not final
    wall[0] -= HOUR
    wait_until(lambda: engine.drain() and outbox.get(key).status == "succeeded", timeout=5,
               message="the resend after the backoff")
    assert gateway.sent == [key, key]                                     # resent once, with the same key
    outbox.close()


def test_resend_waits_for_its_backoff_and_no_longer_whatever_the_wall_clock_does(tmp_path: Path) -> None:
    clocks = Clocks()
    outbox = Outbox(tmp_path, "alice", clock=clocks.wall)
    key = outbox.add("SBI-1001", "HDFC-2001", 700).key
    gateway = AbortsFirst(aborts=2)
    engine = engine_for(outbox, gateway, clocks)
    engine.drain()                                # attempt 1: ABORTED, backoff ≤ longest_backoff(1)
    clocks.step_wall(-HOUR)
    engine.drain()
    assert gateway.sent == [key]                  # not before its backoff …
    clocks.advance(longest_backoff(1))
    engine.drain()                                # … and right after it: attempt 2, ABORTED again
    clocks.step_wall(+HOUR)                       # a step forward does not cut the next backoff short
    engine.drain()
    assert gateway.sent == [key, key]
    clocks.advance(longest_backoff(2))
    engine.drain()
    assert gateway.sent == [key, key, key] and outbox.get(key).status == "succeeded"
    outbox.close()


def test_a_persisted_not_before_is_honoured_after_a_restart_only_while_it_is_plausible(tmp_path: Path) -> None:
    clocks = Clocks()
    outbox = Outbox(tmp_path, "alice", clock=clocks.wall)
    plausible, stale = (outbox.add("SBI-1001", "HDFC-2001", paise).key for paise in (100, 200))
    outbox.record_attempts([plausible, stale])
    # written by an earlier run: one resend due in 1 s (within attempt 1's backoff); one due an hour from
    # now, which no backoff gives: the clock was stepped back by an hour since it was written
    outbox.defer(plausible, "aborted", clocks.wall() + 1.0)
    outbox.defer(stale, "aborted", clocks.wall() + HOUR)
    gateway = AbortsFirst(aborts=0)
    engine = engine_for(outbox, gateway, clocks)   # the restarted wallet
    engine.drain()
    assert gateway.sent == [stale]                 # not stalled for an hour
    clocks.advance(1.0)
    engine.drain()
    assert gateway.sent == [stale, plausible] and outbox.pending() == []
    outbox.close()


def test_a_payment_ages_in_real_time_whatever_the_wall_clock_does(tmp_path: Path) -> None:
    clocks = Clocks()
    outbox = Outbox(tmp_path, "alice", clock=clocks.wall)
    key = outbox.add("SBI-1001", "HDFC-2001", 900).key
    engine = engine_for(outbox, AbortsFirst(), clocks, max_age=HOUR)
    assert engine.expire() == []                   # a poll: the wallet has seen the payment
    clocks.step_wall(+2 * HOUR)                    # the clock jumps ahead: the payment is not an hour old
    assert engine.expire() == [] and [e.key for e in outbox.pending()] == [key]
    clocks.step_wall(-3 * HOUR)                    # … and back, past its creation: it still ages
    clocks.advance(HOUR - 1)
    assert engine.expire() == []
    clocks.advance(1)
    [expired] = engine.expire()
    assert expired.entry.key == key and expired.entry.status == "expired" and outbox.pending() == []
    outbox.close()


def test_outcomes_written_after_a_step_back_are_still_the_newest_and_kept_when_trimming(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wallet_tui.outbox as outbox_module
    monkeypatch.setattr(outbox_module, "FINISHED_KEPT", 2)
    monkeypatch.setattr(outbox_module, "FINISHED_SLACK", 0)
    clocks = Clocks()
    outbox = Outbox(tmp_path, "alice", clock=clocks.wall)
    keys = [outbox.add("SBI-1001", "HDFC-2001", paise).key for paise in (100, 200, 300)]
    outbox.finish(keys[0], "succeeded")
    clocks.step_wall(-HOUR)                        # the next outcomes carry earlier times than the first
    outbox.finish(keys[1], "succeeded")
    assert [e.key for e in outbox.finished()] == [keys[1], keys[0]]
    outbox.finish(keys[2], "succeeded")            # one too many: the oldest written goes
    assert [e.key for e in outbox.finished()] == [keys[2], keys[1]]
    outbox.close()
