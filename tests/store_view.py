"""What tests read from the gateway's store, on either backend: a key's row, the payments under a key, counts.

The gateway's own store code is not used (a test must see what is on disk, not what the code under test says);
each backend is read with its own driver, read-only, one short connection per question.
"""
from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protofiles import payment_pb2 as pb


@dataclass(frozen=True)
class KeyRow:
    txn_id: str
    recovery_point: str
    owner: str | None            # the owner id as the gateway logs it (SQLite: "pid-hex"; PostgreSQL: a number)
    response: pb.PaymentResponse | None
    epoch: int = 0


class StoreView:
    """Read-only questions about a gateway store (`sqlite` in a data directory, or a PostgreSQL URL)."""

    def __init__(self, store: str, data_dir: Path) -> None:
        self.store = store
        self.data_dir = data_dir
        self.postgres = store != "sqlite"

    def _rows(self, sqlite_sql: str, postgres_sql: str, *args: Any) -> list[tuple]:
        if not self.postgres:
            path = self.data_dir / "gateway.sqlite3"
            if not path.exists():
                return []
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
                return db.execute(sqlite_sql, args).fetchall()
        return asyncio.run(self._pg_rows(postgres_sql, args))

    async def _pg_rows(self, statement: str, args: tuple) -> list[tuple]:
        import asyncpg

        conn = await asyncpg.connect(self.store, timeout=10)
        try:
            return [tuple(r) for r in await conn.fetch(statement, *args)]
        finally:
            await conn.close()

    def key_row(self, user: str, idem_key: str) -> KeyRow | None:
        rows = self._rows(
            "SELECT p.txn_id, k.recovery_point, k.locked_by, k.response, 0 FROM idempotency_keys k"
            " JOIN payments p ON p.id = k.payment_id WHERE k.username = ? AND k.idem_key = ?",
            "SELECT p.txn_id, k.recovery_point, k.owner::text, k.response, k.epoch FROM idempotency_keys k"
            " JOIN payments p ON p.id = k.payment_id WHERE k.username = $1 AND k.idem_key = $2", user, idem_key)
        if not rows:
            return None
        txn, point, owner, response, epoch = rows[0]
        return KeyRow(txn, point, owner, None if response is None else pb.PaymentResponse.FromString(response),
                      epoch)

    def payments_with_key(self, user: str, idem_key: str) -> list[tuple[str, str]]:
        """(txn_id, status) of every payment ever executed under this key, oldest first."""
        return self._rows("SELECT txn_id, status FROM payments WHERE username = ? AND idem_key = ? ORDER BY id",
                          "SELECT txn_id, status FROM payments WHERE username = $1 AND idem_key = $2 ORDER BY id",
                          user, idem_key)

    def payments(self) -> list[tuple[str, str, str, str, str, int, str]]:
        """Every payment: (username, idem_key, txn_id, from_account, to_account, amount in paise, status)."""
        sql = "SELECT username, idem_key, txn_id, from_account, to_account, amount, status FROM payments ORDER BY id"
        return self._rows(sql, sql)

    def undecided_by_owner(self) -> dict[str, int]:
        """Owner id (as the gateway logs it) → how many undecided ('started') payments it holds right now."""
        sql = ("SELECT {0}, count(*) FROM idempotency_keys WHERE recovery_point = 'started' AND {0} IS NOT NULL"
               " GROUP BY 1")
        return dict(self._rows(sql.format("locked_by"), sql.format("owner::text")))

    def count_keys(self, recovery_point: str | None = None, *, unfinished: bool = False) -> int:
        where, args = "", ()
        if unfinished:
            where = " WHERE recovery_point != 'finished'"
        elif recovery_point is not None:
            where, args = " WHERE recovery_point = {}", (recovery_point,)
        sql = "SELECT count(*) FROM idempotency_keys" + where
        return self._rows(sql.format("?"), sql.format("$1"), *args)[0][0]

    def unfinished(self) -> int:
        return self.count_keys(unfinished=True)
