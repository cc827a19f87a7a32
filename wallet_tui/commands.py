"""The command palette's wallet actions (ctrl+p): pay, refresh, toggle offline mode, log out."""
from __future__ import annotations

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

COMMANDS = (
    ("Pay", "pay", "Go to the payment form"),
    ("Refresh balances and history", "refresh", "Reload from the gateway now"),
    ("Toggle offline mode", "toggle_offline", "Queue every payment until offline mode is turned off"),
    ("Log out", "logout", "Back to the login screen; pending payments stay in the outbox"),
)


class WalletCommands(Provider):
    def _commands(self):  # type: ignore[no-untyped-def]
        from wallet_tui.screens.main import MainScreen
        screen = self.screen
        if not isinstance(screen, MainScreen):
            return []
        return [(name, partial(screen.run_action, action), help_text) for name, action, help_text in COMMANDS]

    async def discover(self) -> Hits:
        for name, callback, help_text in self._commands():
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, callback, help_text in self._commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)
