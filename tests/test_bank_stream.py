"""The banks' `Exchange` stream: the gateway's long-lived 2PC link, with the rules of the unary methods."""
from __future__ import annotations

import queue
import shutil
from pathlib import Path

import grpc
import pytest

from protofiles import payment_pb2 as pb
from protofiles import payment_pb2_grpc as pbg
from tests.cert_support import issue
from tests.harness import OPENING_TOTAL, Cluster


# Callers that are not the gateway, and how a bank refuses each: no client certificate, or a bank's own
# (serving only, no clientAuth), fail the TLS handshake; a CA-signed client certificate with another common
# name passes it and is refused by the bank's peer check.
PEERS = {None: grpc.StatusCode.UNAVAILABLE, "SBI": grpc.StatusCode.UNAVAILABLE,
         "client CN=SBI": grpc.StatusCode.PERMISSION_DENIED}


def not_the_gateway(cluster: Cluster, cert: str | None, tmp_path: Path) -> pbg.BankStub:
    if cert != "client CN=SBI":
        return cluster.bank_stub("SBI", cert_name=cert)
    issue(cluster.certs_dir, tmp_path, "SBI")
    shutil.copy2(cluster.certs_dir / "ca.crt", tmp_path / "ca.crt")
    return cluster.bank_stub("SBI", cert_name="SBI", certs_dir=tmp_path)


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


@pytest.mark.parametrize("cert", PEERS)
def test_stream_refuses_a_peer_that_is_not_the_gateway(cluster: Cluster, cert: str | None, tmp_path: Path
                                                       ) -> None:
    link = StreamClient(not_the_gateway(cluster, cert, tmp_path))
    with pytest.raises(grpc.RpcError) as err:
        link.send(prepare=pb.PrepareRequest(transaction_id="x", from_account="SBI-1001", to_account="SBI-1002",
                                            amount=1))
    assert err.value.code() == PEERS[cert]
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


# ---- ExchangeBatches: the frames the gateway actually uses ----------------------------------------------------
def frame_of(*messages: pb.BankMessage) -> pb.BankBatch:
    return pb.BankBatch(messages=list(messages))


def test_a_frame_is_applied_and_answered_as_one(cluster: Cluster) -> None:
    stub = cluster.bank_stub("SBI")
    out: "queue.Queue[pb.BankBatch | None]" = queue.Queue()
    replies = stub.ExchangeBatches(iter(out.get, None), timeout=30)
    prepare = pb.PrepareRequest(transaction_id="f-1", from_account="SBI-1001", to_account="SBI-1002", amount=12.5)
    too_much = pb.PrepareRequest(transaction_id="f-2", from_account="SBI-1001", to_account="HDFC-2001",
                                 amount=1_000_000)
    out.put(frame_of(pb.BankMessage(id=1, prepare=prepare), pb.BankMessage(id=2, prepare=too_much),
                     pb.BankMessage(id=3, abort=pb.AbortRequest(transaction_id="f-never")),
                     pb.BankMessage(id=4),  # no body
                     pb.BankMessage(id=5, prepare=pb.PrepareRequest(transaction_id="", from_account="SBI-1001",
                                                                    to_account="SBI-1002", amount=1)),
                     pb.BankMessage(id=6, commit=pb.CommitRequest(transaction_id="f-unknown"))))
    first = {r.id: r for r in next(replies).replies}  # one frame answers the whole frame
    assert set(first) == {1, 2, 3, 4, 5, 6}
    assert first[1].vote.vote and not first[2].vote.vote and "insufficient" in first[2].vote.reason
    assert first[3].ack.success and not first[6].ack.success
    assert first[4].error_code == first[5].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert cluster.accounts()["SBI-1001"] == (500_000, 1_250)  # only f-1 holds money
    out.put(frame_of(pb.BankMessage(id=7, commit=pb.CommitRequest(transaction_id="f-1")),
                     pb.BankMessage(id=8, commit=pb.CommitRequest(transaction_id="f-1")),  # a duplicate in-frame
                     pb.BankMessage(id=9, prepare=pb.PrepareRequest(transaction_id="f-never", from_account="SBI-1001",
                                                                    to_account="SBI-1002", amount=1))))
    second = {r.id: r for r in next(replies).replies}
    assert second[7].ack.success and second[8].ack.success and not second[9].vote.vote  # remembered abort
    out.put(None)
    assert list(replies) == []  # the bank ends the stream cleanly when the gateway does
    assert cluster.accounts()["SBI-1001"] == (498_750, 0) and cluster.balance("SBI-1002") == 251_250
    assert cluster.total() == OPENING_TOTAL and cluster.holds() == 0


def test_a_malformed_frame_ends_the_stream_with_invalid_argument(cluster: Cluster) -> None:
    cluster.bank_stub("SBI")  # keeps the mTLS channel open
    raw = cluster._channels[-1].stream_stream("/Bank/ExchangeBatches", request_serializer=lambda b: b,
                                              response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as err:
        list(raw(iter([b"\xff\xff\xff"]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert cluster.total() == OPENING_TOTAL


@pytest.mark.parametrize("cert", PEERS)
def test_frames_are_refused_to_a_peer_that_is_not_the_gateway(cluster: Cluster, cert: str | None, tmp_path: Path
                                                              ) -> None:
    stub = not_the_gateway(cluster, cert, tmp_path)
    frame = frame_of(pb.BankMessage(id=1, prepare=pb.PrepareRequest(
        transaction_id="x", from_account="SBI-1001", to_account="SBI-1002", amount=1)))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.ExchangeBatches(iter([frame]), timeout=10))
    assert err.value.code() == PEERS[cert]
    assert cluster.holds() == 0 and cluster.total() == OPENING_TOTAL
