"""The wallet without a screen: the session, the outbox and the sync loop behind one small facade.

Every method may block (gRPC, fsync) and is called from a worker thread; each returns plain data and the
events (`wallet_tui.sync`) the UI should show. Tests drive this directly against real servers.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc

from wallet_tui.gateway import Balance, Gateway, GatewayError
from wallet_tui.money import AmountError, parse_amount, valid_account
from wallet_tui.outbox import CannotCancel, Outbox, OutboxEntry
from wallet_tui.settings import WalletSettings
from wallet_tui.storage import Repair
from wallet_tui.sync import DrainReport, Event, SyncEngine, boot_clock


class OutboxUnavailable(Exception):
    """The user's outbox cannot be opened (the data directory is not usable); the message says where and why."""


class FormError(ValueError):
    def __init__(self, field_id: str, message: str) -> None:
        super().__init__(message)
        self.field_id = field_id
        self.message = message


def validate_payment(accounts: tuple[str, ...], from_account: object, to_account: str, amount: str
                     ) -> tuple[str, str, int]:
    """The form's rules, checked again on submit: (from, to, paise), or FormError naming the field."""
    if not isinstance(from_account, str) or from_account not in accounts:
        raise FormError("from-account", "choose the account to pay from")
    to = to_account.strip().upper()
    if not to:
        raise FormError("to-account", "enter the account to pay, e.g. HDFC-2001")
    if not valid_account(to):
        raise FormError("to-account", "an account looks like BANK-digits, e.g. HDFC-2001")
    if to == from_account:
        raise FormError("to-account", "that is the account you are paying from")
    try:
        paise = parse_amount(amount)
    except AmountError as exc:
        raise FormError("amount", str(exc)) from None
    return from_account, to, paise


@dataclass(frozen=True)
class Session:
    username: str
    token: str
    expires_at: float
    accounts: tuple[str, ...]


@dataclass(frozen=True)
class HistoryRow:
    key: str                  # idempotency key for the user's own payments, transaction id otherwise
    when: float
    direction: str            # "sent" | "received"
    counterparty: str
    amount_paise: int
    status: str               # succeeded | declined | failed | expired | cancelled | processing
    message: str


@dataclass(frozen=True)
class PendingRow:
    key: str
    created_at: float
    from_account: str
    to_account: str
    amount_paise: int
    attempts: int
    state: str                # queued | sending | retrying | waiting for login
    last_error: str


@dataclass
class PollReport:
    healthy: bool
    came_back: bool = False
    events: list[Event] = field(default_factory=list)
    sent: int = 0
    repairs: list[Repair] = field(default_factory=list)   # damaged outbox files found (and repaired)


