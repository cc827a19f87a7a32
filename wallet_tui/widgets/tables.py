"""The main screen's three tables: balances, pending payments (the outbox), and history."""
from __future__ import annotations

import time

from rich.text import Text
from textual.binding import Binding
from textual.message import Message

from wallet_tui.core import HistoryRow, PendingRow
from wallet_tui.gateway import Balance
from wallet_tui.money import rupees
from wallet_tui.widgets.keyed_table import KeyedTable

STATUS_STYLE = {"succeeded": "green", "declined": "yellow", "failed": "red", "expired": "magenta",
                "cancelled": "dim", "processing": "cyan"}


def age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600}h"


def money_cell(paise: int) -> Text:
    return Text(rupees(paise), justify="right")


class BalancesTable(KeyedTable):
    COLUMNS = (("account", "Account"), ("balance", "Balance"), ("available", "Available"))

    def show(self, balances: list[Balance]) -> None:
        self.sync({b.account: (b.account, money_cell(b.balance_paise), money_cell(b.available_paise))
                   if b.available else (b.account, Text("bank unavailable", style="italic"), Text(""))
                   for b in balances})


class PendingTable(KeyedTable):
    """Queued and in-flight payments, oldest first (the order they will be sent in)."""

    COLUMNS = (("age", "Age"), ("from", "From"), ("to", "To"), ("amount", "Amount"), ("state", "State"),
               ("tries", "Tries"))
    BINDINGS = [Binding("c,delete", "cancel_selected", "Cancel payment", tooltip="Cancel the selected "
                        "payment (only one that was never sent)")]

    class CancelRequested(Message):
        def __init__(self, key: str) -> None:
            super().__init__()
            self.key = key

    def show(self, rows: list[PendingRow], now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.sync({r.key: (age(now - r.created_at), r.from_account, r.to_account, money_cell(r.amount_paise),
                           r.state, str(r.attempts)) for r in rows})
        self.border_subtitle = f"{len(rows)} pending" if rows else "nothing pending"

    def action_cancel_selected(self) -> None:
        key = self.selected_key()
        if key is not None:
            self.post_message(self.CancelRequested(key))


class HistoryTable(KeyedTable):
    COLUMNS = (("when", "When"), ("dir", ""), ("account", "Account"), ("amount", "Amount"),
               ("status", "Status"))

    def show(self, rows: list[HistoryRow]) -> None:
        self.sync({r.key: (time.strftime("%d %b %H:%M", time.localtime(r.when)),
                           "→" if r.direction == "sent" else "←",
                           r.counterparty, money_cell(r.amount_paise),
                           Text(r.status, style=STATUS_STYLE.get(r.status, ""))) for r in rows})
