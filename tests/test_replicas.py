"""Gateway replicas on one PostgreSQL store act as one gateway, exactly once (CONTRACT §5, §9): started at once
on an empty database, they share tokens and keys; a replica killed at any recovery point, or at random moments
under load, has its payments finished once by a survivor — by a retry there, or with no retry at all by a
survivor's completer — and leaves no hold behind.

Real processes throughout (banks, up to six gateway processes at once, a fresh database per test); money is read
from the banks' ledgers on disk and the store from PostgreSQL itself (cluster.view). What test_crash_recovery
already runs on both stores (two replicas splitting duplicates, a dead replica's payment taken over by a retry, a
live replica's payment never taken) is not repeated here.
"""
from __future__ import annotations

import random
import threading
import time
import uuid

import grpc
import pytest

from protofiles import payment_pb2 as pb
from protofiles import payment_pb2_grpc as pbg
from servers.faults import POINTS
from tests.harness import OPENING, Client, Cluster, free_port, send_duplicates, wait_until
from tests.gateway_support import (AT_CRASH, FAILED, MOVES_MONEY, RETRYABLE, SUCCEEDED, TXN_TIMEOUT, MakeCluster,
                                   assert_conserved, committed, key, key_row, payments_with_key, run_together,
                                   wait_killed_itself, wait_settled)

pytestmark = pytest.mark.timeout(120)
# A replica whose completer passes once at its start and not again during a test: what it finishes, a retry did.
QUIET_COMPLETER = ["--completer-interval", "600"]


# ---- replicas ----------------------------------------------------------------------------------------------------
def start_replicas(make_cluster: MakeCluster, url: str, names: list[str], *,
                   env: dict[str, dict[str, str]] | None = None, args: dict[str, list[str]] | None = None,
                   cluster: Cluster | None = None, **cluster_args: object) -> Cluster:
    """Gateway replicas `names` on the PostgreSQL store `url`, all started at once (none waits for another's
    start or migration), then each waited on until healthy. Without `cluster`, banks first, on a new cluster
    (`cluster_args`) whose first replica is "gateway". `env` / `args`: a replica's extra environment (a crash
    point) and flags; a replica's --store may be another URL to the same database (through a proxy)."""
    if cluster is None:
        cluster = make_cluster(start=False, store=url, **{"txn_timeout": TXN_TIMEOUT, **cluster_args})
        for bank in OPENING:
            cluster.procs[bank] = cluster.bank_proc(bank).start()
    for name in names:
        proc = cluster.gateway_proc(port=cluster.gateway_port if name == "gateway" else free_port(), name=name)
        proc.args += (args or {}).get(name, [])  # of a flag given twice, the last wins
        proc.env = (env or {}).get(name, {})
        cluster.procs[name] = proc.start()
    for bank in OPENING:
        cluster.wait_bank(bank)
    for name in names:
        cluster.wait_gateway(port=cluster.gateway_ports[name], name=name)
    return cluster


def with_token(cluster: Cluster, client: Client, name: str) -> Client:
    """`client`'s session (its token, issued by whichever replica it logged in at), used at replica `name`."""
    return Client(pbg.PaymentGatewayStub(cluster.channel(cluster.gateway_address(name))), client.user, client.token)


def prepares(cluster: Cluster) -> int:
    return sum(cluster.procs[bank].log().count("method=/Bank/Prepare") for bank in OPENING)


def assert_whole_balance_payable(cluster: Cluster, client: Client, account: str, to: str) -> None:
    """No hold is left on `account`: its entire balance can be paid out, and then it is empty."""
    balance = cluster.balance(account)
    paid = client.pay(key(), account, to, balance / 100)
    assert paid.status == SUCCEEDED, paid.message
    assert cluster.balance(account) == 0
    assert_conserved(cluster)


