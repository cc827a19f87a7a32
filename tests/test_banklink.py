"""The gateway's BankLink against a real bank process: frames coalesce under load, every call is answered
once, a silent bank costs exactly the timeout, a restarted bank is reached again on a new stream, and a
connection that died silently or a frame lost on a live one never stalls the link for good."""
from __future__ import annotations

import asyncio
import uuid
from typing import Callable

import grpc
from protofiles import payment_pb2 as pb
from protofiles import payment_pb2_grpc as pbg
from servers import serving
from servers.gateway.banklink import BankCallError, BankLink
from servers.certs import GATEWAY_CN
from tests.harness import OPENING_TOTAL, Cluster, wait_until, write_config
from tests.tcpproxy import TcpProxy


def link_to(cluster: Cluster, bank: str) -> BankLink:
    credentials = serving.client_credentials(cluster.certs_dir, GATEWAY_CN)
    channel = grpc.aio.secure_channel(f"localhost:{cluster.bank_ports[bank]}", credentials,
                                      options=serving.CHANNEL_OPTIONS)
    return BankLink(bank, channel)


def prepare(i: int, amount: float = 1.0) -> pb.PrepareRequest:
    return pb.PrepareRequest(transaction_id=f"link-{i}", from_account="SBI-1001", to_account="HDFC-2001",
                             amount=amount)


def test_concurrent_calls_share_frames_and_each_gets_its_own_answer(cluster: Cluster) -> None:
    async def scenario() -> tuple[list[pb.BankReply], int, int]:
        link = link_to(cluster, "SBI")
        try:
            votes = await asyncio.gather(*(link.send("prepare", prepare(i), 10) for i in range(100)))
            acks = await asyncio.gather(*(link.send("commit", pb.CommitRequest(transaction_id=f"link-{i}"), 10)
                                          for i in range(100)))
            return [*votes, *acks], link.stats.frames, link.stats.messages
        finally:
            await link.close()

    replies, frames, messages = asyncio.run(scenario())
    assert all(r.vote.vote for r in replies[:100]) and all(r.ack.success for r in replies[100:])
    assert messages == 200
    assert frames < messages / 4  # one frame in flight at a time: the rest wait and leave together
    assert cluster.accounts()["SBI-1001"] == (500_000 - 100 * 100, 0)


def test_a_refused_message_fails_only_its_own_call(cluster: Cluster) -> None:
    async def scenario() -> list[object]:
        link = link_to(cluster, "SBI")
        try:
            return await asyncio.gather(link.send("prepare", prepare(1), 10),
                                        link.send("prepare", pb.PrepareRequest(transaction_id="", amount=1), 10),
                                        link.send("abort", pb.AbortRequest(transaction_id="link-1"), 10),
                                        return_exceptions=True)
        finally:
            await link.close()

    vote, refused, ack = asyncio.run(scenario())
    assert isinstance(vote, pb.BankReply) and vote.vote.vote
    assert isinstance(refused, BankCallError) and refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(ack, pb.BankReply) and ack.ack.success
    assert cluster.holds() == 0 and cluster.total() == OPENING_TOTAL


def test_a_silent_bank_costs_the_timeout_then_the_link_recovers(cluster: Cluster) -> None:
    bank = cluster.procs["SBI"]

    async def scenario() -> tuple[list[object], float, pb.BankReply]:
        link = link_to(cluster, "SBI")
        try:
            await link.send("abort", pb.AbortRequest(transaction_id="warm"), 10)
            bank.pause()
            loop = asyncio.get_running_loop()
            started = loop.time()
            first = link.send("prepare", prepare(0), 0.5)
            frames = link.stats.frames
            while link.stats.frames == frames and loop.time() < started + 0.4:  # until the frame is written
                await asyncio.sleep(0.001)
            assert link.stats.frames == frames + 1
            # The first call's frame is in flight to a stopped bank; the others queue behind it. All must time
            # out on time, and the queued ones must not be sent late.
            stalled = await asyncio.gather(first, *(link.send("prepare", prepare(i), 0.5) for i in range(1, 5)),
                                           return_exceptions=True)
            waited = loop.time() - started
            bank.resume()
            after = await link.send("prepare", prepare(99), 10)
            return stalled, waited, after
        finally:
            bank.resume()
            await link.close()

    stalled, waited, after = asyncio.run(scenario())
    assert all(isinstance(e, BankCallError) and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED for e in stalled)
    assert 0.45 < waited < 2.0
    assert after.vote.vote
    # The prepare that reached the bank before it stopped holds its money (the coordinator would abort it);
    # the queued ones timed out before they were sent, so they never reached the bank.
    assert cluster.accounts()["SBI-1001"] == (500_000, 200)
    assert cluster.total() == OPENING_TOTAL


