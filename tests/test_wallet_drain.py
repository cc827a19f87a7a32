"""How a drain writes the outbox: a batch of the oldest payments is marked "may have been sent" in one write
before any of them leaves, they go one at a time oldest first, their outcomes are written in one write, a
crash before that write costs nothing but a resend with the same keys, and payments claimed but never sent
stay cancellable."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from tests.harness import OPENING_TOTAL, PASSWORDS, REPO, Cluster
from tests.wallet_support import wallet_argv
from wallet_tui.core import WalletCore
from wallet_tui.gateway import GatewayError, GrpcGateway, PaymentReply
from wallet_tui.outbox import CannotCancel, Outbox
from wallet_tui.settings import parse_args
from wallet_tui.storage import AtomicJSONStorage
from wallet_tui.sync import DRAIN_BATCH, Deferred, Finished, SyncEngine


class RecordingGateway:
    """Answers every payment at once; records the order, the concurrency, and what the outbox file said about
    the payment at the moment its request left (read from disk, as a crash would leave it)."""

    def __init__(self, outbox_file: Path, fail_at: int | None = None) -> None:
        self.outbox_file = outbox_file
        self.fail_at = fail_at            # the n-th send (1-based) fails with UNAVAILABLE
        self.sent: list[str] = []
        self.attempts_on_disk: list[int] = []
        self.concurrent = self.max_concurrent = 0
        self._lock = threading.Lock()

    def pay(self, token: str, key: str, from_account: str, to_account: str, amount_paise: int) -> PaymentReply:
        with self._lock:
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            docs = json.loads(self.outbox_file.read_text())["pending"].values()
            self.attempts_on_disk.append(next(d["attempts"] for d in docs if d["key"] == key))
            self.sent.append(key)
            if len(self.sent) == self.fail_at:
                raise GatewayError(grpc.StatusCode.UNAVAILABLE, "connection reset")
            return PaymentReply("succeeded", f"txn-{len(self.sent)}", "paid", False)
        finally:
            with self._lock:
                self.concurrent -= 1


def queue(outbox: Outbox, count: int) -> list[str]:
    return [outbox.add("SBI-1001", "HDFC-2001", 100 + i).key for i in range(count)]


def test_drain_marks_a_batch_sent_before_it_leaves_and_rewrites_the_files_per_batch_not_per_payment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outbox = Outbox(tmp_path, "alice")
    keys = queue(outbox, 40)
    gateway = RecordingGateway(outbox.path)
    engine = SyncEngine(gateway, outbox, lambda: "token", max_age=3600, clock=outbox.clock)  # type: ignore[arg-type]
    writes: list[str] = []
    original_write = AtomicJSONStorage.write

    def counting_write(self: AtomicJSONStorage, data: dict) -> None:  # type: ignore[type-arg]
        writes.append(self.path.name)
        original_write(self, data)

    monkeypatch.setattr(AtomicJSONStorage, "write", counting_write)
    report = engine.drain(force=True)

    assert gateway.sent == keys                                  # oldest first, each once
    assert gateway.max_concurrent == 1                           # one payment in flight at a time
    assert gateway.attempts_on_disk == [1] * 40                  # "may have been sent" was durable before each
    assert report.sent == 40 and [e.entry.key for e in report.events if isinstance(e, Finished)] == keys
    assert outbox.pending() == [] and {e.key for e in outbox.finished(100)} == set(keys)
    batches = math.ceil(40 / DRAIN_BATCH)
    # per batch: the claim (hot file), the outcomes (finished file, then hot file)
    assert len(writes) == 3 * batches, writes
    outbox.close()


def test_payments_claimed_but_never_sent_stay_cancellable_when_the_link_drops_mid_batch(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, "alice")
    keys = queue(outbox, 6)
    gateway = RecordingGateway(outbox.path, fail_at=3)
    engine = SyncEngine(gateway, outbox, lambda: "token", max_age=3600, clock=outbox.clock)  # type: ignore[arg-type]
    report = engine.drain(force=True)

    assert gateway.sent == keys[:3] and not engine.online        # the third lost the link: the drain stops
    assert [e.entry.key for e in report.events if isinstance(e, Finished)] == keys[:2]
    assert [e.entry.key for e in report.events if isinstance(e, Deferred)] == [keys[2]]
    assert [(e.key, e.attempts) for e in outbox.pending()] == [(keys[2], 1)] + [(k, 0) for k in keys[3:]]
    with pytest.raises(CannotCancel, match="may have reached the gateway"):
        outbox.cancel(keys[2])
    for key in keys[3:]:                                         # claimed with the batch, never sent
        assert outbox.cancel(key).status == "cancelled"
    outbox.close()


KILLED_MID_BATCH = """
import os, signal, sys
from wallet_tui.core import WalletCore
from wallet_tui.gateway import GrpcGateway
from wallet_tui.outbox import Outbox
from wallet_tui.settings import parse_args
settings = parse_args(sys.argv[1:])
core = WalletCore(settings, GrpcGateway(settings.gateway, settings.ca_path))
core.login("alice", "alice-pw")
core.set_offline_mode(True)
keys = [core.submit("SBI-1001", "HDFC-2001", paise).key for paise in (100, 200, 300, 400, 500)]
print(" ".join(keys), flush=True)
core.set_offline_mode(False)
real_finish_many = Outbox.finish_many
def die_before_writing(self, outcomes):
    if outcomes:   # every payment of the batch has been sent and answered; their outcomes are not yet on disk
        os.kill(os.getpid(), signal.SIGKILL)
    return real_finish_many(self, outcomes)
