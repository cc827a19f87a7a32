"""Two wallets of one user on one data directory (two terminals): real processes sharing the outbox files.
Every payment either one queues is kept, every final record either one writes is kept, neither overwrites the
other, and when both drain the same queue each payment is paid once and reported once; files of older wallets
(TinyDB's counter as id) are re-keyed. Also: a payment that cannot be written to the outbox stays in the form,
and the user is told why."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.harness import OPENING_TOTAL, REPO, Cluster
from tests.wallet_support import FakeGateway, Toasts, fake_app, login, pay, wait_for, wallet_argv
from wallet_tui.outbox import Outbox
from wallet_tui.storage import AtomicJSONStorage

SIZE = (120, 36)

# One wallet's outbox, driven one JSON command per line: each reply is ["ok", result] or ["error", repr].
OUTBOX_DRIVER = """
import json, sys
from pathlib import Path
from wallet_tui.outbox import Outbox
name, base = sys.argv[2], int(sys.argv[3])
outbox = Outbox(Path(sys.argv[1]), "alice")

def finish(keys):
    outcomes = [(k, "succeeded", "paid by " + name, "txn-" + k) for k in keys]
    return [e.key for e in outbox.finish_many(outcomes)]

def loop(count):
    # add `count` payments; claim every 4th (a read-modify-write of the hot file); finish them in pairs
    keys = []
    for i in range(count):
        keys.append(outbox.add("SBI-1001", "HDFC-2001", base + i).key)
        if i % 4 == 2:
            assert [e.key for e in outbox.record_attempts([keys[-1]])] == [keys[-1]]
        if i % 2:
            assert finish(keys[-2:]) == keys[-2:]
    return keys

print("ready", flush=True)
for line in sys.stdin:
    op, arg = json.loads(line)
    try:
        if op == "add":
            result = outbox.add("SBI-1001", "HDFC-2001", arg).key
        elif op == "finish":
            result = finish(arg)
        else:
            result = loop(arg)
        reply = ["ok", result]
    except Exception as exc:
        reply = ["error", repr(exc)]
    print(json.dumps(reply), flush=True)
"""


class Wallet:
    """A child process that owns an Outbox (or a WalletCore) and answers commands one line at a time."""

    def __init__(self, script: str, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self._line() == "ready"

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            assert self.proc.stderr is not None
            raise AssertionError(f"the wallet process died: {self.proc.stderr.read()}")
        return line.strip()

    def start(self, op: str, arg: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps([op, arg]) + "\n")
        self.proc.stdin.flush()

    def reply(self) -> Any:
        status, result = json.loads(self._line())
        assert status == "ok", result
        return result

    def __call__(self, op: str, arg: Any) -> Any:
        self.start(op, arg)
        return self.reply()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(30)


@pytest.fixture
def two_wallets(tmp_path: Path) -> Iterator[tuple[Wallet, Wallet]]:
    a = Wallet(OUTBOX_DRIVER, str(tmp_path), "A", "100000")
    b = Wallet(OUTBOX_DRIVER, str(tmp_path), "B", "200000")
    yield a, b
    a.close()
    b.close()


def read_outbox(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    outbox = Outbox(directory, "alice")
    try:
        return ({e.key: e for e in outbox.pending()}, {e.key: e for e in outbox.finished(10_000)})
    finally:
        outbox.close()


def test_two_wallets_adding_in_turn_both_keep_every_payment(tmp_path: Path,
                                                            two_wallets: tuple[Wallet, Wallet]) -> None:
    a, b = two_wallets
    added = {a("add", 1_001): 1_001, b("add", 2_001): 2_001, a("add", 1_002): 1_002, b("add", 2_002): 2_002}
    pending, finished = read_outbox(tmp_path)
    assert {k: e.amount_paise for k, e in pending.items()} == added and not finished


def test_two_wallets_finishing_in_turn_overwrite_no_final_record(tmp_path: Path,
                                                                two_wallets: tuple[Wallet, Wallet]) -> None:
    a, b = two_wallets
    a1, a2, b1 = a("add", 1_001), a("add", 1_002), b("add", 2_001)
    assert a("finish", [a1]) == [a1]
    assert b("finish", [b1]) == [b1]
    assert a("finish", [a2]) == [a2]
    assert b("finish", [a1]) == []        # finished already (by A): B must not write a second record for it
    pending, finished = read_outbox(tmp_path)
    assert not pending
    assert {k: (e.amount_paise, e.status, e.message, e.transaction_id) for k, e in finished.items()} == {
        a1: (1_001, "succeeded", "paid by A", f"txn-{a1}"), a2: (1_002, "succeeded", "paid by A", f"txn-{a2}"),
        b1: (2_001, "succeeded", "paid by B", f"txn-{b1}")}


def test_two_wallets_writing_at_the_same_time_lose_nothing(tmp_path: Path,
                                                           two_wallets: tuple[Wallet, Wallet]) -> None:
    count = 41   # the last payment of each stays pending
    a, b = two_wallets
    a.start("loop", count)
    b.start("loop", count)
    keys = {"A": a.reply(), "B": b.reply()}
    pending, finished = read_outbox(tmp_path)
    assert len(pending) == 2 and len(finished) == 2 * (count - 1)
    for name, base in (("A", 100_000), ("B", 200_000)):
        for i, key in enumerate(keys[name]):
            entry = pending[key] if i == count - 1 else finished[key]
            assert entry.amount_paise == base + i
            assert entry.attempts == (1 if i % 4 == 2 else 0)      # no claim lost to the other's rewrite
            if i < count - 1:
                assert (entry.status, entry.message, entry.transaction_id) == (
                    "succeeded", f"paid by {name}", f"txn-{key}")


def test_outbox_written_by_an_older_wallet_is_rekeyed_and_keeps_everything(tmp_path: Path) -> None:
    """Older wallets used TinyDB's counter ("1", "2", …) as the record id; the idempotency key is the id now."""
    docs = [{"key": f"old-key-{i}", "from_account": "SBI-1001", "to_account": "HDFC-2001", "amount_paise": 100 * i,
             "created_at": 1_900_000_000.0 + i, "attempts": i % 2} for i in (1, 2, 3)]
    (tmp_path / "alice.outbox.json").write_text(json.dumps({"pending": {str(i): d for i, d in enumerate(docs, 1)}}))
    (tmp_path / "alice.finished.json").write_text(json.dumps({"finished": {"1": {
        **docs[2], "status": "succeeded", "finished_at": 1_900_000_100.0}}}))   # a move a crash cut short
    outbox = Outbox(tmp_path, "alice")
    assert [(e.key, e.amount_paise, e.attempts) for e in outbox.pending()] == [("old-key-1", 100, 1),
                                                                               ("old-key-2", 200, 0)]
    assert [e.key for e in outbox.finished()] == ["old-key-3"] and outbox.take_repairs() == []
    assert sorted(json.loads((tmp_path / "alice.outbox.json").read_text())["pending"]) == ["old-key-1",
                                                                                           "old-key-2"]
    assert outbox.finish("old-key-2", "succeeded").status == "succeeded"
    outbox.close()


