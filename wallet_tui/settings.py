"""The wallet's one settings object, built from its command line (CONTRACT §2)."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from wallet_tui.replicas import parse_gateways

DEFAULT_MAX_AGE = 72 * 3600.0  # below the gateway's default idempotency-key TTL (7 days)


@dataclass(frozen=True)
class WalletSettings:
    gateway: str = "localhost:50053"   # HOST:PORT, or several (replicas of one gateway) joined by commas
    certs_dir: Path = Path("certificates")
    data_dir: Path = Path("data")
    poll_interval: float = 5.0
    max_age: float = DEFAULT_MAX_AGE
    pay_timeout: float = 15.0

    @property
    def gateways(self) -> tuple[str, ...]:
        return parse_gateways(self.gateway)

    @property
    def ca_path(self) -> Path:
        return self.certs_dir / "ca.crt"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "wallet"


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {value!r}")
    return number


def _addresses(value: str) -> str:
    try:
        return ",".join(parse_gateways(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None) -> WalletSettings:
    parser = argparse.ArgumentParser(prog="wallet", description="The Strife terminal wallet.")
    parser.add_argument("--gateway", type=_addresses, default="localhost:50053", metavar="HOST:PORT[,HOST:PORT...]",
                        help="the payment gateway, or its replicas separated by commas: calls are balanced over "
                             "those that answer (default localhost:50053)")
    parser.add_argument("--certs-dir", type=Path, default=Path("certificates"),
                        help="directory holding ca.crt, used to verify the gateway (default certificates)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="where the outbox lives, under wallet/ (default data)")
    parser.add_argument("--poll-interval", type=_positive, default=5.0, metavar="SECONDS",
                        help="how often connectivity is checked (default 5)")
    parser.add_argument("--max-age", type=_positive, default=DEFAULT_MAX_AGE, metavar="SECONDS",
                        help="queued payments older than this are expired, not sent (default 72 h)")
    parser.add_argument("--pay-timeout", type=_positive, default=15.0, metavar="SECONDS",
                        help="deadline of one payment call (default 15)")
    a = parser.parse_args(argv)
    return WalletSettings(a.gateway, a.certs_dir, a.data_dir, a.poll_interval, a.max_age, a.pay_timeout)
