"""Helpers for the wallet tests: build the App against a cluster, drive it with Pilot, wait on conditions,
record toasts, and a deterministic fake gateway for snapshots and poll instrumentation."""
from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path
from typing import Any, Callable

import grpc
from rich.console import Console
from textual.notifications import Notify
from textual.pilot import Pilot
from textual.widgets import DataTable, Input

from tests.harness import Cluster
from wallet_tui.app import WalletApp, make_app
from wallet_tui.gateway import Balance, GatewayError, HistoryRecord, LoginResult, PaymentReply

POLL = 0.3  # seconds; short so tests see connectivity changes quickly


def wallet_argv(cluster: Cluster, data_dir: Path, *, gateway: str | None = None, poll: float = POLL,
                extra: tuple[str, ...] = ()) -> list[str]:
    return ["--gateway", gateway or f"localhost:{cluster.gateway_port}", "--certs-dir", str(cluster.certs_dir),
            "--data-dir", str(data_dir), "--poll-interval", str(poll), *extra]


class Toasts:
    """Every App.notify, recorded through run_test's message_hook."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, str]] = []   # (title, message, severity)

    def __call__(self, message: Any) -> None:
        if isinstance(message, Notify):
            n = message.notification
            self.items.append((n.title, n.message, n.severity))

    def titled(self, title: str) -> list[str]:
        return [m for t, m, _ in self.items if t == title]

    def __repr__(self) -> str:
        return f"Toasts({self.items!r})"


async def wait_for(pilot: Pilot, predicate: Callable[[], Any], timeout: float = 10.0,
                   message: str = "condition") -> Any:
    """Let the app run until `predicate()` is truthy (checked every 20 ms); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        await pilot.pause()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}")
        await asyncio.sleep(0.02)


def table_rows(app: WalletApp, selector: str) -> list[list[str]]:
    table = app.screen.query_one(selector, DataTable)
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


def screen_name(app: WalletApp) -> str:
    return type(app.screen).__name__


async def login(pilot: Pilot, user: str, password: str, *, expect_main: bool = True) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: screen_name(app) == "LoginScreen", message="the login screen")
    app.screen.query_one("#username", Input).value = user
    app.screen.query_one("#password", Input).focus()
    app.screen.query_one("#password", Input).value = password
    await pilot.press("enter")
    if expect_main:
        await wait_for(pilot, lambda: screen_name(app) == "MainScreen" and
                       app.screen.query_one("#balances", DataTable).row_count > 0, message="the main screen")


async def pay(pilot: Pilot, to_account: str, amount: str, from_account: str | None = None) -> None:
    """Fill the form like a person and press Enter in #amount."""
    screen = pilot.app.screen
    if from_account is not None:
        screen.query_one("#from-account").value = from_account
    screen.query_one("#to-account", Input).value = to_account
    screen.query_one("#amount", Input).focus()
    screen.query_one("#amount", Input).value = amount
    await pilot.press("enter")
    await pilot.pause()


def pending_count(app: WalletApp) -> int:
    return app.screen.query_one("#pending", DataTable).row_count


def history_statuses(app: WalletApp) -> list[str]:
    return [row[-1] for row in table_rows(app, "#history")]


def screen_text(app: WalletApp) -> str:
    """The screen as plain text, like a terminal capture."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True, record=True,
                      color_system="truecolor", legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True))
    return console.export_text()


class Clocks:
    """A wall clock and a monotonic clock for the wallet (`make_app(clock=c.wall, monotonic=c.monotonic)`):
    `advance` is time passing (both move), `step_wall` is someone setting the clock (only the wall moves)."""

    def __init__(self, wall: float = 1_900_000_000.0) -> None:
        self._wall = wall
        self._monotonic = 1_000.0
        self._lock = threading.Lock()

    def wall(self) -> float:
        with self._lock:
            return self._wall

    def monotonic(self) -> float:
        with self._lock:
            return self._monotonic

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._wall += seconds
            self._monotonic += seconds

    def step_wall(self, seconds: float) -> None:
        with self._lock:
            self._wall += seconds


# ---- a deterministic gateway (snapshots, poll instrumentation) ---------------------------------------------
FIXED_NOW = 1_800_000_000.0  # 2027-01-15 08:00 UTC


class FakeGateway:
    """Fixed answers; optional slow health check that records how many polls ran at once."""

    def __init__(self, *, health_delay: float = 0.0) -> None:
        self.health_delay = health_delay
        self.healthy = True
        self.paid: list[tuple[str, str, str, int]] = []
        self._lock = threading.Lock()
        self.health_calls = 0
        self.concurrent = 0
        self.max_concurrent = 0

    def login(self, username: str, password: str) -> LoginResult:
        if (username, password) != ("alice", "alice123"):
            raise GatewayError(grpc.StatusCode.UNAUTHENTICATED, "wrong username or password")
        return LoginResult("fake-token", FIXED_NOW + 8 * 3600, ("SBI-1001", "HDFC-2002"))

    def logout(self, token: str) -> None:
        pass

    def pay(self, token: str, key: str, from_account: str, to_account: str, amount_paise: int) -> PaymentReply:
        self.paid.append((key, from_account, to_account, amount_paise))
        return PaymentReply("succeeded", f"txn-{len(self.paid)}", "paid", False)

    def balances(self, token: str) -> list[Balance]:
        return [Balance("SBI-1001", True, 487_650, 487_650), Balance("HDFC-2002", False, message="bank down")]

    def history(self, token: str, limit: int = 50) -> list[HistoryRecord]:
        return [
            HistoryRecord("txn-3", "SBI-1001", "HDFC-2001", 12_350, "succeeded", "paid", True, "k3", FIXED_NOW - 60),
            HistoryRecord("txn-2", "SBI-1002", "SBI-1001", 50_000, "succeeded", "received", False, "",
                          FIXED_NOW - 3600),
            HistoryRecord("txn-1", "SBI-1001", "HDFC-2003", 900_000, "declined", "insufficient funds", True, "k1",
                          FIXED_NOW - 7200),
        ]

    def health(self) -> bool:
        with self._lock:
            self.health_calls += 1
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if self.health_delay:
                time.sleep(self.health_delay)
            return self.healthy
        finally:
            with self._lock:
                self.concurrent -= 1

    def close(self) -> None:
        pass


def fake_app(data_dir: Path, gateway: FakeGateway, poll: float = 3600.0) -> WalletApp:
    return make_app(["--data-dir", str(data_dir), "--poll-interval", str(poll)], gateway=gateway,
                    clock=lambda: FIXED_NOW)
