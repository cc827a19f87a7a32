"""Server interceptors: a log line per call, bearer-token auth (gateway), the gateway-only peer check (banks).

Each interceptor wraps the unary behaviour of the handler it is given, so the outermost (logging) sees the
final status of everything inside it, including a call refused by auth. Handlers add facts to the log line
(user, key, amount, transaction id, retry kind) through `note()`; the line is written once, at the end.
Request bytes that are not a valid message are refused with INVALID_ARGUMENT by the innermost wrapper
(gRPC itself would answer INTERNAL, blaming the server for the caller's bytes).
"""
from __future__ import annotations

import contextvars
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import grpc

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


Behavior = Callable[[Any, grpc.ServicerContext], Any]


@dataclass(frozen=True)
class _Malformed:
    """Request bytes that are not a valid message (truncated, or a string field that is not UTF-8)."""
    error: str


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    # gRPC answers a deserializer's exception with INTERNAL "Exception deserializing request!", as if the
    # server were broken. Bad bytes are the caller's fault: hand them on as _Malformed, refused below.
    if deserialize is None:
        return None

    def tolerant(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, UnicodeDecodeError, …: all mean "not a message"
            return _Malformed(f"{type(exc).__name__}: {exc}"[:200])

    tolerant.strife_tolerant = True  # type: ignore[attr-defined]
    return tolerant


def _refuse_malformed(inner: Behavior) -> Behavior:
    def behavior(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid message ({request.error})")
        return inner(request, context)
    return behavior


def _wrap(handler: grpc.RpcMethodHandler | None, wrapper: Callable[[Behavior], Behavior]
          ) -> grpc.RpcMethodHandler | None:
    if handler is None or handler.unary_unary is None:
        return handler  # Strife has only unary methods; anything else passes through untouched.
    inner, deserialize = handler.unary_unary, handler.request_deserializer
    if not getattr(deserialize, "strife_tolerant", False):
        # The interceptor nearest the servicer refuses malformed requests, so the outer ones (auth, logging)
        # still run first and log the refusal like any other call.
        inner, deserialize = _refuse_malformed(inner), _tolerant(deserialize)
    return grpc.unary_unary_rpc_method_handler(wrapper(inner), request_deserializer=deserialize,
                                               response_serializer=handler.response_serializer)


def _details(context: grpc.ServicerContext) -> str:
    details = context.details()
    if isinstance(details, bytes):
        return details.decode("utf-8", "replace")
    return details or ""


class LoggingInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        method = handler_call_details.method

        def wrapper(inner: Behavior) -> Behavior:
            def behavior(request: Any, context: grpc.ServicerContext) -> Any:
                notes: dict[str, Any] = {}
                token = _NOTES.set(notes)
                start = time.perf_counter()
                try:
                    return inner(request, context)
                finally:
                    _NOTES.reset(token)
                    code = context.code() or grpc.StatusCode.OK
                    if isinstance(code, int):  # pragma: no cover - defensive; grpc gives StatusCode
                        code = grpc.StatusCode.OK
                    parts = [f"method={method}", f"peer={context.peer()}"]
                    parts += [f"{k}={v}" for k, v in notes.items() if v not in (None, "")]
                    parts += [f"status={code.name}", f"message={_details(context)!r}",
                              f"ms={(time.perf_counter() - start) * 1000:.1f}",
                              f"retry={notes.get('retry_kind', 'no')}"]
                    parts = [p for p in parts if not p.startswith("retry_kind=")]
                    log.info(" ".join(parts))
            return behavior

        return _wrap(continuation(handler_call_details), wrapper)


class BearerAuthInterceptor(grpc.ServerInterceptor):
    """Every method except the open ones needs `authorization: Bearer <token>` naming a live session."""

    def __init__(self, resolve_token: Callable[[str], str | None], open_methods: set[str]) -> None:
        self._resolve = resolve_token
        self._open = open_methods

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler_call_details.method in self._open:
            return handler

        def wrapper(inner: Behavior) -> Behavior:
            def behavior(request: Any, context: grpc.ServicerContext) -> Any:
                header = ""
                for key, value in context.invocation_metadata():
                    if key == "authorization":
                        header = value if isinstance(value, str) else ""
                        break
                scheme, _, token = header.partition(" ")
                if not header:
                    context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                  "missing authorization metadata; log in and send 'authorization: Bearer <token>'")
                if scheme.lower() != "bearer" or not token.strip():
                    context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                  "authorization metadata must be 'Bearer <token>'")
                user = self._resolve(token.strip())
                if user is None:
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, "token is unknown or expired; log in again")
                note(user=user)
                reset = _USER.set(user)
                try:
                    return inner(request, context)
                finally:
                    _USER.reset(reset)
            return behavior

        return _wrap(handler, wrapper)


class PeerCertInterceptor(grpc.ServerInterceptor):
    """A bank answers only the gateway: the TLS peer must hold a CA-signed certificate whose CN is allowed."""

    def __init__(self, allowed_common_names: set[str], open_prefix: str = "/grpc.health.v1.Health/") -> None:
        self._allowed = {cn.encode() for cn in allowed_common_names}
        self._open_prefix = open_prefix  # health checks: any CA-signed client certificate will do

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        if handler_call_details.method.startswith(self._open_prefix):
            return continuation(handler_call_details)

        def wrapper(inner: Behavior) -> Behavior:
            def behavior(request: Any, context: grpc.ServicerContext) -> Any:
                names = context.auth_context().get("x509_common_name", [])
                if not any(n in self._allowed for n in names):
                    shown = b",".join(names).decode("utf-8", "replace") or "none"
                    context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                  f"only the gateway may call a bank (peer certificate CN: {shown})")
                return inner(request, context)
            return behavior

        return _wrap(continuation(handler_call_details), wrapper)
