"""Login sessions: random bearer tokens with an expiry, kept in the gateway's SQLite store.

Only a SHA-256 of each token is stored, so a copy of the database does not hand out live tokens. Sessions live
in the store (not in process memory) so that a restarted gateway, or another gateway on the same data
directory, accepts them. A small in-process cache saves the read on hot paths; tokens never change, only
expire, so a cached entry is checked against its own expiry.
"""
from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time

from servers.sqlite_store import SQLiteStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_expiry ON sessions (expires_at)
"""
_CACHE_LIMIT = 10_000


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class Sessions:
    def __init__(self, store: SQLiteStore, ttl_seconds: float) -> None:
        self._store = store
        self._ttl = ttl_seconds
        self._cache: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        with store.transaction() as db:
            for statement in filter(str.strip, SCHEMA.split(";")):
                db.execute(statement)

    def create(self, username: str) -> tuple[str, float]:
        with self._store.transaction() as db:
            return self.create_in(db, username)

    def create_in(self, db: sqlite3.Connection, username: str) -> tuple[str, float]:
        token = secrets.token_urlsafe(32)
        now = time.time()
        expires = now + self._ttl
        db.execute("INSERT INTO sessions (token_hash, username, created_at, expires_at) VALUES (?, ?, ?, ?)",
                   (_digest(token), username, now, expires))
        return token, expires

    def resolve(self, token: str) -> str | None:
        """The user a live token belongs to, or None."""
        if len(token) > 512:
            return None
        key = _digest(token)
        now = time.time()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        row = self._store.connection().execute(
            "SELECT username, expires_at FROM sessions WHERE token_hash = ?", (key,)).fetchone()
        if row is None or row[1] <= now:
            return None
        with self._lock:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = (row[0], row[1])
        return row[0]

    def sweep(self) -> int:
        with self._store.transaction() as db:
            return db.execute("DELETE FROM sessions WHERE expires_at <= ?", (time.time(),)).rowcount
