"""The connectivity indicator: online / offline / offline mode / session expired, and how many are queued."""
from __future__ import annotations

from textual.reactive import reactive
from textual.widgets import Static

LABELS = {
    "online": "● online",
    "offline": "○ offline — payments are queued",
    "offline-mode": "◌ offline mode — payments are queued (ctrl+o to go online)",
    "login-required": "⚠ session expired — log in again to send",
}


class ConnectivityIndicator(Static):
    state: reactive[str] = reactive("online", layout=True)
    queued: reactive[int] = reactive(0, layout=True)

    def render(self) -> str:
        text = LABELS.get(self.state, self.state)
        if self.queued:
            text += f" · {self.queued} pending"
        return text

    def watch_state(self, old: str, new: str) -> None:
        self.remove_class(f"-{old}")
        self.add_class(f"-{new}")

    def on_mount(self) -> None:
        self.add_class(f"-{self.state}")
