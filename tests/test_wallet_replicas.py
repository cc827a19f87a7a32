"""The wallet given several gateway replicas (CONTRACT §9): it balances over those that answer, a replica that
dies (even mid-payment) or reports NOT_SERVING is left for the others without the wallet going offline or
queueing, and it is offline only when none answers.

Real processes throughout: two gateways on one --data-dir share one SQLite store (sessions, keys, payments), as
replicas on PostgreSQL share theirs; balances are read from the banks' ledgers on disk."""
from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from tests.harness import OPENING_TOTAL, PASSWORDS, Cluster, Proc, wait_until
from tests.pg_support import BOTH_STORES
from tests.gateway_support import MakeCluster, key_row, payments_with_key, start_extra_gateway
from tests.wallet_support import Toasts, history_statuses, login, pay, pending_count, wait_for, wallet_argv
from wallet_tui.app import make_app
from wallet_tui.core import WalletCore
from wallet_tui.gateway import KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS, GrpcGateway
from wallet_tui.replicas import channel_target, failover_pause
from wallet_tui.settings import parse_args
from wallet_tui.sync import Event, Finished, WentOffline

TXN_TIMEOUT = 5.0  # these tests are about replicas, not slow banks: a loaded machine must not fail a payment
PAYMENTS = "method=/PaymentGateway/ProcessPayment"


# ---- parsing and targets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, message", [
    ("localhost:50053,", "empty entry"),
    ("localhost:50053,,localhost:50063", "empty entry"),
    ("localhost", "expected HOST:PORT"),
    ("localhost:50053,localhost", "expected HOST:PORT"),
    ("localhost:0", "port 1-65535"),
    ("localhost:65536", "port 1-65535"),
    ("localhost:http", "expected HOST:PORT"),
    ("::1:50053", "written [ADDRESS]:PORT"),
    ("localhost:50053,LocalHost:50053", "listed twice"),
    ("localhost:50053, localhost:050053", "listed twice"),
])
def test_bad_gateway_lists_are_refused_with_an_argparse_error_naming_the_entry(
        value: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--gateway", value])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "argument --gateway" in error and message in error, error


def test_gateway_list_is_trimmed_and_one_address_stays_as_it_was() -> None:
    assert parse_args(["--gateway", " localhost:50053 , 127.0.0.1:50063"]).gateway == \
        "localhost:50053,127.0.0.1:50063"
    assert parse_args(["--gateway", "localhost:50053 , [::1]:50063"]).gateways == ("localhost:50053", "[::1]:50063")
    assert parse_args([]).gateways == ("localhost:50053",)
    assert channel_target(("localhost:50053",)) == "localhost:50053"   # gRPC resolves it, pick_first, as before


def test_replica_names_are_resolved_into_one_balanced_target() -> None:
    assert channel_target(("localhost:1", "127.0.0.1:2")) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target(("localhost:1", "127.0.0.1:1")) == "ipv4:127.0.0.1:1"     # one replica, two names
    assert channel_target(("[::1]:1", "127.0.0.1:2")) == "ipv6:[::1]:1,[::ffff:7f00:1]:2"
    assert channel_target(("nowhere.invalid:1", "127.0.0.1:2")) == "ipv4:127.0.0.1:2"  # resolved again later
    assert channel_target(("nowhere.invalid:1", "nowhere.invalid:2")) == "nowhere.invalid:1"


def test_failover_rule() -> None:
    lost, aborted = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED
    assert failover_pause(lost, 1, 0, replicas=1) is None                 # one gateway: the outbox resends
    assert [failover_pause(lost, n, 0, replicas=2) for n in (1, 2, 3)] == [0.0, 0.0, None]
    assert failover_pause(grpc.StatusCode.CANCELLED, 1, 0, replicas=2) == 0.0
    assert failover_pause(aborted, 0, 1, replicas=2) is None             # a live replica's payment: not ours
    assert 0 < failover_pause(aborted, 1, 1, replicas=2) < 0.1           # the dead owner is not known dead yet
    assert failover_pause(aborted, 1, 6, replicas=2) is None
    for code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT):
        assert failover_pause(code, 1, 0, replicas=2) is None


# ---- helpers ---------------------------------------------------------------------------------------------------
def wallet_core(cluster: Cluster, tmp_path: Path, *ports: int) -> WalletCore:
    settings = parse_args(wallet_argv(cluster, tmp_path, gateway=",".join(f"localhost:{p}" for p in ports)))
    core = WalletCore(settings, GrpcGateway(settings.gateway, settings.ca_path, pay_timeout=settings.pay_timeout))
    core.login("alice", PASSWORDS["alice"])
    return core


