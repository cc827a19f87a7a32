"""Which store a `--store` value (or STRIFE_STORE) names, and opening it (CONTRACT §9)."""
from __future__ import annotations

from pathlib import Path

from servers.gateway.store.interface import GatewayStore

SQLITE = "sqlite"
_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def check_spec(spec: str) -> str:
    """`sqlite` or a PostgreSQL URL (CONTRACT §9); ValueError (naming no password) for anything else."""
    spec = spec.strip()
    if spec == SQLITE or spec.startswith(_POSTGRES_SCHEMES):
        return spec
    # Never the value itself if it could hold a password (user:secret@host).
    shown = spec.split("://", 1)[0] + "://…" if "://" in spec else ("a value with '@'" if "@" in spec else repr(spec))
    raise ValueError(f"store must be 'sqlite' or a postgresql://USER@HOST[:PORT]/DB URL, not {shown}")


def open_store(spec: str, data_dir: Path) -> GatewayStore:
    """The store `spec` names, not yet started (`await store.start()`)."""
    if check_spec(spec) == SQLITE:
        from servers.gateway.store.sqlite import SQLiteGatewayStore
        return SQLiteGatewayStore(data_dir)
    from servers.gateway.store.postgres import PostgresStore
    return PostgresStore(spec)
