"""The gateway store under a chaos run: SQLite in the cluster's data dir, or a database of the run's own on a
PostgreSQL server, with every replica's store connections through a TCP proxy of its own.

On PostgreSQL the run creates `strife_chaos_<random>` from the URL it is given (an admin URL: its database is
only used to create and drop this one) and drops it afterwards, unless the run failed or was asked to keep its
files: then it is kept and its (masked) URL printed, for inspection. The server itself is never restarted: it
may be shared. What a restart does to the replicas is approximated instead (see `restart`).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from servers.gateway.store.spec import SQLITE, check_spec
from servers.gateway.store.url import mask_url, scrub, with_database
from tests.tcpproxy import TcpProxy

PREFIX = "strife_chaos_"
ADMIN_TIMEOUT = 10.0  # seconds for one admin statement (create, drop, terminate)


def through(url: str, address: str) -> str:
    """`url` with its host and port replaced by `address` (HOST:PORT), user, password and parameters kept."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    return urlunsplit((parts.scheme, f"{userinfo}@{address}" if userinfo else address, parts.path, parts.query,
                       parts.fragment))


class ChaosStore:
    """`spec` is `sqlite` or a PostgreSQL URL (check_spec). Call `create()` first and `close(keep)` last."""

    def __init__(self, spec: str) -> None:
        self.spec = check_spec(spec)
        self.postgres = self.spec != SQLITE
        self.url = SQLITE                    # what the run reads the store through (directly, never proxied)
        self.proxies: list[TcpProxy] = []    # replica i's store link (PostgreSQL only)
        self.restarts = 0
        self.link_cuts = 0
        self.terminated = 0                  # backends ended by the restarts
        if self.postgres:
            parts = urlsplit(self.spec)
            if not parts.hostname:
                raise ValueError(f"the chaos run needs a store URL with a TCP host (it proxies every replica's "
                                 f"store link), not {mask_url(self.spec)}")
            self._server = (parts.hostname, parts.port or 5432)

    @property
    def shown(self) -> str:
        return "SQLite (shared data dir)" if not self.postgres else f"PostgreSQL {mask_url(self.url)}"

    @property
    def database(self) -> str:
        """The run's own PostgreSQL database ("" for SQLite, or before `create`)."""
        return urlsplit(self.url).path.lstrip("/") if self.url != SQLITE else ""

    @property
    def dropped_replies(self) -> int:
        return sum(p.dropped_replies for p in self.proxies)

    def create(self, replicas: int) -> None:
        """A fresh database and a proxy per replica (PostgreSQL); nothing to do for SQLite."""
        if not self.postgres:
            return
        name = f"{PREFIX}{uuid.uuid4().hex[:16]}"
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE template0')
        self.url = with_database(self.spec, name)
        host, port = self._server
        self.proxies = [TcpProxy(port, host) for _ in range(replicas)]

    def replica_url(self, index: int) -> str:
        """The store replica `index` is given (`--store`): the run's database, through that replica's proxy."""
        return self.url if not self.postgres else through(self.url, self.proxies[index].address)

    # ---- faults ----------------------------------------------------------------------------------------------
    def restart(self, pause: float) -> None:
        """What a server restart does to its clients, without restarting a shared server, in the order a fast
        shutdown does it: every session of the database is ended with pg_terminate_backend (the client gets the
        FATAL "terminating connection due to administrator command"; whatever transaction was running is rolled
        back), then every connection of every replica is cut at once and new ones are refused for `pause`
        seconds (the server is down)."""
        self.terminated += self._terminate_backends()
        for proxy in self.proxies:
            proxy.cut()
        self.restarts += 1
        time.sleep(pause)  # the fault itself: how long the server is away
        self.restore()

    def restore(self) -> None:
        for proxy in self.proxies:
            proxy.restore()

    def cut_link(self, index: int, pause: float) -> None:
        """One replica loses its store link (a partition): its sessions close, others' do not."""
        self.proxies[index].cut()
        self.link_cuts += 1
        time.sleep(pause)
        self.proxies[index].restore()

    def drop_replies(self, index: int, count: int, pause: float) -> None:
        """Replica `index`'s next `count` store replies are lost (the statement ran; its answer never comes)."""
        self.proxies[index].drop_replies(count)
        time.sleep(pause)
        self.proxies[index].restore()

    # ---- the database's life ---------------------------------------------------------------------------------
    def close(self, keep: bool) -> str | None:
        """Close the proxies; drop the database unless `keep`. Returns a line to print about a kept database."""
        for proxy in self.proxies:
            proxy.close()
        if not self.database:
            return None
        if keep:
            return f"store database kept for inspection: {mask_url(self.url)}"
        self._admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        return None

    def _terminate_backends(self) -> int:
        rows = self._admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                           " WHERE datname = $1 AND pid <> pg_backend_pid()", self.database)
        return sum(1 for (ended,) in rows if ended)

    def _admin(self, statement: str, *args: Any) -> list[tuple]:
        """One statement on the admin URL's database (not the run's: it must survive the run's faults)."""
        try:
            return asyncio.run(self._admin_async(statement, args))
        except Exception as exc:  # noqa: BLE001 - shown as one line, never with the password
            raise RuntimeError(f"PostgreSQL at {mask_url(self.spec)}: "
                               f"{scrub(f'{type(exc).__name__}: {exc}', self.spec)}") from None

    async def _admin_async(self, statement: str, args: tuple) -> list[tuple]:
        import asyncpg

        conn = await asyncpg.connect(self.spec, timeout=ADMIN_TIMEOUT)
        try:
            return [tuple(r) for r in await conn.fetch(statement, *args, timeout=ADMIN_TIMEOUT)]
        finally:
            await conn.close()
