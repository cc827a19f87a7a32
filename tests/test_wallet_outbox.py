"""The wallet's outbox and sync loop: crash safety of the file, kill -9 of a wallet, cancel, expiry, an
expired session, and how send outcomes are classified."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tests.harness import OPENING_TOTAL, PASSWORDS, REPO, Cluster
from tests.wallet_support import (Clocks, Toasts, history_statuses, login, pay, pending_count, table_rows, wait_for,
                                  wallet_argv)
from wallet_tui.app import make_app
from wallet_tui.core import WalletCore
from wallet_tui.gateway import GatewayError, GrpcGateway, PaymentReply
from wallet_tui.outbox import CannotCancel, Outbox
from wallet_tui.settings import parse_args
from wallet_tui.storage import AtomicJSONStorage
from wallet_tui.sync import classify

SIZE = (120, 36)


@pytest.mark.parametrize("code, kind, status", [
    (grpc.StatusCode.UNAVAILABLE, "retry", ""), (grpc.StatusCode.DEADLINE_EXCEEDED, "retry", ""),
    (grpc.StatusCode.ABORTED, "retry", ""), (grpc.StatusCode.CANCELLED, "retry", ""),
    (grpc.StatusCode.UNAUTHENTICATED, "login", ""), (grpc.StatusCode.INVALID_ARGUMENT, "final", "failed"),
    (grpc.StatusCode.PERMISSION_DENIED, "final", "failed"), (grpc.StatusCode.FAILED_PRECONDITION, "final", "failed"),
    (grpc.StatusCode.INTERNAL, "final", "failed"),
])
def test_send_errors_are_classified_as_the_contract_says(code: grpc.StatusCode, kind: str, status: str) -> None:
    outcome = classify(GatewayError(code, "x"))
    assert (outcome.kind, outcome.status) == (kind, status)


@pytest.mark.parametrize("status", ["succeeded", "declined", "failed"])
def test_every_response_is_final(status: str) -> None:
    assert classify(PaymentReply(status, "txn", "m", False)) == classify(PaymentReply(status, "txn", "m", True))
    assert classify(PaymentReply(status, "txn", "m", False)).kind == "final"
    assert classify(PaymentReply(status, "txn", "m", False)).status == status


WRITER = """
import sys
from pathlib import Path
from wallet_tui.outbox import Outbox
outbox = Outbox(Path(sys.argv[1]), "alice")
i = 0
while True:
    entry = outbox.add("SBI-1001", "HDFC-2001", 100 + i)
    if i % 2:
        outbox.finish(entry.key, "succeeded", "paid " * 50)
    i += 1
    print(i, flush=True)
