"""The gateway's idempotency keys and payments, in SQLite: the single source of truth for exactly-once.

Two tables, always written together in one transaction:
- `idempotency_keys` — (username, key) → request fingerprint, recovery point, lock owner, stored response.
- `payments` — one row per payment ever executed: the history that `ListPayments` reads. Keys are swept
  after the TTL; payments are kept.

Recovery points (brandur's atomic phases): `started` (key claimed, banks maybe prepared) →
`commit_decided` | `abort_decided` (the decision and the response, stored together) → `finished` (every bank
acknowledged). Each transition is committed (synchronous=FULL) before the next remote call.

Claim-or-replay is one `BEGIN IMMEDIATE` transaction, so among any number of concurrent requests with one
key (in one process or several sharing the file) exactly one inserts the key; the rest see it. A payment
belongs to the process that locked it (`locked_by`); another process takes it over only when that owner is
dead (see `liveness.Owner`), never by age.
"""
from __future__ import annotations

import enum
import sqlite3
import time
import uuid
from dataclasses import dataclass

from servers.liveness import Owner
from servers.sqlite_store import SQLiteStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS payments (
    id INTEGER PRIMARY KEY,
    txn_id TEXT NOT NULL UNIQUE,
    username TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    from_account TEXT NOT NULL,
    to_account TEXT NOT NULL,
    amount INTEGER NOT NULL CHECK (amount > 0),
    status TEXT NOT NULL CHECK (status IN ('processing', 'succeeded', 'declined', 'failed')),
    message TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS payments_by_user ON payments (username, id);
CREATE INDEX IF NOT EXISTS payments_by_recipient ON payments (to_account, id);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    username TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    payment_id INTEGER NOT NULL REFERENCES payments (id),
    recovery_point TEXT NOT NULL
        CHECK (recovery_point IN ('started', 'commit_decided', 'abort_decided', 'finished')),
    locked_by TEXT,
    response BLOB,
    created_at REAL NOT NULL,
    last_run_at REAL NOT NULL,
    finished_at REAL,
    PRIMARY KEY (username, idem_key)
);
CREATE INDEX IF NOT EXISTS keys_unfinished ON idempotency_keys (recovery_point) WHERE recovery_point != 'finished';
CREATE INDEX IF NOT EXISTS keys_finished_at ON idempotency_keys (finished_at) WHERE recovery_point = 'finished'
"""


class Point(str, enum.Enum):
    STARTED = "started"
    COMMIT_DECIDED = "commit_decided"
    ABORT_DECIDED = "abort_decided"
    FINISHED = "finished"


class ClaimKind(enum.Enum):
    NEW = "new"               # this request inserted the key: execute the payment
    RESUMED = "resumed"       # the key's owner died before deciding: this request continues it
    REPLAY = "replay"         # decided earlier: return the stored response
    MISMATCH = "mismatch"     # same key, other parameters
    IN_FLIGHT = "in_flight"   # a live process is executing it right now


@dataclass(frozen=True)
class Payment:
    id: int
    txn_id: str
    username: str
    idem_key: str
    from_account: str
    to_account: str
    amount: int
    recovery_point: Point
    response: bytes | None = None
    epoch: int = 0  # the fencing token a store hands out with a claimed or taken-over payment (PostgreSQL)


@dataclass(frozen=True)
class Claim:
    kind: ClaimKind
    payment: Payment | None = None
    previous_owner: str | None = None  # RESUMED: the dead owner it was taken from


@dataclass(frozen=True)
class HistoryRow:
    txn_id: str
    username: str
    idem_key: str
    from_account: str
    to_account: str
    amount: int
    status: str
    message: str
    created_at: float
    finished_at: float | None


class LostOwnership(RuntimeError):
    """The payment is no longer locked by this process; it must not act on it."""


def fingerprint(from_account: str, to_account: str, amount: int) -> str:
    return f"ProcessPayment\x1f{from_account}\x1f{to_account}\x1f{amount}"


_SELECT = ("SELECT p.id, p.txn_id, k.username, k.idem_key, p.from_account, p.to_account, p.amount,"
           " k.recovery_point, k.response, k.fingerprint, k.locked_by"
           " FROM idempotency_keys k JOIN payments p ON p.id = k.payment_id")


def _payment(row: tuple) -> Payment:
    return Payment(row[0], row[1], row[2], row[3], row[4], row[5], row[6], Point(row[7]), row[8])


class PaymentStore:
    def __init__(self, store: SQLiteStore, owner: Owner) -> None:
        self._store = store
        self.owner = owner
        with store.transaction() as db:
            for statement in filter(str.strip, SCHEMA.split(";")):
                db.execute(statement)

    # Each operation exists twice: `x(...)` runs in a transaction of its own (committed on return), and
    # `x_in(db, ...)` inside the caller's, which is how the gateway group-commits (sqlite_store.GroupCommitter).
    def claim(self, username: str, key: str, from_account: str, to_account: str, amount: int) -> Claim:
        with self._store.transaction() as db:
            claim = self.claim_in(db, username, key, from_account, to_account, amount)
        self.forget_previous_owner(claim)
        return claim

    def decide(self, payment: Payment, *, commit: bool, status: str, message: str, response: bytes) -> None:
        with self._store.transaction() as db:
            self.decide_in(db, payment, commit, status, message, response)

    def finish(self, payment: Payment) -> None:
        with self._store.transaction() as db:
            self.finish_in(db, payment)

    def release(self, payment: Payment) -> None:
        with self._store.transaction() as db:
            self.release_in(db, payment)

    def take_over_abandoned(self, limit: int = 100) -> list[Payment]:
        with self._store.transaction() as db:
            taken, dead = self.take_over_abandoned_in(db, limit)
        for owner_id in dead:
            self.owner.forget(owner_id)
        return taken

    def forget_previous_owner(self, claim: Claim) -> None:
        if claim.kind is ClaimKind.RESUMED and claim.previous_owner:
            self.owner.forget(claim.previous_owner)

    def claim_in(self, db: sqlite3.Connection, username: str, key: str, from_account: str, to_account: str,
                 amount: int) -> Claim:
        fp = fingerprint(from_account, to_account, amount)
        now = time.time()
        row = db.execute(_SELECT + " WHERE k.username = ? AND k.idem_key = ?", (username, key)).fetchone()
        if row is None:
            txn_id = f"txn-{uuid.uuid4().hex}"
            payment_id = db.execute(
                "INSERT INTO payments (txn_id, username, idem_key, from_account, to_account, amount, status,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, 'processing', ?)",
                (txn_id, username, key, from_account, to_account, amount, now)).lastrowid
            db.execute("INSERT INTO idempotency_keys (username, idem_key, fingerprint, payment_id, recovery_point,"
                       " locked_by, created_at, last_run_at) VALUES (?, ?, ?, ?, 'started', ?, ?, ?)",
                       (username, key, fp, payment_id, self.owner.id, now, now))
            return Claim(ClaimKind.NEW, Payment(payment_id, txn_id, username, key, from_account, to_account,
                                                amount, Point.STARTED))
        payment, stored_fp, locked_by = _payment(row), row[9], row[10]
        if stored_fp != fp:
            return Claim(ClaimKind.MISMATCH, payment)
        if payment.response is not None:
            return Claim(ClaimKind.REPLAY, payment)
        if self.owner.is_alive(locked_by):
            return Claim(ClaimKind.IN_FLIGHT, payment)
        # Undecided and its owner is dead (or let go of it): take it over, fenced on the old owner.
        cur = db.execute("UPDATE idempotency_keys SET locked_by = ?, last_run_at = ?"
                         " WHERE username = ? AND idem_key = ? AND locked_by IS ?",
                         (self.owner.id, now, username, key, locked_by))
        if cur.rowcount != 1:  # pragma: no cover - impossible inside one write transaction
            return Claim(ClaimKind.IN_FLIGHT, payment)
        return Claim(ClaimKind.RESUMED, payment, previous_owner=locked_by)

    def decide_in(self, db: sqlite3.Connection, payment: Payment, commit: bool, status: str, message: str,
                  response: bytes) -> None:
        """Record the decision and the response the client will get, durably, before telling any bank."""
        now = time.time()
        cur = db.execute("UPDATE idempotency_keys SET recovery_point = ?, response = ?, finished_at = ?,"
                         " last_run_at = ? WHERE username = ? AND idem_key = ? AND locked_by = ?"
                         " AND recovery_point = 'started'",
                         (Point.COMMIT_DECIDED.value if commit else Point.ABORT_DECIDED.value, response, now,
                          now, payment.username, payment.idem_key, self.owner.id))
        if cur.rowcount != 1:
            raise LostOwnership(f"payment {payment.txn_id} is not an undecided payment of this process")
        db.execute("UPDATE payments SET status = ?, message = ?, finished_at = ? WHERE id = ?",
                   (status, message, now, payment.id))

    def finish_in(self, db: sqlite3.Connection, payment: Payment) -> None:
        """Every bank acknowledged the decision: nothing is left to do for this payment."""
        db.execute("UPDATE idempotency_keys SET recovery_point = 'finished', locked_by = NULL, last_run_at = ?"
                   " WHERE username = ? AND idem_key = ? AND locked_by = ?"
                   " AND recovery_point IN ('commit_decided', 'abort_decided')",
                   (time.time(), payment.username, payment.idem_key, self.owner.id))

    def release_in(self, db: sqlite3.Connection, payment: Payment) -> None:
        """Let go of a payment this process cannot push further now; any gateway's completer picks it up."""
        db.execute("UPDATE idempotency_keys SET locked_by = NULL WHERE username = ? AND idem_key = ? AND locked_by = ?",
                   (payment.username, payment.idem_key, self.owner.id))

    def take_over_abandoned_in(self, db: sqlite3.Connection, limit: int = 100) -> tuple[list[Payment], set[str]]:
        """Lock unfinished payments whose owner is dead or gone. Returns them and the dead owners' ids."""
        taken: list[Payment] = []
        dead: set[str] = set()
        rows = db.execute(_SELECT + " WHERE k.recovery_point != 'finished' AND (k.locked_by IS NULL OR"
                          " k.locked_by != ?) ORDER BY p.id LIMIT ?", (self.owner.id, limit)).fetchall()
        for row in rows:
            locked_by = row[10]
            if self.owner.is_alive(locked_by):
                continue
            db.execute("UPDATE idempotency_keys SET locked_by = ?, last_run_at = ? WHERE username = ? AND idem_key = ?"
                       " AND locked_by IS ?", (self.owner.id, time.time(), row[2], row[3], locked_by))
            taken.append(_payment(row))
            if locked_by:
                dead.add(locked_by)
        return taken, dead

    def owned_unfinished(self) -> list[Payment]:
        rows = self._store.connection().execute(
            _SELECT + " WHERE k.recovery_point != 'finished' AND k.locked_by = ? ORDER BY p.id",
            (self.owner.id,)).fetchall()
        return [_payment(r) for r in rows]

    def history(self, username: str, accounts: tuple[str, ...], limit: int) -> list[HistoryRow]:
        """The user's payments, sent (any status) and received (succeeded), newest first."""
        cols = "txn_id, username, idem_key, from_account, to_account, amount, status, message, created_at, finished_at, id"
        marks = ",".join("?" * len(accounts)) or "NULL"
        rows = self._store.connection().execute(
            f"SELECT {cols} FROM payments WHERE username = ?"
            f" UNION SELECT {cols} FROM payments WHERE to_account IN ({marks}) AND status = 'succeeded'"
            " ORDER BY id DESC LIMIT ?", (username, *accounts, limit)).fetchall()
        return [HistoryRow(*r[:10]) for r in rows]

    def sweep(self, ttl_seconds: float, batch: int = 1000) -> int:
        """Delete finished keys older than the TTL (their payments stay in the history). Returns how many."""
        cutoff = time.time() - ttl_seconds
        total = 0
        while True:
            with self._store.transaction() as db:
                n = db.execute("DELETE FROM idempotency_keys WHERE rowid IN (SELECT rowid FROM idempotency_keys"
                               " WHERE recovery_point = 'finished' AND finished_at < ? LIMIT ?)",
                               (cutoff, batch)).rowcount
            total += n
            if n < batch:
                return total