def test_a_restarted_bank_is_reached_on_a_new_stream(cluster: Cluster) -> None:
    async def scenario() -> tuple[object, pb.BankReply]:
        link = link_to(cluster, "HDFC")
        try:
            await link.send("abort", pb.AbortRequest(transaction_id="warm"), 10)
            cluster.procs["HDFC"].kill()
            broken = await asyncio.gather(link.send("abort", pb.AbortRequest(transaction_id="x"), 5),
                                          return_exceptions=True)
            await asyncio.get_running_loop().run_in_executor(None, cluster.restart, "HDFC")
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                try:
                    return broken[0], await link.send("abort", pb.AbortRequest(transaction_id="y"), 5)
                except BankCallError:
                    if asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(0.05)
        finally:
            await link.close()

    broken, after = asyncio.run(scenario())
    assert isinstance(broken, BankCallError) and broken.code() in (grpc.StatusCode.UNAVAILABLE,
                                                                   grpc.StatusCode.DEADLINE_EXCEEDED)
    assert after.ack.success


# ---- a link that dies silently ---------------------------------------------------------------------------------
def test_a_link_that_died_silently_is_noticed_within_seconds_and_replaced(
        make_cluster: Callable[..., Cluster]) -> None:
    """The gateway's connection to a bank stops carrying bytes without being closed (a lost route or NAT
    entry): no FIN, no RST, writes still succeed. Once, nothing noticed: the stream's one frame in flight was
    never answered, so no frame was ever sent again and every payment through that bank failed on its
    deadline until TCP gave up (many minutes). Keepalive pings must find the dead connection and let the link
    reconnect, and payments must go through again, moving money exactly once."""
    cluster = make_cluster(start=False)
    proxy = TcpProxy(cluster.bank_ports["SBI"])
    try:
        cluster.bank_addresses["SBI"] = proxy.address
        write_config(cluster.config_dir, cluster.bank_addresses)
        cluster.start()
        alice = cluster.client("alice")
        moved = 0
        assert alice.pay(f"link-{uuid.uuid4()}", "SBI-1001", "HDFC-2001", 10).success  # the link is up
        moved += 1_000

        proxy.blackhole()
        lost = alice.pay(f"link-{uuid.uuid4()}", "SBI-1001", "HDFC-2001", 20, timeout=30)
        assert lost.status == pb.PAYMENT_STATUS_FAILED and "no money moved" in lost.message, lost
        wait_until(lambda: proxy.blackholed_closed >= 1, 15, message="the gateway to give up the dead connection")

        def paid() -> bool:
            nonlocal moved
            response = alice.pay(f"link-{uuid.uuid4()}", "SBI-1001", "HDFC-2001", 30, timeout=30)
            moved += 3_000 if response.success else 0
            return response.success

        wait_until(paid, 15, interval=0.2, message="a payment through a new connection")
        assert proxy.connections >= 2
        wait_until(lambda: cluster.unfinished_payments() == 0 and cluster.holds() == 0, 15,
                   message="every payment finished and every hold released")
        assert cluster.balance("SBI-1001") == 500_000 - moved
        assert cluster.balance("HDFC-2001") == 300_000 + moved
        assert cluster.total() == OPENING_TOTAL
    finally:
        proxy.close()


class LosesTheFirstFrame(pbg.BankServicer):
    """A bank whose stream swallows its first frame and answers every later one: a frame lost on a connection
    that is alive (keepalive pings are answered). A real bank cannot be made to do this on demand."""

    def __init__(self) -> None:
        self.frames = 0

    async def ExchangeBatches(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        while (frame := await context.read()) is not grpc.aio.EOF:
            self.frames += 1
            if self.frames > 1:
                await context.write(pb.BankReplyBatch(replies=[pb.BankReply(id=m.id, ack=pb.Ack(success=True))
                                                               for m in frame.messages]))


def test_a_frame_never_answered_resets_the_stream_instead_of_stalling_the_link() -> None:
    """With one frame in flight at a time, a frame that is never answered once kept every later message
    queued behind it: each call failed on its deadline, for good. The stream must be given up and a new one
    opened, so that the bank is reached again."""
    async def scenario() -> tuple[list[object], list[object], pb.BankReply, float]:
        server = grpc.aio.server(options=serving.KEEPALIVE_SERVER_OPTIONS)
        bank = LosesTheFirstFrame()
        pbg.add_BankServicer_to_server(bank, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        loop = asyncio.get_running_loop()
        link = BankLink("LOSSY", grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=serving.CHANNEL_OPTIONS),
                        frame_grace=0.3)
        try:
            lost = await asyncio.gather(link.send("abort", pb.AbortRequest(transaction_id="lost"), 0.2),
                                        return_exceptions=True)
            started = loop.time()
            queued = await asyncio.gather(link.send("abort", pb.AbortRequest(transaction_id="queued"), 5),
                                          return_exceptions=True)  # behind the lost frame: fails at once
            waited = loop.time() - started
            answered = await link.send("abort", pb.AbortRequest(transaction_id="after"), 5)
            return lost, queued, answered, waited
        finally:
            await link.close()
            await server.stop(None)

    lost, queued, answered, waited = asyncio.run(scenario())
    assert isinstance(lost[0], BankCallError) and lost[0].code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert isinstance(queued[0], BankCallError) and queued[0].code() == grpc.StatusCode.UNAVAILABLE, queued
    assert "answered nothing" in queued[0].details() and waited < 2.0, (queued, waited)
    assert answered.ack.success
