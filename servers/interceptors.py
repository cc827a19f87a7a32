"""Server interceptors: a log line per call, bearer-token auth (gateway), the gateway-only peer check (banks).

Each interceptor wraps the behaviour of the handler it is given, so the outermost (logging) sees the final
status of everything inside it, including a call refused by auth. Handlers add facts to the log line (user,
key, amount, transaction id, retry kind) through `note()`; the line is written once, at the end.
Request bytes that are not a valid message are refused with INVALID_ARGUMENT by the innermost wrapper
(gRPC itself would answer INTERNAL, blaming the server for the caller's bytes).
"""
from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import grpc

from servers.logfmt import is_bare, quoted, value

log = logging.getLogger("strife.calls")

_NOTES: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("strife_call_notes", default=None)
_USER: contextvars.ContextVar[str | None] = contextvars.ContextVar("strife_user", default=None)


def note(**facts: Any) -> None:
    """Add facts to the current call's log line (no-op outside a call)."""
    notes = _NOTES.get()
    if notes is not None:
        notes.update(facts)


def current_user() -> str:
    """The authenticated user of the current gateway call (set by the auth interceptor)."""
    user = _USER.get()
    if user is None:  # pragma: no cover - every authenticated method runs behind the interceptor
        raise RuntimeError("no authenticated user for this call")
    return user


def log_call(method: str, peer: str, notes: dict[str, Any], code: grpc.StatusCode, message: str,
             started: float, ended: float | None = None) -> None:
    # Any value may hold a caller's bytes (a username, an account, a key, a status message quoting them), so
    # each is a logfmt value: bare when safe, else quoted and escaped. A call is always one line of key=value
    # pairs; the keys are our own. The safe test is inlined: this runs once per call.
    parts = [f"method={value(method)}", f"peer={value(peer)}"]
    for k, v in notes.items():
        if v is None or v == "" or k == "retry_kind":
            continue
        text = v if type(v) is str else str(v)
        parts.append(f"{k}={text}" if is_bare(text) else f"{k}={quoted(text)}")
    elapsed = (ended if ended is not None else time.perf_counter()) - started
    parts += [f"status={code.name}", f"message={value(message)}", f"ms={elapsed * 1000:.1f}",
              f"retry={value(notes.get('retry_kind', 'no'))}"]
    log.info(" ".join(parts))


Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


@dataclass(frozen=True)
class Malformed:
    """Request bytes that are not a valid message (truncated, or a string field that is not UTF-8)."""
    error: str


def tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    # gRPC answers a deserializer's exception with INTERNAL "Exception deserializing request!", as if the
    # server were broken. Bad bytes are the caller's fault: hand them on as Malformed, refused below.
    if deserialize is None or getattr(deserialize, "strife_tolerant", False):
        return deserialize

    def tolerant_deserialize(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, UnicodeDecodeError, …: all mean "not a message"
            return Malformed(f"{type(exc).__name__}: {exc}"[:200])

    tolerant_deserialize.strife_tolerant = True  # type: ignore[attr-defined]
    return tolerant_deserialize


def _refuse_malformed(inner: Behavior) -> Behavior:
    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid message ({request.error})")
        return await inner(request, context)
    return behavior


def _wrap_unary(handler: grpc.RpcMethodHandler | None, wrapper: Callable[[Behavior], Behavior]
                ) -> grpc.RpcMethodHandler | None:
    if handler is None or handler.unary_unary is None:
        return handler
    inner, deserialize = handler.unary_unary, handler.request_deserializer
    if not getattr(deserialize, "strife_tolerant", False):
        # The interceptor nearest the servicer refuses malformed requests, so the outer ones (auth, logging)
        # still run first and log the refusal like any other call.
        inner, deserialize = _refuse_malformed(inner), tolerant(deserialize)
    return grpc.unary_unary_rpc_method_handler(wrapper(inner), request_deserializer=deserialize,
                                               response_serializer=handler.response_serializer)


class _Cached:
    """Wrapped handlers are built once per method, not once per call: gRPC hands an interceptor the same
    registered handler object for a method every time, so its wrapped version can be reused."""

    def __init__(self) -> None:
        self._by_method: dict[str, tuple[Any, Any]] = {}

    def get(self, method: str, handler: Any, build: Callable[[Any], Any]) -> Any:
        hit = self._by_method.get(method)
        if hit is not None and hit[0] is handler:
            return hit[1]
        wrapped = build(handler)
        if handler is not None:
            self._by_method[method] = (handler, wrapped)
        return wrapped


def _details(context: grpc.aio.ServicerContext) -> str:
    details = context.details()
    if isinstance(details, bytes):
        return details.decode("utf-8", "replace")
    return details or ""


class LoggingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, on_call_end: Callable[[str, grpc.StatusCode, float], None] | None = None) -> None:
        self._cache = _Cached()
        self._on_call_end = on_call_end  # (method, final status, seconds), e.g. metrics.ServerMetrics.call_ended

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        method = handler_call_details.method
        return self._cache.get(method, await continuation(handler_call_details), lambda h: self._wrap(method, h))

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
        on_call_end = self._on_call_end

        def wrapper(inner: Behavior) -> Behavior:
            async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
                notes: dict[str, Any] = {}
                token = _NOTES.set(notes)
                start = time.perf_counter()
                code = None
                try:
                    return await inner(request, context)
                except grpc.aio.AbortError:
                    raise
                except asyncio.CancelledError:  # the caller hung up, or its deadline passed
                    code = grpc.StatusCode.CANCELLED
                    raise
                except Exception:
                    code = grpc.StatusCode.UNKNOWN
                    raise
                finally:
                    _NOTES.reset(token)
                    code, ended = code or context.code() or grpc.StatusCode.OK, time.perf_counter()
                    # Written on the next loop turn, once the response is on its way: the line costs the
                    # caller no latency. Everything it shows is taken now.
                    asyncio.get_running_loop().call_soon(log_call, method, context.peer(), notes, code,
                                                         _details(context), start, ended)
                    if on_call_end is not None:
                        on_call_end(method, code, ended - start)
            return behavior

        return _wrap_unary(handler, wrapper)


