"""The wallet's only line to the payment gateway: gRPC over TLS (verified with ca.crt), the bearer token and
idempotency key as metadata, a deadline on every call, and the standard health check.

The gateway may be several replicas (`a:p,b:q`, CONTRACT §9): one channel balances over those that answer and
a call whose replica is lost goes to another at once (see wallet_tui/replicas.py).

Thread-safe (one gRPC channel, sync stubs): the UI calls it from thread workers, never from the event loop.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protofiles import payment_pb2, payment_pb2_grpc
from wallet_tui.money import paise_to_wire, wire_to_paise
from wallet_tui.replicas import LOST_REPLICA, SERVICE_CONFIG, channel_target, failover_pause, parse_gateways

LOGIN_TIMEOUT = 10.0      # the gateway checks a slow (scrypt) password hash
READ_TIMEOUT = 5.0        # balances (fans out to the banks, 2 s each) and history
HEALTH_TIMEOUT = 2.0
LOGOUT_TIMEOUT = 2.0      # best effort: a wallet that cannot reach the gateway logs out locally all the same
# The name the gateway's certificate must carry (CONTRACT §3), whatever host it is dialled at: every
# CA-signed certificate (a bank's too) is valid for `localhost`; only the gateway's names `gateway`, so a
# process holding a bank's certificate fails the handshake before any password is sent.
GATEWAY_NAME = "gateway"
# A gateway that hangs (stopped, swapping, a frozen VM) keeps its connection open and answers nothing: the
# kernel still accepts and acknowledges. gRPC pings it this often and gives the connection up when a ping goes
# unanswered for KEEPALIVE_TIMEOUT_MS: every call on it then fails UNAVAILABLE (sent again to another replica,
# with its key), and the replica is out of the rotation until a new connection's handshake completes — that
# is, until it answers again. Without this, a hung replica keeps its share of the calls until each one's
# deadline. A ping is a few bytes every few seconds; the gateway accepts them (servers.serving).
KEEPALIVE_TIME_MS = 4000
KEEPALIVE_TIMEOUT_MS = 3000

STATUS_WORDS = {
    payment_pb2.PAYMENT_STATUS_SUCCEEDED: "succeeded",
    payment_pb2.PAYMENT_STATUS_DECLINED: "declined",
    payment_pb2.PAYMENT_STATUS_FAILED: "failed",
    payment_pb2.PAYMENT_STATUS_PROCESSING: "processing",
}


class GatewayError(Exception):
    """A call that did not get a response: carries the gRPC status code and the server's message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class LoginResult:
    token: str
    expires_at: float
    accounts: tuple[str, ...]


@dataclass(frozen=True)
class PaymentReply:
    status: str               # succeeded | declined | failed
    transaction_id: str
    message: str
    replayed: bool


@dataclass(frozen=True)
class Balance:
    account: str
    available: bool           # False: the account's bank could not be reached; no number is made up
    balance_paise: int = 0
    available_paise: int = 0
    message: str = ""


@dataclass(frozen=True)
class HistoryRecord:
    transaction_id: str
    from_account: str
    to_account: str
    amount_paise: int
    status: str
    message: str
    outgoing: bool
    idempotency_key: str
    created_at: float         # unix seconds


class Gateway(Protocol):
    """What the wallet needs from a gateway; `GrpcGateway` is the real one, tests may inject a fake."""

    def login(self, username: str, password: str) -> LoginResult: ...
    def logout(self, token: str) -> None: ...
    def pay(self, token: str, key: str, from_account: str, to_account: str, amount_paise: int) -> PaymentReply: ...
    def balances(self, token: str) -> list[Balance]: ...
    def history(self, token: str, limit: int = 50) -> list[HistoryRecord]: ...
    def health(self) -> bool: ...
    def close(self) -> None: ...


