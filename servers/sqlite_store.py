"""One SQLite connection per thread, in WAL mode with synchronous=FULL: a commit is on disk when it returns."""
from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")


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


class GroupCommitter:
    """Write operations run on one thread, as many as are waiting in one transaction: one fsync per batch.

    `submit(fn, *args)` queues `fn(db, *args)`; its future resolves only after the batch's COMMIT returned,
    so a caller that awaits it knows its change is on disk before it makes the next remote call. Each
    operation runs inside its own SAVEPOINT: one that raises is rolled back alone and gets the exception,
    the rest of the batch commits. This is how a gateway or a bank under concurrent load pays one fsync for
    many payments without giving up synchronous=FULL.
    """

    def __init__(self, store: SQLiteStore, max_batch: int = 128) -> None:
        self._store = store
        self._max_batch = max_batch
        self._queue: "queue.SimpleQueue[tuple | None]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"commit:{store.path.name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> "futures.Future[T]":
        future: futures.Future[T] = futures.Future()
        self._queue.put((fn, args, future))
        return future

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self._max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                batch.append(more)
            self._commit(batch)

    def _commit(self, batch: list[tuple]) -> None:
        outcomes: list[tuple[futures.Future, Any, BaseException | None]] = []
        db = self._store.connection()
        try:
            with self._store._write_lock:
                db.execute("BEGIN IMMEDIATE")
                try:
                    for fn, args, future in batch:
                        if not future.set_running_or_notify_cancel():
                            continue
                        db.execute("SAVEPOINT op")
                        try:
                            result = fn(db, *args)
                        except Exception as exc:  # noqa: BLE001 - handed to the operation's caller
                            db.execute("ROLLBACK TO op")
                            db.execute("RELEASE op")
                            outcomes.append((future, None, exc))
                        else:
                            db.execute("RELEASE op")
                            outcomes.append((future, result, None))
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
        except Exception as exc:  # noqa: BLE001 - the whole batch failed to commit: nobody's change is durable
            for fn, args, future in batch:
                if future.running():
                    future.set_exception(exc)
            return
        for future, result, error in outcomes:
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
