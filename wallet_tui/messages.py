"""Messages from the wallet's worker threads back to the UI (post_message is thread-safe)."""
from __future__ import annotations

from textual.message import Message

from wallet_tui.core import HistoryRow, PendingRow, PollReport, Session
from wallet_tui.gateway import Balance
from wallet_tui.outbox import OutboxEntry
from wallet_tui.sync import Event


class CoreEvents(Message):
    """Events from a send, a drain, a cancel or a poll, with the pending pane as it now stands."""

    def __init__(self, events: list[Event], pending: list[PendingRow], *, came_back: bool = False,
                 sent: int = 0) -> None:
        super().__init__()
        self.events = events
        self.pending = pending
        self.came_back = came_back
        self.sent = sent


class PollDone(Message):
    def __init__(self, report: PollReport | None, pending: list[PendingRow], error: str = "") -> None:
        super().__init__()
        self.report = report
        self.pending = pending
        self.error = error


class DataLoaded(Message):
    def __init__(self, balances: list[Balance] | None, history: list[HistoryRow], error: str = "") -> None:
        super().__init__()
        self.balances = balances
        self.history = history
        self.error = error


class LoginResult(Message):
    def __init__(self, session: Session | None, error: str = "", *, toast: str = "") -> None:
        super().__init__()
        self.session = session
        self.error = error
        self.toast = toast        # a toast's title when the error deserves more than the line on the form


class PaymentQueued(Message):
    """A submitted payment is in the outbox (`entry`), or could not be written there (`error`, `entry` None)."""

    def __init__(self, entry: OutboxEntry | None, payment: tuple[str, str, int], submitted: tuple[str, str],
                 error: str = "") -> None:
        super().__init__()
        self.entry = entry
        self.payment = payment      # (from, to, paise) as validated
        self.submitted = submitted  # the form's (to, amount) text as submitted
        self.error = error