# ---- one gateway, three processes ----------------------------------------------------------------------------------
def test_three_replicas_started_at_once_on_an_empty_database_serve_as_one_gateway(
        make_cluster: MakeCluster, postgres_url: str) -> None:
    names = ["gateway", "gateway2", "gateway3"]
    cluster = start_replicas(make_cluster, postgres_url, names)
    # One of them created the schema; each is an owner of its own.
    assert sum("applied schema migrations" in cluster.procs[n].log() for n in names) == 1
    assert len({cluster.owner_of(n) for n in names}) == 3

    # A token issued by one replica works on the others.
    login = cluster.client("alice", address=cluster.gateway_address("gateway3"))
    one, two, three = (with_token(cluster, login, n) for n in names)
    k = key()
    first = one.pay(k, "SBI-1001", "HDFC-2001", 12.34)
    assert first.status == SUCCEEDED and not first.replayed

    # The retry lands on another replica: the stored response, no bank asked again.
    before = prepares(cluster)
    again, md = two.pay_with_call(k, "SBI-1001", "HDFC-2001", 12.34)
    assert md.get("idempotent-replayed") == "true" and again.replayed
    again.replayed = False
    assert again == first
    # A fence through both banks: once its Prepare lines are logged, any Prepare the replay caused would be too.
    fence = three.pay(key(), "SBI-1001", "HDFC-2001", 1)
    wait_until(lambda: all(f"txn={fence.transaction_id}" in cluster.procs[b].log() for b in OPENING), 5,
               message="the fence's bank lines")
    assert prepares(cluster) == before + 2

    # The key reused for another payment on a third replica: refused, and nothing stored or moved for it.
    with pytest.raises(grpc.RpcError) as mismatch:
        three.pay(k, "SBI-1001", "HDFC-2001", 99)
    assert mismatch.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert payments_with_key(cluster, "alice", k) == [(first.transaction_id, "succeeded")]

    # Duplicates spread over all three replicas: one payment; the others wait for it (ABORTED) or replay it.
    k2 = key()
    successes, refused = send_duplicates([one, two, three], k2, "SBI-1001", "HDFC-2001", 5, count=21)
    assert successes and all(code == grpc.StatusCode.ABORTED for code in refused), refused
    assert len({r.transaction_id for r in successes}) == 1 and sum(not r.replayed for r in successes) <= 1
    assert len(payments_with_key(cluster, "alice", k2)) == 1

    # Every replica shows the same history; a logout at one ends the session at all.
    histories = [[p.transaction_id for p in c.history()] for c in (one, two, three)]
    assert histories[0] == histories[1] == histories[2] and len(histories[0]) == 3
    two.stub.Logout(pb.LogoutRequest(), metadata=two.md(), timeout=10)
    for client in (one, three):
        with pytest.raises(grpc.RpcError) as ended:
            client.balances()
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    wait_until(lambda: cluster.holds() == 0, 10, message="every hold released")
    assert cluster.balance("SBI-1001") == 500_000 - 1_234 - 100 - 500
    assert cluster.balance("HDFC-2001") == 300_000 + 1_234 + 100 + 500
    assert_conserved(cluster)


# ---- kill -9 at each recovery point ------------------------------------------------------------------------------
def kill_one_replica_per_point(make_cluster: MakeCluster, cluster: Cluster, tag: str, *, completer_running: bool
                               ) -> dict[str, tuple[str, str]]:
    """A replica armed at each recovery point, all started at once; each gets one payment and SIGKILLs itself
    there, its caller unanswered. Returns point → (key, txn id), checked to be where the crash left it — unless
    another replica's completer is running and may have taken it over already."""
    names = {point: f"{tag}-{point}" for point in POINTS}
    start_replicas(make_cluster, cluster.store, list(names.values()), cluster=cluster,
                   env={name: {"STRIFE_CRASH_AT": point} for point, name in names.items()},
                   args={name: QUIET_COMPLETER for name in names.values()})  # none takes another's payment
    left: dict[str, tuple[str, str]] = {}
    for n, (point, name) in enumerate(names.items()):
        k = key()
        with pytest.raises(grpc.RpcError) as cut:
            cluster.client("alice", address=cluster.gateway_address(name)).pay(k, "SBI-1001", "HDFC-2001", 10 + n)
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        wait_killed_itself(cluster.procs[name])
        row = key_row(cluster, "alice", k)
        assert completer_running or (row.recovery_point, row.epoch) == (AT_CRASH[point][0], 1)
        left[point] = (k, row.txn_id)
    return left


