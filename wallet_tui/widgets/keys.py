"""Keys that move the focus as they are read, before the keys after them are handed on.

A password manager's auto-type, or a paste, delivers "bob<Tab>bob123<Enter>" or "HDFC-2001<Enter>250<Enter>"
faster than the app reacts. Textual hands each key to the focused field first and moves the focus only when the
key has bubbled back up — by then the keys behind it are in the old field ("HDFC-2001250"). Priority bindings
run as the key is read, so the focus moves first.
"""
from __future__ import annotations

from textual.actions import SkipAction
from textual.binding import Binding


def focus_keys(source: str, target: str) -> list[Binding]:
    """Tab and Shift+Tab, and Enter in the field `source` (a selector) moving to `target`."""
    return [Binding("tab", "app.focus_next", show=False, priority=True),
            Binding("shift+tab", "app.focus_previous", show=False, priority=True),
            Binding("enter", f"enter_moves_focus('{source}', '{target}')", show=False, priority=True)]


class EnterMovesFocus:
    """Mixed into the screen or widget whose BINDINGS include `focus_keys` (before its Textual base class)."""

    def action_enter_moves_focus(self, source: str, target: str) -> None:
        screen = self.screen  # type: ignore[attr-defined]
        if screen.focused is not self.query_one(source):  # type: ignore[attr-defined]
            raise SkipAction()  # Enter elsewhere does what it does there (submit, pay, open a list, press)
        screen.set_focus(self.query_one(target))  # type: ignore[attr-defined]  # now: focus() would wait
