"""The gateway's link to one bank: a mutual-TLS channel and a long-lived `Exchange` stream on it.

A 2PC call is a message with an id on the stream, answered by a reply with the same id; each waits under its
own deadline (`request(..., timeout=)`), so a silent bank costs exactly the timeout. If the stream breaks (the
bank died or restarted), every waiting call fails as UNAVAILABLE and the next call opens a new stream; the
channel reconnects within a second (serving.CHANNEL_OPTIONS). Unary RPCs (GetBalance) use the same channel.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from typing import AsyncIterator

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


_CODES = {c.value[0]: c for c in grpc.StatusCode}


class _Stream:
    def __init__(self, stub: payment_pb2_grpc.BankStub) -> None:
        self.outbox: asyncio.Queue[payment_pb2.BankMessage | None] = asyncio.Queue()
        self.pending: dict[int, asyncio.Future] = {}
        self.broken = False
        self.call = stub.Exchange(self._messages())
        self.reader = asyncio.ensure_future(self._read())

    async def _messages(self) -> AsyncIterator[payment_pb2.BankMessage]:
        while (message := await self.outbox.get()) is not None:
            yield message

    async def _read(self) -> None:
        error = BankCallError(grpc.StatusCode.UNAVAILABLE, "the bank closed the stream")
        try:
            async for reply in self.call:
                future = self.pending.pop(reply.id, None)
                if future is not None and not future.done():
                    future.set_result(reply)
        except grpc.aio.AioRpcError as exc:
            error = BankCallError(exc.code(), exc.details() or "stream failed")
        except asyncio.CancelledError:
            error = BankCallError(grpc.StatusCode.CANCELLED, "the gateway is shutting down")
        finally:
            self.broken = True
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(error)
            self.pending.clear()

    def close(self) -> None:
        self.outbox.put_nowait(None)
        self.call.cancel()


class BankLink:
    def __init__(self, name: str, channel: grpc.aio.Channel) -> None:
        self.name = name
        self.channel = channel
        self.stub = payment_pb2_grpc.BankStub(channel)
        self._ids = itertools.count(1)
        self._stream: _Stream | None = None

    async def request(self, kind: str, body: object, timeout: float) -> payment_pb2.BankReply:
        """Send one Prepare/Commit/Abort and wait at most `timeout` seconds for its reply."""
        if self._stream is None or self._stream.broken:
            self._stream = _Stream(self.stub)
        stream = self._stream
        message = payment_pb2.BankMessage(id=next(self._ids))
        getattr(message, kind).CopyFrom(body)
        future = asyncio.get_running_loop().create_future()
        stream.pending[message.id] = future
        stream.outbox.put_nowait(message)
        try:
            reply = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise BankCallError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:g} s") from None
        finally:
            stream.pending.pop(message.id, None)
        if reply.error_code:
            raise BankCallError(_CODES.get(reply.error_code, grpc.StatusCode.UNKNOWN), reply.error)
        return reply

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        await self.channel.close()
