"""A bank: a 2PC participant over mutual TLS, with its ledger in SQLite (CONTRACT §2, §6).

    python -m servers.bank_server --bank SBI --port 50051 [--config-dir config] [--certs-dir certificates]
                                  [--data-dir data] [--metrics-port PORT]

Prepare, Commit and Abort are served as unary RPCs, as messages on an `Exchange` stream, and as frames of
messages on the gateway's long-lived `ExchangeBatches` stream (what the gateway uses): a frame is applied in
one transaction, so its operations share one fsync. Every answer leaves only after its change is on disk.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

import grpc

from protofiles import payment_pb2, payment_pb2_grpc
from servers import grpc_engine, serving
from servers.certs import GATEWAY_CN
from servers.config import ConfigError, load_banks, load_opening_balances
from servers.interceptors import LoggingInterceptor, Malformed, PeerCertInterceptor, log_call, note
from servers.bank import metrics as bank_metrics
from servers.bank.ledger import Ledger
from servers.bank.metrics import BankMetrics, BankMetricsOff
from servers.metrics import add_metrics_argument
from servers.money import MAX_PAYMENT_PAISE, MoneyError, bank_of, paise_to_rupees, rupees_to_paise
from servers.sqlite_store import GroupCommitter

log = logging.getLogger("strife.bank")
_MAX_TXN_ID = 255


@dataclass(frozen=True)
class BankSettings:
    bank: str
    port: int
    config_dir: Path
    certs_dir: Path
    data_dir: Path
    metrics_port: int | None = None

    @property
    def ledger_path(self) -> Path:
        return self.data_dir / f"bank_{self.bank}.sqlite3"


def parse_args(argv: list[str] | None = None) -> BankSettings:
    parser = argparse.ArgumentParser(prog="python -m servers.bank_server", description="Run one Strife bank.")
    parser.add_argument("--bank", required=True, help="bank name, a key of banks.json")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--config-dir", type=Path, default=Path("config"))
    parser.add_argument("--certs-dir", type=Path, default=Path("certificates"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    add_metrics_argument(parser)
    args = parser.parse_args(argv)
    return BankSettings(args.bank, args.port, args.config_dir, args.certs_dir, args.data_dir, args.metrics_port)


class Refused(Exception):
    """A request that is malformed in itself (not a business NO): answered with INVALID_ARGUMENT."""


def _check_txn_id(txn_id: str) -> str:
    if not txn_id or len(txn_id) > _MAX_TXN_ID:
        raise Refused(f"transaction_id must be 1–{_MAX_TXN_ID} characters")
    return txn_id


def _prepare_args(request: payment_pb2.PrepareRequest) -> tuple[str, str, str, int]:
    txn_id = _check_txn_id(request.transaction_id)
    try:
        amount = rupees_to_paise(request.amount, maximum=MAX_PAYMENT_PAISE)
        bank_of(request.from_account), bank_of(request.to_account)
    except (MoneyError, ValueError) as exc:
        raise Refused(str(exc)) from exc
    return txn_id, request.from_account, request.to_account, amount


def _error_reply(message_id: int, code: grpc.StatusCode, error: str) -> payment_pb2.BankReply:
    return payment_pb2.BankReply(id=message_id, error_code=code.value[0], error=error)


class BankServicer(payment_pb2_grpc.BankServicer):
    def __init__(self, ledger: Ledger, committer: GroupCommitter, metrics: BankMetrics | None = None) -> None:
        self.ledger = ledger
        self.db = committer
        self.metrics = metrics or BankMetricsOff()
        self._readers: set[asyncio.Task] = set()
        self._idle: set[asyncio.Task] = set()  # ExchangeBatches handlers waiting for their next frame
        self._stopping = False

    def stop_streams(self) -> None:
        """Shutting down: every Exchange stream stops taking messages, answers what it took, and ends."""
        self._stopping = True
        for reader in list(self._readers) + list(self._idle):
            reader.cancel()

    # ---- the three 2PC operations, shared by the unary methods and the stream ------------------------------
    def _operation(self, kind: str, body: object) -> tuple[Callable[..., object], tuple]:
        """The ledger operation for one validated message (raises Refused for a malformed one)."""
        try:
            if kind == "prepare":
                return self.ledger.prepare_in, _prepare_args(body)
            txn_id = _check_txn_id(body.transaction_id)
        except Refused:
            self.metrics.failed(kind)  # every path validates here: a malformed message is counted once
            raise
        return (self.ledger.commit_in if kind == "commit" else self.ledger.abort_in), (txn_id,)

    def _start(self, kind: str, body: object) -> "asyncio.Future":
        """Validate and queue one operation (synchronously, so operations reach the ledger in arrival order)."""
        operation, args = self._operation(kind, body)
        return self.db.submit(operation, *args)

    def _to_message(self, kind: str, result: object) -> payment_pb2.Vote | payment_pb2.Ack:
        """The answer to one applied operation, on every path (unary, Exchange, frames): counted here."""
        self.metrics.answered(kind, result)
        if kind == "prepare":
            return payment_pb2.Vote(vote=result.yes, reason=result.reason)
        return payment_pb2.Ack(success=result.ok, message=result.message)

    def _reply(self, message_id: int, kind: str, result: object, notes: dict) -> payment_pb2.BankReply:
        """A stream's answer to one applied message (and the vote noted for its log line)."""
        reply = payment_pb2.BankReply(id=message_id)
        if kind == "prepare":
            reply.vote.CopyFrom(self._to_message(kind, result))
            notes["vote"] = "yes" if result.yes else "no"
        else:
            reply.ack.CopyFrom(self._to_message(kind, result))
        return reply

    async def _unary(self, kind: str, request: object, context: grpc.aio.ServicerContext) -> object:
        note(txn=request.transaction_id[:80])
        if kind == "prepare":
            note(amount=f"{request.amount:.2f}")
        try:
            future = self._start(kind, request)
        except Refused as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        result = await future
        if kind == "prepare":
            note(vote="yes" if result.yes else "no")
        return self._to_message(kind, result)

    async def Prepare(self, request, context):  # type: ignore[no-untyped-def]
        return await self._unary("prepare", request, context)

    async def Commit(self, request, context):  # type: ignore[no-untyped-def]
        return await self._unary("commit", request, context)

    async def Abort(self, request, context):  # type: ignore[no-untyped-def]
        return await self._unary("abort", request, context)

    async def Exchange(self, request_iterator: AsyncIterator[payment_pb2.BankMessage],
                       context: grpc.aio.ServicerContext) -> AsyncIterator[payment_pb2.BankReply]:
        replies: asyncio.Queue[payment_pb2.BankReply | None] = asyncio.Queue()
        peer = context.peer()
        answering: set[asyncio.Task] = set()
        refused: list[str] = []  # set when the peer sent bytes that are not a message: the stream is ended

        async def answer(message: payment_pb2.BankMessage, kind: str, future: asyncio.Future, started: float) -> None:
            body = getattr(message, kind)
            notes = {"txn": body.transaction_id[:80], "via": "stream"}
            if kind == "prepare":
                notes["amount"] = f"{body.amount:.2f}"
            try:
                result = await future
            except Exception as exc:  # noqa: BLE001 - the ledger failed: tell the gateway, keep the stream
                self.metrics.failed(kind)
                log_call(f"/Bank/{kind.capitalize()}", peer, notes, grpc.StatusCode.INTERNAL, str(exc), started)
                replies.put_nowait(_error_reply(message.id, grpc.StatusCode.INTERNAL, f"ledger error: {exc}"))
                return
            reply = self._reply(message.id, kind, result, notes)
            log_call(f"/Bank/{kind.capitalize()}", peer, notes, grpc.StatusCode.OK, getattr(result, "message", ""),
                     started)
            replies.put_nowait(reply)

        async def read() -> None:
            try:
                async for message in request_iterator:
                    started = time.perf_counter()
                    if isinstance(message, Malformed):
                        refused.append(f"the message is not a valid BankMessage ({message.error})")
                        break
                    kind = message.WhichOneof("body")
                    if kind is None:
                        replies.put_nowait(_error_reply(message.id, grpc.StatusCode.INVALID_ARGUMENT, "empty message"))
                        continue
                    try:
                        future = self._start(kind, getattr(message, kind))
                    except Refused as exc:
                        replies.put_nowait(_error_reply(message.id, grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
                        continue
                    task = asyncio.ensure_future(answer(message, kind, future, started))
                    answering.add(task)
                    task.add_done_callback(answering.discard)
            except asyncio.CancelledError:
                pass  # the bank is stopping: take no more messages, but answer those already taken
            finally:
                if answering:
                    await asyncio.gather(*answering, return_exceptions=True)
                replies.put_nowait(None)

        reader = asyncio.ensure_future(read())
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        try:
            while (reply := await replies.get()) is not None:
                yield reply
        finally:
            reader.cancel()
        if refused:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused[0])

    async def ExchangeBatches(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        """Frames of messages: each frame is applied in one transaction (one fsync), then answered in one
        frame, then logged. Read, apply and answer happen in this one coroutine: no queue, no task per message."""
        peer = context.peer()
        me = asyncio.current_task()
        while True:
            self._idle.add(me)
            try:
                frame = await context.read()
            except asyncio.CancelledError:
                return  # the bank is stopping and this stream was between frames: end it cleanly
            finally:
                self._idle.discard(me)
            if frame is grpc.aio.EOF:
                return
            if isinstance(frame, Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"the frame is not a valid BankBatch ({frame.error})")
            started = time.perf_counter()
            replies, lines = self._apply_frame(frame)
            await context.write(payment_pb2.BankReplyBatch(replies=replies))
            for kind, notes, code, message in lines:
                log_call(f"/Bank/{kind.capitalize()}", peer, notes, code, message, started)
            if self._stopping:
                return

    def _apply_frame(self, frame: payment_pb2.BankBatch
                     ) -> tuple[list[payment_pb2.BankReply], list[tuple[str, dict, grpc.StatusCode, str]]]:
        replies: list[payment_pb2.BankReply] = []
        lines: list[tuple[str, dict, grpc.StatusCode, str]] = []
        taken: list[tuple[payment_pb2.BankMessage, str, dict]] = []
        operations: list[tuple[Callable[..., object], tuple]] = []
        for message in frame.messages:
            kind = message.WhichOneof("body")
            if kind is None:
                replies.append(_error_reply(message.id, grpc.StatusCode.INVALID_ARGUMENT, "empty message"))
                continue
            body = getattr(message, kind)
            notes = {"txn": body.transaction_id[:80], "via": "stream"}
            if kind == "prepare":
                notes["amount"] = f"{body.amount:.2f}"
            try:
                operations.append(self._operation(kind, body))
            except Refused as exc:
                replies.append(_error_reply(message.id, grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
                lines.append((kind, notes, grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
                continue
            taken.append((message, kind, notes))
        try:
            outcomes = self.db.run_now(operations) if operations else []
        except Exception as exc:  # noqa: BLE001 - the transaction failed: nothing in it happened; say so to each
            outcomes = [(None, exc)] * len(operations)
        for (message, kind, notes), (result, error) in zip(taken, outcomes):
            if error is not None:
                self.metrics.failed(kind)
                replies.append(_error_reply(message.id, grpc.StatusCode.INTERNAL, f"ledger error: {error}"))
                lines.append((kind, notes, grpc.StatusCode.INTERNAL, str(error)))
                continue
            replies.append(self._reply(message.id, kind, result, notes))
            lines.append((kind, notes, grpc.StatusCode.OK, getattr(result, "message", "")))
        return replies, lines

    async def GetBalance(self, request: payment_pb2.BankBalanceRequest,
                         context: grpc.aio.ServicerContext) -> payment_pb2.BankBalanceResponse:
        account = request.account_number
        note(account=account[:80])
        balance = self.ledger.balance(account)
        if balance is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"account {account[:80]} does not exist at {self.ledger.bank}")
        return payment_pb2.BankBalanceResponse(balance=paise_to_rupees(balance.balance),
                                               available=paise_to_rupees(balance.available),
                                               balance_paise=balance.balance, available_paise=balance.available)


async def serve(settings: BankSettings) -> None:
    banks = load_banks(settings.config_dir)
    if settings.bank not in banks:
        raise ConfigError(f"bank {settings.bank!r} is not in {settings.config_dir / 'banks.json'}"
                          f" (known: {', '.join(sorted(banks))})")
    credentials = serving.server_credentials(settings.certs_dir, settings.bank, require_client_auth=True)
    ledger = Ledger(settings.ledger_path, settings.bank,
                    lambda: load_opening_balances(settings.config_dir, settings.bank))
    metrics = bank_metrics.start(settings.metrics_port, ledger)
    committer = GroupCommitter(ledger.store, on_commit=metrics.committed)
    # The gateway's link pings every couple of seconds (serving.CHANNEL_OPTIONS): allow it, or the bank
    # would drop the link with GOAWAY "too_many_pings" whenever it has been quiet for a while.
    server = serving.make_server([LoggingInterceptor(metrics.call_ended), PeerCertInterceptor({GATEWAY_CN})],
                                 serving.KEEPALIVE_SERVER_OPTIONS)
    servicer = BankServicer(ledger, committer, metrics)
    payment_pb2_grpc.add_BankServicer_to_server(servicer, server)
    health = await serving.add_health(server)
    serving.bind(server, settings.port, credentials)
    await server.start()
    log.info("network I/O: %s", grpc_engine.describe())
    log.info("bank %s listening on port %d, ledger %s", settings.bank, settings.port, settings.ledger_path)

    async def on_stop() -> None:
        metrics.close()
        committer.close()
        ledger.close()

    await serving.run_until_signalled(server, health, grace=5.0, on_stop=on_stop, before_stop=servicer.stop_streams)


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    serving.configure_logging(f"bank[{settings.bank}]")
    try:
        asyncio.run(serve(settings))
    except (serving.StartupError, ConfigError, ValueError, OSError) as exc:
        serving.exit_on_startup_error(f"bank {settings.bank}", exc)

    sys.exit(0)
