"""One SQLite connection per thread, in WAL mode with synchronous=FULL: a commit is on disk when it returns."""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")


# The page size of every database this store creates (an existing database keeps its own). A commit writes
# each page it changed to the WAL as a frame of page size + 24 bytes, and its fsync flushes every disk block
# those frames touch; a payment's commits change 3–14 pages (rows and index entries): 3–14 KB with 1 KB pages,
# 12–58 KB with SQLite's default 4 KB. In interleaved rounds of real clusters: sequential payments 1.07–1.10×
# (three sets of 8–10 rounds), concurrent neutral (0.88–1.10 in four sets, CPU per payment 0.99×).
PAGE_SIZE = 1024
# How much the WAL holds before SQLite checkpoints it: SQLite's default (1,000 pages of 4 KB), in bytes.
WAL_CHECKPOINT_BYTES = 4 * 1024 * 1024


def wal_checkpoint_pages(page_size: int) -> int:
    return WAL_CHECKPOINT_BYTES // page_size


def preallocate_wal(path: Path, page_size: int) -> None:
    """Give a database that has no WAL yet a zero-filled one of the size it reaches before each checkpoint.

    A commit that appends to the WAL makes the file system journal the new size on every fsync (≈0.4 ms here);
    one that overwrites blocks already on disk needs only the data flushed (≈0.2 ms). After its first
    checkpoint SQLite rewrites its WAL from the start without shrinking it, so this only takes the first
    cycle's cost away from a fresh start. SQLite treats a WAL whose header is not valid as empty, and frames
    are checksummed, so the zeros are never mistaken for data. The file appears whole or not at all (a hard
    link of a finished temp file, refused if a WAL appeared meanwhile): an existing WAL is never touched.
    """
    wal = path.with_name(path.name + "-wal")
    if wal.exists():
        return
    tmp = wal.with_name(f"{wal.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            # A checkpoint runs after the commit that crosses the threshold: leave room for that commit.
            f.write(bytes(32 + (wal_checkpoint_pages(page_size) + 128) * (page_size + 24)))
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, wal)
    except OSError:
        pass  # a WAL appeared meanwhile, or no hard links here: SQLite makes its own, nothing is lost
    finally:
        tmp.unlink(missing_ok=True)


def apply_schema(db: sqlite3.Connection, schema: str) -> None:
    """Every `;`-separated statement of `schema`, inside the caller's transaction (`executescript` would commit)."""
    for statement in filter(str.strip, schema.split(";")):
        db.execute(statement)


