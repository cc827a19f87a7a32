"""Crash points for tests: `STRIFE_CRASH_AT=<point>` makes the process SIGKILL itself when it reaches it.

This is how the crash tests stop a real gateway exactly at a recovery point (after the key is claimed, after
the votes are in, after the decision is stored, after the banks acknowledged) instead of hoping a random
`kill -9` lands there. Unset in production, it costs one dict lookup.
"""
from __future__ import annotations

import os
import signal

POINTS = ("after_claim", "after_prepare", "after_decide", "after_deliver")
_ARMED = os.environ.get("STRIFE_CRASH_AT", "")


def crash_point(name: str) -> None:
    if _ARMED and _ARMED == name:
        os.kill(os.getpid(), signal.SIGKILL)
