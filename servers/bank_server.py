"""A bank: a 2PC participant over mutual TLS, with its ledger in SQLite (CONTRACT §2, §6).

    python -m servers.bank_server --bank SBI --port 50051 [--config-dir config] [--certs-dir certificates]
                                  [--data-dir data]
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc

from protofiles import payment_pb2, payment_pb2_grpc
from servers import serving
from servers.certs import GATEWAY_CN
from servers.config import ConfigError, load_banks, load_opening_balances
from servers.interceptors import LoggingInterceptor, PeerCertInterceptor, note
from servers.ledger import Ledger
from servers.money import MAX_PAYMENT_PAISE, MoneyError, bank_of, paise_to_rupees, rupees_to_paise

log = logging.getLogger("strife.bank")
_MAX_TXN_ID = 255


@dataclass(frozen=True)
class BankSettings:
    bank: str
    port: int
    config_dir: Path
    certs_dir: Path
    data_dir: Path

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
    args = parser.parse_args(argv)
    return BankSettings(args.bank, args.port, args.config_dir, args.certs_dir, args.data_dir)


class BankServicer(payment_pb2_grpc.BankServicer):
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    @staticmethod
    def _txn_id(request: object, context: grpc.ServicerContext) -> str:
        txn_id = getattr(request, "transaction_id")
        note(txn=txn_id[:80])
        if not txn_id or len(txn_id) > _MAX_TXN_ID:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"transaction_id must be 1–{_MAX_TXN_ID} characters")
        return txn_id

    def Prepare(self, request: payment_pb2.PrepareRequest, context: grpc.ServicerContext) -> payment_pb2.Vote:
        txn_id = self._txn_id(request, context)
        try:
            amount = rupees_to_paise(request.amount, maximum=MAX_PAYMENT_PAISE)
            bank_of(request.from_account), bank_of(request.to_account)
        except (MoneyError, ValueError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        note(amount=f"{paise_to_rupees(amount):.2f}")
        vote = self.ledger.prepare(txn_id, request.from_account, request.to_account, amount)
        note(vote="yes" if vote.yes else "no")
        return payment_pb2.Vote(vote=vote.yes, reason=vote.reason)

    def Commit(self, request: payment_pb2.CommitRequest, context: grpc.ServicerContext) -> payment_pb2.Ack:
        outcome = self.ledger.commit(self._txn_id(request, context))
        return payment_pb2.Ack(success=outcome.ok, message=outcome.message)

    def Abort(self, request: payment_pb2.AbortRequest, context: grpc.ServicerContext) -> payment_pb2.Ack:
        outcome = self.ledger.abort(self._txn_id(request, context))
        return payment_pb2.Ack(success=outcome.ok, message=outcome.message)

    def GetBalance(self, request: payment_pb2.BankBalanceRequest,
                   context: grpc.ServicerContext) -> payment_pb2.BankBalanceResponse:
        account = request.account_number
        note(account=account[:80])
        balance = self.ledger.balance(account)
        if balance is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"account {account[:80]} does not exist at {self.ledger.bank}")
        return payment_pb2.BankBalanceResponse(balance=paise_to_rupees(balance.balance),
                                               available=paise_to_rupees(balance.available),
                                               balance_paise=balance.balance, available_paise=balance.available)


def serve(settings: BankSettings) -> None:
    banks = load_banks(settings.config_dir)
    if settings.bank not in banks:
        raise ConfigError(f"bank {settings.bank!r} is not in {settings.config_dir / 'banks.json'}"
                          f" (known: {', '.join(sorted(banks))})")
    credentials = serving.server_credentials(settings.certs_dir, settings.bank, require_client_auth=True)
    ledger = Ledger(settings.ledger_path, settings.bank,
                    lambda: load_opening_balances(settings.config_dir, settings.bank))
    server = serving.make_server([LoggingInterceptor(), PeerCertInterceptor({GATEWAY_CN})])
    payment_pb2_grpc.add_BankServicer_to_server(BankServicer(ledger), server)
    health = serving.add_health(server)
    serving.bind(server, settings.port, credentials)
    server.start()
    log.info("bank %s listening on port %d, ledger %s", settings.bank, settings.port, settings.ledger_path)
    serving.run_until_signalled(server, health, grace=5.0, on_stop=ledger.close)


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    serving.configure_logging(f"bank[{settings.bank}]")
    try:
        serve(settings)
    except (serving.StartupError, ConfigError, ValueError, OSError) as exc:
        serving.exit_on_startup_error(f"bank {settings.bank}", exc)


if __name__ == "__main__":
    main()
    sys.exit(0)
