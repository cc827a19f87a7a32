"""The payment gateway: login, balances, history, and exactly-once payments coordinated over the banks.

    python -m servers.gateway_server [--port 50053] [--config-dir config] [--certs-dir certificates]
        [--data-dir data] [--txn-timeout 5] [--idempotency-ttl 604800] [--token-ttl 28800]
        [--max-payment 10000000] [--login-failures-per-user 10] [--login-failures-per-peer 100]
        [--login-window 60] [--login-concurrency 2]
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from protofiles import payment_pb2, payment_pb2_grpc
from servers import grpc_engine, serving
from servers.config import ConfigError, User, load_banks, load_users, verify_password
from servers.gateway.coordinator import STATUS_ENUM, Banks, Coordinator
from servers.faults import delay_at
from servers.gateway.store.sqlite_payments import Claim, ClaimKind, Payment, PaymentStore
from servers.interceptors import BearerAuthInterceptor, LoggingInterceptor, bearer_token, current_user, note
from servers.gateway.store.owners import Owner
from servers.gateway.login_guard import LoginGuard, LoginLimits, LoginRefused
from servers.money import MAX_PAYMENT_PAISE, bank_of, format_paise, paise_to_rupees, rupees_to_paise
from servers.gateway.payment_checks import Refusal, checked_amount, idempotency_key, refusal
from servers.gateway.store.sqlite_sessions import Sessions
from servers.sqlite_store import GroupCommitter, SQLiteStore

log = logging.getLogger("strife.gateway")

_BALANCE_TIMEOUT = 2.0
# Checked for unknown users so that a wrong username costs as long as a wrong password.
_DUMMY_HASH = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


@dataclass(frozen=True)
class GatewaySettings:
    port: int
    config_dir: Path
    certs_dir: Path
    data_dir: Path
    txn_timeout: float
    idempotency_ttl: float
    token_ttl: float
    completer_interval: float
    max_payment: int = MAX_PAYMENT_PAISE  # paise
    login: LoginLimits = LoginLimits()

    @property
    def store_path(self) -> Path:
        return self.data_dir / "gateway.sqlite3"


def _positive(value: str) -> float:
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {value!r}")
    return number


def _count(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {value!r}")
    return number


def _max_payment(value: str) -> int:
    try:
        return rupees_to_paise(float(value))  # at most the hard ceiling, which the banks enforce too
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (not {value!r})") from exc


def parse_args(argv: list[str] | None = None) -> GatewaySettings:
    parser = argparse.ArgumentParser(prog="python -m servers.gateway_server", description="Run the Strife gateway.")
    parser.add_argument("--port", type=int, default=50053)
    parser.add_argument("--config-dir", type=Path, default=Path("config"))
    parser.add_argument("--certs-dir", type=Path, default=Path("certificates"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--txn-timeout", type=_positive, default=5.0, help="2PC prepare-phase deadline (s)")
    parser.add_argument("--idempotency-ttl", type=_positive, default=7 * 24 * 3600.0,
                        help="how long finished idempotency keys are kept (s)")
    parser.add_argument("--token-ttl", type=_positive, default=8 * 3600.0, help="login token lifetime (s)")
    parser.add_argument("--completer-interval", type=_positive, default=1.0,
                        help="how often abandoned payments are looked for (s)")
    parser.add_argument("--max-payment", type=_max_payment, default=MAX_PAYMENT_PAISE, metavar="RUPEES",
                        help=f"largest payment accepted (at most the default, ₹{format_paise(MAX_PAYMENT_PAISE)})")
    limits = LoginLimits()
    parser.add_argument("--login-failures-per-user", type=_count, default=limits.failures_per_user,
                        help="failed logins per username per window before logins for it are refused")
    parser.add_argument("--login-failures-per-peer", type=_count, default=limits.failures_per_peer,
                        help="failed logins per client address per window before its logins are refused")
    parser.add_argument("--login-window", type=_positive, default=limits.window, help="login-limit window (s)")
    parser.add_argument("--login-concurrency", type=_count, default=limits.concurrency,
                        help="password checks (scrypt) run at once; further logins wait")
    a = parser.parse_args(argv)
    login = LoginLimits(a.login_failures_per_user, a.login_failures_per_peer, a.login_window, a.login_concurrency)
    return GatewaySettings(a.port, a.config_dir, a.certs_dir, a.data_dir, a.txn_timeout, a.idempotency_ttl,
                           a.token_ttl, a.completer_interval, a.max_payment, login)


class GatewayServicer(payment_pb2_grpc.PaymentGatewayServicer):
    def __init__(self, users: dict[str, User], banks: Banks, sessions: Sessions, coordinator: Coordinator,
                 max_payment: int = MAX_PAYMENT_PAISE, login_limits: LoginLimits = LoginLimits()) -> None:
        self.users = users
        self.banks = banks
        self.sessions = sessions
        self.coordinator = coordinator
        self.max_payment = max_payment
        self.login_guard = LoginGuard(login_limits)
        self.store = coordinator.store
        self.db = coordinator.db
        self.running: set[asyncio.Task] = set()  # payments being executed, shielded from their callers
        # History reads run here, off the event loop: they are bounded in rows (PaymentStore.history) but not
        # in disk reads — old pages of a large store may not be cached — and the loop serves every payment.
        # Threads of their own, not the default executor, where a flood of (unauthenticated) Logins queues
        # scrypt checks. Each thread reads on its own connection (SQLiteStore.connection is per thread).
        self.reads = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="strife-read")

    async def Login(self, request: payment_pb2.LoginRequest,
                    context: grpc.aio.ServicerContext) -> payment_pb2.LoginResponse:
        note(user=request.username[:64])
        user = self.users.get(request.username)
        password = request.password
        if user is None or len(password) > 1024:
            # As slow as a real check, so that a wrong username cannot be told from a wrong password.
            check = lambda: verify_password(password[:1024], _DUMMY_HASH) and False  # noqa: E731
        else:
            check = lambda: user.check_password(password)  # noqa: E731
        try:  # scrypt is deliberately slow: the guard limits it and runs it off the event loop
            right = await self.login_guard.check(request.username, context.peer(), check)
        except LoginRefused as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        if not right or user is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong username or password")
        token, expires = await self.db.run(self.sessions.create_in, user.username, user.credential)
        return payment_pb2.LoginResponse(token=token, expires_at_unix=int(expires), accounts=list(user.accounts))

    async def Logout(self, request: payment_pb2.LogoutRequest,
                     context: grpc.aio.ServicerContext) -> payment_pb2.LogoutResponse:
        # Not behind the auth interceptor: a token already logged out is answered OK (its holder retrying
        # after a lost reply); only a token never issued, or expired, is refused.
        token = await bearer_token(context)
        username = await self.db.run(self.sessions.revoke_in, token)  # every call after this reads the change
        if username is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "token is unknown or expired")
        note(user=username)
        return payment_pb2.LogoutResponse()

    async def _replay(self, payment: Payment, context: grpc.aio.ServicerContext) -> payment_pb2.PaymentResponse:
        note(retry_kind="replay", txn=payment.txn_id)
        response = payment_pb2.PaymentResponse.FromString(payment.response)
        response.replayed = True
        await context.send_initial_metadata((("idempotent-replayed", "true"),))
        return response

    async def ProcessPayment(self, request: payment_pb2.PaymentRequest,
                             context: grpc.aio.ServicerContext) -> payment_pb2.PaymentResponse:
        username = current_user()
        key = await idempotency_key(request, context)
        note(key=key, amount=request.amount, to=request.to_account[:40])
        amount = await checked_amount(request, context)
        # Today's configuration decides only whether a new key may be stored: a key with an outcome replays it.
        refused = refusal(self.users[username], self.banks, self.max_payment, request, amount)

        # One indexed read in the claim's transaction tells a new key from a replay, a mismatch or a payment
        # in flight. (A separate read before it, to serve replays outside the write path, cost new payments
        # ≈ 0.1 ms of the loop: that connection's page cache is dropped by every commit of the committer's.)
        # A claim that commits makes this process the payment's executor, so the payment must run even if the
        # caller is gone by then (hung up, or its deadline passed) — else the key would be "in flight" to every
        # retry for as long as this process lives. So the claim is shielded from the caller's cancellation,
        # and a caller that goes away meanwhile leaves its payment to be started once the claim is in.
        claim_write = self.db.submit(self.store.claim_in, username, key, request.from_account, request.to_account,
                                     amount, refused is None)
        try:
            claim = await asyncio.shield(claim_write)
            self.store.forget_previous_owner(claim)
            delay = delay_at("after_claim")
            if delay:
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            claim_write.add_done_callback(lambda done: self._run_claim_of_gone_caller(done, refused))
            raise
        if claim.kind is ClaimKind.REFUSED and refused is not None:
            await context.abort(refused.code, refused.message)
        if claim.kind is ClaimKind.MISMATCH:
            note(retry_kind="mismatch")
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this idempotency key was already used for a different payment (other from, to or"
                                " amount); use a new key for a new payment")
        if claim.kind is ClaimKind.IN_FLIGHT:
            note(retry_kind="in_progress", txn=claim.payment.txn_id)
            await context.abort(grpc.StatusCode.ABORTED,
                                "a payment with this idempotency key is still being processed; retry shortly")
        payment = claim.payment
        if claim.kind is ClaimKind.REPLAY:
            return await self._replay(payment, context)
        note(txn=payment.txn_id)
        if claim.kind is ClaimKind.RESUMED:
            note(retry_kind="resumed")
        # The payment runs as a task of its own, shielded too: its outcome is stored and a retry gets it.
        response = await asyncio.shield(self._run(payment, refused))
        note(outcome=payment_pb2.PaymentStatus.Name(response.status).removeprefix("PAYMENT_STATUS_").lower())
        return response

    def _run(self, payment: Payment, refused: Refusal | None) -> "asyncio.Task[payment_pb2.PaymentResponse]":
        # Only a resumed payment can be refused here (a new one is not claimed): its dead owner accepted it
        # under another configuration, and this one cannot execute it, so it is decided as failed.
        task = asyncio.ensure_future(self.coordinator.run(payment, refused.message if refused else None))
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        return task

    def _run_claim_of_gone_caller(self, claim_write: "asyncio.Future[Claim]", refused: Refusal | None) -> None:
        """The caller went away before its claim was in: if the claim made this process the payment's
        executor, run the payment all the same."""
        if claim_write.cancelled() or claim_write.exception() is not None:
            return  # nothing was claimed
        claim = claim_write.result()
        self.store.forget_previous_owner(claim)
        if claim.kind in (ClaimKind.NEW, ClaimKind.RESUMED):
            self._run(claim.payment, refused)

    async def GetBalance(self, request: payment_pb2.GatewayBalanceRequest,
                         context: grpc.aio.ServicerContext) -> payment_pb2.GatewayBalanceResponse:
        username = current_user()
        if request.username and request.username != username:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{username} may not see another user's balances")
        accounts = self.users[username].accounts
        known = [a for a in accounts if bank_of(a) in self.banks]
        results = await asyncio.gather(
            *(self.banks.links[bank_of(a)].stub.GetBalance(payment_pb2.BankBalanceRequest(account_number=a),
                                                            timeout=_BALANCE_TIMEOUT) for a in known),
            return_exceptions=True)
        by_account = dict(zip(known, results))
        response = payment_pb2.GatewayBalanceResponse()
        for account in accounts:
            detail = response.details.add(account=account)
            if account not in by_account:
                detail.message = f"bank {bank_of(account)} is not configured"
                continue
            result = by_account[account]
            if isinstance(result, grpc.RpcError):
                # Never a made-up number: an unreachable bank's accounts are reported as unavailable.
                detail.message = (f"bank {bank_of(account)} is unavailable" if result.code() in
                                  (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                                  else f"bank {bank_of(account)}: {result.details()}")
                continue
            if isinstance(result, BaseException):
                raise result
            detail.available = True
            detail.balance, detail.available_balance = result.balance, result.available
            detail.balance_paise, detail.available_paise = result.balance_paise, result.available_paise
            response.accounts[account] = result.balance
        return response

    async def ListPayments(self, request: payment_pb2.ListPaymentsRequest,
                           context: grpc.aio.ServicerContext) -> payment_pb2.ListPaymentsResponse:
        username = current_user()
        if request.limit < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit must not be negative")
        limit = min(request.limit or 50, 500)
        rows = await asyncio.get_running_loop().run_in_executor(
            self.reads, self.store.history, username, self.users[username].accounts, limit)
        response = payment_pb2.ListPaymentsResponse()
        for row in rows:
            outgoing = row.username == username
            response.payments.add(
                transaction_id=row.txn_id, from_account=row.from_account, to_account=row.to_account,
                amount=paise_to_rupees(row.amount), amount_paise=row.amount, status=STATUS_ENUM[row.status],
                message=row.message if outgoing else f"received from {row.from_account}", outgoing=outgoing,
                idempotency_key=row.idem_key if outgoing else "", created_at_ms=int(row.created_at * 1000),
                finished_at_ms=int((row.finished_at or 0) * 1000))
        return response


async def _completer_loop(coordinator: Coordinator, store: PaymentStore, sessions: Sessions,
                          settings: GatewaySettings, stop: asyncio.Event) -> None:
    """Start-up recovery (the first pass), then a pass every interval; the sweeper now and then."""
    sweep_every = min(60.0, settings.idempotency_ttl)
    next_sweep = 0.0
    while not stop.is_set():
        try:
            await coordinator.complete_abandoned()
            if time.monotonic() >= next_sweep:
                swept = await asyncio.get_running_loop().run_in_executor(None, store.sweep, settings.idempotency_ttl)
                await asyncio.get_running_loop().run_in_executor(None, sessions.sweep)
                if swept:
                    log.info("swept %d idempotency keys older than %g s", swept, settings.idempotency_ttl)
                next_sweep = time.monotonic() + sweep_every
        except Exception:  # noqa: BLE001 - the completer must outlive any one failure
            log.exception("completer pass failed; retrying")
        try:
            await asyncio.wait_for(stop.wait(), settings.completer_interval)
        except asyncio.TimeoutError:
            pass


async def serve(settings: GatewaySettings) -> None:
    users = load_users(settings.config_dir)
    bank_addresses = load_banks(settings.config_dir)
    credentials = serving.server_credentials(settings.certs_dir, "gateway", require_client_auth=False)
    banks = Banks(bank_addresses, settings.certs_dir)
    sqlite = SQLiteStore(settings.store_path, "", preallocate=True)
    owner = Owner(settings.data_dir)
    store = PaymentStore(sqlite, owner)
    sessions = Sessions(sqlite, settings.token_ttl,
                        lambda name: users[name].credential if name in users else None)
    db = GroupCommitter(sqlite, commit_in_thread=True)
    stop = asyncio.Event()
    coordinator = Coordinator(store, db, banks, settings.txn_timeout, stop)

    open_methods = {"/PaymentGateway/Login", "/PaymentGateway/Logout",  # Logout checks its token itself
                    "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"}
    server = serving.make_server([LoggingInterceptor(), BearerAuthInterceptor(sessions.resolve, open_methods)])
    servicer = GatewayServicer(users, banks, sessions, coordinator, settings.max_payment, settings.login)
    payment_pb2_grpc.add_PaymentGatewayServicer_to_server(servicer, server)
    health = await serving.add_health(server)
    serving.bind(server, settings.port, credentials)
    aborted = await coordinator.recover_at_start()
    if aborted:
        log.info("start-up recovery: aborted %d undecided payments left by a dead gateway", aborted)
    completer = asyncio.ensure_future(_completer_loop(coordinator, store, sessions, settings, stop))
    await server.start()  # the completer then delivers every decision a dead gateway left
    log.info("network I/O: %s", grpc_engine.describe())
    log.info("gateway listening on port %d (owner %s, store %s, txn timeout %g s)", settings.port, owner.id,
             settings.store_path, settings.txn_timeout)

    async def on_stop() -> None:
        if servicer.running:  # payments whose callers went away still finish (or stay recoverable)
            await asyncio.wait(set(servicer.running), timeout=settings.txn_timeout + 2)
        stop.set()
        await asyncio.wait({completer}, timeout=5)
        await banks.close()
        servicer.reads.shutdown(wait=True)  # before the store closes the read threads' connections
        db.close()
        sqlite.close()
        owner.release()

    await serving.run_until_signalled(server, health, grace=settings.txn_timeout + 2, on_stop=on_stop)


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    serving.configure_logging("gateway")
    try:
        asyncio.run(serve(settings))
    except (serving.StartupError, ConfigError, ValueError, OSError) as exc:
        serving.exit_on_startup_error("gateway", exc)

