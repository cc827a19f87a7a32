"""The SQLite layer: group commit (inline and with the COMMIT on a thread), and the preallocated WAL."""
from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from servers.sqlite_store import PAGE_SIZE, WAL_CHECKPOINT_BYTES, GroupCommitter, SQLiteStore, preallocate_wal

SCHEMA = "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INTEGER NOT NULL CHECK (v >= 0))"


def put(db: sqlite3.Connection, key: str, value: int) -> str:
    db.execute("INSERT INTO t (k, v) VALUES (?, ?)", (key, value))
    return key


def on_disk(path: Path) -> dict[str, int]:
    """What another connection (another process, or this one after a crash) reads: only committed rows."""
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT k, v FROM t").fetchall())


@pytest.mark.parametrize("in_thread", [False, True])
def test_a_batch_commits_together_and_a_failing_write_fails_alone(tmp_path: Path, in_thread: bool) -> None:
    store = SQLiteStore(tmp_path / "s.sqlite3", SCHEMA)
    committer = GroupCommitter(store, commit_in_thread=in_thread)
    seen_at_resolution: list[dict[str, int]] = []

    async def scenario() -> list[object]:
        futures = [committer.submit(put, "a", 1), committer.submit(put, "bad", -1), committer.submit(put, "b", 2)]
        for future in futures:
            future.add_done_callback(lambda _: seen_at_resolution.append(on_disk(store.path)))
        return await asyncio.gather(*futures, return_exceptions=True)

    results = asyncio.run(scenario())
    assert results[0] == "a" and results[2] == "b"
    assert isinstance(results[1], sqlite3.IntegrityError)
    # Each future resolved only once its batch was durable and visible to others.
    assert all(seen == {"a": 1, "b": 2} for seen in seen_at_resolution)
    committer.close()
    store.close()


