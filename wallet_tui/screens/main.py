"""The main screen: balances, the payment form, pending payments, history, and the connectivity indicator.

All IO runs in thread workers that call the headless core and post messages back. The connectivity poll is
self-scheduling (dolphie's pattern): a poll finishes → the UI updates → the next poll is set `poll_interval`
later, so two polls never overlap; `poll_now()` asks for one at once (or right after the running one).
"""
from __future__ import annotations

import time
from functools import partial

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, Static
from textual.worker import Worker, WorkerState

from wallet_tui.core import FormError, Session, validate_payment
from wallet_tui.gateway import GatewayError
from wallet_tui.messages import CoreEvents, DataLoaded, PaymentQueued, PollDone
from wallet_tui.outbox import CannotCancel
from wallet_tui.sync import Finished
from wallet_tui.widgets.connectivity import ConnectivityIndicator
from wallet_tui.widgets.payment_form import PaymentForm
from wallet_tui.widgets.tables import BalancesTable, HistoryTable, PendingTable


class MainScreen(Screen):
    BINDINGS = [
        Binding("ctrl+n", "pay", "Pay", tooltip="Go to the payment form", priority=True),
        Binding("ctrl+r", "refresh", "Refresh", tooltip="Reload balances and history now"),
        Binding("ctrl+o", "toggle_offline", "Offline mode", tooltip="Queue every payment until turned off"),
        Binding("ctrl+l", "logout", "Log out"),
    ]

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session
        self._poll_timer: Timer | None = None
        self._poll_running = False
        self._poll_worker: Worker[None] | None = None
        self._poll_again = False
        self._submitting: set[tuple[str, str, int]] = set()   # submitted, being written to the outbox
        self.polls = 0

    @property
    def core(self):  # type: ignore[no-untyped-def]
        return self.app.core  # type: ignore[attr-defined]

    def compose(self) -> ComposeResult:
        with Horizontal(id="topbar"):
            yield Static(f"Strife wallet · {self.session.username}", id="title")
            yield ConnectivityIndicator(id="connectivity")
        with Horizontal(id="body"):
            with Vertical(id="left"):
                yield BalancesTable(id="balances")
                yield PaymentForm(id="payment-form")
            with Vertical(id="right"):
                yield PendingTable(id="pending")
                yield HistoryTable(id="history")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#balances").border_title = "Balances"
        self.query_one("#payment-form").border_title = "New payment"
        self.query_one("#pending").border_title = "Pending"
        self.query_one("#history").border_title = "History"
        self.query_one(PaymentForm).set_accounts(self.session.accounts)
        self.query_one("#to-account").focus()
        self._show_connectivity()
        self.poll_now()   # sends anything left pending by an earlier run
        self.load_data()

    def on_unmount(self) -> None:
        if self._poll_timer is not None:
            self._poll_timer.stop()

    # ---- connectivity poll ---------------------------------------------------------------------------------
    def poll_now(self) -> None:
        if self._poll_running:
            self._poll_again = True
            return
        if self._poll_timer is not None:
            self._poll_timer.stop()
            self._poll_timer = None
        self._poll_running = True
        self._poll_worker = self.run_worker(self._poll, thread=True, group="poll", name="connectivity poll",
                                            exit_on_error=False)

    def _poll(self) -> None:
        try:
            report = self.core.poll()
            pending = self.core.pending_rows()
        except Exception as exc:  # noqa: BLE001 - reported on screen; the poll must go on
            self.post_message(PollDone(None, [], f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(PollDone(report, pending))
        if report.healthy and self.core.connectivity != "login-required":
            self._load()

    def on_poll_done(self, message: PollDone) -> None:
        self._poll_running = False
        self.polls += 1
        if message.report is None:
            self.app.notify(message.error, title="Connectivity check failed", severity="error", markup=False)
        else:
            self.app.show_repairs(message.report.repairs)  # type: ignore[attr-defined]
            self.app.show_events(message.report.events, came_back=message.report.came_back,  # type: ignore
                                 sent=message.report.sent)
            self._show_pending(message.pending)
            if not message.report.healthy:
                self._mark_balances_stale()
        self._show_connectivity()
        if self._poll_again:
            self._poll_again = False
            self.poll_now()
        elif self.is_mounted:
            self._poll_timer = self.set_timer(self.core.settings.poll_interval, self.poll_now)

    # ---- data ----------------------------------------------------------------------------------------------
    @work(thread=True, group="load", exclusive=True, exit_on_error=False)
    def load_data(self) -> None:
        self._load()

    def _load(self) -> None:
        try:
            balances = self.core.balances()
            error = ""
        except GatewayError as exc:
            balances, error = None, exc.message
        self.post_message(DataLoaded(balances, self.core.history(), error))

    def on_data_loaded(self, message: DataLoaded) -> None:
        balances = self.query_one(BalancesTable)
        if message.balances is not None:
            balances.show(message.balances)
            balances.border_subtitle = "as of " + time.strftime("%H:%M:%S", time.localtime(self.core.clock()))
        else:
            self._mark_balances_stale()
        self.query_one(HistoryTable).show(message.history)
        self._show_connectivity()
        if self.core.connectivity == "login-required":
            self.app.ask_to_log_in_again()  # type: ignore[attr-defined]

    def _mark_balances_stale(self) -> None:
        balances = self.query_one(BalancesTable)
        if balances.border_subtitle and not balances.border_subtitle.startswith("last known"):
            balances.border_subtitle = "last known, " + balances.border_subtitle

    # ---- payments ------------------------------------------------------------------------------------------
    @on(PaymentForm.Submitted)
    def _submit(self, event: PaymentForm.Submitted) -> None:
        form = self.query_one(PaymentForm)
        try:
            payment = validate_payment(self.session.accounts, event.from_account, event.to_account, event.amount)
        except FormError as exc:
            form.show_error(exc.field_id, exc.message)
            return
        if payment in self._submitting:
            return   # a second Enter on the same form while its payment is being written: one payment
        # The form keeps the payment until it is on disk (PaymentQueued): if it cannot be written, nothing
        # the user typed is lost.
        self._submitting.add(payment)
        self.run_worker(partial(self._send, payment, (event.to_account, event.amount)), thread=True,
                        group="send", name="send payment", exit_on_error=False)

    def _send(self, payment: tuple[str, str, int], submitted: tuple[str, str]) -> None:
        try:
            entry = self.core.submit(*payment)   # key made and on disk before any send
        except Exception as exc:  # noqa: BLE001 - any failure to queue is the user's to know, with the form kept
            reason = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.post_message(PaymentQueued(None, payment, submitted, reason or type(exc).__name__))
            return
        self.post_message(PaymentQueued(entry, payment, submitted))
        self.post_message(CoreEvents([], self.core.pending_rows()))
        if not self.core.can_send:
            self.app.call_from_thread(self.app.notify_queued, entry)  # type: ignore[attr-defined]
            return
        events = self.core.send_now(entry.key)
        self.post_message(CoreEvents(events, self.core.pending_rows()))
        self._load()

    def on_payment_queued(self, message: PaymentQueued) -> None:
        self._submitting.discard(message.payment)
        form = self.query_one(PaymentForm)
        if message.entry is not None:
            form.clear_if_unchanged(*message.submitted)
            return
        text = (f"Not queued and not sent: the outbox could not be written ({message.error}). "
                "Your payment is still in the form; try again.")
        form.show_error(None, text)
        self.app.notify(text, title="Payment not queued", severity="error", markup=False)

    @on(PendingTable.CancelRequested)
    def _cancel(self, event: PendingTable.CancelRequested) -> None:
        self.run_worker(partial(self._cancel_work, event.key), thread=True, group="cancel", name="cancel",
                        exit_on_error=False)

    def _cancel_work(self, key: str) -> None:
        try:
            entry = self.core.cancel(key)
        except CannotCancel as exc:
            self.app.notify(f"Cannot cancel: {exc}", title="Not cancelled", severity="warning", markup=False)
            return
        self.post_message(CoreEvents([Finished(entry, queued=True)], self.core.pending_rows()))
        self._load()

    def on_core_events(self, message: CoreEvents) -> None:
        self.app.show_events(message.events, came_back=message.came_back, sent=message.sent)  # type: ignore
        self._show_pending(message.pending)
        self._show_connectivity()

    def _show_pending(self, rows: list) -> None:  # type: ignore[type-arg]
        self.query_one(PendingTable).show(rows, self.core.clock())
        self.query_one(ConnectivityIndicator).queued = len(rows)

    def _show_connectivity(self) -> None:
        self.query_one(ConnectivityIndicator).state = self.core.connectivity

    # ---- actions -------------------------------------------------------------------------------------------
    def action_pay(self) -> None:
        self.set_focus(self.query_one("#to-account"))  # at once: keys typed right after ctrl+n belong there

    def action_refresh(self) -> None:
        self.load_data()
        self.poll_now()

    def action_toggle_offline(self) -> None:
        on = not self.core.offline_mode
        self.core.set_offline_mode(on)
        self._show_connectivity()
        if on:
            self.app.notify("Nothing is sent until you turn it off (ctrl+o). New payments wait in Pending.",
                            title="Offline mode on", severity="warning")
        else:
            self.app.notify("Sending queued payments now.", title="Offline mode off")
            self.poll_now()

    def action_logout(self) -> None:
        self.app.logout()  # type: ignore[attr-defined]

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state is WorkerState.ERROR:
            # A poll that failed after its PollDone (in the data reload) has already scheduled the next one:
            # scheduling another would start a second chain of polls, and they would overlap.
            if event.worker is self._poll_worker and self._poll_running:
                self._poll_running = False
                self._poll_timer = self.set_timer(self.core.settings.poll_interval, self.poll_now)
            self.app.notify(f"{event.worker.name}: {event.worker.error}", title="Something went wrong",
                            severity="error", markup=False)
