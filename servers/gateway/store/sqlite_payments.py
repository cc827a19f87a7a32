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
dead (see `owners.Owner`), never by age. Its records are in `records`.
"""
from __future__ import annotations

import heapq
import sqlite3
import time
from operator import itemgetter

from servers.gateway.store.owners import Owner
from servers.gateway.store.records import (Claim, ClaimKind, HistoryRow, LostOwnership, Payment, Point, fingerprint,
                                           new_txn_id)
from servers.sqlite_store import SQLiteStore, apply_schema

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
-- What an account received, newest first (the history): only succeeded payments are shown, so only they
-- are indexed, and a flood of declined payments to an account costs its history nothing.
CREATE INDEX IF NOT EXISTS payments_received ON payments (to_account, id) WHERE status = 'succeeded';
DROP INDEX IF EXISTS payments_by_recipient;
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


_SELECT = ("SELECT p.id, p.txn_id, k.username, k.idem_key, p.from_account, p.to_account, p.amount,"
           " k.recovery_point, k.response, k.fingerprint, k.locked_by"
           " FROM idempotency_keys k JOIN payments p ON p.id = k.payment_id")


_HISTORY_COLUMNS = ("txn_id, username, idem_key, from_account, to_account, amount, status, message, created_at,"
                    " finished_at, id")
_HISTORY_SENT = f"SELECT {_HISTORY_COLUMNS} FROM payments WHERE username = ? ORDER BY id DESC LIMIT ?"
# `status = 'succeeded'` spelled as the partial index `payments_received` is, so that the index is used.
_HISTORY_RECEIVED = (f"SELECT {_HISTORY_COLUMNS} FROM payments WHERE to_account = ? AND status = 'succeeded'"
                     " ORDER BY id DESC LIMIT ?")


def _payment(row: tuple) -> Payment:
    return Payment(row[0], row[1], row[2], row[3], row[4], row[5], row[6], Point(row[7]), row[8])


class PaymentStore:
    def __init__(self, store: SQLiteStore, owner: Owner) -> None:
        self._store = store
        self.owner = owner
        with store.transaction() as db:
            apply_schema(db, SCHEMA)

    # Each operation exists twice: `x(...)` runs in a transaction of its own (committed on return), and
    # `x_in(db, ...)` inside the caller's, which is how the gateway group-commits (sqlite_store.GroupCommitter).
    def claim(self, username: str, key: str, from_account: str, to_account: str, amount: int,
              may_insert: bool = True) -> Claim:
        with self._store.transaction() as db:
            claim = self.claim_in(db, username, key, from_account, to_account, amount, may_insert)
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
        self.forget_dead(dead)
        return taken

    def forget_dead(self, owners: set[str]) -> None:
        """After the commit that took their payments over: owners found dead need no more probing."""
        for owner_id in owners:
            self.owner.forget(owner_id)

    def forget_previous_owner(self, claim: Claim) -> None:
        if claim.kind is ClaimKind.RESUMED and claim.previous_owner:
            self.owner.forget(claim.previous_owner)

    def claim_in(self, db: sqlite3.Connection, username: str, key: str, from_account: str, to_account: str,
                 amount: int, may_insert: bool = True) -> Claim:
        """Claim a key, or find what it already holds. `may_insert=False` (today's configuration refuses the
        request) still finds a stored key, to replay it, but inserts no new one: REFUSED instead of NEW."""
        fp = fingerprint(from_account, to_account, amount)
        now = time.time()
        row = db.execute(_SELECT + " WHERE k.username = ? AND k.idem_key = ?", (username, key)).fetchone()
        if row is None and not may_insert:
            return Claim(ClaimKind.REFUSED)
        if row is None:
            txn_id = new_txn_id()
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
        """Lock up to `limit` unfinished payments (oldest first) whose owner is dead or let go of them.
        Returns them and the dead owners' ids.

        Live owners are left out in the query itself, not after it: a live peer may have any number of
        payments in flight, and filtering a `LIMIT`ed page afterwards let its oldest `limit` hide a dead
        owner's payments from every pass. Owners are few (one per gateway process), so each is asked once."""
        owners = [o for (o,) in db.execute("SELECT DISTINCT locked_by FROM idempotency_keys"
                                           " WHERE recovery_point != 'finished' AND locked_by IS NOT NULL")]
        live = [self.owner.id] + [o for o in owners if o != self.owner.id and self.owner.is_alive(o)]
        rows = db.execute(_SELECT + " WHERE k.recovery_point != 'finished' AND (k.locked_by IS NULL OR"
                          f" k.locked_by NOT IN ({','.join('?' * len(live))})) ORDER BY p.id LIMIT ?",
                          (*live, limit)).fetchall()
        taken: list[Payment] = []
        dead: set[str] = set()
        for row in rows:
            locked_by = row[10]
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
        """The user's payments, sent (any status) and received (succeeded), newest first.

        One indexed query per source (what the user sent; what each account received), each reading at most
        `limit` rows newest first, merged here: the cost is O(limit × sources) however many payments an
        account has received — anyone can send an account ₹0.01 payments, and one query over all sources
        (`to_account IN (…)` in a UNION) sorted every one of them. One read transaction: one snapshot."""
        db = self._store.connection()
        own_snapshot = not db.in_transaction
        if own_snapshot:
            db.execute("BEGIN")
        try:
            sources = [db.execute(_HISTORY_SENT, (username, limit)).fetchall()]
            sources += [db.execute(_HISTORY_RECEIVED, (account, limit)).fetchall() for account in accounts]
        finally:
            if own_snapshot:
                db.execute("COMMIT")
        rows: list[HistoryRow] = []
        last_id = None
        # Each source is newest first; a payment between two of the user's own accounts is in two of them.
        for row in heapq.merge(*sources, key=itemgetter(10), reverse=True):
            if row[10] != last_id:
                rows.append(HistoryRow(*row[:10]))
                last_id = row[10]
                if len(rows) == limit:
                    break
        return rows

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