def assert_once(cluster: Cluster, k: str, txn: str, moved: bool) -> None:
    """The payment under `k` is finished as the one transaction `txn`, alike at both banks."""
    row = key_row(cluster, "alice", k)
    assert row.recovery_point == "finished" and row.txn_id == txn
    assert row.response.status == (SUCCEEDED if moved else FAILED)
    assert payments_with_key(cluster, "alice", k) == [(txn, "succeeded" if moved else "failed")]
    for bank in OPENING:
        assert cluster.txn_states(bank)[txn] == ("committed" if moved else "aborted")


def test_a_replica_killed_at_each_recovery_point_is_finished_once_by_a_survivor(
        make_cluster: MakeCluster, postgres_url: str) -> None:
    cluster = start_replicas(make_cluster, postgres_url, ["gateway"],
                             args={"gateway": QUIET_COMPLETER})
    survivor = cluster.client("alice")
    moved = 0

    # 1. Retried with the same key on the survivor: an undecided payment is resumed there and run to its end
    # (the banks' votes are idempotent per id); a decided one replays its stored outcome at once.
    by_retry = kill_one_replica_per_point(make_cluster, cluster, "retried", completer_running=False)
    for n, (point, (k, txn)) in enumerate(by_retry.items()):
        final = survivor.pay_until_final(k, "SBI-1001", "HDFC-2001", 10 + n, deadline=20)
        assert final.transaction_id == txn and final.status == SUCCEEDED, (point, final)
        assert final.replayed is MOVES_MONEY[point]  # decided before the crash: the stored outcome
        moved += (10 + n) * 100
    for point, (k, _) in by_retry.items():
        kind = "replay" if MOVES_MONEY[point] else "resumed"
        wait_until(lambda: any(f"key={k}" in line and f"retry={kind}" in line
                               for line in cluster.procs["gateway"].log().splitlines()), 5,
                   message=f"the survivor's retry={kind} line for the payment killed {point}")

    # 2. Nobody retries: another replica's completer finishes them — aborts what was undecided, commits what was
    # decided, and delivers the decisions the retries above only replayed.
    cluster = start_replicas(make_cluster, postgres_url, ["completer"], cluster=cluster)
    by_completer = kill_one_replica_per_point(make_cluster, cluster, "abandoned", completer_running=True)
    wait_settled(cluster)
    for point, (k, txn) in by_retry.items():
        assert_once(cluster, k, txn, moved=True)
    for n, (point, (k, txn)) in enumerate(by_completer.items()):
        assert_once(cluster, k, txn, moved=MOVES_MONEY[point])
        assert key_row(cluster, "alice", k).epoch == 2  # taken over once: from the dead replica
        moved += (10 + n) * 100 if MOVES_MONEY[point] else 0
    completer_log = cluster.procs["completer"].log()
    for point, (k, txn) in by_completer.items():
        done = "finished commit_decided payment" if MOVES_MONEY[point] else "aborted undecided payment"
        assert f"{done} {txn}" in completer_log, point
    assert committed(cluster, "SBI") == committed(cluster, "HDFC")
    assert cluster.balance("SBI-1001") == 500_000 - moved
    assert cluster.balance("HDFC-2001") == 300_000 + moved
    assert_whole_balance_payable(cluster, survivor, "SBI-1001", "HDFC-2001")


# ---- kill -9 at random moments under load --------------------------------------------------------------------------
STATUS = {SUCCEEDED: "succeeded", FAILED: "failed", pb.PAYMENT_STATUS_DECLINED: "declined"}
ROUTES = [("alice", "SBI-1001", "HDFC-2001"), ("bob", "HDFC-2001", "SBI-1002"), ("carol", "SBI-1002", "HDFC-2002"),
          ("alice", "HDFC-2002", "SBI-1003"), ("carol", "HDFC-2003", "SBI-1001"), ("dave", "SBI-1004", "HDFC-2003")]