class GrpcGateway:
    def __init__(self, address: str, ca_path: Path, *, pay_timeout: float = 15.0) -> None:
        try:
            ca = ca_path.read_bytes()
        except OSError as exc:
            raise GatewayError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"cannot read the CA certificate {ca_path}: {exc.strerror}") from exc
        try:
            self.addresses = parse_gateways(address)
        except ValueError as exc:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"bad gateway address: {exc}") from None
        self.pay_timeout = pay_timeout
        self._credentials = grpc.ssl_channel_credentials(ca)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._open_channel()

    def _open_channel(self) -> None:
        options: list[tuple[str, int | str]] = [
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.enable_retries", 0),  # resends are ours (failover, the outbox), always with the same key
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),  # gRPC waits this long, whatever the line above says
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),  # keep pinging while the health watch is quiet
            # One name for every replica: each one's certificate must name `gateway`, whatever its address.
            ("grpc.ssl_target_name_override", GATEWAY_NAME),
        ]
        if len(self.addresses) > 1:
            options.append(("grpc.service_config", SERVICE_CONFIG))
        # Several replicas: their names are resolved now, so again each time the channel is replaced.
        self._channel = grpc.secure_channel(channel_target(self.addresses), self._credentials, options=options)
        self._stub = payment_pb2_grpc.PaymentGatewayStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @staticmethod
    def _auth(token: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {token}")]

    def _call(self, method, request, *, timeout: float, **kwargs):  # type: ignore[no-untyped-def]
        """One call within `timeout` seconds in all: with several replicas, sent again (same request, same
        metadata, so the same idempotency key) to another replica when its replica is lost (`failover_pause`)."""
        deadline = time.monotonic() + timeout
        lost = aborted = 0
        while True:
            try:
                return method(request, timeout=max(0.0, deadline - time.monotonic()), **kwargs)
            except grpc.RpcError as exc:
                code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
                details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
                error = GatewayError(code or grpc.StatusCode.UNKNOWN, details or "")
            except ValueError:  # grpc's "closed channel": the wallet is closing, or health() replaced it
                raise GatewayError(grpc.StatusCode.CANCELLED, "the connection to the gateway was closed") from None
            lost += error.code in LOST_REPLICA
            aborted += lost > 0 and error.code is grpc.StatusCode.ABORTED
            pause = failover_pause(error.code, lost, aborted, len(self.addresses))
            if pause is None or time.monotonic() + pause >= deadline or self._closed.wait(pause):
                raise error

    def login(self, username: str, password: str) -> LoginResult:
        reply = self._call(self._stub.Login, payment_pb2.LoginRequest(username=username, password=password),
                           timeout=LOGIN_TIMEOUT)
        return LoginResult(reply.token, float(reply.expires_at_unix), tuple(reply.accounts))

    def logout(self, token: str) -> None:
        """End the session at the gateway, so the token stops working there too."""
        self._call(self._stub.Logout, payment_pb2.LogoutRequest(), timeout=LOGOUT_TIMEOUT,
                   metadata=self._auth(token))

    def pay(self, token: str, key: str, from_account: str, to_account: str, amount_paise: int) -> PaymentReply:
        request = payment_pb2.PaymentRequest(from_account=from_account, to_account=to_account,
                                             amount=paise_to_wire(amount_paise))
        reply = self._call(self._stub.ProcessPayment, request, timeout=self.pay_timeout,
                           metadata=[*self._auth(token), ("idempotency-key", key)])
        status = STATUS_WORDS.get(reply.status, "succeeded" if reply.success else "failed")
        return PaymentReply(status, reply.transaction_id, reply.message, reply.replayed)

    def balances(self, token: str) -> list[Balance]:
        reply = self._call(self._stub.GetBalance, payment_pb2.GatewayBalanceRequest(), timeout=READ_TIMEOUT,
                           metadata=self._auth(token))
        return [Balance(d.account, d.available, d.balance_paise or wire_to_paise(d.balance),
                        d.available_paise or wire_to_paise(d.available_balance), d.message)
                for d in reply.details]

    def history(self, token: str, limit: int = 50) -> list[HistoryRecord]:
        reply = self._call(self._stub.ListPayments, payment_pb2.ListPaymentsRequest(limit=limit),
                           timeout=READ_TIMEOUT, metadata=self._auth(token))
        return [HistoryRecord(p.transaction_id, p.from_account, p.to_account,
                              p.amount_paise or wire_to_paise(p.amount), STATUS_WORDS.get(p.status, "processing"),
                              p.message, p.outgoing, p.idempotency_key, p.created_at_ms / 1000)
                for p in reply.payments]

    def health(self) -> bool:
        """True when the gateway (any one replica of it) answers SERVING. With several replicas each check goes
        to one the balancer picks among those connected and SERVING, and fails at once when there is none;
        a check that fails is tried again (the balancer's next pick) up to once per replica, so one replica
        that has just died or hangs does not make the wallet offline while another answers."""
        for _ in self.addresses:
            try:
                reply = self._health.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT)
            except (grpc.RpcError, ValueError):
                continue
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return True
            if len(self.addresses) == 1:
                return False
        # No answer: a channel that failed sits in reconnect backoff for up to a second; a fresh one dials at
        # once (resolving the replicas' names again), so the next poll sees a returning gateway straight away.
        # A call still on the old channel ends CANCELLED, which the sync loop resends with the same key.
        with self._lock:
            if self._closed.is_set():  # the wallet is closing: no new channel to leak
                return False
            old = self._channel
            self._open_channel()
        old.close()
        return False

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._channel.close()
