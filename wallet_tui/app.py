"""The wallet App: wires the headless core to the screens, owns the toasts. `make_app(argv)` builds it
exactly as the `wallet` command does."""
from __future__ import annotations

import time
from typing import Callable

from textual.app import App

from wallet_tui.commands import WalletCommands
from wallet_tui.core import Session, WalletCore
from wallet_tui.gateway import Gateway, GatewayError, GrpcGateway
from wallet_tui.money import rupees
from wallet_tui.outbox import OutboxEntry
from wallet_tui.screens.login import LoginScreen
from wallet_tui.screens.main import MainScreen
from wallet_tui.settings import WalletSettings, parse_args
from wallet_tui.storage import Repair
from wallet_tui.sync import Deferred, Event, Finished, LoginRequired, WentOffline, boot_clock

OUTCOME_TOAST = {  # status → (title, severity, verb)
    "succeeded": ("Payment sent", "information", "paid"),
    "declined": ("Payment declined", "warning", "declined"),
    "failed": ("Payment failed", "error", "failed"),
    "expired": ("Payment expired", "warning", "expired, not sent"),
    "cancelled": ("Payment cancelled", "information", "cancelled"),
}


class WalletApp(App):
    TITLE = "Strife wallet"
    CSS_PATH = "wallet.tcss"
    COMMANDS = App.COMMANDS | {WalletCommands}

    def __init__(self, settings: WalletSettings, gateway_factory: Callable[[], Gateway],
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = boot_clock) -> None:
        super().__init__()
        self.settings = settings
        self._gateway_factory = gateway_factory
        self._clock = clock
        self._monotonic = monotonic
        self.core: WalletCore | None = None
        self._relogin_open = False

    def on_mount(self) -> None:
        # The channel is made here, inside the running app, and closed on unmount.
        try:
            gateway = self._gateway_factory()
        except GatewayError as exc:
            self.exit(return_code=2, message=f"wallet: {exc.message}")
            return
        self.core = WalletCore(self.settings, gateway, self._clock, self._monotonic)
        self.push_screen(LoginScreen())

    def on_unmount(self) -> None:
        if self.core is not None:
            self.core.close()  # ends any call still in a worker thread

    # ---- screens -------------------------------------------------------------------------------------------
    def logged_in(self, session: Session, *, relogin: bool = False) -> None:
        if relogin:
            self._relogin_open = False
            self.pop_screen()
            main = self.screen
            if isinstance(main, MainScreen):
                main.poll_now()
            self.notify("Queued payments will be sent now.", title="Logged in again")
            return
        self.switch_screen(MainScreen(session))

    def logout(self) -> None:
        assert self.core is not None
        pending = len(self.core.pending_rows())
        self.core.logout()
        self.switch_screen(LoginScreen())
        if pending:
            self.notify(f"{pending} pending payment(s) stay in the outbox and are sent after your next login.",
                        title="Logged out", severity="warning")

    # ---- toasts --------------------------------------------------------------------------------------------
    def show_events(self, events: list[Event], *, came_back: bool = False, sent: int = 0) -> None:
        for event in events:
            if isinstance(event, Finished):
                self.notify_outcome(event.entry)
            elif isinstance(event, WentOffline):
                self.notify("The gateway cannot be reached. New payments are queued and sent when it is back.",
                            title="Offline", severity="warning")
            elif isinstance(event, LoginRequired):
                self.ask_to_log_in_again()
            elif isinstance(event, Deferred):
                pass  # still pending: the pending pane shows it; a toast per retry would be noise
        sent_text = f"Sent {sent} queued payment{'s' if sent != 1 else ''}."
        if came_back:
            self.notify(sent_text if sent else "Nothing was waiting.", title="Back online")
        elif sent:  # e.g. left pending by an earlier run, sent after login
            self.notify(sent_text, title="Queued payments sent")

    def notify_outcome(self, entry: OutboxEntry) -> None:
        title, severity, verb = OUTCOME_TOAST[entry.status]
        text = f"{rupees(entry.amount_paise)} to {entry.to_account} from {entry.from_account}: {verb}."
        if entry.message and entry.status != "succeeded":
            text += f"\n{entry.message}"
        self.notify(text, title=title, severity=severity, markup=False,  # server text is never markup
                    timeout=5 if entry.status == "succeeded" else 10)

    def show_repairs(self, repairs: list[Repair]) -> None:
        for repair in repairs:
            what = "queued payment" if repair.path.name.endswith(".outbox.json") else "finished record"
            count = f"{repair.recovered} {what}{'s' if repair.recovered != 1 else ''}"
            self.notify(f"{repair.path.name} was damaged ({repair.problem}). {count} could be read back and "
                        f"{'are' if repair.recovered != 1 else 'is'} kept. The damaged file is saved as "
                        f"{repair.copy}: a payment missing from Pending may be only there, so check your "
                        "history before paying it again.", title="Outbox repaired", severity="error",
                        markup=False, timeout=60)

    def notify_queued(self, entry: OutboxEntry) -> None:
        assert self.core is not None
        why = "offline mode is on" if self.core.offline_mode else (
            "you need to log in again" if self.core.connectivity == "login-required" else "the wallet is offline")
        self.notify(f"{rupees(entry.amount_paise)} to {entry.to_account} waits in Pending ({why}). It is sent "
                    "automatically, once, as soon as it can be.", title="Payment queued", markup=False)

    def ask_to_log_in_again(self) -> None:
        if self._relogin_open or self.core is None or self.core.session is None:
            return
        self._relogin_open = True
        self.notify("Your session expired. Log in again; queued payments wait until you do.",
                    title="Log in again", severity="warning")
        self.push_screen(LoginScreen(relogin=self.core.session.username))


def make_app(argv: list[str], *, gateway: Gateway | None = None, clock: Callable[[], float] = time.time,
             monotonic: Callable[[], float] = boot_clock) -> WalletApp:
    """The App exactly as `wallet <argv>` builds it. Tests may inject a `gateway` (e.g. a deterministic fake
    for snapshots) and the clocks (wall and monotonic, see wallet_tui.sync)."""
    settings = parse_args(argv)
    if gateway is not None:
        factory: Callable[[], Gateway] = lambda: gateway  # noqa: E731
    else:
        factory = lambda: GrpcGateway(settings.gateway, settings.ca_path,  # noqa: E731
                                      pay_timeout=settings.pay_timeout)
    return WalletApp(settings, factory, clock, monotonic)

