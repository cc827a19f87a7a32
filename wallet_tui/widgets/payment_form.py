"""The payment form: from (the user's accounts), to, amount. Validated inline as the user types and again on
submit; Enter in the amount field submits."""
from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, Input, Label, Select, Static

from wallet_tui.money import AmountError, parse_amount, valid_account
from wallet_tui.widgets.keys import EnterMovesFocus, focus_keys


class PaymentForm(EnterMovesFocus, Vertical):
    BINDINGS = focus_keys("#to-account", "#amount")

    class Submitted(Message):
        def __init__(self, from_account: object, to_account: str, amount: str) -> None:
            super().__init__()
            self.from_account = from_account
            self.to_account = to_account
            self.amount = amount

    def compose(self) -> ComposeResult:
        yield Label("From")
        yield Select[str]([], id="from-account", prompt="account to pay from", allow_blank=True)
        yield Label("To")
        yield Input(placeholder="e.g. HDFC-2001", id="to-account", max_length=40)
        yield Label("Amount (₹)")
        with Horizontal(id="amount-row"):
            yield Input(placeholder="e.g. 250.00", id="amount", max_length=20)
            yield Button("Pay", id="pay", variant="primary")
        yield Static("", id="form-error")

    def set_accounts(self, accounts: tuple[str, ...]) -> None:
        select = self.query_one("#from-account", Select)
        select.set_options([(a, a) for a in accounts])
        if accounts:
            select.value = accounts[0]

    def show_error(self, field_id: str | None, message: str) -> None:
        error = self.query_one("#form-error", Static)
        error.update(message)
        error.set_class(bool(message), "-visible")
        for widget_id in ("to-account", "amount"):
            self.query_one(f"#{widget_id}", Input).set_class(widget_id == field_id, "-invalid")
        if field_id:
            self.query_one(f"#{field_id}").focus()

    def clear(self) -> None:
        self.query_one("#to-account", Input).value = ""
        self.query_one("#amount", Input).value = ""
        self.show_error(None, "")
        self.query_one("#to-account", Input).focus()

    def clear_if_unchanged(self, to_account: str, amount: str) -> None:
        """Clear the form after a payment was queued, unless the user has started typing the next one."""
        if (self.query_one("#to-account", Input).value, self.query_one("#amount", Input).value) == (
                to_account, amount):
            self.clear()

    @on(Input.Changed, "#to-account")
    def _check_to(self, event: Input.Changed) -> None:
        text = event.value.strip()
        problem = "" if not text or valid_account(text) else "an account looks like BANK-digits, e.g. HDFC-2001"
        self._inline("to-account", problem)

    @on(Input.Changed, "#amount")
    def _check_amount(self, event: Input.Changed) -> None:
        problem = ""
        if event.value.strip():
            try:
                parse_amount(event.value)
            except AmountError as exc:
                problem = str(exc)
        self._inline("amount", problem)

    def _inline(self, field_id: str, problem: str) -> None:
        self.query_one(f"#{field_id}", Input).set_class(bool(problem), "-invalid")
        error = self.query_one("#form-error", Static)
        error.update(problem)
        error.set_class(bool(problem), "-visible")

    @on(Input.Submitted, "#amount")
    @on(Button.Pressed, "#pay")
    def _submit(self, event: Message) -> None:
        event.stop()
        self.post_message(self.Submitted(self.query_one("#from-account", Select).value,
                                         self.query_one("#to-account", Input).value,
                                         self.query_one("#amount", Input).value))
