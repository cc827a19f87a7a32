"""Watching a benchmark from outside its processes: CPU time and memory from /proc, and the PostgreSQL side —
a database made for one run, the backends that serve it (for their CPU time) and which gateway replica each
of its connections comes from.

The gateways all name their sessions `strife-gateway`, so pg_stat_activity alone cannot tell replicas apart;
a connection is matched to a replica by its client port instead: the replica's own sockets (/proc/<pid>/fd)
whose far end is the server's port. Reading other users' /proc entries (the postgres backends) needs root or
the same user, as the benchmark runs here.
"""
from __future__ import annotations

import asyncio
import os
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from bench.process_stats import cpu_seconds as process_cpu_seconds
from bench.process_stats import machine_busy_seconds
from servers.gateway.store.url import mask_url, scrub, with_database

DATABASE_PREFIX = "strife_bench_"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far; 0 once it is gone (a backend that ended within a
    window is not counted: the pools here keep theirs)."""
    try:
        return process_cpu_seconds(pid)
    except OSError:
        return 0.0


class PgAdmin:
    """One admin connection to the server, usable from plain threads (asyncpg runs on a loop of its own)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        import asyncpg

        self.url = url
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pg-admin", daemon=True)
        self._thread.start()
        try:
            self._conn = self._run(asyncpg.connect(url, timeout=timeout))
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(self.timeout * 6)

    def fetch(self, statement: str, *args: Any) -> list[tuple]:
        return [tuple(r) for r in self._run(self._conn.fetch(statement, *args, timeout=self.timeout * 6))]

    def execute(self, statement: str) -> None:
        self._run(self._conn.execute(statement, timeout=self.timeout * 6))

    def close(self) -> None:
        try:
            self._run(self._conn.close(timeout=self.timeout))
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


def probe(url: str) -> str | None:
    """None if the URL's server answers as an admin that can make databases; else one line saying why not
    (any password masked)."""
    try:
        admin = PgAdmin(url)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is reported the same way
        return scrub(f"cannot connect to {mask_url(url)}: {type(exc).__name__}: {exc}", url)
    try:
        (can_create,), = admin.fetch("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user")
    finally:
        admin.close()
    return None if can_create else f"{mask_url(url)}: this role may not create databases (the bench makes its own)"


@contextmanager
def bench_database(admin: PgAdmin) -> Iterator[str]:
    """A fresh, empty database on the admin's server, dropped on exit (its sessions ended first)."""
    name = f"{DATABASE_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:8]}"  # whose it is, for a test's clean-up check
    admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        yield with_database(admin.url, name)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_of(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def server_port(url: str) -> int:
    return urlsplit(url).port or 5432


def backend_pids(admin: PgAdmin, database: str) -> list[int]:
    return [pid for pid, in admin.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", database)]


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def local_ports_to(pid: int, remote_port: int) -> set[int]:
    """The local ports of `pid`'s TCP connections to `remote_port` (IPv4 and IPv6)."""
    inodes = _socket_inodes(pid)
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], int(fields[9])
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def connections_by_replica(admin: PgAdmin, database: str, replicas: dict[str, int], port: int) -> dict[str, int]:
    """PostgreSQL's own count of the sessions on `database`, by the replica (name → pid) each comes from;
    sessions from anywhere else count under "other"."""
    owner = {p: name for name, pid in replicas.items() for p in local_ports_to(pid, port)}
    counts = dict.fromkeys(replicas, 0) | {"other": 0}
    for client_port, in admin.fetch("SELECT client_port FROM pg_stat_activity WHERE datname = $1"
                                    " AND backend_type = 'client backend'", database):  # not autovacuum
        counts[owner.get(client_port, "other")] += 1
    return counts


class CpuMeter:
    """CPU seconds by role ("gateway", "SBI", "postgres", ...) over a window: fixed processes by pid, plus
    the PostgreSQL backends of one database, looked up at each reading (a pool may open one meanwhile; a
    backend born in the window counts from its start). `machine` is every process's, ours and others'."""

    def __init__(self, roles: dict[str, list[int]], admin: PgAdmin | None = None, database: str = "") -> None:
        self.roles = roles
        self.admin = admin
        self.database = database

    def read(self) -> dict[str, Any]:
        reading: dict[str, Any] = {role: sum(map(cpu_seconds, pids)) for role, pids in self.roles.items()}
        reading["machine"] = machine_busy_seconds()
        if self.admin is not None:
            reading["postgres"] = {pid: cpu_seconds(pid) for pid in backend_pids(self.admin, self.database)}
        return reading

    @staticmethod
    def used(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
        used = {role: after[role] - before[role] for role in after if role != "postgres"}
        if "postgres" in after:
            used["postgres"] = sum(cpu - before["postgres"].get(pid, 0.0) for pid, cpu in after["postgres"].items())
        return used
