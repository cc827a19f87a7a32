"""Which gateway process owns an in-flight payment, and whether that owner is still alive.

Each gateway process holds an exclusive `flock` on `<data-dir>/owners/<owner-id>.lock` for as long as it
lives. The kernel drops the lock when the process dies, however it dies (`kill -9` included), so "can I take
that lock?" answers "is that owner dead?" exactly, with no clocks and no lease to wait out. Processes sharing
a data directory (and so one SQLite store) share the owners directory too.
"""
from __future__ import annotations

import fcntl
import os
import uuid
from pathlib import Path


class Owner:
    def __init__(self, data_dir: Path) -> None:
        self.id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._dir = Path(data_dir) / "owners"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self._dir / f"{self.id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def is_alive(self, owner_id: str | None) -> bool:
        if not owner_id:
            return False
        if owner_id == self.id:
            return True
        path = self._dir / f"{os.path.basename(owner_id)}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops the probe's lock if it got it
        return False

    def forget(self, owner_id: str) -> None:
        """Remove a dead owner's lock file once nothing refers to it."""
        if owner_id != self.id and not self.is_alive(owner_id):
            try:
                (self._dir / f"{os.path.basename(owner_id)}.lock").unlink()
            except FileNotFoundError:
                pass

    def release(self) -> None:
        if self._fd >= 0:
            try:
                (self._dir / f"{self.id}.lock").unlink()
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = -1
