"""The embedded store: one SQLite file in --data-dir (the default; `run_all.py` needs no database server).

Gateway processes started on one data directory share it and give exactly-once together (CONTRACT §5): SQLite
admits one writer at a time, so a claim is atomic across them, and an owner is alive while it holds its `flock`
(`owners.Owner`), which the kernel drops whenever the process dies. A flock cannot be lost while its process
lives, so this store is always live.

Writes go through a group committer on the event loop: every write submitted while the previous batch was
being written shares one transaction and one fsync, and a caller's awaitable resolves only once its batch is
on disk (`sqlite_store.GroupCommitter`). The SQL lives in `sqlite_payments` and `sqlite_sessions`.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path
from typing import Callable

from servers.gateway.store.owners import Owner
from servers.gateway.store.records import Claim, HistoryRow, Payment
from servers.gateway.store.sqlite_payments import PaymentStore
from servers.gateway.store.sqlite_sessions import Sessions
from servers.sqlite_store import GroupCommitter, SQLiteStore

FILE_NAME = "gateway.sqlite3"


class SQLiteGatewayStore:
    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self.display_url = str(self.path)
        self._sqlite = SQLiteStore(self.path, "", preallocate=True)
        self._owner = Owner(Path(data_dir))
        self.payments = PaymentStore(self._sqlite, self._owner)
        self.sessions = Sessions(self._sqlite)
        self._db = GroupCommitter(self._sqlite, commit_in_thread=True)
        # History reads run here, off the event loop: they are bounded in rows but not in disk reads (old pages
        # of a large store may not be cached), and the loop serves every payment. Threads of their own, not
        # the default executor, where a flood of Logins queues scrypt checks. Each thread reads on its own
        # connection (SQLiteStore.connection is per thread).
        self._reads = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="strife-read")

    @property
    def owner_id(self) -> str:
        return self._owner.id

    def is_live(self) -> bool:
        return True

    def on_liveness_change(self, callback: Callable[[bool], None]) -> None:
        pass  # never changes while the process lives

    async def start(self) -> None:
        pass  # opened (and its schema made) in the constructor

    async def close(self) -> None:
        self._reads.shutdown(wait=True)  # before the store closes the read threads' connections
        self._db.close()
        self._sqlite.close()
        self._owner.release()

    # ---- the payment's life ----------------------------------------------------------------------------------
    def claim(self, username: str, key: str, from_account: str, to_account: str, amount: int,
              may_insert: bool = True) -> "asyncio.Future[Claim]":
        # The group committer's own future: no task per payment on the hot path.
        claim = self._db.submit(self.payments.claim_in, username, key, from_account, to_account, amount,
                                may_insert)
        claim.add_done_callback(self._forget_previous_owner)
        return claim

    def _forget_previous_owner(self, claim: "asyncio.Future[Claim]") -> None:
        if not claim.cancelled() and claim.exception() is None:
            self.payments.forget_previous_owner(claim.result())

    def decide(self, payment: Payment, commit: bool, status: str, message: str,
               response: bytes) -> "asyncio.Future[None]":
        return self._db.submit(self.payments.decide_in, payment, commit, status, message, response)

    def finish(self, payment: Payment) -> "asyncio.Future[None]":
        return self._db.submit(self.payments.finish_in, payment)

    def finish_later(self, payment: Payment) -> "asyncio.Future[None]":
        # Lazily batched: it rides along with the next batch, keeping its fsync off the reply being sent.
        return self._db.submit_lazy(self.payments.finish_in, payment)

    def release(self, payment: Payment) -> "asyncio.Future[None]":
        return self._db.submit(self.payments.release_in, payment)

    async def take_over_abandoned(self, limit: int) -> list[Payment]:
        taken, dead = await self._db.run(self.payments.take_over_abandoned_in, limit)
        self.payments.forget_dead(dead)
        return taken

    async def owned_unfinished(self) -> list[Payment]:
        return self.payments.owned_unfinished()

    async def history(self, username: str, accounts: tuple[str, ...], limit: int) -> list[HistoryRow]:
        return await asyncio.get_running_loop().run_in_executor(self._reads, self.payments.history, username,
                                                                accounts, limit)

    async def sweep_keys(self, ttl_seconds: float) -> int:
        return await asyncio.get_running_loop().run_in_executor(self._reads, self.payments.sweep, ttl_seconds)

    # ---- sessions ---------------------------------------------------------------------------------------------
    async def create_session(self, username: str, credential: str, ttl: float) -> tuple[str, float]:
        return await self._db.run(self.sessions.create_in, username, credential, ttl)

    async def resolve_session(self, token: str) -> tuple[str, str] | None:
        return self.sessions.resolve(token)  # one indexed read by primary key: on the loop

    async def end_session(self, token: str) -> str | None:
        return await self._db.run(self.sessions.revoke_in, token)  # every call after this reads the change

    async def sweep_sessions(self) -> int:
        return await asyncio.get_running_loop().run_in_executor(self._reads, self.sessions.sweep)

