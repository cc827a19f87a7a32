"""What a store raises when it cannot be reached."""
from __future__ import annotations


class StoreUnavailable(Exception):
    """The store cannot be reached right now (refused, lost, timed out, or this replica lost its session).

    The gateway answers `UNAVAILABLE`: the caller may retry, here or on another replica. Nothing was half-done:
    a write either committed whole or not at all. The message names the store with its password masked.
    """
