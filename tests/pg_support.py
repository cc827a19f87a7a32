"""PostgreSQL for tests: a fresh database per test on a real server, and what to do when there is no server.

The server comes from `STRIFE_TEST_POSTGRES` (an admin URL; default postgresql://postgres@127.0.0.1:5432/postgres).
Each test gets a database of its own, `strife_test_<random>`, created from template0 and dropped afterwards (also
when the test fails). The server may be shared: nothing here touches a database it did not create.
Without a server the PostgreSQL tests skip, with one line saying how to enable them; under
`STRIFE_REQUIRE_POSTGRES=1` (CI with a server) a missing server fails them instead.
"""
from __future__ import annotations

import asyncio
import os
import time
import uuid
from contextlib import contextmanager
from typing import Any, Awaitable, Callable, Iterator

import pytest

from servers.gateway.store.url import mask_url, scrub, with_database

ADMIN_ENV = "STRIFE_TEST_POSTGRES"
REQUIRE_ENV = "STRIFE_REQUIRE_POSTGRES"
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PREFIX = "strife_test_"

_unreachable: list[str | None] = []  # the probe's answer, once per test session


def admin_url() -> str:
    return os.environ.get(ADMIN_ENV) or DEFAULT_ADMIN_URL


async def _admin(statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url(), timeout=5)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def _probe() -> str | None:
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return "the asyncpg driver is not installed (pip install -e '.[test]')"
    try:
        asyncio.run(_admin("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means "no usable server"
        return scrub(f"{type(exc).__name__}: {exc}", admin_url())
    return None


def require_postgres() -> None:
    """Skip (or, under STRIFE_REQUIRE_POSTGRES=1, fail) the calling test when no server is reachable."""
    if not _unreachable:
        _unreachable.append(_probe())
    reason = _unreachable[0]
    if reason is None:
        return
    where = mask_url(admin_url())
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"PostgreSQL required ({REQUIRE_ENV}=1) but not reachable at {where}: {reason}", pytrace=False)
    pytest.skip(f"no PostgreSQL at {where} ({reason}); to run these tests set {ADMIN_ENV}=postgresql://USER@HOST:PORT/DB"
                f" (an admin URL), and {REQUIRE_ENV}=1 to make a missing server a failure")


@contextmanager
def fresh_database() -> Iterator[str]:
    """The URL of a new, empty database, dropped on exit (its sessions ended first)."""
    require_postgres()
    name = f"{PREFIX}{uuid.uuid4().hex[:16]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}" TEMPLATE template0'))
    try:
        yield with_database(admin_url(), name)
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def eventually(predicate: Callable[[], Awaitable[Any] | Any], timeout: float = 10.0, interval: float = 0.02,
                     message: str = "condition") -> Any:
    """`harness.wait_until` for async tests: poll without blocking the loop (the store's own tasks run on it)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}")
        await asyncio.sleep(interval)


# One test on both stores (a fresh PostgreSQL database for its second run): `@BOTH_STORES` on the test.
BOTH_STORES = pytest.mark.parametrize("gateway_store", ["sqlite", "postgres"], indirect=True)


@pytest.fixture(params=["sqlite", "postgres"], name="gateway_store")
def on_both_stores(request: pytest.FixtureRequest) -> str:
    """Run a module's cluster tests on both stores: `gateway_store = on_both_stores` in the module. The
    PostgreSQL run gets a fresh database (skipped without a server, failed under STRIFE_REQUIRE_POSTGRES=1)."""
    return "sqlite" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
