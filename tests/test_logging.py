"""The servers' log lines: lines logged during one loop turn leave in one write, in order, soon after; and a
value from a caller can never add a field or a line (logfmt quoting, checked against a real gateway)."""
from __future__ import annotations

import asyncio
import io
import logging
import re
import threading
import uuid

import grpc
import pytest

from protofiles import payment_pb2 as pb
from servers.logfmt import value
from servers.serving import LoopBufferedHandler, _Formatter
from tests.harness import OPENING_TOTAL, Client, Cluster, wait_until


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def make_logger(stream: CountingStream) -> logging.Logger:
    handler = LoopBufferedHandler(stream)
    handler.setFormatter(_Formatter("%(asctime)s test %(levelname)s %(message)s"))
    logger = logging.getLogger(f"strife.test.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_lines_of_one_loop_turn_are_written_together_and_in_order() -> None:
    stream = CountingStream()
    logger = make_logger(stream)

    async def scenario() -> tuple[str, int]:
        for i in range(50):
            logger.info("line %d", i)
        held_back = stream.getvalue()
        await asyncio.sleep(0)  # one loop turn: the handler's flush runs
        return held_back, stream.writes

    held_back, writes = asyncio.run(scenario())
    assert held_back == "" and writes == 1
    lines = stream.getvalue().splitlines()
    assert [line.split(" INFO ")[1] for line in lines] == [f"line {i}" for i in range(50)]
    assert all(line[:4].isdigit() and line[19] == "," for line in lines)  # 2026-11-26 15:04:05,123


def test_lines_logged_off_the_loop_are_written_at_once() -> None:
    stream = CountingStream()
    logger = make_logger(stream)
    logger.info("no loop here")
    assert stream.getvalue().endswith("no loop here\n")
    worker = threading.Thread(target=logger.info, args=("from a thread",))
    worker.start()
    worker.join()
    assert stream.getvalue().endswith("from a thread\n")


# ---- values from callers: one call is one line (logfmt) ---------------------------------------------------------
FORGED = "\n2099-01-01 00:00:00,000 gateway INFO method=/PaymentGateway/ProcessPayment user=mallory status=OK"
_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?=\s|$)')


def fields(line: str) -> list[tuple[str, str]]:
    """A call line's key=value pairs, quoted values unescaped; asserts nothing else is on the line."""
    pairs = line.split(" INFO ", 1)[1]
    found = _PAIR.findall(pairs)
    assert " ".join(f"{k}={v}" for k, v in found) == pairs, line
    return [(k, v[1:-1].encode().decode("unicode_escape") if v.startswith('"') else v) for k, v in found]


def test_logfmt_values_are_bare_when_safe_and_quoted_one_line_otherwise() -> None:
    assert [value(v) for v in ("alice", "ipv6:[::1]:50312", 12.5, "SBI-1001")] == \
        ["alice", "ipv6:[::1]:50312", "12.5", "SBI-1001"]
    for raw in ("", "a b", "k=v", 'say "hi"', "back\\slash", "line\nbreak\r", "tab\there", "nul\x00bell\x07",
                "sep\u2028nel\x85", "bidi\u202e", FORGED):
        shown = value(raw)
        assert shown.startswith('"') and shown.endswith('"') and shown.isprintable() and "\n" not in shown, shown
        line = f"2026-01-01 00:00:00,000 gateway INFO user={shown} status=OK"
        assert len(line.splitlines()) == 1
        assert fields(line) == [("user", raw), ("status", "OK")]


def test_any_log_line_with_a_line_break_in_its_arguments_stays_one_line() -> None:
    stream = CountingStream()
    logger = make_logger(stream)
    logger.warning("commit at %s not acknowledged: %s", "HDFC", "bank said" + FORGED)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].endswith("user=mallory status=OK") and "\\n2099-01-01" in lines[0], lines


def test_forged_username_account_and_key_stay_inside_their_own_field_of_one_line(untouched: Cluster,
                                                                               alice: Client) -> None:
    with pytest.raises(grpc.RpcError) as login:
        alice.stub.Login(pb.LoginRequest(username="eve" + FORGED, password="nope"), timeout=10)
    assert login.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as to_account:
        alice.pay(f"forge-{uuid.uuid4()}", "SBI-1001", "HDFC-2001" + FORGED, 1)
    assert to_account.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A key may hold any printable ASCII, spaces and '=' included: it must not add fields to its line.
    forged_key = f"forge-{uuid.uuid4()} status=OK retry=no"
    with pytest.raises(grpc.RpcError) as same_account:
        alice.pay(forged_key, "SBI-1001", "SBI-1001", 1)
    assert same_account.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    gateway = untouched.procs["gateway"]
    lines = wait_until(lambda: (found := [line for line in gateway.log().splitlines() if "forge-" in line
                                          or "2099-01-01" in line]) and len(found) >= 3 and found, 10,
                       message="the three calls' log lines")
    login_line, payment_line, key_line = lines
    assert not any(line.startswith("2099") for line in gateway.log().splitlines())
    for line, method, status in ((login_line, "Login", "UNAUTHENTICATED"),
                                 (payment_line, "ProcessPayment", "INVALID_ARGUMENT"),
                                 (key_line, "ProcessPayment", "INVALID_ARGUMENT")):
        pairs = fields(line)
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), line  # no field was added by a caller's value
        got = dict(pairs)
        assert got["method"] == f"/PaymentGateway/{method}" and got["status"] == status, line
    assert dict(fields(login_line))["user"].startswith("eve" + FORGED[:40])
    assert dict(fields(payment_line))["to"].startswith("HDFC-2001" + FORGED[:20])
    assert dict(fields(key_line))["key"] == forged_key
    assert untouched.total() == OPENING_TOTAL and untouched.holds() == 0