def pay_now(core: WalletCore, paise: int) -> tuple[str, list[Event]]:
    """A payment as the form makes it: into the outbox, then sent at once (the wallet believes it is online)."""
    entry = core.submit("SBI-1001", "HDFC-2001", paise)
    return entry.key, core.send_now(entry.key)


def assert_paid_at_once(events: list[Event]) -> None:
    assert [(type(e), getattr(e, "entry", None) and e.entry.status) for e in events] == [(Finished, "succeeded")], \
        events


def payments_on(proc: Proc) -> int:
    """Payments the gateway answered OK (so it accepted the token), from its log."""
    return sum(PAYMENTS in line and "status=OK" in line for line in proc.log().splitlines())


def assert_moved(cluster: Cluster, paise: int) -> None:
    wait_until(lambda: cluster.holds() == 0, 15, message="every hold released")
    assert cluster.balance("SBI-1001") == 500_000 - paise
    assert cluster.balance("HDFC-2001") == 300_000 + paise
    assert cluster.total() == OPENING_TOTAL


def each_key_paid_once(cluster: Cluster, keys: list[str]) -> None:
    for k in keys:
        assert [status for _, status in payments_with_key(cluster, "alice", k)] == ["succeeded"], k


# ---- behaviour against real replicas --------------------------------------------------------------------------
def test_calls_are_balanced_over_the_replicas_and_a_replica_killed_changes_nothing_for_the_user(
        make_cluster: MakeCluster, tmp_path: Path) -> None:
    cluster = make_cluster(txn_timeout=TXN_TIMEOUT)
    port2 = start_extra_gateway(cluster, "gateway2")
    first, second = cluster.procs["gateway"], cluster.procs["gateway2"]
    core = wallet_core(cluster, tmp_path, cluster.gateway_port, port2)

    keys = []
    for i in range(6):
        k, events = pay_now(core, 100 + i)
        assert_paid_at_once(events)
        keys.append(k)
    # Both replicas got payments, each with the token of the one login (sessions live in the shared store).
    wait_until(lambda: payments_on(first) + payments_on(second) == 6, 5, message="both gateways' log lines")
    assert payments_on(first) > 0 and payments_on(second) > 0

    second.kill()
    report = core.poll()
    assert report.healthy and not report.events and core.connectivity == "online"
    for i in range(6):
        k, events = pay_now(core, 200 + i)
        assert_paid_at_once(events)        # not Deferred, not WentOffline: the survivor took every one
        keys.append(k)
    assert core.connectivity == "online" and core.pending_rows() == []
    wait_until(lambda: payments_on(first) >= 9, 5, message="the survivor's log lines")
    each_key_paid_once(cluster, keys)
    assert_moved(cluster, sum(range(100, 106)) + sum(range(200, 206)))
    core.close()


def test_a_hung_replica_is_left_out_within_seconds_and_every_payment_is_paid_by_the_other(
        make_cluster: MakeCluster, tmp_path: Path) -> None:
    cluster = make_cluster(txn_timeout=TXN_TIMEOUT)
    port2 = start_extra_gateway(cluster, "gateway2")
    hung = cluster.procs["gateway2"]
    core = wallet_core(cluster, tmp_path, cluster.gateway_port, port2)
    keys = []
    for i in range(2):  # round robin: each replica has had a call, so each has a connection in the rotation
        k, events = pay_now(core, 100 + i)
        assert_paid_at_once(events)
        keys.append(k)

    # Hung, not dead: its port still accepts and the kernel acknowledges, its store session (and lock) lives on,
    # its connection looks healthy to the balancer. Only unanswered pings tell.
    hung.popen.send_signal(signal.SIGSTOP)
    try:
        for i in range(6):
            started = time.monotonic()
            k, events = pay_now(core, 200 + i)
            # Never left to its deadline (15 s), never deferred: a call given to the hung replica fails within
            # the keepalive's few seconds and is sent again, with its key, to the other one.
            assert_paid_at_once(events)
            assert time.monotonic() - started < KEEPALIVE_TIME_MS / 1000 + KEEPALIVE_TIMEOUT_MS / 1000 + 3
            keys.append(k)
        assert core.poll().healthy and core.connectivity == "online"
    finally:
        hung.popen.send_signal(signal.SIGCONT)
    # Back, it may find a request that reached it while it was stopped: its key replays, nothing moves twice.
    wait_until(lambda: cluster.serving(port=port2), 15, message="the replica serving again")
    each_key_paid_once(cluster, keys)
    assert_moved(cluster, 100 + 101 + sum(range(200, 206)))
    core.close()


