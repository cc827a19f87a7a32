"""Money and account numbers at the edge: double rupees on the wire, whole paise inside (CONTRACT §3, §4)."""
from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

PAISE_PER_RUPEE = 100
MAX_PAYMENT_PAISE = 1_00_00_000 * PAISE_PER_RUPEE  # ₹1,00,00,000 per payment
ACCOUNT_RE = re.compile(r"^([A-Za-z][A-Za-z0-9_]{0,31})-([0-9]{1,32})$")


class MoneyError(ValueError):
    """An amount that cannot be a payment; the message says why, for a person."""


def rupees_to_paise(amount: float, *, maximum: int = MAX_PAYMENT_PAISE) -> int:
    """Exact conversion of a wire amount. Rejects non-finite, ≤ 0, sub-paisa and over-limit amounts.

    `repr` of a double is the shortest string that round-trips, so 100.1 is read as exactly 100.1 while
    0.1 + 0.2 (0.30000000000000004) is rejected as having more than two decimals instead of being rounded.
    """
    if not isinstance(amount, (int, float)) or isinstance(amount, bool):
        raise MoneyError("amount must be a number")
    if not math.isfinite(amount):
        raise MoneyError("amount must be a finite number")
    if amount <= 0:
        raise MoneyError("amount must be greater than zero")
    try:
        exact = Decimal(repr(float(amount)))
    except InvalidOperation as exc:  # pragma: no cover - repr of a finite float always parses
        raise MoneyError("amount is not a number") from exc
    paise = exact * PAISE_PER_RUPEE
    if paise != paise.to_integral_value():
        raise MoneyError("amount may have at most 2 decimal places")
    value = int(paise)
    if value > maximum:
        raise MoneyError(f"amount is above the maximum of ₹{format_paise(maximum)} per payment")
    return value


def paise_to_rupees(paise: int) -> float:
    return paise / PAISE_PER_RUPEE


def format_paise(paise: int) -> str:
    sign = "-" if paise < 0 else ""
    rupees, rest = divmod(abs(paise), PAISE_PER_RUPEE)
    return f"{sign}{rupees:,}.{rest:02d}"


def bank_of(account: str) -> str:
    """The bank part of `<BANK>-<digits>`; raises ValueError for a malformed account number."""
    match = ACCOUNT_RE.fullmatch(account)  # not .match: "$" would let a trailing newline through
    if not match:
        raise ValueError(f"malformed account number {account[:40]!r} (expected BANK-digits, e.g. SBI-1001)")
    return match.group(1)
