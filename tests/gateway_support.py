"""Helpers for the tests that run real gateways against real banks: keys, reading the gateway's store (either
backend: tests/store_view.py), gateways armed to crash at a recovery point (CONTRACT §6), and the checks that
every payment settled and money is conserved."""
from __future__ import annotations

import signal
import threading
import uuid
from typing import Callable

import grpc
import pytest

from protofiles import payment_pb2 as pb
from tests.harness import OPENING, OPENING_TOTAL, Client, Cluster, Proc, free_port, wait_until
from tests.store_view import KeyRow

MakeCluster = Callable[..., Cluster]
SUCCEEDED, FAILED = pb.PAYMENT_STATUS_SUCCEEDED, pb.PAYMENT_STATUS_FAILED
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
             grpc.StatusCode.CANCELLED)
# Generous: these tests are about crashes, not slow banks, and a loaded machine must not turn a YES into a timeout.
TXN_TIMEOUT = 5.0

# Where the payment stands when the gateway dies at each point: the key's recovery point, and what the banks hold.
AT_CRASH = {
    "after_claim": ("started", None),            # no bank has heard of it
    "after_prepare": ("started", "prepared"),    # both banks voted YES and hold it
    "after_decide": ("commit_decided", "prepared"),
    "after_deliver": ("commit_decided", "committed"),  # both banks committed; only 'finished' is missing
}
MOVES_MONEY = {"after_claim": False, "after_prepare": False, "after_decide": True, "after_deliver": True}


def key() -> str:
    return f"test-{uuid.uuid4()}"


# ---- reading the gateway's store (either backend: tests/store_view.py) -------------------------------------
def key_row(cluster: Cluster, user: str, idem_key: str) -> KeyRow | None:
    return cluster.view.key_row(user, idem_key)


def payments_with_key(cluster: Cluster, user: str, idem_key: str) -> list[tuple[str, str]]:
    """(txn_id, status) of every payment ever executed under this key, oldest first."""
    return cluster.view.payments_with_key(user, idem_key)


def committed(cluster: Cluster, bank: str) -> set[str]:
    return {t for t, state in cluster.txn_states(bank).items() if state == "committed"}


# ---- processes -------------------------------------------------------------------------------------------------
def start_with_gateway_crash_at(make_cluster: MakeCluster, point: str, **kwargs) -> Cluster:
    """Banks and a gateway armed to SIGKILL itself when a payment reaches `point`."""
    return start_with_gateway_env(make_cluster, {"STRIFE_CRASH_AT": point}, **kwargs)


def start_with_gateway_env(make_cluster: MakeCluster, env: dict[str, str], **kwargs) -> Cluster:
    """Banks and a gateway with `env` (a crash or delay point) in its environment."""
    cluster = make_cluster(start=False, **{"txn_timeout": TXN_TIMEOUT, **kwargs})
    for bank in OPENING:
        cluster.procs[bank] = cluster.bank_proc(bank).start()
    gateway = cluster.gateway_proc()
    gateway.env = env
    cluster.procs["gateway"] = gateway.start()
    for bank in OPENING:
        cluster.wait_bank(bank)
    cluster.wait_gateway()
    return cluster


def start_extra_gateway(cluster: Cluster, name: str, crash_at: str | None = None, *,
                        env: dict[str, str] | None = None, wrapper: str | None = None) -> int:
    """Another gateway process on the same store (the SQLite file in the same --data-dir, or the same PostgreSQL
    database); returns its port. `crash_at`/`env`: a crash or delay point in its environment; `wrapper`: a
    module that runs the gateway (tests/health_switch.py)."""
    port = free_port()
    proc = cluster.gateway_proc(port=port, name=name)
    proc.env = {**(env or {}), **({"STRIFE_CRASH_AT": crash_at} if crash_at else {})}
    if wrapper:
        proc.args = [wrapper, *proc.args]
    cluster.procs[name] = proc.start()
    cluster.wait_gateway(port=port, name=name)
    return port


def wait_killed_itself(proc: Proc) -> None:
    wait_until(lambda: not proc.alive, 10, message=f"{proc.name} to SIGKILL itself at its crash point")
    assert proc.popen.returncode == -signal.SIGKILL, proc.log()[-2000:]


def pay_into_the_crash(cluster: Cluster, client: Client, k: str, amount: float) -> str:
    """Pay through the gateway armed to SIGKILL itself at its crash point: the call fails, the gateway is gone,
    and what it left is stored under the key. The key's transaction id."""
    with pytest.raises(grpc.RpcError):
        client.pay(k, "SBI-1001", "HDFC-2001", amount)
    wait_killed_itself(cluster.procs["gateway"])
    return key_row(cluster, client.user, k).txn_id


def wait_settled(cluster: Cluster, timeout: float = 15) -> None:
    wait_until(lambda: cluster.unfinished_payments() == 0, timeout, message="every payment to be finished")
    wait_until(lambda: cluster.holds() == 0, timeout, message="every hold to be released")


def assert_conserved(cluster: Cluster) -> None:
    assert cluster.total() == OPENING_TOTAL
    assert cluster.holds() == 0


def run_together(threads: list[threading.Thread], failures: list[BaseException], timeout: float = 60) -> None:
    """Start the payers and the fault-maker at once, wait for all of them, and fail on anything they raised."""
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not failures, failures
    assert not any(t.is_alive() for t in threads)