def test_payment_whose_replica_dies_mid_call_is_finished_by_the_other_with_the_same_key_once(
        make_cluster: MakeCluster, tmp_path: Path) -> None:
    cluster = make_cluster(txn_timeout=TXN_TIMEOUT)
    # This replica SIGKILLs itself with the banks prepared: money held, nothing decided, the caller unanswered.
    port2 = start_extra_gateway(cluster, "gateway2", crash_at="after_prepare")
    survivor, dying = cluster.procs["gateway"], cluster.procs["gateway2"]
    core = wallet_core(cluster, tmp_path, cluster.gateway_port, port2)

    keys = []
    while dying.alive:       # round robin hands it one of the first two payments
        assert len(keys) < 4, "the crash-armed replica never got a payment"
        k, events = pay_now(core, 1_000 + len(keys))
        assert_paid_at_once(events)      # the user sees it paid: no retry later, no queue, still online
        keys.append(k)
    assert dying.popen.returncode == -signal.SIGKILL and core.connectivity == "online"
    # The one it died with was resent at once, with its key, to the survivor, which took it over.
    line = wait_until(lambda: next((ln for ln in survivor.log().splitlines() if "retry=resumed" in ln), None), 5,
                      message="the survivor's resumed payment")
    resumed = re.search(r"key=(\S+)", line).group(1)
    assert resumed == keys[-1] and core.outbox.finished(10)[0].key == resumed
    each_key_paid_once(cluster, keys)
    assert_moved(cluster, sum(1_000 + i for i in range(len(keys))))
    core.close()


def test_offline_only_when_no_replica_answers_and_the_queue_drains_when_one_returns(
        make_cluster: MakeCluster, tmp_path: Path) -> None:
    cluster = make_cluster(txn_timeout=TXN_TIMEOUT)
    port2 = start_extra_gateway(cluster, "gateway2")
    core = wallet_core(cluster, tmp_path, cluster.gateway_port, port2)

    cluster.procs["gateway"].kill()
    assert core.poll().healthy and core.connectivity == "online"       # one answers: online
    cluster.procs["gateway2"].kill()
    report = core.poll()
    assert not report.healthy and [type(e) for e in report.events] == [WentOffline]
    assert core.connectivity == "offline"
    k, events = pay_now(core, 777)
    assert events == [] and [(r.key, r.state) for r in core.pending_rows()] == [(k, "queued")]

    cluster.restart("gateway")                                           # one replica back, on its port
    report = wait_until(lambda: (r := core.poll()).healthy and r, 10, message="the wallet to see a replica back")
    assert report.came_back and report.sent == 1 and core.connectivity == "online"
    assert [(e.entry.key, e.entry.status) for e in report.events if isinstance(e, Finished)] == [(k, "succeeded")]
    assert core.pending_rows() == []
    each_key_paid_once(cluster, [k])
    assert_moved(cluster, 777)
    core.close()


def switchable_gateway(cluster: Cluster, name: str) -> tuple[Proc, int]:
    """A real gateway on the shared store whose health a test sets (tests/health_switch.py)."""
    port = start_extra_gateway(cluster, name, wrapper="tests.health_switch")
    return cluster.procs[name], port


def test_a_replica_reporting_not_serving_gets_no_calls_until_it_serves_again(make_cluster: MakeCluster,
                                                                             tmp_path: Path) -> None:
    cluster = make_cluster(txn_timeout=TXN_TIMEOUT)
    switchable, port2 = switchable_gateway(cluster, "gateway2")
    other = cluster.procs["gateway"]
    core = wallet_core(cluster, tmp_path, cluster.gateway_port, port2)

    switchable.popen.send_signal(signal.SIGUSR1)
    wait_until(lambda: not cluster.serving(port=port2), 5, message="NOT_SERVING")
    keys = []
    for i in range(6):
        k, events = pay_now(core, 300 + i)
        assert_paid_at_once(events)
        keys.append(k)
    assert core.poll().healthy and core.connectivity == "online"
    wait_until(lambda: payments_on(other) == 6, 5, message="the serving replica's log lines")
    assert payments_on(switchable) == 0 and PAYMENTS not in switchable.log()

    # NOT_SERVING and the only other replica dead: none answers, the wallet is offline.
    other.kill()
    assert not core.poll().healthy and core.connectivity == "offline"
    # Serving again: it is used again, and the wallet is back.
    switchable.popen.send_signal(signal.SIGUSR2)
    wait_until(lambda: core.poll().healthy, 10, message="the wallet to see the replica serving again")
    k, events = pay_now(core, 999)
    assert_paid_at_once(events)
    keys.append(k)
    wait_until(lambda: payments_on(switchable) == 1, 5, message="its log line")
    each_key_paid_once(cluster, keys)
    assert_moved(cluster, sum(range(300, 306)) + 999)
    core.close()


