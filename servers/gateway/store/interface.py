"""The seam between the gateway and its durable state: what the payment's life, the completer, the sweeper and
the sessions need, and nothing else. Two implementations: `sqlite.SQLiteGatewayStore` (the embedded default,
one file in --data-dir) and `postgres.PostgresStore` (shared by gateway replicas on several machines). The
coordinator and the servicer import this, never a driver.

Every write is one committed transaction, durable when its awaitable resolves: the caller awaits it before its
next remote call. Writes after the claim are compare-and-sets on the payment's owner (and, on PostgreSQL, its
epoch): a process that no longer owns a payment gets `LostOwnership`, never a silent overwrite.
"""
from __future__ import annotations

from typing import Awaitable, Callable, Protocol

from servers.gateway.store.records import Claim, HistoryRow, Payment


class GatewayStore(Protocol):
    display_url: str          # what logs and errors may show (a password is never in it)

    @property
    def owner_id(self) -> str:
        """This process's identity as an owner of in-flight payments (it changes when liveness is re-taken)."""

    def is_live(self) -> bool:
        """This process holds its liveness now. When it does not, it takes no new payment and tells no bank
        anything (another process may be taking its payments over): health reports NOT_SERVING."""

    def on_liveness_change(self, callback: Callable[[bool], None]) -> None: ...
    async def start(self) -> None: ...
    async def close(self) -> None: ...

    # ---- the payment's life ----------------------------------------------------------------------------------
    def claim(self, username: str, key: str, from_account: str, to_account: str, amount: int,
              may_insert: bool = True) -> Awaitable[Claim]:
        """Claim-or-replay in one transaction. Returns an awaitable that may be shielded and given callbacks
        (a future or task): the claim commits even if its caller goes away. `may_insert=False` (today's
        configuration refuses the request) still finds a stored key, but inserts none: REFUSED."""

    def decide(self, payment: Payment, commit: bool, status: str, message: str, response: bytes) -> Awaitable[None]:
        """The decision and the client's response, stored together; raises LostOwnership if the payment is no
        longer this process's undecided payment."""

    def finish(self, payment: Payment) -> Awaitable[None]: ...
    def finish_later(self, payment: Payment) -> Awaitable[None]:
        """As `finish`, for a caller that does not wait (it may be batched with others): if it is lost, the
        completer re-sends the decision (idempotent at the banks) and finishes the payment then."""

    def release(self, payment: Payment) -> Awaitable[None]:
        """Let go of a payment this process cannot push further now: any process's completer takes it."""

    def take_over_abandoned(self, limit: int) -> Awaitable[list[Payment]]:
        """Up to `limit` unfinished payments, oldest first, whose owner is dead (or let go of them), now this
        process's. Never a live owner's; a dead owner's is always reached, however many a live one has."""

    def owned_unfinished(self) -> Awaitable[list[Payment]]: ...
    def history(self, username: str, accounts: tuple[str, ...], limit: int) -> Awaitable[list[HistoryRow]]:
        """Sent by the user (any status) and received into `accounts` (succeeded), newest first: O(limit) rows
        read per source, however many the accounts received."""

    def sweep_keys(self, ttl_seconds: float) -> Awaitable[int]: ...

    # ---- sessions (only a digest of each token is stored) ---------------------------------------------------
    def create_session(self, username: str, credential: str, ttl: float) -> Awaitable[tuple[str, float]]:
        """A new token and its expiry; `credential` fingerprints the credential it was issued against."""

    def resolve_session(self, token: str) -> Awaitable[tuple[str, str] | None]:
        """(username, credential) of a live, not logged-out session, else None."""

    def end_session(self, token: str) -> Awaitable[str | None]:
        """Log a token out; returns its user (also when it was logged out before), None if unknown/expired."""

    def sweep_sessions(self) -> Awaitable[int]: ...
