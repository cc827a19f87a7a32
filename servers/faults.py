"""Crash points for tests: `STRIFE_CRASH_AT=<point>` makes the process SIGKILL itself when it reaches it, and
`STRIFE_DELAY_AT=<point>:<seconds>` makes it wait there (e.g. for a caller's deadline to pass, or for another
replica to take a payment over before this one decides it).

This is how the crash tests stop a real gateway exactly at a recovery point (after the key is claimed, after
the votes are in, after the decision is stored, after the banks acknowledged) instead of hoping a random
`kill -9` lands there. Unset in production, each costs one string comparison.
"""
from __future__ import annotations

import os
import signal

POINTS = ("after_claim", "after_prepare", "after_decide", "after_deliver")
_ARMED = os.environ.get("STRIFE_CRASH_AT", "")


def crash_point(name: str) -> None:
    if _ARMED and _ARMED == name:
        os.kill(os.getpid(), signal.SIGKILL)


_DELAY_POINT, _, _DELAY_SECONDS = os.environ.get("STRIFE_DELAY_AT", "").partition(":")


def delay_at(name: str) -> float:
    """How long to wait at this point: 0 unless `STRIFE_DELAY_AT` names it."""
    return float(_DELAY_SECONDS) if _DELAY_POINT and _DELAY_POINT == name else 0.0
