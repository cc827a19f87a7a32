"""The outbox: every payment the user submits, durable from the moment it is submitted until its outcome is
final, one TinyDB file per user under `<data-dir>/wallet/`.

Two files per user, so that the file rewritten on every send stays small:
- `<user>.outbox.json` (hot): payments not yet final — queued, or sent with an unknown outcome;
- `<user>.finished.json`: payments whose outcome is final (succeeded, declined, failed, expired, cancelled).
A payment is moved by writing it to the finished file first and then deleting it from the hot file; a crash
between the two leaves it in both, and opening the outbox finishes the move (the finished copy wins).

The entry's `key` is its idempotency key: made once (uuid4) when the payment is submitted, written here before
the first send, and sent unchanged on every resend. `attempts > 0` means a send may have reached the gateway.

Every write rewrites a whole file (that is what makes it atomic), so a drain works in small batches to keep
the number of writes per payment well below one: `record_attempts` marks a batch of the oldest queued
payments as "may have been sent" in one write before they are sent one by one, and `finish_many` moves the
batch's final outcomes in one write per file. A crash inside a batch costs only the ability to cancel its
unsent payments, and the resend of payments whose outcome was not yet recorded (same keys: the gateway replays).

Several wallets of one user may share the files (two terminals): every read-modify-write holds `OutboxLock` (an
flock) and works on the file as it is on disk (no cache), and a record's TinyDB id is its idempotency key, so
two wallets can never hand out the same id (TinyDB's own counter is per process) nor overwrite each other.
Both may drain the same queue: the same keys reach the gateway, which pays each once and replays the outcome.

A damaged file (see `storage`) is kept aside and its whole records salvaged; `take_repairs` says what happened.
"""
from __future__ import annotations

import hashlib
import re
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from tinydb import TinyDB
from tinydb.table import Document, Table

from wallet_tui.storage import AtomicJSONStorage, OutboxLock, Repair

FINAL_STATUSES = ("succeeded", "declined", "failed", "expired", "cancelled")
FINISHED_KEPT = 500   # the finished file keeps the newest this many …
FINISHED_SLACK = 100  # … trimmed back only once it has this many more (one rewrite per 100, not per payment)


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


# What a record must hold for the wallet to use it; a record without these is damage, not a payment.
_REQUIRED: dict[str, type | tuple[type, ...]] = {"key": str, "from_account": str, "to_account": str,
                                                 "amount_paise": int, "created_at": (int, float)}
_OPTIONAL: dict[str, type | tuple[type, ...]] = {"attempts": int, "last_attempt_at": (int, float),
                                                 "next_attempt_at": (int, float), "last_error": str,
                                                 "status": str, "message": str, "transaction_id": str,
                                                 "finished_at": (int, float)}


def record_problem(doc: Any) -> str:
    """Why `doc` is not a usable outbox record; "" when it is."""
    if not isinstance(doc, dict):
        return "a record is not an object"
    for name, kind in _REQUIRED.items():
        value = doc.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"a record has no valid {name!r}"
    if not doc["key"] or doc["amount_paise"] <= 0:
        return "a record has an empty key or a non-positive amount"
    for name, kind in _OPTIONAL.items():
        if name in doc and (not isinstance(doc[name], kind) or isinstance(doc[name], bool)):
            return f"record {doc['key']} has an invalid {name!r}"
    return ""


class _OutboxSchema:
    """One table of records keyed by their idempotency key (see `storage.Schema`)."""

    def __init__(self, table: str) -> None:
        self.table = table

    def problem(self, data: Any) -> str:
        if not isinstance(data, dict) or not all(isinstance(t, dict) for t in data.values()):
            return "not an outbox file"
        for doc in data.get(self.table, {}).values():
            if problem := record_problem(doc):
                return problem
        return ""

    def rebuild(self, records: Iterator[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], int]:
        kept: dict[str, dict[str, Any]] = {}
        for doc in records:
            if record_problem(doc):
                continue
            # the same payment twice: keep the copy with more send attempts, so a payment that may have
            # reached the gateway never looks unsent (and so cancellable)
            other = kept.get(doc["key"])
            if other is None or doc.get("attempts", 0) > other.get("attempts", 0):
                kept[doc["key"]] = doc
        return {self.table: kept}, len(kept)


