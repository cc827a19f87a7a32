"""Crash-safe files for the outbox: a TinyDB storage that replaces the whole file atomically, and a lock.

TinyDB's own JSONStorage rewrites its file in place, so a crash mid-write leaves half a JSON document, and it
is safe neither across threads nor across processes. Here every write goes to a temp file in the same
directory, is fsynced, and is renamed over the old file with `os.replace` (atomic on POSIX), then the directory
is fsynced so the rename itself survives a power cut. A reader therefore sees the old file or the new one,
never a mix. `OutboxLock` serialises read-modify-write cycles between threads and between processes.
"""
from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path
from typing import Any

from tinydb.storages import Storage


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicJSONStorage(Storage):
    def __init__(self, path: str | os.PathLike[str], **_: Any) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def read(self) -> dict[str, dict[str, Any]] | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        if not text.strip():
            return None
        return json.loads(text)

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
