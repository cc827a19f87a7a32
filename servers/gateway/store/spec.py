"""Which store a `--store` value (or STRIFE_STORE) names, and opening it (CONTRACT §9)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from urllib.parse import urlsplit

from servers.gateway.store.interface import GatewayStore
from servers.gateway.store.url import mask_url

SQLITE = "sqlite"
_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def check_spec(spec: str) -> str:
    """`sqlite` or a PostgreSQL URL (CONTRACT §9); ValueError (naming no password) for anything else."""
    spec = spec.strip()
    if spec == SQLITE:
        return spec
    if spec.startswith(_POSTGRES_SCHEMES):
        try:
            urlsplit(spec).port  # a port that is not a number from 0 to 65535 raises here, before any connection
        except ValueError:
            raise ValueError(f"the port in the store URL {mask_url(spec)} must be a number from 1 to 65535") from None
        return spec
    # Never the value itself if it could hold a password (user:secret@host).
    shown = spec.split("://", 1)[0] + "://…" if "://" in spec else ("a value with '@'" if "@" in spec else repr(spec))
    raise ValueError(f"store must be 'sqlite' or a postgresql://USER@HOST[:PORT]/DB URL, not {shown}")


def store_argument(value: str) -> str:
    """`--store`'s argparse type."""
    try:
        return check_spec(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def store_or_environment(given: str | None, parser: argparse.ArgumentParser) -> str:
    """`--store` if given, else $STRIFE_STORE, else sqlite (CONTRACT §9); a bad $STRIFE_STORE is the parser's error."""
    if given is not None:
        return given
    try:
        return check_spec(os.environ.get("STRIFE_STORE") or SQLITE)
    except ValueError as exc:
        parser.error(f"STRIFE_STORE: {exc}")


def open_store(spec: str, data_dir: Path) -> GatewayStore:
    """The store `spec` names, not yet started (`await store.start()`)."""
    if check_spec(spec) == SQLITE:
        from servers.gateway.store.sqlite import SQLiteGatewayStore
        return SQLiteGatewayStore(data_dir)
    from servers.gateway.store.postgres import PostgresStore
    return PostgresStore(spec)