"""


def test_outbox_file_is_never_corrupt_after_a_crash_mid_write(tmp_path: Path) -> None:
    """SIGKILL a process in a tight write loop, many times at different moments: the files always parse."""
    written = 0
    for round_ in range(6):
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                                 text=True)
        assert child.stdout is not None
        for _ in range(5 + 7 * round_):  # let it write a different number of times each round
            assert child.stdout.readline()
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        for name in ("alice.outbox.json", "alice.finished.json"):
            json.loads((tmp_path / name).read_text())           # the raw file is whole JSON …
            assert AtomicJSONStorage(tmp_path / name).read()    # … and TinyDB reads it
        outbox = Outbox(tmp_path, "alice")                      # and the outbox opens and is consistent
        pending, finished = outbox.pending(), outbox.finished(10_000)
        assert not {e.key for e in pending} & {e.key for e in finished}
        assert len(pending) + len(finished) >= written
        written = len(pending) + len(finished)
        outbox.close()


KILLED_WALLET = """
import sys, time
from wallet_tui.core import WalletCore
from wallet_tui.gateway import GrpcGateway
from wallet_tui.settings import parse_args
settings = parse_args(sys.argv[1:])
core = WalletCore(settings, GrpcGateway(settings.gateway, settings.ca_path))
core.login("alice", "alice-pw")
core.set_offline_mode(True)
keys = [core.submit("SBI-1001", "HDFC-2001", paise).key for paise in (1_100, 2_200)]
assert core.send_now(keys[0]) == []   # offline mode: queued, not sent
print(" ".join(keys), flush=True)
time.sleep(120)
"""


async def test_outbox_survives_kill_9_and_is_sent_after_the_next_login(cluster: Cluster, tmp_path: Path) -> None:
    argv = wallet_argv(cluster, tmp_path)
    wallet = subprocess.Popen([sys.executable, "-c", KILLED_WALLET, *argv], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    assert wallet.stdout is not None
    keys = wallet.stdout.readline().split()
    wallet.send_signal(signal.SIGKILL)
    assert wallet.wait(10) == -signal.SIGKILL and len(keys) == 2
    assert cluster.balance("SBI-1001") == 500_000

    toasts = Toasts()
    app = make_app(argv)
    async with app.run_test(size=SIZE, message_hook=toasts) as pilot:
        await login(pilot, "alice", PASSWORDS["alice"])
        await wait_for(pilot, lambda: len(toasts.titled("Payment sent")) == 2 and pending_count(app) == 0,
                       message="the payments left by the killed wallet")
        assert toasts.titled("Queued payments sent") == ["Sent 2 queued payments."]
    sent = {p.idempotency_key: p.amount_paise for p in cluster.client("alice").history()}
    assert sent == {keys[0]: 1_100, keys[1]: 2_200}  # sent with the keys made before the crash
    assert cluster.balance("SBI-1001") == 500_000 - 3_300
    assert cluster.total() == OPENING_TOTAL


async def test_a_never_sent_payment_can_be_cancelled(cluster: Cluster, tmp_path: Path) -> None:
    toasts = Toasts()
    app = make_app(wallet_argv(cluster, tmp_path))
    async with app.run_test(size=SIZE, message_hook=toasts) as pilot:
        await login(pilot, "alice", PASSWORDS["alice"])
        await pilot.press("ctrl+o")
        await pay(pilot, "HDFC-2001", "42")
        await wait_for(pilot, lambda: pending_count(app) == 1, message="queued")
        app.screen.query_one("#pending").focus()
        await pilot.press("c")
        await wait_for(pilot, lambda: toasts.titled("Payment cancelled"), message="the cancel toast")
        assert "₹42.00 to HDFC-2001" in toasts.titled("Payment cancelled")[0]
        await wait_for(pilot, lambda: pending_count(app) == 0 and history_statuses(app) == ["cancelled"],
                       message="a cancelled history row")
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: toasts.titled("Back online"), message="back online")
        assert toasts.titled("Back online") == ["Nothing was waiting."]
    assert cluster.balance("SBI-1001") == 500_000 and cluster.total() == OPENING_TOTAL


def test_a_payment_that_may_have_reached_the_gateway_cannot_be_cancelled(cluster: Cluster, tmp_path: Path
                                                                         ) -> None:
    settings = parse_args(wallet_argv(cluster, tmp_path, gateway="127.0.0.1:1"))  # nothing listens there
    core = WalletCore(settings, GrpcGateway(settings.gateway, settings.ca_path))
    core.open_offline("alice", ("SBI-1001",))
    core.engine.login_required = False
    entry = core.submit("SBI-1001", "HDFC-2001", 500)
    events = core.engine.send(entry.key)             # the send leaves, the outcome is unknown
    assert core.outbox.get(entry.key).attempts == 1 and core.pending_rows()[0].state == "retrying"
    assert any(type(e).__name__ == "Deferred" for e in events)
    with pytest.raises(CannotCancel, match="may have reached the gateway"):
        core.cancel(entry.key)
    assert [e.key for e in core.outbox.pending()] == [entry.key]   # still pending, to be resent
    core.close()


async def test_queued_payment_older_than_max_age_expires_and_is_not_sent(cluster: Cluster, tmp_path: Path
                                                                         ) -> None:
    clocks = Clocks()
    toasts = Toasts()
    app = make_app(wallet_argv(cluster, tmp_path, extra=("--max-age", "3600")), clock=clocks.wall,
                   monotonic=clocks.monotonic)
    async with app.run_test(size=SIZE, message_hook=toasts) as pilot:
        await login(pilot, "alice", PASSWORDS["alice"])
        await pilot.press("ctrl+o")
        await pay(pilot, "HDFC-2001", "15")
        await pay(pilot, "HDFC-2001", "16")
        await wait_for(pilot, lambda: pending_count(app) == 2, message="queued")
        clocks.advance(1800)
        await pay(pilot, "HDFC-2001", "17")            # younger: survives
        await wait_for(pilot, lambda: pending_count(app) == 3, message="queued")
        clocks.advance(1801)                           # the first two are now older than an hour
        await wait_for(pilot, lambda: len(toasts.titled("Payment expired")) == 2, message="expiry toasts")
        assert all("never sent" in t for t in toasts.titled("Payment expired"))
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: pending_count(app) == 0 and toasts.titled("Payment sent"), message="sent")
        await wait_for(pilot, lambda: sorted(history_statuses(app)) == ["expired", "expired", "succeeded"],
                       message="history")
        assert [row[3] for row in table_rows(app, "#history") if row[4] == "succeeded"] == ["₹17.00"]
    assert cluster.balance("SBI-1001") == 500_000 - 1_700 and cluster.total() == OPENING_TOTAL


async def test_expired_session_holds_the_queue_until_the_user_logs_in_again(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster(gateway_args=["--token-ttl", "3"])
    toasts = Toasts()
    app = make_app(wallet_argv(cluster, tmp_path))
    async with app.run_test(size=SIZE, message_hook=toasts) as pilot:
        await login(pilot, "alice", PASSWORDS["alice"])
        await wait_for(pilot, lambda: type(app.screen).__name__ == "LoginScreen", timeout=10,
                       message="the log-in-again screen")
        assert app.core.connectivity == "login-required" and toasts.titled("Log in again")
        main = app.screen_stack[-2]
        assert "session expired" in str(main.query_one("#connectivity").render())
        # a payment made meanwhile (e.g. submitted just before) waits in the queue
        entry = app.core.submit("SBI-1001", "HDFC-2001", 900)
        assert app.core.send_now(entry.key) == [] and cluster.balance("SBI-1001") == 500_000
        from textual.widgets import Input
        assert app.screen.query_one("#username", Input).value == "alice"
        app.screen.query_one("#password", Input).value = PASSWORDS["alice"]
        app.screen.query_one("#password", Input).focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: toasts.titled("Payment sent"), message="the queued payment sent")
        assert type(app.screen).__name__ == "MainScreen"
    assert cluster.balance("SBI-1001") == 500_000 - 900 and cluster.total() == OPENING_TOTAL


def test_the_headless_core_does_not_import_textual() -> None:
    code = ("import sys, wallet_tui.core, wallet_tui.sync, wallet_tui.outbox, wallet_tui.gateway, "
            "wallet_tui.storage; assert not [m for m in sys.modules if m.split('.')[0] == 'textual']")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
