"""The gateway's RPCs: Login, Logout, ProcessPayment (claim → the coordinator runs it), GetBalance, ListPayments.

Everything a request depends on is read from the store (sessions, keys, payments), never kept in this process,
so any number of gateway processes sharing one store answer alike (CONTRACT §5, §9).
"""
from __future__ import annotations

import asyncio

import grpc

from protofiles import payment_pb2, payment_pb2_grpc
from servers.config import User, verify_password
from servers.faults import delay_at
from servers.gateway.coordinator import STATUS_ENUM, Banks, Coordinator
from servers.gateway.login_guard import LoginGuard, LoginLimits, LoginRefused
from servers.gateway.payment_checks import Refusal, checked_amount, idempotency_key, refusal
from servers.gateway.store.errors import StoreUnavailable
from servers.gateway.store.records import Claim, ClaimKind, Payment
from servers.interceptors import bearer_token, current_user, note
from servers.money import MAX_PAYMENT_PAISE, bank_of, paise_to_rupees

_BALANCE_TIMEOUT = 2.0
# Checked for unknown users so that a wrong username costs as long as a wrong password.
_DUMMY_HASH = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


class GatewayServicer(payment_pb2_grpc.PaymentGatewayServicer):
    def __init__(self, users: dict[str, User], banks: Banks, coordinator: Coordinator, token_ttl: float,
                 max_payment: int = MAX_PAYMENT_PAISE, login_limits: LoginLimits = LoginLimits()) -> None:
        self.users = users
        self.banks = banks
        self.coordinator = coordinator
        self.store = coordinator.store
        self.token_ttl = token_ttl
        self.max_payment = max_payment
        self.login_guard = LoginGuard(login_limits)
        self.metrics = coordinator.metrics
        self.running: set[asyncio.Task] = set()  # payments being executed, shielded from their callers

    async def resolve_token(self, token: str) -> str | None:
        """The user a token stands for now: its session is live, and its user still exists with the credential
        the session was issued against (a changed password or a removed user ends every session)."""
        session = await self.store.resolve_session(token)
        if session is None:
            return None
        username, credential = session
        user = self.users.get(username)
        return username if user is not None and user.credential == credential else None

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
        token, expires = await self.store.create_session(user.username, user.credential, self.token_ttl)
        return payment_pb2.LoginResponse(token=token, expires_at_unix=int(expires), accounts=list(user.accounts))

    async def Logout(self, request: payment_pb2.LogoutRequest,
                     context: grpc.aio.ServicerContext) -> payment_pb2.LogoutResponse:
        # Not behind the auth interceptor: a token already logged out is answered OK (its holder retrying
        # after a lost reply); only a token never issued, or expired, is refused.
        token = await bearer_token(context)
        username = await self.store.end_session(token)  # every call after this, on any replica, reads the change
        if username is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "token is unknown or expired")
        note(user=username)
        return payment_pb2.LogoutResponse()

    async def _replay(self, payment: Payment, context: grpc.aio.ServicerContext) -> payment_pb2.PaymentResponse:
        note(retry_kind="replay", txn=payment.txn_id)
        self.metrics.replayed()
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
        if not self.store.is_live():  # UNAVAILABLE, like every StoreUnavailable (the server's StatusFor)
            raise StoreUnavailable("this gateway lost its store session; retry (another replica may answer)")
        claim_write = asyncio.ensure_future(self.store.claim(username, key, request.from_account,
                                                             request.to_account, amount, refused is None))
        try:
            claim = await asyncio.shield(claim_write)
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
            self.metrics.refused_in_flight()
            await context.abort(grpc.StatusCode.ABORTED,
                                "a payment with this idempotency key is still being processed; retry shortly")
        payment = claim.payment
        if claim.kind is ClaimKind.REPLAY:
            return await self._replay(payment, context)
        note(txn=payment.txn_id)
        if claim.kind is ClaimKind.RESUMED:
            note(retry_kind="resumed")
        # The payment runs as a task of its own, shielded too: its outcome is stored and a retry gets it.
        # (A payment this replica loses to another mid-way — its store session gone — ends in StoreUnavailable:
        # UNAVAILABLE, retry with the same key; see Coordinator.run.)
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
        rows = await self.store.history(username, self.users[username].accounts, limit)
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
