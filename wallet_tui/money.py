"""Money at the wallet's edges: what a person types → whole paise; paise → what a person reads."""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

PAISE_PER_RUPEE = 100
MAX_PAYMENT_PAISE = 1_00_00_000 * PAISE_PER_RUPEE  # the gateway's default per-payment maximum
ACCOUNT_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}-[0-9]{1,32}$")


class AmountError(ValueError):
    """Why a typed amount cannot be paid, for a person."""


def parse_amount(text: str) -> int:
    """'1,250.5' → 125050 paise. Rejects empty, non-numbers, ≤ 0, more than 2 decimals, above the maximum."""
    cleaned = text.strip().replace(",", "").removeprefix("₹").strip()
    if not cleaned:
        raise AmountError("enter an amount")
    if not re.fullmatch(r"[0-9]*\.?[0-9]*", cleaned) or cleaned == ".":
        raise AmountError("amount must be a number, e.g. 250 or 99.50")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:  # pragma: no cover - the regex admits only decimals
        raise AmountError("amount must be a number") from None
    paise = value * PAISE_PER_RUPEE
    if paise != paise.to_integral_value():
        raise AmountError("amount may have at most 2 decimal places")
    if paise <= 0:
        raise AmountError("amount must be more than zero")
    if paise > MAX_PAYMENT_PAISE:
        raise AmountError(f"amount is above the maximum of ₹{format_paise(MAX_PAYMENT_PAISE)}")
    return int(paise)


def format_paise(paise: int) -> str:
    sign = "-" if paise < 0 else ""
    rupees, rest = divmod(abs(paise), PAISE_PER_RUPEE)
    return f"{sign}{rupees:,}.{rest:02d}"


def rupees(paise: int) -> str:
    """For people: ₹1,250.50."""
    return f"₹{format_paise(paise)}"


def paise_to_wire(paise: int) -> float:
    """The wire carries double rupees; paise/100 is the double closest to the exact amount."""
    return paise / PAISE_PER_RUPEE


def wire_to_paise(amount: float) -> int:
    return int(round(amount * PAISE_PER_RUPEE))


def valid_account(account: str) -> bool:
    return bool(ACCOUNT_RE.match(account))