class SQLiteStore:
    def __init__(self, path: Path, schema: str, *, preallocate: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        # Set up with a connection of its own, closed again: the last connection to close checkpoints and
        # removes the WAL, so it can then be recreated preallocated (below).
        bootstrap = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        try:
            bootstrap.execute("PRAGMA busy_timeout=30000")
            bootstrap.execute(f"PRAGMA page_size={PAGE_SIZE}")  # takes effect only on a new, empty file
            bootstrap.execute("PRAGMA journal_mode=WAL")
            bootstrap.execute("BEGIN IMMEDIATE")
            apply_schema(bootstrap, schema)
            bootstrap.execute("COMMIT")
            self.page_size: int = bootstrap.execute("PRAGMA page_size").fetchone()[0]
        finally:
            bootstrap.close()
        if preallocate:  # the servers: a few MB written once at start for cheaper commits ever after
            preallocate_wal(self.path, self.page_size)

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (made on first use)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self.new_connection()
        return db

    def new_connection(self) -> sqlite3.Connection:
        """A connection of its own (closed with the store), e.g. for a writer that hands it between threads."""
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so the write lock is taken up front
        # and two writers never deadlock upgrading a read lock.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(f"PRAGMA wal_autocheckpoint={wal_checkpoint_pages(self.page_size)}")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=30000")
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


def _call_soon_threadsafe(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:
        pass  # the loop is closed: close() settled the batch itself


class GroupCommitter:
    """Write operations batched on the event loop: all those submitted while the previous batch was being
    written share one transaction, so one fsync serves many payments under load.

    `submit(fn, *args)` queues `fn(db, *args)` and returns an asyncio future that resolves only after the
    batch's COMMIT returned: a caller that awaits it knows its change is on disk before it makes the next
    remote call. An operation that raises is rolled back alone and gets the exception (the batch then starts
    over with a SAVEPOINT around each operation); the rest of the batch commits. The operations always run on
    the loop (they are short). A batch with one awaited write (lazy ones may ride along) is committed right
    there too: a lone write costs no thread hand-off. With `commit_in_thread`, a batch of several awaited
    writes (the sign of load) has its COMMIT, the fsync, done on a thread of its own, so the loop keeps
    serving while the disk works, and everything submitted meanwhile forms the next batch. One transaction at
    a time, on a connection of the committer's own, so reads elsewhere never see a batch before it is
    durable. Must be used from the event loop's thread.
    """

    def __init__(self, store: SQLiteStore, max_batch: int = 256, *, commit_in_thread: bool = False,
                 on_commit: Callable[[float], None] | None = None) -> None:
        self._store = store
        self._on_commit = on_commit  # told each COMMIT's duration in seconds (on the thread that committed)
        self._max_batch = max_batch
        self._pending: list[tuple[Callable[..., Any], tuple, asyncio.Future]] = []
        self._scheduled = False
        self._lazy_timer: asyncio.TimerHandle | None = None
        self._db = store.new_connection()
        self._committer = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="strife-commit")
                           if commit_in_thread else None)
        self._in_flight: concurrent.futures.Future | None = None  # a COMMIT running on the thread
        self._lazy: set[asyncio.Future] = set()  # queued writes nobody waits for (submit_lazy)
        self._settle_in_flight: Callable[[], None] = lambda: None
        self._closing = False

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
        self._lazy.add(future)
        if not self._scheduled and self._lazy_timer is None:
            self._lazy_timer = loop.call_later(within, self._flush)
        return future

    def close(self) -> None:
        """Write everything still queued (waiting for a COMMIT in flight first), then release the connection."""
        self._closing = True  # from here on every batch commits right here, on the caller's thread
        if self._in_flight is not None:
            concurrent.futures.wait([self._in_flight])
            self._settle_in_flight()
        while self._pending:
            self._flush()
        if self._committer is not None:
            self._committer.shutdown(wait=True)
        self._db.close()

    def run_now(self, operations: list[tuple[Callable[..., Any], tuple]]) -> list[tuple[Any, BaseException | None]]:
        """Run `fn(db, *args)` for each operation in one transaction, now, on the caller's thread: one fsync
        for all of them. Returns (result, error) per operation, as `submit` would resolve them (an operation
        that raises is rolled back alone). If the transaction itself cannot commit, raises: nothing is durable.
        Not for a committer with `commit_in_thread` (its connection may be mid-commit)."""
        if self._committer is not None:
            raise RuntimeError("run_now is not available with commit_in_thread")
        outcomes = self._apply(operations)
        self._commit()
        return outcomes

    def _apply(self, operations: list[tuple[Callable[..., Any], tuple]]) -> list[tuple[Any, BaseException | None]]:
        """Take the write lock, BEGIN IMMEDIATE and run the operations. On return the transaction is open and
        the lock held, for `_commit` (on any thread); if this raises, both are already let go."""
        db = self._db
        self._store._write_lock.acquire()
        try:
            db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._store._write_lock.release()
            raise
        try:
            # Optimistically without savepoints (operations rarely fail); if one does, the batch starts over
            # with a savepoint around each operation, so that only the failing one is rolled back (a lone
            # operation needs no second run: rolling back the transaction rolled it back).
            try:
                return [(fn(db, *args), None) for fn, args in operations]
            except Exception as exc:  # noqa: BLE001 - handed to the caller, or each operation run on its own
                db.execute("ROLLBACK")
                db.execute("BEGIN IMMEDIATE")
                if len(operations) == 1:
                    return [(None, exc)]
            outcomes: list[tuple[Any, BaseException | None]] = []
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
            return outcomes
        except BaseException:
            self._rollback()
            raise

    def _commit(self) -> None:
        """COMMIT the open transaction (the fsync) and let go of the write lock; on failure, roll back."""
        started = time.perf_counter()
        try:
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._store._write_lock.release()
        if self._on_commit is not None:
            self._on_commit(time.perf_counter() - started)

    def _rollback(self) -> None:
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        finally:
            self._store._write_lock.release()

    def _flush(self) -> None:
        self._scheduled = False
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        if self._in_flight is not None or not self._pending:
            return  # a batch is being written: what is queued goes next, when it is done
        batch, self._pending = self._pending[:self._max_batch], self._pending[self._max_batch:]
        live = [(fn, args, future) for fn, args, future in batch if not future.cancelled()]
        if not live:
            self._next()
            return
        try:
            outcomes = self._apply([(fn, args) for fn, args, _ in live])
        except Exception as exc:  # noqa: BLE001 - the batch could not run: nobody's change is durable
            self._settle(live, None, exc)
            self._next()
            return
        awaited = sum(1 for _, _, future in live if future not in self._lazy)
        self._lazy.difference_update(future for _, _, future in batch)
        # One awaited write (plus lazy ones riding along) is the sign of no load: commit here, no hand-off.
        if self._committer is None or awaited <= 1 or self._closing:
            try:
                self._commit()
            except Exception as exc:  # noqa: BLE001
                self._settle(live, None, exc)
            else:
                self._settle(live, outcomes, None)
            self._next()
            return
        loop = asyncio.get_running_loop()
        flight = self._in_flight = self._committer.submit(self._commit)

        def committed() -> None:
            if self._in_flight is not flight:
                return  # already settled (by close)
            self._in_flight = None
            error = flight.exception()
            self._settle(live, None if error else outcomes, error)
            self._next()

        self._settle_in_flight = committed
        flight.add_done_callback(lambda _: _call_soon_threadsafe(loop, committed))

    def _next(self) -> None:
        if self._pending and not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # closing outside the loop: close() flushes what is left itself
            self._scheduled = True
            loop.call_soon(self._flush)

    @staticmethod
    def _settle(live: list[tuple[Callable[..., Any], tuple, asyncio.Future]],
                outcomes: list[tuple[Any, BaseException | None]] | None, error: BaseException | None) -> None:
        for index, (_, _, future) in enumerate(live):
            if future.done():
                continue
            if outcomes is None:
                future.set_exception(error if error is not None else RuntimeError("commit failed"))
                continue
            result, failure = outcomes[index]
            if failure is None:
                future.set_result(result)
            else:
                future.set_exception(failure)
