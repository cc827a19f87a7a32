"""gRPC's I/O engine for the server programs: chosen before grpc is imported, only for tested gRPC versions,
never over the operator's own choice; and the servers say in their log what they run on."""
from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

from servers import grpc_engine
from tests.harness import REPO, Cluster, wait_until


def _version(monkeypatch: pytest.MonkeyPatch, version: str | None) -> None:
    def fake(name: str) -> str:
        assert name == "grpcio"
        if version is None:
            raise metadata.PackageNotFoundError(name)
        return version
    monkeypatch.setattr(grpc_engine.metadata, "version", fake)


def test_a_tested_grpc_gets_the_older_pollers(monkeypatch: pytest.MonkeyPatch) -> None:
    _version(monkeypatch, "1.85.3")
    env: dict[str, str] = {}
    decision = grpc_engine._choose(env, grpc_imported=False)
    assert env == {"GRPC_EXPERIMENTS": grpc_engine.OLDER_POLLERS}
    assert decision.startswith("gRPC's older pollers (grpcio 1.85.3")


@pytest.mark.parametrize("env, version, says", [
    ({"GRPC_EXPERIMENTS": "-foo"}, "1.85.3", "GRPC_EXPERIMENTS=-foo (set by the operator)"),
    ({"STRIFE_GRPC_ENGINE": "default"}, "1.85.3", "default I/O engine (STRIFE_GRPC_ENGINE=default)"),
    ({}, "1.99.0", "grpcio 1.99.0 is not a version the older pollers were tested with"),
    ({}, None, "grpcio's version is unknown"),
])
def test_otherwise_the_environment_is_left_as_it_is(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                    version: str | None, says: str) -> None:
    _version(monkeypatch, version)
    before = dict(env)
    assert says in grpc_engine._choose(env, grpc_imported=False)
    assert env == before


def test_too_late_once_grpc_is_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    _version(monkeypatch, "1.85.3")
    env: dict[str, str] = {}
    assert "grpc was imported before" in grpc_engine._choose(env, grpc_imported=True) and env == {}


def test_an_unknown_engine_wish_is_named_in_the_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    _version(monkeypatch, "1.85.3")
    env = {"STRIFE_GRPC_ENGINE": "fast"}
    assert "STRIFE_GRPC_ENGINE='fast' ignored" in grpc_engine._choose(env, grpc_imported=False)


def test_the_console_scripts_choose_before_grpc_is_imported() -> None:
    probe = ("import sys; import servers.launch, servers.grpc_engine as e; assert 'grpc' not in sys.modules;"
             " e.choose(); import grpc; print(e.describe())")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "older pollers" in out.stdout or "default I/O engine (grpcio" in out.stdout, out.stdout


def test_the_servers_log_what_they_run_on(cluster: Cluster) -> None:
    expected = ("older pollers" if metadata.version("grpcio").startswith(grpc_engine.TESTED_VERSIONS)
                else "default I/O engine")
    for name in ("gateway", "SBI", "HDFC"):
        proc = cluster.procs[name]
        wait_until(lambda: "network I/O:" in proc.log(), message=f"{name}'s start-up lines")
        line = next(line for line in proc.log().splitlines() if "network I/O:" in line)
        assert expected in line, line
