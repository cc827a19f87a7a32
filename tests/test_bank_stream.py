"""The banks' `Exchange` stream: the gateway's long-lived 2PC link, with the rules of the unary methods."""
from __future__ import annotations

import queue

import grpc
import pytest

from protofiles import payment_pb2 as pb
from tests.harness import OPENING_TOTAL, Cluster


class StreamClient:
    """A blocking client for one Exchange stream: send a message, wait for the reply with its id."""

    def __init__(self, stub) -> None:  # type: ignore[no-untyped-def]
        self._out: "queue.Queue[pb.BankMessage | None]" = queue.Queue()
        self._replies = stub.Exchange(iter(self._out.get, None), timeout=30)
        self._ids = iter(range(1, 1_000_000))

    def send(self, **body: object) -> pb.BankReply:
        message = pb.BankMessage(id=next(self._ids), **body)
        self._out.put(message)
        reply = next(self._replies)
        assert reply.id == message.id
        return reply

    def close(self) -> None:
        self._out.put(None)


def test_stream_prepare_commit_moves_money_once(cluster: Cluster) -> None:
    link = StreamClient(cluster.bank_stub("SBI"))
    prepare = pb.PrepareRequest(transaction_id="s-1", from_account="SBI-1001", to_account="SBI-1002", amount=12.5)
    assert link.send(prepare=prepare).vote.vote
    assert cluster.accounts()["SBI-1001"] == (500_000, 1_250)
    assert link.send(prepare=prepare).vote.vote  # a duplicate changes nothing
    assert link.send(commit=pb.CommitRequest(transaction_id="s-1")).ack.success
    assert link.send(commit=pb.CommitRequest(transaction_id="s-1")).ack.success
    assert not link.send(abort=pb.AbortRequest(transaction_id="s-1")).ack.success  # committed: no abort
    assert cluster.accounts()["SBI-1001"] == (498_750, 0)
    assert cluster.balance("SBI-1002") == 251_250
    link.close()
    assert cluster.total() == OPENING_TOTAL


def test_stream_remembers_an_abort_and_refuses_a_late_prepare(cluster: Cluster) -> None:
    link = StreamClient(cluster.bank_stub("HDFC"))
    assert link.send(abort=pb.AbortRequest(transaction_id="late")).ack.success
    late = pb.PrepareRequest(transaction_id="late", from_account="HDFC-2001", to_account="SBI-1001", amount=1)
    assert not link.send(prepare=late).vote.vote
    assert cluster.holds() == 0
    link.close()


def test_a_bad_message_is_refused_and_the_stream_goes_on(cluster: Cluster) -> None:
    link = StreamClient(cluster.bank_stub("SBI"))
    bad = link.send(prepare=pb.PrepareRequest(transaction_id="", from_account="SBI-1001", to_account="SBI-1002",
                                              amount=1))
    assert bad.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    nan = link.send(prepare=pb.PrepareRequest(transaction_id="n", from_account="SBI-1001", to_account="SBI-1002",
                                              amount=float("nan")))
    assert nan.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert link.send().error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]  # no body at all
    assert link.send(commit=pb.CommitRequest(transaction_id="never")).ack.success is False
    link.close()
    assert cluster.total() == OPENING_TOTAL and cluster.holds() == 0


def test_malformed_stream_bytes_are_invalid_argument(cluster: Cluster) -> None:
    channel = cluster.bank_stub("SBI")  # keeps the mTLS channel open
    raw = cluster._channels[-1].stream_stream("/Bank/Exchange", request_serializer=lambda b: b,
                                              response_deserializer=lambda b: b)
    replies = raw(iter([b"\xff\xff\xff"]), timeout=10)
    with pytest.raises(grpc.RpcError) as err:
        list(replies)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert channel is not None and cluster.total() == OPENING_TOTAL


@pytest.mark.parametrize("cert", [None, "SBI"])
def test_stream_refuses_a_peer_that_is_not_the_gateway(cluster: Cluster, cert: str | None) -> None:
    link = StreamClient(cluster.bank_stub("SBI", cert_name=cert))
    with pytest.raises(grpc.RpcError) as err:
        link.send(prepare=pb.PrepareRequest(transaction_id="x", from_account="SBI-1001", to_account="SBI-1002",
                                            amount=1))
    assert err.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE)
    if cert == "SBI":
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert cluster.holds() == 0 and cluster.total() == OPENING_TOTAL


def test_many_messages_in_flight_on_one_stream_are_all_answered(cluster: Cluster) -> None:
    stub = cluster.bank_stub("SBI")
    out: "queue.Queue[pb.BankMessage | None]" = queue.Queue()
    replies = stub.Exchange(iter(out.get, None), timeout=60)
    for i in range(200):  # all sent before any reply is read: the bank group-commits them
        out.put(pb.BankMessage(id=i + 1, prepare=pb.PrepareRequest(
            transaction_id=f"m-{i}", from_account="SBI-1001", to_account="HDFC-2001", amount=1)))
    got = {}
    for _ in range(200):
        reply = next(replies)
        got[reply.id] = reply.vote.vote
    out.put(None)
    assert set(got) == set(range(1, 201)) and all(got.values())
    assert cluster.accounts()["SBI-1001"] == (500_000, 20_000)
