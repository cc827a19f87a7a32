"""A bank's durable ledger: accounts, holds, and the 2PC state of every transaction id (CONTRACT §6).

Invariants, each enforced inside one SQLite transaction:
- `held` of an account is the sum of the amounts of its prepared (not yet committed or aborted) debits;
- `balance - held >= 0` always (CHECK constraints), so concurrent prepares can never overdraw;
- a transaction id moves only started → prepared → committed | aborted, or straight to aborted (an Abort
  of an unknown id is remembered so that a late Prepare votes NO).
"""
from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from servers.money import bank_of
from servers.sqlite_store import SQLiteStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (
    account TEXT PRIMARY KEY,
    balance INTEGER NOT NULL CHECK (balance >= 0),
    held INTEGER NOT NULL DEFAULT 0 CHECK (held >= 0 AND held <= balance)
);
CREATE TABLE IF NOT EXISTS transactions (
    txn_id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('prepared', 'committed', 'aborted')),
    from_account TEXT,
    to_account TEXT,
    amount INTEGER,
    debit_here INTEGER NOT NULL DEFAULT 0,
    credit_here INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS transactions_prepared ON transactions (state) WHERE state = 'prepared'
"""


@dataclass(frozen=True)
class Vote:
    yes: bool
    reason: str = ""


@dataclass(frozen=True)
class Outcome:
    ok: bool
    message: str = ""


@dataclass(frozen=True)
class Balance:
    balance: int
    available: int


class Ledger:
    def __init__(self, path: Path, bank: str, opening_balances: "callable[[], dict[str, int]]") -> None:  # type: ignore[valid-type]
        self.bank = bank
        self._store = SQLiteStore(path, SCHEMA, preallocate=True)
        with self._store.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'bank'").fetchone()
            if row is None:
                # A new ledger: the config's opening balances are read now and never again.
                db.execute("INSERT INTO meta (key, value) VALUES ('bank', ?)", (bank,))
                db.executemany("INSERT INTO accounts (account, balance) VALUES (?, ?)",
                               sorted(opening_balances().items()))
            elif row[0] != bank:
                raise ValueError(f"ledger {path} belongs to bank {row[0]}, not {bank}")
        self._reader: sqlite3.Connection | None = None  # holds(): one connection for every thread that asks
        self._reader_lock = threading.Lock()

    @property
    def store(self) -> SQLiteStore:
        return self._store

    def close(self) -> None:
        self._store.close()

    def _mine(self, account: str) -> bool:
        try:
            return bank_of(account) == self.bank
        except ValueError:
            return False

    # Each operation exists twice: `x(...)` runs it in a transaction of its own (committed on return);
    # `x_in(db, ...)` runs it inside the caller's transaction, which is how the bank server group-commits.
    def prepare(self, txn_id: str, from_account: str, to_account: str, amount: int) -> Vote:
        with self._store.transaction() as db:
            return self.prepare_in(db, txn_id, from_account, to_account, amount)

    def commit(self, txn_id: str) -> Outcome:
        with self._store.transaction() as db:
            return self.commit_in(db, txn_id)

    def abort(self, txn_id: str) -> Outcome:
        with self._store.transaction() as db:
            return self.abort_in(db, txn_id)

    def prepare_in(self, db: sqlite3.Connection, txn_id: str, from_account: str, to_account: str,
                   amount: int) -> Vote:
        debit, credit = self._mine(from_account), self._mine(to_account)
        if not (debit or credit):
            return Vote(False, f"neither account belongs to bank {self.bank}")
        now = time.time()
        row = db.execute("SELECT state, from_account, to_account, amount FROM transactions WHERE txn_id = ?",
                         (txn_id,)).fetchone()
        if row is not None:
            state, f, t, a = row
            if state == "aborted":
                return Vote(False, "transaction was aborted")
            if (f, t, a) != (from_account, to_account, amount):
                return Vote(False, "transaction id already used for another transfer")
            return Vote(True)  # prepared or committed: a duplicate Prepare changes nothing
        for account in {a for a, here in ((from_account, debit), (to_account, credit)) if here}:
            if db.execute("SELECT 1 FROM accounts WHERE account = ?", (account,)).fetchone() is None:
                return Vote(False, f"account {account} does not exist at {self.bank}")
        if debit:
            # Hold the money: the sender's available balance (balance - held) must cover it.
            cur = db.execute("UPDATE accounts SET held = held + ? WHERE account = ? AND balance - held >= ?",
                             (amount, from_account, amount))
            if cur.rowcount != 1:
                return Vote(False, f"insufficient funds in {from_account}")
        db.execute("INSERT INTO transactions (txn_id, state, from_account, to_account, amount, debit_here,"
                   " credit_here, created_at, updated_at) VALUES (?, 'prepared', ?, ?, ?, ?, ?, ?, ?)",
                   (txn_id, from_account, to_account, amount, int(debit), int(credit), now, now))
        return Vote(True)

    def commit_in(self, db: sqlite3.Connection, txn_id: str) -> Outcome:
        row = db.execute("SELECT state, from_account, to_account, amount, debit_here, credit_here"
                         " FROM transactions WHERE txn_id = ?", (txn_id,)).fetchone()
        if row is None:
            return Outcome(False, "unknown transaction: it was never prepared here")
        state, from_account, to_account, amount, debit, credit = row
        if state == "committed":
            return Outcome(True, "already committed")
        if state == "aborted":
            return Outcome(False, "transaction was aborted; it cannot be committed")
        if debit:
            db.execute("UPDATE accounts SET balance = balance - ?, held = held - ? WHERE account = ?",
                       (amount, amount, from_account))
        if credit:
            db.execute("UPDATE accounts SET balance = balance + ? WHERE account = ?", (amount, to_account))
        db.execute("UPDATE transactions SET state = 'committed', updated_at = ? WHERE txn_id = ?",
                   (time.time(), txn_id))
        return Outcome(True, "committed")

    def abort_in(self, db: sqlite3.Connection, txn_id: str) -> Outcome:
        now = time.time()
        row = db.execute("SELECT state, from_account, amount, debit_here FROM transactions WHERE txn_id = ?",
                         (txn_id,)).fetchone()
        if row is None:
            # Remember the abort so that a Prepare arriving late (after the coordinator gave up) votes NO.
            db.execute("INSERT INTO transactions (txn_id, state, created_at, updated_at)"
                       " VALUES (?, 'aborted', ?, ?)", (txn_id, now, now))
            return Outcome(True, "aborted before it was prepared")
        state, from_account, amount, debit = row
        if state == "aborted":
            return Outcome(True, "already aborted")
        if state == "committed":
            return Outcome(False, "transaction is committed; it cannot be aborted")
        if debit:
            db.execute("UPDATE accounts SET held = held - ? WHERE account = ?", (amount, from_account))
        db.execute("UPDATE transactions SET state = 'aborted', updated_at = ? WHERE txn_id = ?", (now, txn_id))
        return Outcome(True, "aborted")

    def holds(self) -> tuple[int, int]:
        """(how many, paise): the debits prepared here and not yet committed or aborted. Callable from any
        thread (metrics are scraped on threads of their own, one per scrape: a connection per thread would
        leave one open per scrape). Reads the prepared rows only, through their partial index."""
        with self._reader_lock:
            if self._reader is None:
                self._reader = self._store.new_connection()
            count, paise = self._reader.execute(
                "SELECT count(*), coalesce(sum(amount), 0) FROM transactions WHERE state = 'prepared'"
                " AND debit_here = 1").fetchone()
        return count, paise

    def balance(self, account: str) -> Balance | None:
        row = self._store.connection().execute("SELECT balance, held FROM accounts WHERE account = ?",
                                                (account,)).fetchone()
        return None if row is None else Balance(row[0], row[0] - row[1])