def test_writes_submitted_while_a_commit_is_in_flight_form_the_next_batch(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.sqlite3", SCHEMA)
    committer = GroupCommitter(store, commit_in_thread=True)
    in_commit = threading.Event()
    release = threading.Event()
    original = committer._commit

    def slow_commit() -> None:  # hold the first batch's COMMIT until the test has queued more writes
        if threading.current_thread() is not threading.main_thread():
            in_commit.set()
            assert release.wait(10)
        original()

    committer._commit = slow_commit  # type: ignore[method-assign]

    async def scenario() -> tuple[list[str], list[str], dict[str, int]]:
        loop = asyncio.get_running_loop()
        first = [committer.submit(put, f"first-{i}", i) for i in range(3)]
        await loop.run_in_executor(None, in_commit.wait, 10)
        second = [committer.submit(put, f"second-{i}", i) for i in range(3)]
        await asyncio.sleep(0)  # the flush runs, sees the COMMIT in flight and leaves the batch queued
        during = on_disk(store.path)
        release.set()
        return await asyncio.gather(*first), await asyncio.gather(*second), during

    first, second, during = asyncio.run(scenario())
    assert during == {}  # nothing was visible (or reported) before the first COMMIT finished
    assert first == [f"first-{i}" for i in range(3)] and second == [f"second-{i}" for i in range(3)]
    assert len(on_disk(store.path)) == 6
    committer.close()
    store.close()


def test_close_waits_for_the_commit_in_flight_and_writes_what_is_queued(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.sqlite3", SCHEMA)
    committer = GroupCommitter(store, commit_in_thread=True)

    async def scenario() -> None:
        committer.submit(put, "x", 1)
        committer.submit(put, "y", 2)
        committer.submit_lazy(put, "z", 3, within=60)
        await asyncio.sleep(0)  # the first batch is flushed (its COMMIT on the thread); z waits for the timer
        committer.close()

    asyncio.run(scenario())
    assert on_disk(store.path) == {"x": 1, "y": 2, "z": 3}
    store.close()


def test_a_server_store_starts_with_a_preallocated_wal(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = SQLiteStore(path, SCHEMA, preallocate=True)
    wal = path.with_name(path.name + "-wal")
    assert wal.stat().st_size >= WAL_CHECKPOINT_BYTES
    with store.transaction() as db:
        put(db, "k", 7)
    assert on_disk(path) == {"k": 7}
    size = wal.stat().st_size
    store.close()
    # Reopened (also after a crash: the WAL is read, never overwritten while it exists)
    again = SQLiteStore(path, SCHEMA, preallocate=True)
    assert on_disk(path) == {"k": 7}
    assert wal.stat().st_size >= size
    again.close()


def page_size(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA page_size").fetchone()[0]
    finally:
        db.close()


def test_a_new_database_gets_small_pages_and_an_existing_one_keeps_its_own(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.sqlite3"
    store = SQLiteStore(fresh, SCHEMA, preallocate=True)
    assert store.connection().execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WAL_CHECKPOINT_BYTES // PAGE_SIZE
    store.close()
    assert page_size(fresh) == PAGE_SIZE < 4096

    # A database made before (SQLite's default 4 KB pages) opens with its rows and its page size unchanged,
    # and its WAL is preallocated and checkpointed at the same size in bytes.
    old = tmp_path / "old.sqlite3"
    db = sqlite3.connect(old, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
    db.execute("INSERT INTO t VALUES ('before', 1)")
    db.close()
    assert page_size(old) == 4096
    store = SQLiteStore(old, SCHEMA, preallocate=True)
    assert WAL_CHECKPOINT_BYTES <= old.with_name(old.name + "-wal").stat().st_size < 2 * WAL_CHECKPOINT_BYTES
    assert store.connection().execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WAL_CHECKPOINT_BYTES // 4096
    with store.transaction() as conn:
        put(conn, "after", 2)
    store.close()
    assert page_size(old) == 4096
    assert on_disk(old) == {"before": 1, "after": 2}


def test_an_existing_wal_is_never_touched(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = SQLiteStore(path, SCHEMA)
    writer = store.new_connection()
    writer.execute("PRAGMA wal_autocheckpoint=0")  # the row stays in the WAL only, as after a crash
    writer.execute("INSERT INTO t (k, v) VALUES ('only-in-wal', 1)")
    wal = path.with_name(path.name + "-wal")
    before = wal.read_bytes()
    preallocate_wal(path, 4096)  # a WAL exists (a live or crashed writer's): it must be left alone
    assert wal.read_bytes() == before
    assert on_disk(path) == {"only-in-wal": 1}
    store.close()


def test_one_awaited_write_commits_on_the_loop_even_with_lazy_writes_riding_along(tmp_path: Path) -> None:
    # The lazy "finished" mark of one payment rides with the next payment's claim: still no load, so no
    # hand-off to the commit thread (it would add a thread round trip to every sequential payment).
    store = SQLiteStore(tmp_path / "s.sqlite3", SCHEMA)
    committer = GroupCommitter(store, commit_in_thread=True)
    handed_off: list[object] = []
    real_submit = committer._committer.submit
    committer._committer.submit = lambda fn: handed_off.append(fn) or real_submit(fn)  # type: ignore[union-attr]

    async def scenario() -> None:
        committer.submit_lazy(put, "finished-mark", 1, within=60)
        await committer.submit(put, "claim", 2)
        assert handed_off == []
        await asyncio.gather(committer.submit(put, "a", 3), committer.submit(put, "b", 4))  # load: two awaited
        assert len(handed_off) == 1

    asyncio.run(scenario())
    assert on_disk(store.path) == {"finished-mark": 1, "claim": 2, "a": 3, "b": 4}
    committer.close()
    store.close()


def test_close_writes_every_queued_batch_of_several_awaited_writes(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.sqlite3", SCHEMA)
    committer = GroupCommitter(store, max_batch=2, commit_in_thread=True)

    async def scenario() -> list["asyncio.Future[str]"]:
        futures = [committer.submit(put, f"k{i}", i) for i in range(5)]  # three batches' worth, none flushed
        committer.close()  # every batch is written here, on the caller's thread, before close returns
        return futures

    futures = asyncio.run(scenario())
    assert [f.result() for f in futures] == [f"k{i}" for i in range(5)]
    assert on_disk(store.path) == {f"k{i}": i for i in range(5)}
    store.close()