class WalletCore:
    def __init__(self, settings: WalletSettings, gateway: Gateway, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = boot_clock) -> None:
        self.settings = settings
        self.gateway = gateway
        self.clock = clock          # wall time: stamps records
        self.monotonic = monotonic  # nobody can set it: backoff and expiry (see wallet_tui.sync)
        self.session: Session | None = None
        self.outbox: Outbox | None = None
        self.engine: SyncEngine | None = None
        self.offline_mode = False
        self._resuming = False
        self._lock = threading.Lock()

    # ---- session -------------------------------------------------------------------------------------------
    def login(self, username: str, password: str) -> Session:
        """Raises GatewayError (UNAUTHENTICATED for a wrong password, UNAVAILABLE when unreachable), or
        OutboxUnavailable (then no one is logged in)."""
        result = self.gateway.login(username, password)
        session = Session(username, result.token, result.expires_at, result.accounts)
        with self._lock:
            if self.outbox is not None and self.outbox.username != username:
                self._close_outbox()
                self.session = None
            if self.outbox is None:
                self._open_outbox(username)
            self.session = session
            assert self.engine is not None
            self.engine.login_required = False
            self.engine.online = True  # it just answered
        return session

    def open_offline(self, username: str, accounts: tuple[str, ...] = ()) -> None:
        """Work on a user's outbox without a session (no token: nothing can be sent until `login`)."""
        with self._lock:
            self._close_outbox()
            self.session = None
            self._open_outbox(username)
            self.session = Session(username, "", 0.0, accounts)
            assert self.engine is not None
            self.engine.login_required = True

    def _open_outbox(self, username: str) -> None:
        # Opening reads both files: that is also when a damaged one is found and repaired (see `poll`).
        try:
            self.outbox = Outbox(self.settings.outbox_dir, username, self.clock)
        except OSError as exc:
            raise OutboxUnavailable(f"cannot open the outbox in {self.settings.outbox_dir}: "
                                    f"{exc.strerror or exc} ({exc.filename or self.settings.outbox_dir}). "
                                    "Check --data-dir, and that its disk is writable and not full.") from exc
        self.engine = SyncEngine(self.gateway, self.outbox, self._token, max_age=self.settings.max_age,
                                 clock=self.clock, monotonic=self.monotonic)

    def logout(self) -> threading.Thread | None:
        """Log out here at once, and end the session at the gateway in the background, best effort (the call
        has a deadline; a gateway that cannot be reached lets the token expire). Returns that thread, if any."""
        with self._lock:
            token = self._token()
            self.session = None
            self._close_outbox()
        if not token:
            return None
        ending = threading.Thread(target=self._end_session, args=(token,), name="wallet-logout", daemon=True)
        ending.start()
        return ending

    def _end_session(self, token: str) -> None:
        try:
            self.gateway.logout(token)
        except (GatewayError, ValueError):  # ValueError: the wallet closed the channel meanwhile (quitting)
            pass  # offline, or the token had expired already: either way it no longer works for this wallet

    def _close_outbox(self) -> None:
        if self.outbox is not None:
            self.outbox.close()
        self.outbox, self.engine = None, None

    def _token(self) -> str:
        return self.session.token if self.session else ""

    @property
    def accounts(self) -> tuple[str, ...]:
        return self.session.accounts if self.session else ()

    # ---- state the UI shows --------------------------------------------------------------------------------
    @property
    def connectivity(self) -> str:
        """online | offline | offline-mode | login-required"""
        if self.engine is None:
            return "offline"
        if self.engine.login_required:
            return "login-required"
        if self.offline_mode:
            return "offline-mode"
        return "online" if self.engine.online else "offline"

    @property
    def can_send(self) -> bool:
        return self.engine is not None and self.connectivity == "online"

    def pending_rows(self) -> list[PendingRow]:
        if self.outbox is None or self.engine is None:
            return []
        in_flight = self.engine.in_flight
        rows = []
        for e in self.outbox.pending():
            if e.key in in_flight:
                state = "sending"
            elif self.engine.login_required and e.attempts:
                state = "waiting for login"
            elif e.attempts:
                state = "retrying"
            else:
                state = "queued"
            rows.append(PendingRow(e.key, e.created_at, e.from_account, e.to_account, e.amount_paise,
                                   e.attempts, state, e.last_error))
        return rows

    # ---- actions -------------------------------------------------------------------------------------------
    def submit(self, from_account: str, to_account: str, amount_paise: int) -> OutboxEntry:
        """Write the payment, with its new idempotency key, to the outbox. Sending is `send_now`."""
        if self.outbox is None or self.engine is None:
            raise RuntimeError("not logged in")
        entry = self.outbox.add(from_account, to_account, amount_paise)
        self.engine.saw(entry)
        return entry

    def send_now(self, key: str) -> list[Event]:
        """Send a just-submitted payment at once if the wallet believes it is online; else it stays queued."""
        if self.engine is None or not self.can_send:
            return []
        return self.engine.send(key)

    def cancel(self, key: str) -> OutboxEntry:
        """Raises CannotCancel if the payment may have reached the gateway (or is not pending)."""
        if self.outbox is None:
            raise RuntimeError("not logged in")
        if self.engine is not None and key in self.engine.in_flight:
            raise CannotCancel("it is being sent right now")
        return self.outbox.cancel(key)

    def set_offline_mode(self, on: bool) -> None:
        """Offline mode queues every payment on purpose; turning it off drains the queue at the next poll
        (reported like a return of the gateway)."""
        self.offline_mode = on
        self._resuming = not on

    def poll(self) -> PollReport:
        """One connectivity check: health → online/offline; expire old payments; drain when the gateway
        answers (at once, ignoring backoff, when it has just come back). Never run two at once (the UI
        schedules the next poll only when this one has returned)."""
        engine, outbox = self.engine, self.outbox
        healthy = self.gateway.health()
        report = PollReport(healthy)
        if engine is None or outbox is None:
            return report
        was_online = engine.online
        report.events += engine.set_online(healthy, "the gateway does not answer its health check")
        resuming, self._resuming = self._resuming, False
        report.came_back = healthy and (not was_online or resuming) and not self.offline_mode
        if healthy and not self.offline_mode and not engine.login_required:
            drained: DrainReport = engine.drain(force=report.came_back)
            report.events += drained.events
            report.sent = drained.sent
        else:
            report.events += engine.expire()
        # found by any read since the last poll (e.g. at login: the first poll follows it)
        report.repairs += outbox.take_repairs()
        return report

    def drain(self, *, force: bool = True) -> DrainReport:
        if self.engine is None or not self.can_send:
            return DrainReport()
        return self.engine.drain(force=force)

    def balances(self) -> list[Balance]:
        return self._authed(lambda token: self.gateway.balances(token))

    def history(self, limit: int = 50) -> list[HistoryRow]:
        """The gateway's history (sent and received) merged with local final outcomes; the gateway's status
        wins for a payment it knows (matched by idempotency key), local-only ones (expired, cancelled,
        refused) are added. Newest first. Without the gateway: the local outcomes only."""
        local = self.outbox.finished(limit) if self.outbox else []
        try:
            remote = self._authed(lambda token: self.gateway.history(token, limit))
        except GatewayError:
            remote = []
        rows: dict[str, HistoryRow] = {}
        for e in local:
            rows[e.key] = HistoryRow(e.key, e.finished_at or e.created_at, "sent", e.to_account, e.amount_paise,
                                     e.status, e.message)
        for r in remote:
            if r.outgoing:
                key = r.idempotency_key or r.transaction_id
                rows[key] = HistoryRow(key, r.created_at, "sent", r.to_account, r.amount_paise, r.status,
                                       r.message)
            else:
                rows["rx:" + r.transaction_id] = HistoryRow("rx:" + r.transaction_id, r.created_at, "received",
                                                            r.from_account, r.amount_paise, r.status, r.message)
        return sorted(rows.values(), key=lambda row: row.when, reverse=True)[:limit]

    def _authed(self, call: Callable[[str], object]):  # type: ignore[no-untyped-def]
        """A read with the session's token; an expired token puts the queue on hold until a new login."""
        try:
            return call(self._token())
        except GatewayError as exc:
            if exc.code is grpc.StatusCode.UNAUTHENTICATED and self.engine is not None:
                self.engine.login_required = True
            raise

    def close(self) -> None:
        with self._lock:
            self._close_outbox()
        self.gateway.close()
