"""One SQLite connection per thread, in WAL mode with synchronous=FULL: a commit is on disk when it returns."""
from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class SQLiteStore:
    def __init__(self, path: Path, schema: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        with self.transaction() as db:
            for statement in filter(str.strip, schema.split(";")):
                db.execute(statement)

    def connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so the write lock is taken up front
            # and two writers never deadlock upgrading a read lock.
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
            with self._lock:
                self._all.append(db)
        return db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT (durable on return), or ROLLBACK if the block raises.

        Writers of one process queue on a lock first: SQLite's own busy handler sleeps in growing steps
        (up to 100 ms) when the write lock is taken, which under concurrency costs far more than waiting for
        the holder. Other processes sharing the file still meet at SQLite's lock (busy_timeout).
        """
        db = self.connection()
        with self._write_lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                try:
                    db.close()
                except sqlite3.Error:  # pragma: no cover - closing a connection another thread still uses
                    pass
            self._all.clear()
        self._local = threading.local()