async def bearer_token(context: grpc.aio.ServicerContext) -> str:
    """The token of the call's `authorization: Bearer <token>` metadata; aborts UNAUTHENTICATED without one."""
    header = ""
    for key, given in context.invocation_metadata() or ():
        if key == "authorization":
            header = given if isinstance(given, str) else ""
            break
    scheme, _, token = header.partition(" ")
    if not header:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing authorization metadata; log in"
                            " and send 'authorization: Bearer <token>'")
    if scheme.lower() != "bearer" or not token.strip():
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization metadata must be 'Bearer <token>'")
    return token.strip()


class StatusFor(grpc.aio.ServerInterceptor):
    """Exceptions of the given types end the call with the given status and the exception's message, instead of
    UNKNOWN (e.g. a store that cannot be reached: UNAVAILABLE, so the caller retries)."""

    def __init__(self, codes: dict[type[Exception], grpc.StatusCode]) -> None:
        self._codes = codes
        self._types = tuple(codes)
        self._cache = _Cached()

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        return self._cache.get(handler_call_details.method, await continuation(handler_call_details), self._wrap)

    def _wrap(self, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
        def wrapper(inner: Behavior) -> Behavior:
            async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner(request, context)
                except self._types as exc:
                    code = next(c for t, c in self._codes.items() if isinstance(exc, t))
                    await context.abort(code, str(exc))
            return behavior

        return _wrap_unary(handler, wrapper)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Every method except the open ones needs `authorization: Bearer <token>` naming a live session."""

    def __init__(self, resolve_token: Callable[[str], Awaitable[str | None]], open_methods: set[str]) -> None:
        self._resolve = resolve_token
        self._open = open_methods
        self._cache = _Cached()

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        if handler_call_details.method in self._open:
            return handler
        return self._cache.get(handler_call_details.method, handler, self._wrap)

    def _wrap(self, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
        def wrapper(inner: Behavior) -> Behavior:
            async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
                user = await self._resolve(await bearer_token(context))
                if user is None:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "token is unknown, expired or ended (logged"
                                        " out, password changed, user removed); log in again")
                note(user=user)
                reset = _USER.set(user)
                try:
                    return await inner(request, context)
                finally:
                    _USER.reset(reset)
            return behavior

        return _wrap_unary(handler, wrapper)


def peer_allowed(context: grpc.aio.ServicerContext, allowed: set[bytes]) -> str | None:
    """None if the TLS peer's certificate has an allowed common name, else a message saying who it is."""
    names = context.auth_context().get("x509_common_name", [])
    if any(n in allowed for n in names):
        return None
    shown = b",".join(names).decode("utf-8", "replace") or "none"
    return f"only the gateway may call a bank (peer certificate CN: {shown})"


class PeerCertInterceptor(grpc.aio.ServerInterceptor):
    """A bank answers only the gateway: the TLS peer must hold a CA-signed certificate whose CN is allowed."""

    def __init__(self, allowed_common_names: set[str], open_prefix: str = "/grpc.health.v1.Health/") -> None:
        self._allowed = {cn.encode() for cn in allowed_common_names}
        self._open_prefix = open_prefix  # health checks: any CA-signed client certificate will do

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._open_prefix):
            return handler
        if handler.unary_unary is not None:
            def wrapper(inner: Behavior) -> Behavior:
                async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    refusal = peer_allowed(context, self._allowed)
                    if refusal:
                        await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
                    return await inner(request, context)
                return behavior
            return _wrap_unary(handler, wrapper)
        if handler.stream_stream is not None:
            inner_stream = handler.stream_stream

            async def refuse_stranger(context: grpc.aio.ServicerContext) -> None:
                refusal = peer_allowed(context, self._allowed)
                if refusal:
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)

            if inspect.isasyncgenfunction(inner_stream):
                async def stream_behavior(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                    await refuse_stranger(context)
                    async for reply in inner_stream(request_iterator, context):
                        yield reply
            else:  # a reader/writer handler (context.read / context.write)
                async def stream_behavior(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                    await refuse_stranger(context)
                    return await inner_stream(request_iterator, context)
            return grpc.stream_stream_rpc_method_handler(stream_behavior,
                                                         request_deserializer=tolerant(handler.request_deserializer),
                                                         response_serializer=handler.response_serializer)
        return handler