# Two real wallets (WalletCore) of alice against a real gateway: they queue in turn, then both drain.
CORE_DRIVER = """
import json, sys, time
from wallet_tui.core import WalletCore
from wallet_tui.gateway import GrpcGateway
from wallet_tui.settings import parse_args
from wallet_tui.sync import Finished
settings = parse_args(sys.argv[1:])
core = WalletCore(settings, GrpcGateway(settings.gateway, settings.ca_path))
core.login("alice", "alice-pw")
core.set_offline_mode(True)
print("ready", flush=True)
for line in sys.stdin:
    op, arg = json.loads(line)
    try:
        if op == "submit":
            result = [core.submit("SBI-1001", "HDFC-2001", paise).key for paise in arg]
        else:   # drain like the poll loop does, until the queue (shared with the other wallet) is empty
            core.set_offline_mode(False)
            deadline, finished = time.monotonic() + 60, []
            while core.outbox.pending() and time.monotonic() < deadline:
                report = core.drain(force=False)
                finished += [e.entry.key for e in report.events if isinstance(e, Finished)]
                time.sleep(0.05)   # the poll interval
            result = finished
        reply = ["ok", result]
    except Exception as exc:
        reply = ["error", repr(exc)]
    print(json.dumps(reply), flush=True)
"""


def test_two_wallets_draining_one_queue_pay_each_payment_once(cluster: Cluster, tmp_path: Path) -> None:
    argv = wallet_argv(cluster, tmp_path)
    a, b = Wallet(CORE_DRIVER, *argv), Wallet(CORE_DRIVER, *argv)
    try:
        amounts = {}
        for wallet, paise in ((a, [101, 102, 103, 104, 105]), (b, [201, 202, 203, 204, 205]),
                              (a, [106, 107, 108, 109, 110])):
            amounts.update(zip(wallet("submit", paise), paise))
        a.start("drain", None)
        b.start("drain", None)
        reported = a.reply() + b.reply()
    finally:
        a.close()
        b.close()
    assert sorted(reported) == sorted(amounts)          # each outcome reported once, by one of the two
    pending, finished = read_outbox(tmp_path / "wallet")
    assert not pending
    assert {k: (e.amount_paise, e.status) for k, e in finished.items()} == {
        k: (p, "succeeded") for k, p in amounts.items()}
    paid = [(p.idempotency_key, p.amount_paise) for p in cluster.client("alice").history()]
    assert sorted(paid) == sorted(amounts.items())     # each key paid once
    assert cluster.balance("SBI-1001") == 500_000 - sum(amounts.values())
    assert cluster.total() == OPENING_TOTAL and cluster.holds() == 0


async def test_a_payment_that_cannot_be_queued_stays_in_the_form_and_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toasts = Toasts()
    app = fake_app(tmp_path, FakeGateway())
    async with app.run_test(size=SIZE, message_hook=toasts) as pilot:
        await login(pilot, "alice", "alice123")
        original_write = AtomicJSONStorage.write

        def disk_full(self: AtomicJSONStorage, data: dict) -> None:  # type: ignore[type-arg]
            # a full disk cannot be had on demand here; the write fails as os.write would
            raise OSError(28, "No space left on device", str(self.path))

        monkeypatch.setattr(AtomicJSONStorage, "write", disk_full)
        await pay(pilot, "HDFC-2001", "12.50")
        await wait_for(pilot, lambda: toasts.titled("Payment not queued"), message="the not-queued toast")
        [toast] = toasts.titled("Payment not queued")
        assert "No space left on device" in toast and "still in the form" in toast
        form_error = str(app.screen.query_one("#form-error").render())
        assert "No space left on device" in form_error
        assert app.screen.query_one("#to-account").value == "HDFC-2001"     # nothing typed is lost
        assert app.screen.query_one("#amount").value == "12.50"
        assert app.core.outbox.pending() == [] and app.screen.query_one("#pending").row_count == 0

        monkeypatch.setattr(AtomicJSONStorage, "write", original_write)   # space again: the same form works
        await pilot.press("enter")
        await wait_for(pilot, lambda: toasts.titled("Payment sent"), message="the payment sent")
        assert app.screen.query_one("#amount").value == ""
        assert [p[3] for p in app.core.gateway.paid] == [1_250]
