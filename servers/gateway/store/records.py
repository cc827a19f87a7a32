"""What the gateway's store hands out and takes back, whichever backend keeps it.

Recovery points (brandur's atomic phases): `started` (key claimed, banks maybe prepared) → `commit_decided` |
`abort_decided` (the decision and the client's response, stored together) → `finished` (every bank
acknowledged). Each transition is committed durably before the next remote call.
"""
from __future__ import annotations

import enum
import hashlib
import secrets
import uuid
from dataclasses import dataclass


class Point(str, enum.Enum):
    STARTED = "started"
    COMMIT_DECIDED = "commit_decided"
    ABORT_DECIDED = "abort_decided"
    FINISHED = "finished"


class ClaimKind(enum.Enum):
    NEW = "new"               # this request inserted the key: execute the payment
    RESUMED = "resumed"       # the key's owner died before deciding: this request continues it
    REPLAY = "replay"         # decided earlier: return the stored response
    MISMATCH = "mismatch"     # same key, other parameters
    IN_FLIGHT = "in_flight"   # a live process is executing it right now
    REFUSED = "refused"       # a new key, but the caller may not insert it (may_insert=False): nothing stored


@dataclass(frozen=True)
class Payment:
    id: int
    txn_id: str
    username: str
    idem_key: str
    from_account: str
    to_account: str
    amount: int               # paise
    recovery_point: Point
    response: bytes | None = None
    epoch: int = 0            # the fencing token handed out with a claimed or taken-over payment (PostgreSQL)


@dataclass(frozen=True)
class Claim:
    kind: ClaimKind
    payment: Payment | None = None
    previous_owner: str | None = None  # RESUMED: the dead owner it was taken from


@dataclass(frozen=True)
class HistoryRow:
    txn_id: str
    username: str
    idem_key: str
    from_account: str
    to_account: str
    amount: int
    status: str
    message: str
    created_at: float
    finished_at: float | None


class LostOwnership(RuntimeError):
    """The payment is no longer this process's (another took it over): it must not act on it."""


def fingerprint(from_account: str, to_account: str, amount: int) -> str:
    """What a key was first used for: a retry with other parameters is refused (FAILED_PRECONDITION)."""
    return f"ProcessPayment\x1f{from_account}\x1f{to_account}\x1f{amount}"


# Sessions and transaction ids, alike in every backend. A store keeps only a token's digest, so a stolen copy of
# the store holds no usable token; a token longer than any we issue is not looked up at all.
MAX_TOKEN = 512


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_key(token: str) -> str | None:
    """What a store keeps of `token` (its SHA-256), or None for a value too long to be one of ours."""
    return None if len(token) > MAX_TOKEN else hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_txn_id() -> str:
    return f"txn-{uuid.uuid4().hex}"
