"""A replica's owner identity on PostgreSQL, and the proof that it is alive.

At start a replica draws a fresh owner number (never reused) and, in the same statement, takes the
session-level advisory lock (OWNER_LOCK_SPACE, number) on a connection of its own — not from the pool, and
never through a transaction-mode pooler. PostgreSQL holds that lock exactly as long as the session lives: it
vanishes when the replica's process dies (`kill -9` closes the socket at once), when the backend is
terminated, or when the server gives up on a silent peer (TCP keepalives and `tcp_user_timeout` on the session
bring that down from hours to seconds). "Is owner N alive?" is then "can I take N's lock?" — no clocks, no
lease that confuses a slow owner with a dead one.

A lock tells liveness; it does not fence. This replica checks its own connection continuously (a cheap query
every `check_interval`, and the driver's notice when the connection closes); the moment that fails it stops
being live (the store refuses new work and stops acting on its payments), and it reconnects in the background
under a NEW number. Its old payments are recovered by the completers like any dead owner's, and whatever it
still had in hand fails the compare-and-set on (owner, epoch) that guards every write.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from servers.gateway.store import postgres_sql as sql

log = logging.getLogger("strife.store.liveness")

_RECONNECT_MAX = 1.0  # seconds between attempts to take a new identity while the store is unreachable


class Liveness:
    def __init__(self, connect: Callable[[], Awaitable[Any]], *, describe: Callable[[BaseException], str],
                 on_change: Callable[[bool], None], check_interval: float, check_timeout: float) -> None:
        self._connect = connect          # opens a dedicated asyncpg connection to the store
        self._describe = describe        # an exception as one line, with any password masked
        self._on_change = on_change
        self._interval = check_interval
        self._timeout = check_timeout
        self._conn: Any = None
        self._live = False
        self._closed = False
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()     # set on a loss: the watchdog reconnects now, not after its interval
        self.number: int | None = None  # the current owner number (the last one, while not live)

    @property
    def live(self) -> bool:
        return self._live

    async def start(self) -> None:
        """Take a first identity (raises if the store cannot be reached), then watch it."""
        await self._take_identity()
        self._task = asyncio.ensure_future(self._watch())

    async def close(self) -> None:
        """Give the identity up: closing the session releases the lock, so this owner reads as dead at once."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        conn, self._conn = self._conn, None
        self._set_live(False)
        if conn is not None:
            conn.remove_termination_listener(self._on_terminated)
            try:
                await asyncio.wait_for(conn.close(), self._timeout)
            except Exception:  # noqa: BLE001 - closing a session that may be gone already
                conn.terminate()

    async def _take_identity(self) -> None:
        conn = await self._connect()
        try:
            number, locked, _pid, _name = await conn.fetchrow(sql.TAKE_IDENTITY, timeout=self._timeout)
            if not locked:  # pragma: no cover - a fresh number's lock cannot be held by anyone
                raise RuntimeError(f"owner lock {number} is held already: is another program using its key space?")
            if self.number is not None:
                await self._end_old_identity(conn, self.number)
        except BaseException:
            conn.terminate()
            raise
        if self._closed:
            conn.terminate()
            return
        conn.add_termination_listener(self._on_terminated)
        old = self.number
        self._conn, self.number = conn, number
        if old is not None:
            log.warning("store session back: this replica is now owner %d (was %d); owner %d's payments are "
                        "recovered by the completers", number, old, old)
        self._set_live(True)

    async def _end_old_identity(self, conn: Any, old: int) -> None:
        """Best effort: if the server still has our old session (a false alarm, or a half-open socket), end it,
        so that our old payments are free for take-over now, not when the server's keepalives give up."""
        import asyncpg

        try:
            if await conn.fetch(sql.END_OLD_IDENTITY, old, timeout=self._timeout):
                log.info("ended this replica's earlier store session (owner %d)", old)
        except asyncpg.PostgresError as exc:  # e.g. no right to signal it: keepalives will end it
            log.info("could not end the earlier store session of owner %d: %s", old, self._describe(exc))

    def _on_terminated(self, conn: Any) -> None:
        if conn is self._conn:
            self._lost("the store closed this replica's liveness session")

    def _lost(self, reason: str) -> None:
        if not self._live or self._closed:
            return
        conn, self._conn = self._conn, None
        log.warning("lost the store session of owner %s (%s): not serving until it is back", self.number, reason)
        self._set_live(False)
        self._wake.set()
        if conn is not None:
            conn.remove_termination_listener(self._on_terminated)
            conn.terminate()  # if the server still has the session, it sees the socket close and ends it

    def _set_live(self, live: bool) -> None:
        if live == self._live:
            return
        self._live = live
        try:
            self._on_change(live)
        except Exception:  # noqa: BLE001 - a failing observer must not stop the watchdog
            log.exception("liveness observer failed")

    async def _watch(self) -> None:
        backoff = 0.05
        reported = False
        while not self._closed:
            if self._live:
                try:
                    await asyncio.wait_for(self._wake.wait(), self._interval)
                except asyncio.TimeoutError:
                    pass
                self._wake.clear()
                conn = self._conn
                if conn is None or not self._live:
                    continue
                try:
                    await conn.fetchval(sql.PING, timeout=self._timeout)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - any failure means the session can't be trusted
                    self._lost(f"liveness check failed: {self._describe(exc)}")
                continue
            try:
                await self._take_identity()
                backoff, reported = 0.05, False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep trying until the store is back
                if not reported:
                    log.warning("cannot reach the store to take a new owner identity (%s); retrying",
                                self._describe(exc))
                    reported = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _RECONNECT_MAX)
