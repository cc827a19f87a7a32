"""One SQLite connection per thread, in WAL mode with synchronous=FULL: a commit is on disk when it returns."""
from __future__ import annotations

import asyncio
import sqlite3
import threading
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
    """Write operations batched on the event loop: all those submitted in one loop iteration share one
    transaction, so one fsync serves many payments under load, and a lone write costs no thread hand-off.

    `submit(fn, *args)` queues `fn(db, *args)` and returns an asyncio future that resolves only after the
    batch's COMMIT returned: a caller that awaits it knows its change is on disk before it makes the next
    remote call. Each operation runs inside its own SAVEPOINT: one that raises is rolled back alone and gets
    the exception; the rest of the batch commits. The commit blocks the loop for one fsync (well under a
    millisecond); requests arriving meanwhile wait in the socket buffers and join the next batch.
    Must be used from the event loop's thread.
    """

    def __init__(self, store: SQLiteStore, max_batch: int = 256) -> None:
        self._store = store
        self._max_batch = max_batch
        self._pending: list[tuple[Callable[..., Any], tuple, asyncio.Future]] = []
        self._scheduled = False
        self._lazy_timer: asyncio.TimerHandle | None = None

    def submit(self, fn: Callable[..., T], *args: Any) -> "asyncio.Future[T]":
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append((fn, args, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.submit(fn, *args)

    def submit_lazy(self, fn: Callable[..., T], *args: Any, within: float = 0.02) -> "asyncio.Future[T]":
        """Queue a write nobody waits for before a remote call (e.g. marking a payment finished): it rides
        along with the next batch, or is flushed on its own after `within` seconds. Keeps its fsync off the
        path of the reply being sent right now."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append((fn, args, future))
        if not self._scheduled and self._lazy_timer is None:
            self._lazy_timer = loop.call_later(within, self._flush)
        return future

    def close(self) -> None:
        while self._pending:
            self._flush()

    def run_now(self, operations: list[tuple[Callable[..., Any], tuple]]) -> list[tuple[Any, BaseException | None]]:
        """Run `fn(db, *args)` for each operation in one transaction, now, on the caller's thread: one fsync
        for all of them. Returns (result, error) per operation, as `submit` would resolve them (an operation
        that raises is rolled back alone). If the transaction itself cannot commit, raises: nothing is durable."""
        return self._execute(operations)

    def _execute(self, operations: list[tuple[Callable[..., Any], tuple]]) -> list[tuple[Any, BaseException | None]]:
        outcomes: list[tuple[Any, BaseException | None]] = []
        db = self._store.connection()
        with self._store._write_lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                for fn, args in operations:
                    db.execute("SAVEPOINT op")
                    try:
                        result = fn(db, *args)
                    except Exception as exc:  # noqa: BLE001 - handed to the operation's caller
                        db.execute("ROLLBACK TO op")
                        db.execute("RELEASE op")
                        outcomes.append((None, exc))
                    else:
                        db.execute("RELEASE op")
                        outcomes.append((result, None))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        return outcomes

    def _flush(self) -> None:
        self._scheduled = False
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        if not self._pending:
            return
        batch, self._pending = self._pending[:self._max_batch], self._pending[self._max_batch:]
        if self._pending:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        live = [(fn, args, future) for fn, args, future in batch if not future.cancelled()]
        try:
            outcomes = self._execute([(fn, args) for fn, args, _ in live])
        except Exception as exc:  # noqa: BLE001 - the batch failed to commit: nobody's change is durable
            for _, _, future in live:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), (result, error) in zip(live, outcomes):
            if future.done():
                continue
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
