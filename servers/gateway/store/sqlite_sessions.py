"""Login sessions in SQLite: random bearer tokens with an expiry.

Only a SHA-256 of each token is stored, so a copy of the database does not hand out live tokens. Sessions live
in the store (not in process memory) so that a restarted gateway, or another gateway on the same data
directory, accepts them.

A session ends when it expires, when its holder logs out (`revoked_at` is set: the row stays until it expires,
so the holder's repeated Logout is still recognised), when its user's credential changes (each session stores
the fingerprint of the credential it was issued against, `config.credential_id`, and is refused once the user's
current one differs) and when its user is removed from the configuration.

Every call reads its session from the store, with no cache in between, so a Logout takes effect at once on
every process sharing the store. (A cache saved little: an indexed read by primary key costs ≈15 µs on the
loop when a commit came just before it, against ≈3 µs for a cache hit; payments showed no difference.)
"""
from __future__ import annotations

import sqlite3
import time

from servers.gateway.store.records import new_token, token_key
from servers.sqlite_store import SQLiteStore, apply_schema

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_expiry ON sessions (expires_at)
"""
# Added after the first release: a store made before them is upgraded in place. Its sessions carry no
# credential fingerprint, so they are refused and their users log in once more.
_ADDED_COLUMNS = {"credential": "TEXT NOT NULL DEFAULT ''", "revoked_at": "REAL"}


class Sessions:
    def __init__(self, store: SQLiteStore) -> None:
        self._store = store
        with store.transaction() as db:
            apply_schema(db, SCHEMA)
            have = {row[1] for row in db.execute("PRAGMA table_info(sessions)")}
            for column, declaration in _ADDED_COLUMNS.items():
                if column not in have:
                    db.execute(f"ALTER TABLE sessions ADD COLUMN {column} {declaration}")

    def create(self, username: str, credential: str, ttl: float) -> tuple[str, float]:
        with self._store.transaction() as db:
            return self.create_in(db, username, credential, ttl)

    def create_in(self, db: sqlite3.Connection, username: str, credential: str, ttl: float) -> tuple[str, float]:
        token = new_token()
        now = time.time()
        expires = now + ttl
        db.execute("INSERT INTO sessions (token_hash, username, created_at, expires_at, credential)"
                   " VALUES (?, ?, ?, ?, ?)", (token_key(token), username, now, expires, credential))
        return token, expires

    def resolve(self, token: str) -> tuple[str, str] | None:
        """(user, credential fingerprint) of a live token, or None (unknown, expired, logged out). The gateway
        compares the credential with the user's current one (a changed password ends the session)."""
        if (key := token_key(token)) is None:
            return None
        row = self._store.connection().execute(
            "SELECT username, credential FROM sessions WHERE token_hash = ? AND expires_at > ? AND revoked_at IS NULL",
            (key, time.time())).fetchone()
        return None if row is None else (row[0], row[1])

    def revoke_in(self, db: sqlite3.Connection, token: str) -> str | None:
        """Log a token out. Returns its user, also for a token logged out before (the holder retrying), or
        None if the token is unknown or expired."""
        if (key := token_key(token)) is None:
            return None
        now = time.time()
        row = db.execute("UPDATE sessions SET revoked_at = coalesce(revoked_at, ?) WHERE token_hash = ?"
                         " AND expires_at > ? RETURNING username", (now, key, now)).fetchone()
        return None if row is None else row[0]

    def sweep(self) -> int:
        with self._store.transaction() as db:
            return db.execute("DELETE FROM sessions WHERE expires_at <= ?", (time.time(),)).rowcount
