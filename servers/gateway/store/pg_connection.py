"""How the PostgreSQL store talks to its server: its options, what every session is set to, which driver
errors mean "the store is unavailable" (the gateway's UNAVAILABLE) rather than a bug, and how the driver's own
log lines about an unavailable store read."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class PostgresOptions:
    pool_min: int = 1
    pool_max: int = 8                # connections per replica: this pool, plus one for liveness
    connect_timeout: float = 5.0
    command_timeout: float = 5.0     # bounds every call (client side) and every statement (server side)
    liveness_interval: float = 1.0   # how often the liveness session is checked
    liveness_timeout: float = 2.0    # a check slower than this counts as a lost session
    keepalive_idle: int = 5          # the server's TCP keepalives on our sessions: a vanished replica's lock is
    keepalive_interval: int = 1      # freed after ~idle + interval × count seconds, or user_timeout when the
    keepalive_count: int = 3         # server was sending — instead of the kernel's two hours
    user_timeout_ms: int = 8000
    sweep_batch: int = 1000
    finish_batch: int = 500


def server_settings(o: PostgresOptions) -> dict[str, str]:
    """Set on every session at connect, whatever the server's or the database's defaults say."""
    return {"application_name": "strife-gateway",
            "synchronous_commit": "on",  # a transition is durable before the next remote call
            "statement_timeout": str(int(o.command_timeout * 1000)),
            # A client that vanished mid-transaction must not hold a key's row lock for long.
            "idle_in_transaction_session_timeout": str(int(o.command_timeout * 2000)),
            "tcp_keepalives_idle": str(o.keepalive_idle), "tcp_keepalives_interval": str(o.keepalive_interval),
            "tcp_keepalives_count": str(o.keepalive_count), "tcp_user_timeout": str(o.user_timeout_ms)}


def is_unavailable(exc: BaseException) -> bool:
    """Refused, lost, timed out, terminated, shutting down, out of connections: retry later, maybe elsewhere."""
    import asyncpg

    return isinstance(exc, (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError,
                            asyncpg.exceptions.OperatorInterventionError,   # terminated, shutting down, timed out
                            asyncpg.exceptions.InsufficientResourcesError))  # too many connections


def is_broken(exc: BaseException) -> bool:
    """The connection's protocol state can't be trusted: closed under us, or confused by a backend that was
    terminated between two calls (asyncpg's "another operation is in progress"). Argument errors are ours."""
    import asyncpg

    return isinstance(exc, (asyncpg.InternalClientError, asyncpg.InterfaceError)) and not isinstance(exc, ValueError)


POOL_LOGGER = "asyncpg.pool"


class OneLineOutages(logging.Filter):
    """For asyncpg's pool logger: an unavailable store in one line, not a traceback.

    While the store is away, the pool's attempts to restore its connection floor log "Failed to restore the pool
    connection floor; retrying" with the exception attached — a traceback about once a second at first, on every
    replica. An unreachable store is an expected condition (calls answer UNAVAILABLE until it is back), and a
    traceback in a server's log reads as a bug: such a record keeps its line and gets the reason appended
    (password scrubbed by `describe`). Any other exception keeps its traceback."""

    def __init__(self, describe: Callable[[BaseException], str]) -> None:
        super().__init__()
        self._describe = describe

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and (is_unavailable(exc) or is_broken(exc)):
            record.msg, record.args = f"{record.getMessage()} ({self._describe(exc)})", None
            record.exc_info, record.exc_text = None, None
        return True
