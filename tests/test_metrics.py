"""Prometheus metrics (CONTRACT §10): real servers with `--metrics-port`, scraped over HTTP, count what real
payments and real 2PC messages did; without the flag no port is open; a metrics port that is taken stops a
server with one line; run_all serves them at its documented ports and says where."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import grpc
import pytest

from protofiles import payment_pb2 as pb
from servers.bank.metrics import BankMetrics, BankMetricsOff
from servers.gateway.metrics import GatewayMetrics, GatewayMetricsOff
from tests.harness import (OPENING, OPENING_ACCOUNTS, OPENING_TOTAL, REPO, Cluster, free_port, free_port_base,
                           run_all_servers, scrape, server_processes, wait_until, write_config)
from tests.gateway_support import (assert_conserved, start_with_gateway_crash_at, wait_killed_itself,
                                   wait_settled)


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """How much each sample grew between two scrapes (a sample absent before counts from 0)."""
    return {name: value - before.get(name, 0.0) for name, value in after.items()}


def test_gateway_counts_payments_by_outcome_replays_in_flight_refusals_and_calls(
        make_cluster: Callable[..., Cluster]) -> None:
    # A longer prepare deadline: the in-flight window below (a bank frozen, its vote awaited) lasts that long.
    cluster = make_cluster(metrics=True, txn_timeout=4.0)
    before = cluster.scrape("gateway")
    alice = cluster.client("alice")

    paid = alice.pay("metrics-paid", "SBI-1001", "HDFC-2001", 10.0)
    assert paid.status == pb.PAYMENT_STATUS_SUCCEEDED
    assert alice.pay("metrics-paid", "SBI-1001", "HDFC-2001", 10.0).replayed
    declined = alice.pay("metrics-declined", "SBI-1001", "HDFC-2001", 9000.0)  # SBI-1001 holds ₹5,000
    assert declined.status == pb.PAYMENT_STATUS_DECLINED
    with pytest.raises(grpc.RpcError) as refused:
        alice.stub.GetBalance(pb.GatewayBalanceRequest(), metadata=[("authorization", "Bearer forged")], timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # HDFC frozen: its vote never comes, so the payment is in flight (a retry is refused ABORTED) until the
    # deadline fails it; HDFC cannot acknowledge the abort either, so the payment is left to the completer.
    wait_until(lambda: cluster.unfinished_payments() == 0, message="earlier payments finished")
    cluster.procs["HDFC"].pause()
    try:
        outcome: list[pb.PaymentResponse] = []
        payer = threading.Thread(target=lambda: outcome.append(
            alice.pay("metrics-failed", "SBI-1001", "HDFC-2001", 20.0)))
        payer.start()
        wait_until(lambda: cluster.unfinished_payments() == 1, message="the payment claimed")
        with pytest.raises(grpc.RpcError) as in_flight:
            alice.pay("metrics-failed", "SBI-1001", "HDFC-2001", 20.0)
        assert in_flight.value.code() == grpc.StatusCode.ABORTED
        payer.join(30)
        assert outcome and outcome[0].status == pb.PAYMENT_STATUS_FAILED
        wait_until(lambda: cluster.scrape("gateway")["strife_payments_awaiting_completer"] == 1, 10,
                   message="the unacknowledged abort waiting for the completer")
    finally:
        cluster.procs["HDFC"].resume()
    wait_until(lambda: cluster.scrape("gateway")["strife_payments_awaiting_completer"] == 0, 15,
               message="the completer delivering the abort once HDFC is back")
    wait_until(lambda: cluster.unfinished_payments() == 0, 15, message="every payment finished")

    grew = moved(before, cluster.scrape("gateway"))
    assert {o: grew[f'strife_payments_total{{outcome="{o}"}}'] for o in ("succeeded", "declined", "failed")} == \
        {"succeeded": 1, "declined": 1, "failed": 1}
    assert grew["strife_payment_replays_total"] == 1
    assert grew["strife_payment_in_flight_refusals_total"] == 1
    assert grew["strife_payment_duration_seconds_count"] == 3  # one per executed payment, none per replay
    assert grew['strife_payment_duration_seconds_bucket{le="+Inf"}'] == 3
    calls = 'strife_grpc_server_requests_total{{code="{}",method="/PaymentGateway/{}"}}'
    assert grew[calls.format("OK", "Login")] == 1
    assert grew[calls.format("OK", "ProcessPayment")] == 4  # paid, replayed, declined, failed: each a response
    assert grew[calls.format("ABORTED", "ProcessPayment")] == 1
    assert grew[calls.format("UNAUTHENTICATED", "GetBalance")] == 1
    assert grew['strife_grpc_server_request_duration_seconds_count{method="/PaymentGateway/ProcessPayment"}'] == 5
    for bank in OPENING:
        frames = grew[f'strife_banklink_frames_total{{bank="{bank}"}}']
        assert 1 <= frames <= grew[f'strife_banklink_messages_total{{bank="{bank}"}}']

    # The banks counted the same payments over the gateway's frames: SBI voted yes twice (paid, failed) and no
    # once (declined), committed once; the holds of the failed payment are released.
    sbi = cluster.scrape("SBI")
    assert [sbi[f'strife_bank_prepares_total{{result="{r}"}}'] for r in ("yes", "no", "error")] == [2, 1, 0]
    assert sbi['strife_bank_commits_total{result="ok"}'] == 1
    assert sbi['strife_bank_aborts_total{result="ok"}'] >= 2 and sbi['strife_bank_aborts_total{result="refused"}'] == 0
    assert sbi["strife_bank_holds"] == 0 and sbi["strife_bank_held_paise"] == 0
    assert sbi["strife_bank_commit_duration_seconds_count"] >= 3
    hdfc = cluster.scrape("HDFC")
    assert hdfc['strife_bank_prepares_total{result="yes"}'] >= 2 and hdfc['strife_bank_commits_total{result="ok"}'] == 1
    assert cluster.total() == OPENING_TOTAL and cluster.holds() == 0
    assert cluster.balance("SBI-1001") == OPENING_ACCOUNTS["SBI-1001"][0] - 1000


def test_bank_counts_prepares_commits_aborts_by_result_and_shows_its_holds(make_cluster: Callable[..., Cluster]
                                                                          ) -> None:
    cluster = make_cluster(metrics=True)
    sbi = cluster.bank_stub("SBI")  # as the gateway: unary calls, the other path into the ledger
    before = cluster.scrape("SBI")

    def prepare(txn: str, amount: float) -> bool:
        return sbi.Prepare(pb.PrepareRequest(transaction_id=txn, from_account="SBI-1001", to_account="HDFC-2001",
                                             amount=amount), timeout=10).vote

    def holds() -> tuple[float, float]:
        page = cluster.scrape("SBI")
        return page["strife_bank_holds"], page["strife_bank_held_paise"]

    assert prepare("held-then-committed", 250.0) and prepare("held-then-aborted", 100.0)
    assert holds() == (2, 35000)
    assert not prepare("more-than-there-is", 9000.0)
    assert holds() == (2, 35000)  # a NO places no hold
    assert sbi.Commit(pb.CommitRequest(transaction_id="held-then-committed"), timeout=10).success
    assert holds() == (1, 10000)
    assert sbi.Abort(pb.AbortRequest(transaction_id="held-then-aborted"), timeout=10).success
    assert holds() == (0, 0)
    assert not sbi.Abort(pb.AbortRequest(transaction_id="held-then-committed"), timeout=10).success
    assert not sbi.Commit(pb.CommitRequest(transaction_id="held-then-aborted"), timeout=10).success
    with pytest.raises(grpc.RpcError) as malformed:
        prepare("", 1.0)
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    grew = moved(before, cluster.scrape("SBI"))
    assert {r: grew[f'strife_bank_prepares_total{{result="{r}"}}'] for r in ("yes", "no", "error")} == \
        {"yes": 2, "no": 1, "error": 1}
    for kind in ("commits", "aborts"):
        assert {r: grew[f'strife_bank_{kind}_total{{result="{r}"}}'] for r in ("ok", "refused", "error")} == \
            {"ok": 1, "refused": 1, "error": 0}
    assert grew["strife_bank_commit_duration_seconds_count"] >= 4  # each write answered after its COMMIT
    calls = 'strife_grpc_server_requests_total{{code="{}",method="/Bank/{}"}}'
    # A call is counted with its log line, written once its answer is on its way (the server's next loop turn):
    # the last call's count may trail its answer by that turn.
    wait_until(lambda: moved(before, cluster.scrape("SBI")).get(calls.format("INVALID_ARGUMENT", "Prepare")) == 1,
               5, message="the malformed Prepare to be counted")
    grew = moved(before, cluster.scrape("SBI"))
    assert grew[calls.format("OK", "Prepare")] == 3 and grew[calls.format("INVALID_ARGUMENT", "Prepare")] == 1
    assert cluster.balance("SBI-1001") == OPENING_ACCOUNTS["SBI-1001"][0] - 25000 and cluster.holds() == 0


def test_a_payment_a_dead_gateway_left_undecided_counts_once_as_failed_when_recovery_aborts_it(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = start_with_gateway_crash_at(make_cluster, "after_prepare", metrics=True)
    alice = cluster.client("alice")
    with pytest.raises(grpc.RpcError):
        alice.pay("metrics-crashed", "SBI-1001", "HDFC-2001", 30.0, timeout=10)
    wait_killed_itself(cluster.procs["gateway"])
    assert cluster.holds() == 3000  # both banks voted yes; SBI holds the money

    cluster.restart("gateway")  # start-up recovery decides ABORT for it; the completer tells the banks
    wait_settled(cluster)
    page = cluster.scrape("gateway")
    assert [page[f'strife_payments_total{{outcome="{o}"}}'] for o in ("succeeded", "declined", "failed")] == [0, 0, 1]
    assert page["strife_payment_duration_seconds_count"] == 0  # decided by recovery: no request waited for it
    replay = alice.pay("metrics-crashed", "SBI-1001", "HDFC-2001", 30.0)
    assert replay.replayed and replay.status == pb.PAYMENT_STATUS_FAILED
    page = cluster.scrape("gateway")
    assert page['strife_payments_total{outcome="failed"}'] == 1 and page["strife_payment_replays_total"] == 1
    assert_conserved(cluster)


def _listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (its socket inodes matched against the kernel's LISTEN table)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    inodes = set()
    for fd in fd_dir.iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_metrics_are_off_by_default_no_port_is_opened(cluster: Cluster) -> None:
    assert _listening_ports(cluster.procs["gateway"].popen.pid) == {cluster.gateway_port}
    for bank in OPENING:
        assert _listening_ports(cluster.procs[bank].popen.pid) == {cluster.bank_ports[bank]}


@pytest.mark.parametrize("server", ["gateway", "bank"])
def test_a_metrics_port_in_use_stops_the_server_with_exit_2_and_one_line(tmp_path: Path, certs_dir: Path,
                                                                         server: str) -> None:
    config = tmp_path / "config"
    write_config(config, {bank: f"localhost:{free_port()}" for bank in OPENING})
    module = ["servers.gateway_server"] if server == "gateway" else ["servers.bank_server", "--bank", "SBI"]
    with socket.socket() as squatter:  # another program already holds the metrics port
        squatter.bind(("0.0.0.0", free_port()))
        squatter.listen()
        taken = squatter.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", *module, "--port", str(free_port()), "--metrics-port",
                                 str(taken), "--config-dir", str(config), "--certs-dir", str(certs_dir),
                                 "--data-dir", str(tmp_path / "data")], cwd=REPO, capture_output=True, text=True,
                                timeout=60)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    name = "gateway" if server == "gateway" else "bank SBI"
    assert (result.returncode, lines) == (2, [f"{name}: cannot start: cannot serve metrics on port {taken}:"
                                              " Address already in use"])


def test_run_all_serves_metrics_at_its_ports_and_says_where(tmp_path: Path) -> None:
    base = free_port_base([0, 10, 11])  # the gateway at the base, the banks (HDFC, SBI) from base + 10
    config, data = tmp_path / "config", tmp_path / "data"
    write_config(config, {bank: f"localhost:{free_port()}" for bank in OPENING})
    proc, banner = run_all_servers("--config-dir", str(config), "--certs-dir", str(tmp_path / "certs"), "--data-dir",
                                   str(data), "--gateway-port", str(free_port()), "--metrics-base-port", str(base))
    try:
        said = dict(re.findall(r"(gateway|bank \w+) (http://localhost:\d+/metrics)", banner))
        assert said == {"gateway": f"http://localhost:{base}/metrics",
                        "bank HDFC": f"http://localhost:{base + 10}/metrics",
                        "bank SBI": f"http://localhost:{base + 11}/metrics"}
        assert f"http://localhost:{base}/metrics" in (data / "logs" / "run_all.log").read_text()  # for the wallet
        assert 'strife_payments_total{outcome="succeeded"}' in scrape(said["gateway"])
        for bank in ("HDFC", "SBI"):
            assert scrape(said[f"bank {bank}"])["strife_bank_holds"] == 0
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in server_processes(str(data)):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("real, off", [(GatewayMetrics, GatewayMetricsOff), (BankMetrics, BankMetricsOff)])
def test_metrics_off_answers_every_event_of_its_role_with_nothing(real: type, off: type) -> None:
    # An event the Off class inherits from the real one would touch metric objects that are not there: every
    # server started without --metrics-port would fail at that event.
    events = {name for cls in real.__mro__ if cls is not object for name, value in vars(cls).items()
              if callable(value) and not name.startswith("_")}
    assert {"call_ended", "close"} < events
    inherited = {name for name in events if getattr(off, name).__qualname__.split(".")[0] not in (off.__name__, "Off")}
    assert inherited == set()