Outbox.finish_many = die_before_writing
core.drain(force=True)
"""


def test_wallet_killed_before_the_batch_outcomes_are_written_resends_with_the_same_keys_and_pays_once(
        cluster: Cluster, tmp_path: Path) -> None:
    argv = wallet_argv(cluster, tmp_path)
    wallet = subprocess.run([sys.executable, "-c", KILLED_MID_BATCH, *argv], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert wallet.returncode == -signal.SIGKILL, wallet.stderr
    keys = wallet.stdout.split()
    assert len(keys) == 5 and cluster.balance("SBI-1001") == 500_000 - 1_500    # the sends went out

    settings = parse_args(argv)
    core = WalletCore(settings, GrpcGateway(settings.gateway, settings.ca_path))
    core.login("alice", PASSWORDS["alice"])
    assert core.outbox is not None
    assert [(e.key, e.attempts) for e in core.outbox.pending()] == [(k, 1) for k in keys]   # outcomes unknown
    with pytest.raises(CannotCancel):
        core.cancel(keys[0])
    report = core.drain(force=True)
    finished = [e for e in report.events if isinstance(e, Finished)]
    # the user is told every outcome; the gateway replayed each stored one instead of paying again
    assert [(e.entry.key, e.entry.status, e.replayed) for e in finished] == [(k, "succeeded", True) for k in keys]
    assert core.outbox.pending() == [] and report.sent == 5
    core.close()
    sent = sorted((p.idempotency_key, p.amount_paise) for p in cluster.client("alice").history())
    assert sent == sorted(zip(keys, (100, 200, 300, 400, 500)))
    assert cluster.balance("SBI-1001") == 500_000 - 1_500 and cluster.total() == OPENING_TOTAL


def test_finished_file_keeps_the_newest_outcomes_and_is_trimmed_in_steps(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import wallet_tui.outbox as outbox_module
    monkeypatch.setattr(outbox_module, "FINISHED_KEPT", 5)
    monkeypatch.setattr(outbox_module, "FINISHED_SLACK", 3)
    now = [1_900_000_000.0]
    outbox = Outbox(tmp_path, "alice", clock=lambda: now[0])
    keys = queue(outbox, 12)
    sizes = []
    for key in keys:
        now[0] += 1
        outbox.finish(key, "succeeded", "paid")
        sizes.append(len(outbox.finished(100)))
    assert sizes == [1, 2, 3, 4, 5, 6, 7, 8, 5, 6, 7, 8]       # trimmed back to 5 once it passed 5 + 3
    assert [e.key for e in outbox.finished(100)] == keys[::-1][:8]   # newest first, the oldest dropped
    outbox.close()
