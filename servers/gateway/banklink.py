"""The gateway's link to one bank: a mutual-TLS channel and a long-lived `ExchangeBatches` stream on it.

A 2PC call is a message with an id, answered by a reply with the same id. Messages queued for a bank leave
together in one frame (one write), one frame in flight at a time; the bank applies a frame in one transaction
and answers it in one frame: under load, N payments cost one stream write, one fsync and one read per bank
instead of N, and a lone payment waits for nothing. Each call waits under its own deadline (a timer, not a
task), so a silent bank costs exactly the timeout. If the stream breaks (the bank died or restarted), every
waiting call fails as UNAVAILABLE and the next call opens a new stream; the channel reconnects within a
second (serving.CHANNEL_OPTIONS). A connection that died silently is found by keepalive pings (same
options) and breaks the stream the same way. A frame still unanswered `FRAME_GRACE` after the last of its
calls gave up means the stream lost it: the stream is reset, else no frame would ever be sent on it again.
Unary RPCs (GetBalance) use the same channel.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from dataclasses import dataclass

import grpc

from protofiles import payment_pb2, payment_pb2_grpc

log = logging.getLogger("strife.banklink")


class BankCallError(Exception):
    """A failed 2PC call, shaped like grpc.RpcError (code(), details()) so callers treat both alike."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


# A frame is sent only while fewer than this many are unanswered; messages queue meanwhile and leave together
# in the next frame. A lone payment never waits (nothing is in flight); under load, frames grow with the load,
# so the banks do one transaction, one fsync and one write per frame instead of per message.
FRAMES_IN_FLIGHT = 1
# How long past the longest deadline of the calls in a frame the frame may stay unanswered before the stream
# is given up (its calls have all failed by then; only those queued behind it are waiting). A backstop: a dead
# connection is found sooner by keepalive; this catches a frame lost on a live one. Generous, so that a bank
# that was merely slow (or stopped and resumed) answers on the stream it has.
FRAME_GRACE = 2.0

_CODES = {c.value[0]: c for c in grpc.StatusCode}


@dataclass
class LinkStats:
    frames: int = 0    # frames written
    messages: int = 0  # messages in them


