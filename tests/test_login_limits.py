"""Failed logins are limited per user and per peer, refused before any password is checked, and password checks
run a few at a time (issue 12: 16 threads of wrong passwords once made everyone's payments 5× slower).

Against a real gateway whose password check is made slow on purpose (`STRIFE_DELAY_AT=password_check`), so
that what waits for a check and what does not shows in the order answers arrive, not in timings. The limiter
itself (windows, bounded memory, the queue for check slots) is also tested in-process.
"""
from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Callable

import grpc
import pytest

from protofiles import payment_pb2 as pb
from protofiles import payment_pb2_grpc as pbg
from servers.gateway.login_guard import FailureWindows, LoginGuard, LoginLimits, LoginRefused, peer_key
from tests.harness import OPENING_TOTAL, PASSWORDS, Cluster, wait_until
from tests.gateway_support import start_with_gateway_env

EXHAUSTED, UNAUTHENTICATED = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED
WINDOW = 4.0  # s: long enough for a burst, short enough to wait out


def login_code(stub: pbg.PaymentGatewayStub, username: str, password: str) -> grpc.StatusCode:
    try:
        stub.Login(pb.LoginRequest(username=username, password=password), timeout=30)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def right_password_works_once_the_window_ends(stub: pbg.PaymentGatewayStub, username: str) -> None:
    """Until the window ends a right password may be refused too (it is not checked); never UNAUTHENTICATED."""
    codes: list[grpc.StatusCode] = []

    def logged_in() -> bool:
        codes.append(login_code(stub, username, PASSWORDS[username]))
        return codes[-1] == grpc.StatusCode.OK

    wait_until(logged_in, timeout=WINDOW + 20, interval=0.2, message=f"{username}'s right password to work")
    assert set(codes) <= {EXHAUSTED, grpc.StatusCode.OK}, codes


def test_wrong_passwords_for_one_user_are_refused_without_a_check_and_payments_go_on(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = start_with_gateway_env(
        make_cluster, {"STRIFE_DELAY_AT": "password_check:0.5"},
        gateway_args=["--login-failures-per-user", "3", "--login-failures-per-peer", "1000",
                      "--login-window", str(WINDOW), "--login-concurrency", "1"])
    bob = cluster.client("bob")  # logged in before the attack
    stub = pbg.PaymentGatewayStub(cluster.channel())
    finished: list[str] = []  # what answered, in the order the answers came
    lock = threading.Lock()
    start = threading.Barrier(17)

    def guess(i: int) -> None:
        start.wait()
        code = login_code(stub, "alice", f"guess-{i}")
        with lock:
            finished.append(code.name)

    def pay() -> None:
        start.wait()
        response = bob.pay(f"limits-{uuid.uuid4()}", "HDFC-2001", "SBI-1001", 10)
        with lock:
            finished.append("PAID" if response.success else "NOT PAID")

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(16)] + [threading.Thread(target=pay)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    # Three guesses were checked (one at a time, 0.5 s each); the other 13 were refused without one, so their
    # answers, and the payment, came before the last check ended.
    assert sorted(finished) == sorted(["PAID"] + [EXHAUSTED.name] * 13 + [UNAUTHENTICATED.name] * 3), finished
    last_check = max(i for i, name in enumerate(finished) if name == UNAUTHENTICATED.name)
    assert all(i < last_check for i, name in enumerate(finished) if name in (EXHAUSTED.name, "PAID")), finished
    assert cluster.balance("HDFC-2001") == 300_000 - 1_000 and cluster.total() == OPENING_TOTAL

    assert login_code(stub, "carol", PASSWORDS["carol"]) == grpc.StatusCode.OK  # another user is not limited
    right_password_works_once_the_window_ends(stub, "alice")


def test_wrong_logins_from_one_peer_are_limited_across_usernames(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(gateway_args=["--login-failures-per-user", "1000", "--login-failures-per-peer", "4",
                                         "--login-window", str(WINDOW)])
    stub = pbg.PaymentGatewayStub(cluster.channel())
    codes = [login_code(stub, f"nobody-{i}", "x") for i in range(7)]  # a different name every time
    assert codes == [UNAUTHENTICATED] * 4 + [EXHAUSTED] * 3, codes
    with pytest.raises(grpc.RpcError) as err:
        stub.Login(pb.LoginRequest(username="nobody", password="x"), timeout=10)
    assert "from your address" in err.value.details() and "try again in" in err.value.details()
    right_password_works_once_the_window_ends(stub, "carol")


# ---- the limiter in-process ------------------------------------------------------------------------------------
def test_failure_windows_count_per_key_reset_after_the_window_and_stay_bounded() -> None:
    now = [100.0]
    windows = FailureWindows(limit=2, window=10.0, capacity=3, clock=lambda: now[0])
    first, _ = windows.reserve("a")
    assert first is not None and windows.reserve("a")[0] is not None
    refused, wait = windows.reserve("a")
    assert refused is None and wait == pytest.approx(10.0)
    FailureWindows.give_back(first)  # a right password: that attempt is not a failure
    assert windows.reserve("a")[0] is not None and windows.reserve("a")[0] is None
    now[0] += 10.0
    assert windows.reserve("a")[0] is not None  # a new window
    for name in ("b", "c", "d", "e"):
        windows.reserve(name)
    assert len(windows) == 3  # least recently used dropped: an attacker cannot grow it without limit


@pytest.mark.parametrize("peer,expected", [
    ("ipv4:10.1.2.3:5555", "ipv4:10.1.2.3"), ("ipv6:[2001:db8:1:2:3:4:5:6]:443", "ipv6:2001:db8:1:2::/64"),
    ("ipv6:[::1]:50000", "ipv6:::/64"), ("unix:/tmp/sock", "unix:/tmp/sock"),
])
def test_peer_key_drops_the_port_and_groups_ipv6_by_64(peer: str, expected: str) -> None:
    assert peer_key(peer) == expected


async def test_checks_run_a_few_at_a_time_and_an_overfull_queue_is_refused() -> None:
    guard = LoginGuard(LoginLimits(failures_per_user=100, failures_per_peer=100, concurrency=2, queue=3))
    release = threading.Event()
    running = threading.Semaphore(0)

    def slow_check() -> bool:
        running.release()
        release.wait(30)
        return True

    calls = [asyncio.ensure_future(guard.check(f"user{i}", "ipv4:10.0.0.1:1", slow_check)) for i in range(5)]
    loop = asyncio.get_running_loop()
    for _ in range(2):  # two checks run; three wait for a slot
        assert await loop.run_in_executor(None, running.acquire, True, 10)
    assert not await loop.run_in_executor(None, running.acquire, True, 0.2)
    with pytest.raises(LoginRefused, match="busy"):
        await guard.check("user5", "ipv4:10.0.0.1:1", slow_check)
    calls[0].cancel()  # a caller gone: its check still holds its slot until it ends
    assert not await loop.run_in_executor(None, running.acquire, True, 0.2)
    release.set()
    assert await asyncio.gather(*calls[1:]) == [True] * 4
