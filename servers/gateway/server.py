"""The payment gateway program: settings from the command line, the store, the servicer, the completer.

    python -m servers.gateway_server [--port 50053] [--config-dir config] [--certs-dir certificates]
        [--data-dir data] [--store sqlite|postgresql://USER@HOST/DB] [--txn-timeout 5]
        [--idempotency-ttl 604800] [--token-ttl 28800] [--max-payment 10000000]
        [--login-failures-per-user 10] [--login-failures-per-peer 100] [--login-window 60] [--login-concurrency 2]
        [--metrics-port PORT]
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from protofiles import payment_pb2_grpc
from servers import grpc_engine, serving
from servers.config import ConfigError, load_banks, load_users
from servers.gateway import metrics as gateway_metrics
from servers.gateway.coordinator import Banks, Coordinator
from servers.gateway.login_guard import LoginLimits
from servers.gateway.servicer import GatewayServicer
from servers.gateway.store.spec import SQLITE, open_store, store_argument, store_or_environment
from servers.gateway.store.errors import StoreUnavailable
from servers.gateway.store.interface import GatewayStore
from servers.interceptors import BearerAuthInterceptor, LoggingInterceptor, StatusFor
from servers.metrics import add_metrics_argument
from servers.money import MAX_PAYMENT_PAISE, format_paise, rupees_to_paise

log = logging.getLogger("strife.gateway")


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
    store: str = SQLITE  # or a PostgreSQL URL (CONTRACT §9)
    metrics_port: int | None = None


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
    parser.add_argument("--store", type=store_argument, default=None, metavar="sqlite|postgresql://USER@HOST[:PORT]/DB",
                        help="where keys, payments and sessions live: 'sqlite' (a file in --data-dir, the default)"
                             " or a PostgreSQL database shared by gateway replicas; default $STRIFE_STORE, else sqlite")
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
    add_metrics_argument(parser)
    a = parser.parse_args(argv)
    login = LoginLimits(a.login_failures_per_user, a.login_failures_per_peer, a.login_window, a.login_concurrency)
    store = store_or_environment(a.store, parser)
    return GatewaySettings(a.port, a.config_dir, a.certs_dir, a.data_dir, a.txn_timeout, a.idempotency_ttl,
                           a.token_ttl, a.completer_interval, a.max_payment, login, store,
                           a.metrics_port)


async def _completer_loop(coordinator: Coordinator, store: GatewayStore, settings: GatewaySettings,
                          stop: asyncio.Event) -> None:
    """A pass every interval (finishing what dead owners left); the sweeper now and then."""
    sweep_every = min(60.0, settings.idempotency_ttl)
    next_sweep = 0.0
    while not stop.is_set():
        try:
            await coordinator.complete_abandoned()
            if time.monotonic() >= next_sweep:
                swept = await store.sweep_keys(settings.idempotency_ttl)
                await store.sweep_sessions()
                if swept:
                    log.info("swept %d idempotency keys older than %g s", swept, settings.idempotency_ttl)
                next_sweep = time.monotonic() + sweep_every
        except StoreUnavailable as exc:
            log.warning("completer pass skipped: %s", exc)
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
    store = open_store(settings.store, settings.data_dir)
    await store.start()  # StoreUnavailable: one line naming the store (password masked), exit 2
    banks = Banks(bank_addresses, settings.certs_dir)
    metrics = gateway_metrics.start(settings.metrics_port, banks.links)
    stop = asyncio.Event()
    coordinator = Coordinator(store, banks, settings.txn_timeout, stop, metrics)
    servicer = GatewayServicer(users, banks, coordinator, settings.token_ttl, settings.max_payment, settings.login)

    open_methods = {"/PaymentGateway/Login", "/PaymentGateway/Logout",  # Logout checks its token itself
                    "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"}
    # A store that cannot be reached is the caller's UNAVAILABLE (retry, maybe on another replica), never
    # UNKNOWN; nothing was half-done (every write commits whole or not at all).
    unavailable = StatusFor({StoreUnavailable: grpc.StatusCode.UNAVAILABLE})
    # Wallets ping every few seconds to notice a hung replica (wallet_tui.gateway): accept those pings.
    server = serving.make_server([LoggingInterceptor(metrics.call_ended), unavailable,
                                  BearerAuthInterceptor(servicer.resolve_token, open_methods)],
                                 serving.KEEPALIVE_SERVER_OPTIONS)
    payment_pb2_grpc.add_PaymentGatewayServicer_to_server(servicer, server)
    health = await serving.add_health(server)
    # A replica that lost its store session reports NOT_SERVING (balancing clients send it nothing) and takes
    # no new payment until it has its liveness back (servicer, coordinator).
    store.on_liveness_change(lambda live: asyncio.ensure_future(health.set(
        "", health_pb2.HealthCheckResponse.SERVING if live else health_pb2.HealthCheckResponse.NOT_SERVING)))
    serving.bind(server, settings.port, credentials)
    aborted = await coordinator.recover_at_start()
    if aborted:
        log.info("start-up recovery: aborted %d undecided payments left by a dead gateway", aborted)
    completer = asyncio.ensure_future(_completer_loop(coordinator, store, settings, stop))
    await server.start()  # the completer then delivers every decision a dead gateway left
    log.info("network I/O: %s", grpc_engine.describe())
    log.info("gateway listening on port %d (owner %s, store %s, txn timeout %g s)", settings.port, store.owner_id,
             store.display_url, settings.txn_timeout)

    async def on_stop() -> None:
        if servicer.running:  # payments whose callers went away still finish (or stay recoverable)
            await asyncio.wait(set(servicer.running), timeout=settings.txn_timeout + 2)
        stop.set()
        await asyncio.wait({completer}, timeout=5)
        metrics.close()
        await banks.close()
        await store.close()

    await serving.run_until_signalled(server, health, grace=settings.txn_timeout + 2, on_stop=on_stop)


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    serving.configure_logging("gateway")
    try:
        asyncio.run(serve(settings))
    except (serving.StartupError, ConfigError, StoreUnavailable, ValueError, OSError) as exc:
        serving.exit_on_startup_error("gateway", exc)
