from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.harness import Client, Cluster, make_certs


@pytest.fixture(scope="session")
def certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def gateway_store(request: pytest.FixtureRequest) -> str:
    """The store the clusters' gateways run on: SQLite, unless a module runs on both stores
    (`gateway_store = on_both_stores`, tests/pg_support.py) or a test does (`@BOTH_STORES`, the same file)."""
    store = getattr(request, "param", "sqlite")
    return "sqlite" if store == "sqlite" else request.getfixturevalue("postgres_url")


@pytest.fixture
def make_cluster(tmp_path: Path, certs_dir: Path, gateway_store: str) -> Iterator[Callable[..., Cluster]]:
    """Build (and afterwards stop) fresh clusters: `make_cluster(txn_timeout=1, start=True, ...)`."""
    made: list[Cluster] = []

    def factory(*, start: bool = True, **kwargs) -> Cluster:
        kwargs.setdefault("store", gateway_store)
        cluster = Cluster(root=tmp_path / f"cluster{len(made)}", certs_dir=certs_dir, **kwargs)
        made.append(cluster)
        return cluster.start() if start else cluster

    yield factory
    for cluster in made:
        cluster.stop()


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    return make_cluster()


@pytest.fixture(scope="module")
def untouched(tmp_path_factory: pytest.TempPathFactory, certs_dir: Path) -> Iterator[Cluster]:
    """One cluster per test module for calls that must all be refused: nothing sent to it may move money."""
    cluster = Cluster(root=tmp_path_factory.mktemp("untouched"), certs_dir=certs_dir).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def alice(untouched: Cluster) -> Client:
    """alice, logged in to the module's `untouched` cluster."""
    return untouched.client("alice")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test, dropped afterwards (tests/pg_support.py). Skips with one
    line when no server is reachable; fails instead under STRIFE_REQUIRE_POSTGRES=1."""
    from tests.pg_support import fresh_database

    with fresh_database() as url:
        yield url