def test_a_draining_replica_finishes_its_payment_while_new_ones_go_to_the_other(make_cluster: MakeCluster,
                                                                                tmp_path: Path) -> None:
    cluster = make_cluster(txn_timeout=TXN_TIMEOUT)
    # Its payments take 3 s: long enough to stop it meanwhile.
    port2 = start_extra_gateway(cluster, "gateway2", env={"STRIFE_DELAY_AT": "after_claim:3"})
    draining = cluster.procs["gateway2"]
    other = cluster.procs["gateway"]
    core = wallet_core(cluster, tmp_path, cluster.gateway_port, port2)

    # Send payments in the background until one is being executed by the slow replica.
    results: dict[str, list[Event]] = {}
    for attempt in range(4):
        entry = core.submit("SBI-1001", "HDFC-2001", 500 + attempt)
        worker = threading.Thread(target=lambda k=entry.key: results.__setitem__(k, core.send_now(k)))
        worker.start()
        row = wait_until(lambda: key_row(cluster, "alice", entry.key), 10, message="the key claimed")
        if row.owner == cluster.owner_of("gateway2"):
            break
        worker.join(10)
    else:
        raise AssertionError("round robin never gave the slow replica a payment")
    slow_key = entry.key

    draining.popen.send_signal(signal.SIGTERM)     # NOT_SERVING, port closed, in-flight calls may finish
    wait_until(lambda: not cluster.serving(port=port2), 5, message="the replica to stop serving")
    before = payments_on(other)
    for i in range(3):
        k, events = pay_now(core, 700 + i)
        assert_paid_at_once(events)
        results[k] = events
    assert core.connectivity == "online"
    worker.join(15)
    assert_paid_at_once(results[slow_key])            # answered by the draining replica itself, not resent
    assert draining.popen.wait(15) == 0
    assert payments_on(draining) == 1 and f"key={slow_key}" in draining.log()
    assert payments_on(other) == before + 3
    each_key_paid_once(cluster, list(results))
    assert_moved(cluster, sum(e.amount_paise for e in core.outbox.finished(20)))
    core.close()


@BOTH_STORES  # replicas sharing a SQLite file, and replicas on PostgreSQL
async def test_the_app_fails_over_between_replicas_and_stays_online(make_cluster: MakeCluster,
                                                                   tmp_path: Path) -> None:
    # The survivor's completer passes only at its start: the dead replica's payment is the wallet's resend to
    # finish (resumed and paid), not a completer's to abort first — a race seen under load (its replay: "failed").
    cluster = make_cluster(txn_timeout=TXN_TIMEOUT, gateway_args=["--completer-interval", "600"])
    port2 = start_extra_gateway(cluster, "gateway2", crash_at="after_prepare")
    dying = cluster.procs["gateway2"]
    toasts = Toasts()
    # A long poll: the payments' own calls (and their refreshes) decide where each goes, not the polls.
    app = make_app(wallet_argv(cluster, tmp_path, gateway=f"localhost:{cluster.gateway_port},localhost:{port2}",
                               poll=30))
    paid = 0
    async with app.run_test(size=(120, 36), message_hook=toasts) as pilot:
        await login(pilot, "alice", PASSWORDS["alice"])
        while dying.alive:
            assert paid < 4, "the crash-armed replica never got a payment"
            paid += 1
            await pay(pilot, "HDFC-2001", f"{paid}.00")
            await wait_for(pilot, lambda: len(toasts.titled("Payment sent")) == paid, message=f"payment {paid}")
        assert dying.popen.returncode == -signal.SIGKILL
        await wait_for(pilot, lambda: history_statuses(app).count("succeeded") == paid, message="the history")
        assert "online" in str(app.screen.query_one("#connectivity").render())
        assert pending_count(app) == 0
        assert not toasts.titled("Offline") and not toasts.titled("Payment queued")
    assert_moved(cluster, sum(100 * n for n in range(1, paid + 1)))