class _KeyedTable(Table):
    """A table whose document ids are the records' idempotency keys (strings), never TinyDB's counter."""

    document_id_class = str


class _KeyedDB(TinyDB):
    table_class = _KeyedTable


def _doc(entry: OutboxEntry | dict[str, Any]) -> Document:
    data = asdict(entry) if isinstance(entry, OutboxEntry) else entry
    return Document(data, doc_id=data["key"])


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
        self._hot_db = _KeyedDB(self.path, storage=AtomicJSONStorage, schema=_OutboxSchema("pending"))
        self._done_db = _KeyedDB(self.finished_path, storage=AtomicJSONStorage, schema=_OutboxSchema("finished"))
        # cache_size=0: another wallet process may have written the file since this one last read it
        self._hot = self._hot_db.table("pending", cache_size=0)
        self._done = self._done_db.table("finished", cache_size=0)
        try:
            self._tidy()
        except BaseException:
            self.close()
            raise

    def _tidy(self) -> None:
        """On opening: finish a move a crash interrupted (the finished copy wins), and re-key records written
        by wallets older than this one (TinyDB's counter as id) by their idempotency key, in one write per
        file. Reading is also what finds (and repairs) a damaged file."""
        with self._lock:
            keys: dict[str, set[str]] = {}
            for db, name in ((self._done_db, "finished"), (self._hot_db, "pending")):
                data = db.storage.read() or {}
                table = data.get(name, {})
                if any(doc_id != doc["key"] for doc_id, doc in table.items()):
                    table = data[name] = {doc["key"]: doc for doc in table.values()}
                    db.storage.write(data)
                keys[name] = set(table)  # the ids, which are now the keys
            stale = sorted(keys["pending"] & keys["finished"])
            if stale:
                self._hot.remove(doc_ids=stale)

    def take_repairs(self) -> list[Repair]:
        """Damaged files found (and repaired) since the last call, for the user to be told once."""
        repairs: list[Repair] = []
        for db in (self._hot_db, self._done_db):
            storage = db.storage
            assert isinstance(storage, AtomicJSONStorage)
            repairs += storage.repairs
            storage.repairs = []
        return repairs

    # ---- reading -------------------------------------------------------------------------------------------
    def pending(self) -> list[OutboxEntry]:
        """Payments not yet final, oldest first."""
        with self._lock:
            entries = [OutboxEntry.from_doc(doc) for doc in self._hot.all()]
        return sorted(entries, key=lambda e: (e.created_at, e.key))

    def get(self, key: str) -> OutboxEntry | None:
        with self._lock:
            doc = self._hot.get(doc_id=key) or self._done.get(doc_id=key)
        return OutboxEntry.from_doc(doc) if doc else None

    def finished(self, limit: int = 100) -> list[OutboxEntry]:
        """Payments with a final outcome, newest first: in the order they were written to the file (appended,
        under the lock), which a wall-clock step cannot reorder as it would `finished_at`."""
        with self._lock:
            docs = self._done.all()
        return [OutboxEntry.from_doc(doc) for doc in reversed(docs[-limit:])] if limit > 0 else []

    # ---- writing -------------------------------------------------------------------------------------------
    def add(self, from_account: str, to_account: str, amount_paise: int) -> OutboxEntry:
        """A new payment with a fresh idempotency key, on disk before this returns (so before any send)."""
        entry = OutboxEntry(key=str(uuid.uuid4()), from_account=from_account, to_account=to_account,
                            amount_paise=amount_paise, created_at=self.clock())
        with self._lock:
            self._hot.insert(_doc(entry))
        return entry

    def _update(self, key: str, **changes: Any) -> OutboxEntry | None:
        with self._lock:
            doc = self._hot.get(doc_id=key)
            if doc is None:
                return None
            self._hot.update(changes, doc_ids=[key])
            return OutboxEntry.from_doc({**doc, **changes})

    def record_attempt(self, key: str) -> OutboxEntry | None:
        """Written before every send: from here on the payment may reach the gateway and cannot be cancelled.
        None when the payment is no longer pending (finished, cancelled or expired meanwhile)."""
        claimed = self.record_attempts([key])
        return claimed[0] if claimed else None

    def record_attempts(self, keys: Sequence[str]) -> list[OutboxEntry]:
        """`record_attempt` for a batch, in one write: each of these payments may now reach the gateway. Returns
        the ones still pending, in the order given (the others were finished, cancelled or expired meanwhile)."""
        now = self.clock()
        with self._lock:
            docs = {doc["key"]: doc for doc in self._hot.all()}
            hits = [docs[key] for key in dict.fromkeys(keys) if key in docs]
            if not hits:
                return []

            def bump(doc: dict[str, Any]) -> None:
                doc["attempts"] = doc.get("attempts", 0) + 1
                doc["last_attempt_at"] = now

            self._hot.update(bump, doc_ids=[doc.doc_id for doc in hits])
            return [OutboxEntry.from_doc({**doc, "attempts": doc.get("attempts", 0) + 1, "last_attempt_at": now})
                    for doc in hits]

    def release_attempts(self, entries: Iterable[OutboxEntry]) -> None:
        """Undo `record_attempts` for claimed payments whose send never started (the drain stopped first), so
        that a payment never sent stays cancellable. Only an entry still exactly as claimed is touched."""
        claimed = {e.key: e for e in entries}
        if not claimed:
            return
        with self._lock:
            ids = [doc.doc_id for doc in self._hot.all() if (e := claimed.get(doc["key"])) is not None
                   and doc.get("attempts") == e.attempts and doc.get("last_attempt_at") == e.last_attempt_at]
            if not ids:
                return

            def unbump(doc: dict[str, Any]) -> None:
                doc["attempts"] = max(0, doc["attempts"] - 1)
                # the previous attempt's time is not kept; 0 only means "never" when attempts is back to 0
                if doc["attempts"] == 0:
                    doc["last_attempt_at"] = 0.0

            self._hot.update(unbump, doc_ids=ids)

    def defer(self, key: str, error: str, next_attempt_at: float) -> OutboxEntry | None:
        return self._update(key, last_error=error, next_attempt_at=next_attempt_at)

    def finish(self, key: str, status: str, message: str = "", transaction_id: str = "") -> OutboxEntry | None:
        """Move a pending payment to the finished file with its final status. None if it was not pending."""
        done = self.finish_many([(key, status, message, transaction_id)])
        return done[0] if done else None

    def finish_many(self, outcomes: Sequence[tuple[str, str, str, str]]) -> list[OutboxEntry]:
        """Move pending payments to the finished file, each (key, status, message, transaction_id), in one
        write per file. Returns the entries moved, in the order given; a key no longer pending is skipped."""
        for _, status, _, _ in outcomes:
            assert status in FINAL_STATUSES, status
        if not outcomes:
            return []
        now = self.clock()
        with self._lock:
            docs = {doc.doc_id: doc for doc in self._hot.all()}
            moved: list[OutboxEntry] = []
            for key, status, message, transaction_id in outcomes:
                doc = docs.pop(key, None)
                if doc is None:
                    continue   # finished meanwhile (by this wallet or another one of the same user)
                entry = OutboxEntry.from_doc(doc)
                entry.status, entry.message, entry.transaction_id = status, message, transaction_id
                entry.finished_at = now
                moved.append(entry)
            if not moved:
                return []
            # A record already finished (a move a crash cut short, finished by another wallet meanwhile) keeps
            # its first final outcome: the gateway gives one outcome per key, so the copies agree anyway.
            done = {doc.doc_id for doc in self._done.all()}
            fresh = [_doc(e) for e in moved if e.key not in done]
            if fresh:
                self._done.insert_multiple(fresh)                      # 1: the final records are durable …
            self._hot.remove(doc_ids=[e.key for e in moved])           # 2: … before the pending ones go
            self._trim_finished()
            return moved

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
        if len(self._done) <= FINISHED_KEPT + FINISHED_SLACK:
            return
        docs = self._done.all()   # oldest first (see `finished`)
        if len(docs) > FINISHED_KEPT:
            self._done.remove(doc_ids=[d.doc_id for d in docs[:len(docs) - FINISHED_KEPT]])

    def close(self) -> None:
        self._hot_db.close()
        self._done_db.close()
        self._lock.close()
