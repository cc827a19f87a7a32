"""The login screen. Also pushed over the main screen when the session expires (`relogin`), with the
username fixed: the queue waits until the same user logs in again."""
from __future__ import annotations

import grpc
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Center, Vertical
from textual.screen import Screen
from textual.widgets import Button, Footer, Input, Label, Static
from textual.worker import Worker, WorkerState

from wallet_tui.core import OutboxUnavailable
from wallet_tui.gateway import GatewayError
from wallet_tui.messages import LoginResult
from wallet_tui.widgets.keys import EnterMovesFocus, focus_keys


def login_error_text(exc: GatewayError, address: str) -> str:
    if exc.code is grpc.StatusCode.UNAUTHENTICATED:
        return "Wrong username or password."
    if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return f"Cannot reach the gateway at {address}. Is it running? Try again in a moment."
    return f"Login failed: {exc.message or exc.code.name}"


class LoginScreen(EnterMovesFocus, Screen):
    BINDINGS = [("escape", "app.quit", "Quit"), *focus_keys("#username", "#password")]

    def __init__(self, relogin: str | None = None) -> None:
        super().__init__()
        self.relogin = relogin

    def compose(self) -> ComposeResult:
        with Center():
            with Vertical(id="login-box"):
                yield Static("Strife wallet", id="login-title")
                if self.relogin:
                    yield Static("Your session has expired. Log in again to send your queued payments.",
                                 id="login-hint")
                else:
                    yield Static("Pay from your terminal — even when the network is not there.", id="login-hint")
                yield Label("Username")
                yield Input(value=self.relogin or "", placeholder="e.g. alice", id="username",
                            disabled=self.relogin is not None)
                yield Label("Password")
                yield Input(placeholder="password", password=True, id="password")
                yield Static("", id="login-error")
                yield Button("Log in", id="login", variant="primary")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#password" if self.relogin else "#username", Input).focus()

    @on(Input.Submitted, "#password")
    @on(Button.Pressed, "#login")
    def _submit(self) -> None:
        username = self.query_one("#username", Input).value.strip()
        password = self.query_one("#password", Input).value
        if not username or not password:
            self._show_error("Enter your username and password.")
            return
        self.query_one("#login", Button).disabled = True
        self.query_one("#login-error", Static).update("Logging in…")
        self._login(username, password)

    @work(thread=True, group="login", exclusive=True, exit_on_error=False)
    def _login(self, username: str, password: str) -> None:
        core = self.app.core  # type: ignore[attr-defined]
        try:
            session = core.login(username, password)
        except GatewayError as exc:
            self.post_message(LoginResult(None, login_error_text(exc, core.settings.gateway)))
            return
        except OutboxUnavailable as exc:
            self.post_message(LoginResult(None, f"Not logged in: {exc}", toast="Outbox unavailable"))
            return
        self.post_message(LoginResult(session))

    def on_login_result(self, message: LoginResult) -> None:
        self.query_one("#login", Button).disabled = False
        if message.session is None:
            self._failed(message.error, message.toast)
            return
        self.app.logged_in(message.session, relogin=self.relogin is not None)  # type: ignore[attr-defined]

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        # Anything the worker did not expect: say so and give the form back, never "Logging in…" for good.
        if event.state is WorkerState.ERROR:
            self.query_one("#login", Button).disabled = False
            self._failed(f"Login failed: {type(event.worker.error).__name__}: {event.worker.error}",
                         "Something went wrong")

    def _failed(self, text: str, toast: str = "") -> None:
        self._show_error(text)
        if toast:
            self.app.notify(text, title=toast, severity="error", markup=False)
        password = self.query_one("#password", Input)
        password.value = ""
        password.focus()

    def _show_error(self, text: str) -> None:
        error = self.query_one("#login-error", Static)
        error.update(text)
        error.set_class(bool(text), "-visible")