class _Stream:
    def __init__(self, name: str, stub: payment_pb2_grpc.BankStub, stats: LinkStats, frame_grace: float) -> None:
        self.name = name
        self.stats = stats
        self.frame_grace = frame_grace
        self.call = stub.ExchangeBatches()
        self.pending: dict[int, tuple[asyncio.Future, asyncio.TimerHandle]] = {}
        self.queue: list[tuple[int, str, object, asyncio.Future, float]] = []
        self.in_flight = 0  # frames sent and not yet answered (the bank answers each frame with one frame)
        self.overdue: collections.deque[asyncio.TimerHandle] = collections.deque()  # one per frame in flight
        self.broken = False
        self.writer: asyncio.Task | None = None
        self.reader = asyncio.ensure_future(self._read())

    def send(self, message_id: int, kind: str, body: object, future: asyncio.Future,
             timer: asyncio.TimerHandle, timeout: float) -> None:
        self.pending[message_id] = (future, timer)
        self.queue.append((message_id, kind, body, future, timeout))
        self._kick()

    def _kick(self) -> None:
        if self.writer is None and self.queue and self.in_flight < FRAMES_IN_FLIGHT and not self.broken:
            # Started now, runs on the next loop turn: every message queued until then shares its frame.
            self.writer = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        try:
            while self.queue and self.in_flight < FRAMES_IN_FLIGHT and not self.broken:
                frame = payment_pb2.BankBatch()
                patience = 0.0
                for message_id, kind, body, future, timeout in self.queue:
                    if not future.done():  # a call that timed out or was cancelled while queued is not sent
                        message = frame.messages.add(id=message_id)
                        getattr(message, kind).CopyFrom(body)
                        patience = max(patience, timeout)
                self.queue.clear()
                if frame.messages:
                    self.in_flight += 1
                    self.stats.frames += 1
                    self.stats.messages += len(frame.messages)
                    # Armed before the write, which may itself never finish on a dead connection.
                    waited = patience + self.frame_grace
                    self.overdue.append(asyncio.get_running_loop().call_later(waited, self._overdue, waited))
                    await self.call.write(frame)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            self.fail(BankCallError(grpc.StatusCode.UNAVAILABLE, f"could not send to the bank: {exc}"))
        except asyncio.CancelledError:
            self.fail(BankCallError(grpc.StatusCode.CANCELLED, "the gateway is shutting down"))
        except Exception as exc:  # noqa: BLE001 - anything else: this stream cannot be trusted; start afresh
            log.exception("bank stream write failed")
            self.fail(BankCallError(grpc.StatusCode.UNAVAILABLE, f"could not send to the bank: {exc}"))
        finally:
            self.writer = None

    async def _read(self) -> None:
        error = BankCallError(grpc.StatusCode.UNAVAILABLE, "the bank closed the stream")
        loop = asyncio.get_running_loop()
        try:
            while (frame := await self.call.read()) is not grpc.aio.EOF:
                self.in_flight -= 1
                if self.overdue:
                    self.overdue.popleft().cancel()
                self._kick()
                for reply in frame.replies:
                    entry = self.pending.pop(reply.id, None)
                    if entry is None:
                        continue
                    future, timer = entry
                    timer.cancel()
                    if future.done():
                        continue
                    if timer.when() <= loop.time():
                        # Its deadline passed before this answer was read (e.g. the gateway was frozen and the
                        # timer is due but has not run yet): a vote that comes too late is no vote.
                        future.set_exception(BankCallError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                                           "the answer came after the call's deadline"))
                    elif reply.error_code:
                        future.set_exception(BankCallError(_CODES.get(reply.error_code, grpc.StatusCode.UNKNOWN),
                                                           reply.error))
                    else:
                        future.set_result(reply)
        except grpc.aio.AioRpcError as exc:
            error = BankCallError(exc.code(), exc.details() or "stream failed")
        except asyncio.CancelledError:
            error = BankCallError(grpc.StatusCode.CANCELLED, "the gateway is shutting down")
        except Exception as exc:  # noqa: BLE001 - e.g. a reply frame that is not a message: start afresh
            log.exception("bank stream read failed")
            error = BankCallError(grpc.StatusCode.UNAVAILABLE, f"the bank's stream failed: {exc}")
        finally:
            self.fail(error)

    def _overdue(self, waited: float) -> None:
        if not self.broken:
            log.warning("bank %s left a frame unanswered for %g s; its stream is reset", self.name, waited)
            self.fail(BankCallError(grpc.StatusCode.UNAVAILABLE,
                                    f"bank {self.name} answered nothing on its stream for {waited:g} s"))

    def fail(self, error: BankCallError) -> None:
        """The stream is unusable: fail every waiting call with `error`; the next call opens a new stream."""
        self.broken = True
        self.queue.clear()
        while self.overdue:
            self.overdue.popleft().cancel()
        pending, self.pending = self.pending, {}
        for future, timer in pending.values():
            timer.cancel()
            if not future.done():
                future.set_exception(error)
        self.call.cancel()

    def expire(self, message_id: int, timeout: float) -> None:
        entry = self.pending.pop(message_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(BankCallError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:g} s"))

    def close(self) -> None:
        self.fail(BankCallError(grpc.StatusCode.CANCELLED, "the gateway is shutting down"))


class BankLink:
    def __init__(self, name: str, channel: grpc.aio.Channel, frame_grace: float = FRAME_GRACE) -> None:
        self.name = name
        self.frame_grace = frame_grace
        self.channel = channel
        self.stub = payment_pb2_grpc.BankStub(channel)
        self._ids = itertools.count(1)
        self._stream: _Stream | None = None
        self.stats = LinkStats()

    def send(self, kind: str, body: object, timeout: float) -> "asyncio.Future[payment_pb2.BankReply]":
        """Queue one Prepare/Commit/Abort; the future resolves to its reply, or fails (BankCallError) on a
        refusal, a broken stream or after `timeout` seconds without an answer."""
        if self._stream is None or self._stream.broken:
            self._stream = _Stream(self.name, self.stub, self.stats, self.frame_grace)
        stream = self._stream
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        message_id = next(self._ids)
        stream.send(message_id, kind, body, future, loop.call_later(timeout, stream.expire, message_id, timeout),
                    timeout)
        return future

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        await self.channel.close()
