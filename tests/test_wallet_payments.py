"""The wallet against real servers (Pilot): log in, balances, paying online, form validation, offline queueing
and draining, a lost reply resent with the same key, a declined queued payment, offline mode."""
from __future__ import annotations

import time
from pathlib import Path

from textual.widgets import Input

from tests.harness import OPENING_TOTAL, PASSWORDS, Cluster
from tests.tcpproxy import TcpProxy
from tests.wallet_support import (POLL, Toasts, history_statuses, login, pay, pending_count, screen_name,
                                  table_rows, wait_for, wallet_argv)
from wallet_tui.app import make_app

SIZE = (120, 36)


async def test_login_with_right_password_shows_balances(cluster: Cluster, tmp_path: Path) -> None:
    app = make_app(wallet_argv(cluster, tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        await login(pilot, "alice", PASSWORDS["alice"])
        rows = {row[0]: row for row in table_rows(app, "#balances")}
        assert rows["SBI-1001"][1] == "₹5,000.00" and rows["HDFC-2002"][1] == "₹1,500.00"
        assert "online" in str(app.screen.query_one("#connectivity").render())
        assert app.screen.query_one("#from-account").value == "SBI-1001"


async def test_login_with_wrong_password_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    app = make_app(wallet_argv(cluster, tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        await login(pilot, "alice", "not-her-password", expect_main=False)
        error = app.screen.query_one("#login-error")
        await wait_for(pilot, lambda: "Wrong username or password" in str(error.render()), message="error")
        assert screen_name(app) == "LoginScreen"
        assert app.screen.query_one("#password", Input).value == ""


async def test_online_payment_moves_money_once_with_toast_and_history_row(cluster: Cluster, tmp_path: Path
                                                                          ) -> None:
    toasts = Toasts()
    app = make_app(wallet_argv(cluster, tmp_path))
    async with app.run_test(size=SIZE, message_hook=toasts) as pilot:
        await login(pilot, "alice", PASSWORDS["alice"])
        await pay(pilot, "HDFC-2001", "123.45")
        await wait_for(pilot, lambda: toasts.titled("Payment sent"), message="the success toast")
        assert "₹123.45 to HDFC-2001" in toasts.titled("Payment sent")[0]
        await wait_for(pilot, lambda: "succeeded" in history_statuses(app), message="a history row")
        row = table_rows(app, "#history")[0]
        assert row[2:] == ["HDFC-2001", "₹123.45", "succeeded"]
        await wait_for(pilot, lambda: ["SBI-1001", "₹4,876.55", "₹4,876.55"] in table_rows(app, "#balances"),
                       message="the new balance")
    assert cluster.balance("SBI-1001") == 500_000 - 12_345
    assert cluster.balance("HDFC-2001") == 300_000 + 12_345
    assert cluster.total() == OPENING_TOTAL and cluster.holds() == 0


async def test_form_validation_changes_nothing(cluster: Cluster, tmp_path: Path) -> None:
    app = make_app(wallet_argv(cluster, tmp_path, poll=5))
    before = cluster.accounts()
    async with app.run_test(size=SIZE) as pilot:
        await login(pilot, "alice", PASSWORDS["alice"])
        error = app.screen.query_one("#form-error")
        cases = [("HDFC-2001", "abc", "must be a number"), ("HDFC-2001", "0", "more than zero"),
                 ("HDFC-2001", "-5", "must be a number"), ("HDFC-2001", "1.234", "2 decimal places"),
                 ("SBI-1001", "10", "the account you are paying from"), ("", "10", "enter the account"),
                 ("HDFC-2001", "", "enter an amount"), ("nonsense", "10", "BANK-digits")]
        for to_account, amount, expected in cases:
            await pay(pilot, to_account, amount)
            await wait_for(pilot, lambda: expected in str(error.render()), message=f"error {expected!r}")
        app.screen.query_one("#from-account").clear()
        await pay(pilot, "HDFC-2001", "10")
        await wait_for(pilot, lambda: "choose the account" in str(error.render()), message="from error")
        assert pending_count(app) == 0 and not app.core.outbox.pending() and not app.core.outbox.finished()
    assert cluster.accounts() == before


async def test_offline_payments_queue_and_drain_once_when_the_link_returns(cluster: Cluster, tmp_path: Path
                                                                          ) -> None:
    proxy = TcpProxy(cluster.gateway_port)
    toasts = Toasts()
    app = make_app(wallet_argv(cluster, tmp_path, gateway=proxy.address))
    async with app.run_test(size=SIZE, message_hook=toasts) as pilot:
        await login(pilot, "alice", PASSWORDS["alice"])
        proxy.cut()
        await wait_for(pilot, lambda: app.core.connectivity == "offline", message="offline")
        await wait_for(pilot, lambda: toasts.titled("Offline"), message="the offline toast")
        for amount in ("10", "20", "30"):
            await pay(pilot, "HDFC-2001", amount)
        await wait_for(pilot, lambda: pending_count(app) == 3, message="3 queued payments")
        assert [row[4] for row in table_rows(app, "#pending")] == ["queued"] * 3
        assert cluster.balance("SBI-1001") == 500_000
        restored = time.monotonic()
        proxy.restore()
        await wait_for(pilot, lambda: pending_count(app) == 0 and len(toasts.titled("Payment sent")) == 3,
                       timeout=10, message="the queue drained")
        assert time.monotonic() - restored < 2 * POLL + 1.0  # the drain starts within two poll intervals
        assert toasts.titled("Back online") == ["Sent 3 queued payments."]
        assert sorted(toasts.titled("Payment sent")) == sorted(
            f"₹{a}.00 to HDFC-2001 from SBI-1001: paid." for a in ("10", "20", "30"))
    proxy.close()
    assert cluster.balance("SBI-1001") == 500_000 - 6_000
    assert cluster.balance("HDFC-2001") == 300_000 + 6_000
    assert cluster.total() == OPENING_TOTAL and cluster.holds() == 0


async def test_lost_reply_is_resent_with_the_same_key_and_debits_once(cluster: Cluster, tmp_path: Path) -> None:
    proxy = TcpProxy(cluster.gateway_port)
    toasts = Toasts()
    # A slower poll, so that the one reply lost is the payment's and not a poll's.
    app = make_app(wallet_argv(cluster, tmp_path, gateway=proxy.address, poll=1.0))
    async with app.run_test(size=SIZE, message_hook=toasts) as pilot:
        await login(pilot, "alice", PASSWORDS["alice"])
        await wait_for(pilot, lambda: app.screen.polls >= 1, message="the first poll")
        await app.workers.wait_for_complete()
        proxy.drop_replies(1, min_bytes=100)  # HTTP/2 control frames pass: the reply lost is a call's
        await pay(pilot, "HDFC-2001", "77")
        await wait_for(pilot, lambda: toasts.titled("Payment sent"), message="the payment to finish")
        assert proxy.dropped_replies >= 1
        [entry] = app.core.outbox.finished()
        assert entry.status == "succeeded" and entry.attempts >= 2  # resent …
    proxy.close()
    keys = [p.idempotency_key for p in cluster.client("alice").history() if p.amount_paise == 7_700]
    assert keys == [entry.key]                                       # … with the same key: one payment
    assert cluster.balance("SBI-1001") == 500_000 - 7_700            # one debit
    assert cluster.total() == OPENING_TOTAL and cluster.holds() == 0


async def test_declined_queued_payment_is_reported_and_does_not_block_the_rest(cluster: Cluster, tmp_path: Path
                                                                              ) -> None:
    toasts = Toasts()
    app = make_app(wallet_argv(cluster, tmp_path))
    async with app.run_test(size=SIZE, message_hook=toasts) as pilot:
        await login(pilot, "alice", PASSWORDS["alice"])
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: app.core.connectivity == "offline-mode", message="offline mode")
        for amount in ("100", "9999", "200"):  # the middle one is more than SBI-1001 holds
            await pay(pilot, "HDFC-2001", amount)
        await wait_for(pilot, lambda: pending_count(app) == 3, message="3 queued")
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: pending_count(app) == 0 and len(toasts.titled("Payment sent")) == 2,
                       message="the queue drained")
        [declined] = toasts.titled("Payment declined")
        assert "₹9,999.00 to HDFC-2001" in declined and "insufficient funds" in declined
        await wait_for(pilot, lambda: sorted(history_statuses(app)) == ["declined", "succeeded", "succeeded"],
                       message="history")
    assert cluster.balance("SBI-1001") == 500_000 - 30_000
    assert cluster.total() == OPENING_TOTAL and cluster.holds() == 0


async def test_offline_mode_queues_everything_until_turned_off(cluster: Cluster, tmp_path: Path) -> None:
    toasts = Toasts()
    app = make_app(wallet_argv(cluster, tmp_path))
    async with app.run_test(size=SIZE, message_hook=toasts) as pilot:
        await login(pilot, "alice", PASSWORDS["alice"])
        await pilot.press("ctrl+o")
        assert "offline mode" in str(app.screen.query_one("#connectivity").render())
        await pay(pilot, "HDFC-2001", "5")
        await wait_for(pilot, lambda: toasts.titled("Payment queued"), message="queued toast")
        polls = app.screen.polls
        await wait_for(pilot, lambda: app.screen.polls >= polls + 3, message="three more polls")
        assert pending_count(app) == 1 and cluster.balance("SBI-1001") == 500_000  # the gateway is up: still held
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: pending_count(app) == 0 and toasts.titled("Payment sent"), message="sent")
        assert toasts.titled("Back online") == ["Sent 1 queued payment."]
    assert cluster.balance("SBI-1001") == 500_000 - 500
    assert cluster.total() == OPENING_TOTAL
