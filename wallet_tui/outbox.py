"""The outbox: every payment the user submits, durable from the moment it is submitted until its outcome is
final, one TinyDB file per user under `<data-dir>/wallet/`.

Two files per user, so that the file rewritten on every send stays small:
- `<user>.outbox.json` (hot): payments not yet final — queued, or sent with an unknown outcome;
- `<user>.finished.json`: payments whose outcome is final (succeeded, declined, failed, expired, cancelled).
A payment is moved by writing it to the finished file first and then deleting it from the hot file; a crash
between the two leaves it in both, and opening the outbox finishes the move (the finished copy wins).

The entry's `key` is its idempotency key: made once (uuid4) when the payment is submitted, written here before
the first send, and sent unchanged on every resend. `attempts > 0` means a send may have reached the gateway.
"""
from __future__ import annotations

import hashlib
import re
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

from tinydb import Query, TinyDB

from wallet_tui.storage import AtomicJSONStorage, OutboxLock

FINAL_STATUSES = ("succeeded", "declined", "failed", "expired", "cancelled")
FINISHED_KEPT = 500  # the finished file keeps the newest this many


class CannotCancel(Exception):
    """The payment is not cancellable (sent already, or no longer pending); the message says why."""


@dataclass
class OutboxEntry:
    key: str                       # the idempotency key, also the entry's id
    from_account: str
    to_account: str
    amount_paise: int
    created_at: float              # unix seconds
    attempts: int = 0              # sends started; > 0 → the gateway may have it
    last_attempt_at: float = 0.0
    next_attempt_at: float = 0.0   # backoff: not resent before this (ignored when the gateway comes back)
    last_error: str = ""
    status: str = "pending"        # pending, or one of FINAL_STATUSES
    message: str = ""
    transaction_id: str = ""
    finished_at: float = 0.0

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def maybe_sent(self) -> bool:
        return self.attempts > 0

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> "OutboxEntry":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})


def _file_stem(username: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", username) and not username.startswith("."):
        return username
    return "user-" + hashlib.sha256(username.encode()).hexdigest()[:16]


class Outbox:
    def __init__(self, directory: Path, username: str, clock: Callable[[], float] = time.time) -> None:
        self.username = username
        self.clock = clock
        stem = _file_stem(username)
        self.path = directory / f"{stem}.outbox.json"
        self.finished_path = directory / f"{stem}.finished.json"
        self._lock = OutboxLock(directory / f"{stem}.lock")
        self._hot_db = TinyDB(self.path, storage=AtomicJSONStorage)
        self._done_db = TinyDB(self.finished_path, storage=AtomicJSONStorage)
        # cache_size=0: another wallet process may have written the file since this one last read it
        self._hot = self._hot_db.table("pending", cache_size=0)
        self._done = self._done_db.table("finished", cache_size=0)
        self._finish_interrupted_moves()

    def _finish_interrupted_moves(self) -> None:
        with self._lock:
            done = {doc["key"] for doc in self._done.all()}
            stale = [doc.doc_id for doc in self._hot.all() if doc["key"] in done]
            if stale:
                self._hot.remove(doc_ids=stale)

    # ---- reading -------------------------------------------------------------------------------------------
    def pending(self) -> list[OutboxEntry]:
        """Payments not yet final, oldest first."""
        with self._lock:
            entries = [OutboxEntry.from_doc(doc) for doc in self._hot.all()]
        return sorted(entries, key=lambda e: (e.created_at, e.key))

    def get(self, key: str) -> OutboxEntry | None:
        with self._lock:
            doc = self._hot.get(Query().key == key) or self._done.get(Query().key == key)
        return OutboxEntry.from_doc(doc) if doc else None

    def finished(self, limit: int = 100) -> list[OutboxEntry]:
        """Payments with a final outcome, newest first."""
        with self._lock:
            entries = [OutboxEntry.from_doc(doc) for doc in self._done.all()]
        return sorted(entries, key=lambda e: e.finished_at, reverse=True)[:limit]

    # ---- writing -------------------------------------------------------------------------------------------
    def add(self, from_account: str, to_account: str, amount_paise: int) -> OutboxEntry:
        """A new payment with a fresh idempotency key, on disk before this returns (so before any send)."""
        entry = OutboxEntry(key=str(uuid.uuid4()), from_account=from_account, to_account=to_account,
                            amount_paise=amount_paise, created_at=self.clock())
        with self._lock:
            self._hot.insert(asdict(entry))
        return entry

    def _update(self, key: str, **changes: Any) -> OutboxEntry | None:
        with self._lock:
            doc = self._hot.get(Query().key == key)
            if doc is None:
                return None
            self._hot.update(changes, doc_ids=[doc.doc_id])
            return OutboxEntry.from_doc({**doc, **changes})

    def record_attempt(self, key: str) -> OutboxEntry | None:
        """Written before every send: from here on the payment may reach the gateway and cannot be cancelled.
        None when the payment is no longer pending (finished, cancelled or expired meanwhile)."""
        with self._lock:
            entry = self.get(key)
            if entry is None or entry.final:
                return None
            return self._update(key, attempts=entry.attempts + 1, last_attempt_at=self.clock())

    def defer(self, key: str, error: str, next_attempt_at: float) -> OutboxEntry | None:
        return self._update(key, last_error=error, next_attempt_at=next_attempt_at)

    def finish(self, key: str, status: str, message: str = "", transaction_id: str = "") -> OutboxEntry | None:
        """Move a pending payment to the finished file with its final status. None if it was not pending."""
        assert status in FINAL_STATUSES, status
        with self._lock:
            doc = self._hot.get(Query().key == key)
            if doc is None:
                return None
            entry = OutboxEntry.from_doc(doc)
            entry.status, entry.message, entry.transaction_id = status, message, transaction_id
            entry.finished_at = self.clock()
            self._done.insert(asdict(entry))          # 1: the final record is durable …
            self._hot.remove(doc_ids=[doc.doc_id])    # 2: … before the pending one goes
            self._trim_finished()
            return entry

    def cancel(self, key: str) -> OutboxEntry:
        with self._lock:
            entry = self.get(key)
            if entry is None:
                raise CannotCancel("that payment is no longer in the outbox")
            if entry.final:
                raise CannotCancel(f"that payment has already {entry.status}")
            if entry.maybe_sent:
                raise CannotCancel("it was already sent and may have reached the gateway; it will be "
                                   "resent with the same key until its outcome is known")
            finished = self.finish(key, "cancelled", "cancelled before it was sent")
            assert finished is not None
            return finished

    def _trim_finished(self) -> None:
        docs = self._done.all()
        if len(docs) > FINISHED_KEPT:
            docs.sort(key=lambda d: d.get("finished_at", 0.0))
            self._done.remove(doc_ids=[d.doc_id for d in docs[:len(docs) - FINISHED_KEPT]])

    def close(self) -> None:
        self._hot_db.close()
        self._done_db.close()
        self._lock.close()
