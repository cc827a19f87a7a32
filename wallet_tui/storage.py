"""Crash-safe files for the outbox: a TinyDB storage that replaces the whole file atomically, and a lock.

TinyDB's own JSONStorage rewrites its file in place, so a crash mid-write leaves half a JSON document, and it
is safe neither across threads nor across processes. Here every write goes to a temp file in the same
directory, is fsynced, and is renamed over the old file with `os.replace` (atomic on POSIX), then the directory
is fsynced so the rename itself survives a power cut. A reader therefore sees the old file or the new one,
never a mix. `OutboxLock` serialises read-modify-write cycles between threads and between processes.

A file can still be damaged from outside (a disk error, a copy cut short, an editor). Every read goes through
`AtomicJSONStorage.read`, so that is where damage is caught: given a `Schema`, the storage keeps the damaged
file as it was (`<name>.corrupt-<UTC time>`), salvages every whole record it can still parse, writes those back
as the file, and records a `Repair` for the user to be told. Without a schema a damaged file is an error.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

from tinydb.storages import Storage


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CorruptFile(ValueError):
    """A file that is not what it should be, and no schema to salvage it with."""


class Schema(Protocol):
    """What a storage's file must hold, so that damage can be told apart and what is still good kept."""

    def problem(self, data: Any) -> str:
        """Why `data` (a whole parsed file) is not a good file; "" when it is."""

    def rebuild(self, records: Iterator[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], int]:
        """A good file made of the good ones among `records` (JSON objects found in the damaged text), and how
        many records it holds."""


@dataclass(frozen=True)
class Repair:
    path: Path          # the file that was damaged, now holding what could be salvaged
    copy: Path          # the damaged file, byte for byte
    recovered: int      # records salvaged
    problem: str        # what was wrong


def json_objects(text: str) -> Iterator[dict[str, Any]]:
    """Every JSON object in `text` that parses whole, outermost first: an object that parses is yielded and then
    looked into (its members may be the records), one that does not (cut short) is skipped up to the next `{`.
    A truncated file thus still yields each record written before the cut."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start >= 0:
        try:
            value, _ = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):   # cut short, or garbage nested deeper than the parser goes
            value = None
        if isinstance(value, dict):
            yield value
        start = text.find("{", start + 1)


def _corrupt_copy_path(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    copy = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while copy.exists():
        n += 1
        copy = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    return copy


class AtomicJSONStorage(Storage):
    def __init__(self, path: str | os.PathLike[str], *, schema: Schema | None = None, **_: Any) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.repairs: list[Repair] = []   # taken (and cleared) by the owner to tell the user

    def read(self) -> dict[str, dict[str, Any]] | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return self._damaged(raw.decode("utf-8", errors="replace"), f"not UTF-8 text ({exc.reason})")
        if not text.strip():
            return None
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            return self._damaged(text, f"not whole JSON ({exc})")
        problem = self.schema.problem(data) if self.schema is not None else ""
        if problem:
            return self._damaged(text, problem)
        return data

    def _damaged(self, text: str, problem: str) -> dict[str, dict[str, Any]]:
        """Keep the damaged file aside, then replace it with what can be salvaged. Called under the owner's lock
        (every read is), so no other wallet reads or writes the file meanwhile. The copy is made before the
        file is touched: a crash in between leaves the damaged file to be repaired again, never nothing."""
        if self.schema is None:
            raise CorruptFile(f"{self.path} is damaged: {problem}")
        data, recovered = self.schema.rebuild(json_objects(text))
        copy = _corrupt_copy_path(self.path)
        shutil.copy2(self.path, copy)
        self.write(data)
        self.repairs.append(Repair(self.path, copy, recovered, problem))
        return data

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        # json.dumps (the C encoder, one string) then one write: json.dump streams through the pure-Python
        # encoder in small chunks, which was most of the cost of every outbox write.
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        try:
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.path.parent)

    def close(self) -> None:
        pass


class OutboxLock:
    """Re-entrant within a process, exclusive between processes (flock on a sibling `.lock` file)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._local = threading.RLock()
        self._depth = 0

    def __enter__(self) -> "OutboxLock":
        self._local.acquire()
        if self._depth == 0:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except BaseException:
                self._local.release()
                raise
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._local.release()

    def close(self) -> None:
        with self._local:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
