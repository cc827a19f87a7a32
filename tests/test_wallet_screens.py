"""Screens with a deterministic fake gateway: the poll never overlaps itself, a payment made online is sent
without waiting for a health check, and snapshots of the login and main screens."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from textual import events
from textual.pilot import Pilot
from textual.widgets import Input, Select

from tests.wallet_support import FakeGateway, Toasts, fake_app, login, pay, screen_name, wait_for

SIZE = (120, 36)


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


async def test_polls_never_overlap_even_when_slower_than_the_interval(tmp_path: Path) -> None:
    gateway = FakeGateway(health_delay=0.1)
    app = fake_app(tmp_path, gateway, poll=0.01)   # the check takes 10× the interval
    async with app.run_test(size=SIZE) as pilot:
        await login(pilot, "alice", "alice123")
        for _ in range(5):                          # "refresh" asks for a poll while one is running
            await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: gateway.health_calls >= 8, message="eight polls")
    assert gateway.max_concurrent == 1


async def test_payment_made_online_is_sent_at_once_without_a_health_check(tmp_path: Path) -> None:
    gateway = FakeGateway()
    toasts = Toasts()
    app = fake_app(tmp_path, gateway)               # one poll at login, the next in an hour
    async with app.run_test(size=SIZE, message_hook=toasts) as pilot:
        await login(pilot, "alice", "alice123")
        await wait_for(pilot, lambda: app.screen.polls == 1, message="the login poll")
        checks = gateway.health_calls
        await pay(pilot, "HDFC-2001", "1")
        await wait_for(pilot, lambda: toasts.titled("Payment sent"), message="sent")
        assert gateway.health_calls == checks and len(gateway.paid) == 1
        key = gateway.paid[0][0]
        assert app.core.outbox.get(key).status == "succeeded"   # the key sent is the one in the outbox


@pytest.mark.parametrize("between", ["tab", "enter"])
async def test_a_login_typed_all_at_once_lands_in_the_right_fields(tmp_path: Path, between: str) -> None:
    """A password manager's auto-type (or a paste) delivers "user<Tab>password<Enter>" faster than the screen
    reacts: every key must still land where it would have, typed one by one."""
    gateway = FakeGateway()
    app = fake_app(tmp_path, gateway)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: screen_name(app) == "LoginScreen", message="the login screen")
        typed = [*"alice", between, *"alice123", "enter"]
        for key in typed:  # all queued before the app handles the first
            app.post_message(events.Key(key, key if len(key) == 1 else None))
        await wait_for(pilot, lambda: screen_name(app) == "MainScreen", message="logged in")
        assert app.core.session is not None and app.core.session.username == "alice"


@pytest.mark.parametrize("between", ["tab", "enter"])
async def test_a_payment_typed_all_at_once_pays_the_account_typed(tmp_path: Path, between: str) -> None:
    gateway = FakeGateway()
    toasts = Toasts()
    app = fake_app(tmp_path, gateway)
    async with app.run_test(size=SIZE, message_hook=toasts) as pilot:
        await login(pilot, "alice", "alice123")
        app.screen.query_one("#history").focus()  # somewhere else: ctrl+n must bring the keys after it along
        await pilot.pause()
        for key in ["ctrl+n", *"HDFC-2001", between, *"12.50", "enter"]:
            app.post_message(events.Key(key, key if len(key) == 1 else None))
        await wait_for(pilot, lambda: toasts.titled("Payment sent"), message="sent")
    assert [(to, paise) for _key, _from, to, paise in gateway.paid] == [("HDFC-2001", 1250)]


async def test_enter_on_the_from_list_still_opens_it(tmp_path: Path) -> None:
    app = fake_app(tmp_path, FakeGateway())
    async with app.run_test(size=SIZE) as pilot:
        await login(pilot, "alice", "alice123")
        select = app.screen.query_one("#from-account", Select)
        select.focus()
        await pilot.pause()
        await pilot.press("enter")
        await wait_for(pilot, lambda: select.expanded, message="the list open")
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: not select.expanded, message="the list closed")
        assert select.value == "HDFC-2002"
        await pilot.press("tab")
        assert app.focused is app.screen.query_one("#to-account", Input)


async def test_shift_tab_goes_back_to_the_username(tmp_path: Path) -> None:
    app = fake_app(tmp_path, FakeGateway())
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: screen_name(app) == "LoginScreen", message="the login screen")
        await pilot.press(*"bob", "tab", *"x", "shift+tab")
        assert app.focused is app.screen.query_one("#username", Input)
        await pilot.press("end", *"by")
        assert {i.id: i.value for i in app.screen.query(Input)} == {"username": "bobby", "password": "x"}


def _no_blink(pilot: Pilot) -> None:
    for widget in pilot.app.screen.query(Input):
        widget.cursor_blink = False


def test_login_screen_snapshot(snap_compare, tmp_path: Path, utc) -> None:  # type: ignore[no-untyped-def]
    async def run_before(pilot: Pilot) -> None:
        await pilot.pause()
        _no_blink(pilot)

    assert snap_compare(fake_app(tmp_path, FakeGateway()), terminal_size=SIZE, run_before=run_before)


def test_main_screen_snapshot(snap_compare, tmp_path: Path, utc) -> None:  # type: ignore[no-untyped-def]
    async def run_before(pilot: Pilot) -> None:
        app = pilot.app
        await login(pilot, "alice", "alice123")
        await pilot.press("ctrl+o")                 # offline mode: the payment below stays queued
        await pay(pilot, "HDFC-2001", "250")
        await wait_for(pilot, lambda: app.screen.query_one("#pending").row_count == 1, message="queued")
        await wait_for(pilot, lambda: app.screen.query_one("#history").row_count == 3, message="history")
        await app.workers.wait_for_complete()
        # DataTable sizes its columns on idle after rows are added: wait until it has
        await wait_for(pilot, lambda: all(table.ordered_columns[2].content_width >= len("HDFC-2001")
                                          for table in app.screen.query("#pending, #history")) and
                       app.screen.query_one("#balances").ordered_columns[1].content_width >= len("₹4,876.50"),
                       message="the tables sized")
        _no_blink(pilot)
        app.clear_notifications()
        # A busy machine can leave the last layout pass queued: ask for one and let it (and the repaint) run.
        for table in app.screen.query("DataTable"):
            table.refresh(layout=True)
        await pilot.pause()
        await pilot.wait_for_scheduled_animations()
        await pilot.pause()

    assert snap_compare(fake_app(tmp_path, FakeGateway()), terminal_size=SIZE, run_before=run_before)