def test_replicas_killed_at_random_moments_under_load_settle_every_key_once(
        make_cluster: MakeCluster, postgres_url: str) -> None:
    names = ["gateway", "gateway2", "gateway3"]
    cluster = start_replicas(make_cluster, postgres_url, names)
    logins = {user: cluster.client(user) for user in {r[0] for r in ROUTES}}
    at = {(user, name): with_token(cluster, client, name) for user, client in logins.items() for name in names}
    rng = random.Random(0x4E711CA)
    kills_over = threading.Event()
    lock = threading.Lock()
    # (user, key) → (from, to, paise, the final response; None where the payer gave up on its first error)
    sent: dict[tuple[str, str], tuple[str, str, int, pb.PaymentResponse | None]] = {}
    interrupted: list[str] = []
    failures: list[BaseException] = []

    def payer(index: int, user: str, src: str, dst: str) -> None:
        # Even payers retry a cut call with the same key on the next replica; odd ones never retry: whatever
        # their cut payments left is for the survivors' completers alone.
        retries = index % 2 == 0
        local = random.Random(index)
        try:
            for n in range(300):
                if kills_over.is_set() and n >= 5:
                    return
                k, paise = f"load-{index}-{n}-{uuid.uuid4().hex[:8]}", local.randint(100, 900)
                response, end, replica = None, time.monotonic() + 30, (index + n) % len(names)
                while response is None:
                    try:
                        response = at[(user, names[replica])].pay(k, src, dst, paise / 100, timeout=5)
                    except grpc.RpcError as exc:
                        if exc.code() not in RETRYABLE or time.monotonic() > end:
                            raise
                        with lock:
                            interrupted.append(k)
                        if not retries:
                            break
                        replica = (replica + 1) % len(names)
                        time.sleep(0.02)
                with lock:
                    sent[(user, k)] = (src, dst, paise, response)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)

    def killer() -> None:
        try:
            for victim in rng.sample(names, 2):  # one replica survives
                time.sleep(rng.uniform(0.3, 0.8))  # chaos timing, not synchronisation
                cluster.procs[victim].kill()
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)
        finally:
            kills_over.set()

    run_together([*(threading.Thread(target=payer, args=(i, *route)) for i, route in enumerate(ROUTES)),
                  threading.Thread(target=killer)], failures)
    assert interrupted, "the kills never cut a call"
    wait_settled(cluster, timeout=20)  # nothing unfinished, no hold: the survivors finished what the dead left

    (survivor,) = [n for n in names if cluster.procs[n].alive]
    expected = {a: int(round(v * 100)) for accounts in OPENING.values() for a, v in accounts.items()}
    succeeded: set[str] = set()
    for (user, k), (src, dst, paise, response) in sent.items():
        stored = payments_with_key(cluster, user, k)
        if response is not None:  # what the payer was told is what the store keeps, and a replay says it again
            assert response.status in STATUS, response  # a final answer (dave's ₹100 runs out: declines too)
            assert stored == [(response.transaction_id, STATUS[response.status])]
        elif not stored:
            continue  # given up before any replica claimed it
        assert len(stored) == 1, stored
        (txn, status), = stored
        replay = at[(user, survivor)].pay(k, src, dst, paise / 100)
        assert replay.replayed and replay.transaction_id == txn
        if status == "succeeded":
            succeeded.add(txn)
            expected[src] -= paise
            expected[dst] += paise
    log = "".join(cluster.procs[n].log() for n in names)
    recovered = sum(log.count(s) for s in ("aborted undecided payment", "finished commit_decided payment",
                                           "finished abort_decided payment", "retry=resumed"))
    assert recovered > 0, "no kill landed in the middle of a payment"
    for bank in OPENING:
        assert committed(cluster, bank) == {t for t in succeeded if t in cluster.txn_states(bank)}
    assert {a: b for a, (b, _) in cluster.accounts().items()} == expected
    assert_whole_balance_payable(cluster, at[("alice", survivor)], "SBI-1001", "HDFC-2001")
