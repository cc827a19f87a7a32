"""The checks a payment request goes through before its key is claimed, in two kinds.

- Checks that need no configuration (`idempotency_key`, `checked_amount`): a well-formed key, well-formed
  accounts, two different accounts, an exact amount within the hard ceiling. They hold for a request whatever
  the gateway's configuration is, so they come first.
- Checks against today's configuration (`refusal`): both banks known, the sending account the caller's, the
  amount within the configured maximum. They decide only whether a *new* key may be stored: a key that
  already has an outcome replays it whatever the configuration says now (a retry of a payment that succeeded
  must never read as failed because a bank was removed, an account moved or the maximum lowered since).
"""
from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass

import grpc

from protofiles import payment_pb2
from servers.config import User
from servers.money import MAX_PAYMENT_PAISE, MoneyError, bank_of, format_paise, rupees_to_paise

MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    message: str


def key_problem(key: str) -> str | None:
    """Why a key cannot be used, or None."""
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not all(" " <= ch <= "~" for ch in key):
        return f"idempotency key must be 1–{MAX_KEY_LENGTH} printable ASCII characters"
    if key != key.strip(" "):
        # A proxy that trims header values would make "k " and "k" one key on some paths and two on others:
        # a retry could become a second payment.
        return "idempotency key must not begin or end with a space"
    return None


def _metadata(context: grpc.ServicerContext, key: str) -> list[str]:
    return [v for k, v in (context.invocation_metadata() or ()) if k == key and isinstance(v, str)]


async def idempotency_key(request: payment_pb2.PaymentRequest, context: grpc.aio.ServicerContext) -> str:
    values = _metadata(context, "idempotency-key")
    if len(values) > 1:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "send one idempotency-key, not several")
    key = values[0] if values else request.transaction_id
    if not key:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            "missing idempotency key: send 'idempotency-key' metadata (or transaction_id)")
    problem = key_problem(key)
    if problem:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
    return key


async def checked_amount(request: payment_pb2.PaymentRequest, context: grpc.aio.ServicerContext) -> int:
    """Every check that needs neither the store nor the configuration; returns the amount in paise."""
    for field, account in (("from_account", request.from_account), ("to_account", request.to_account)):
        try:
            bank_of(account)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {exc}")
    if request.from_account == request.to_account:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "from_account and to_account are the same account")
    try:
        return rupees_to_paise(request.amount, maximum=MAX_PAYMENT_PAISE)
    except MoneyError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    raise AssertionError("unreachable")  # pragma: no cover


def refusal(user: User, banks: Container[str], max_payment: int, request: payment_pb2.PaymentRequest,
            amount: int) -> Refusal | None:
    """What today's configuration says against a new payment, or None."""
    for field, account in (("from_account", request.from_account), ("to_account", request.to_account)):
        bank = bank_of(account)
        if bank not in banks:
            return Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: unknown bank {bank!r}")
    if request.from_account not in user.accounts:
        return Refusal(grpc.StatusCode.PERMISSION_DENIED,
                       f"account {request.from_account} does not belong to {user.username}")
    if amount > max_payment:
        return Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                       f"amount is above the maximum of ₹{format_paise(max_payment)} per payment")
    return None
