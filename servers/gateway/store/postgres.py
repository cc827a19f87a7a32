"""The gateway's store on PostgreSQL, shared by any number of gateway replicas (CONTRACT §9).

Each method is one committed transaction (synchronous_commit on, durable when it returns) on a bounded asyncpg
pool; the payment's life costs one round trip per step: claim (a new key, or a replay), decide, finish (several
finishes share one statement). Exactly-once across machines rests on three things (see the Design notes):
- the key's primary key: among any number of concurrent claims of one key, exactly one inserts it;
- liveness (pg_liveness): a payment is taken from its owner only when the owner's session lock is free;
- fencing: a take-over bumps the payment's epoch, and every later write is a compare-and-set on (owner, epoch),
  so a replica that lost its session, however late it wakes up, cannot write over a survivor's decision.

A write whose outcome is unknown (the connection dropped after the statement was sent) may have left this
replica holding a payment nobody executes; such payments are released (`owner` NULL, fenced on the exact
payment) at the next completer pass, so a retry or any completer finishes them.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, AsyncIterator, Callable

from servers.gateway.store import postgres_sql as sql
from servers.gateway.store.errors import StoreUnavailable
from servers.gateway.store.pg_connection import (POOL_LOGGER, OneLineOutages, PostgresOptions, is_broken,
                                                 is_unavailable, server_settings)
from servers.gateway.store.pg_liveness import Liveness
from servers.gateway.store.url import mask_url, scrub
from servers.gateway.store.records import (Claim, ClaimKind, HistoryRow, LostOwnership, Payment, Point, fingerprint,
                                           new_token, new_txn_id, token_key)

log = logging.getLogger("strife.store.postgres")

def _payment(row: Any) -> Payment:
    return Payment(row["id"], row["txn_id"], row["username"], row["idem_key"], row["from_account"],
                   row["to_account"], row["amount"], Point(row["recovery_point"]), row["response"], row["epoch"])


class PostgresStore:
    def __init__(self, url: str, options: PostgresOptions = PostgresOptions(), *,
                 query_logger: Callable[[Any], None] | None = None) -> None:
        self._url = url
        self.options = options
        self.display_url = mask_url(url)
        self._query_logger = query_logger  # asyncpg's LoggedQuery for every pooled statement (tests, debugging)
        self._pool: Any = None
        self._liveness: Liveness | None = None
        self._observers: list[Callable[[bool], None]] = []
        self._unsettled: list[Payment] = []  # held by this owner maybe, executed by nobody: release them
        self._finish_queue: list[tuple[Payment, asyncio.Future[None]]] = []
        self._finisher: asyncio.Task | None = None
        self._pool_log_filter = OneLineOutages(self._describe)

    # ---- identity and liveness --------------------------------------------------------------------------------
    @property
    def owner_number(self) -> int | None:
        return self._liveness.number if self._liveness else None

    @property
    def owner_id(self) -> str:
        return str(self.owner_number) if self.owner_number is not None else "-"

    def is_live(self) -> bool:
        return self._liveness is not None and self._liveness.live

    def on_liveness_change(self, callback: Callable[[bool], None]) -> None:
        self._observers.append(callback)

    def _liveness_changed(self, live: bool) -> None:
        if live:
            # A new identity: whatever the old one held is recovered as a dead owner's, by every completer.
            self._unsettled.clear()
        for callback in list(self._observers):
            try:
                callback(live)
            except Exception:  # noqa: BLE001 - one observer must not keep the news from the others
                log.exception("liveness callback failed")

    def _me(self) -> int:
        """This replica's owner number for new work; refuses while the liveness session is lost."""
        if not self.is_live():
            raise StoreUnavailable(f"this gateway replica has lost its session with the payment store "
                                   f"{self.display_url}; it takes no payments until it is back (retry, here or "
                                   "on another replica)")
        return self._liveness.number  # type: ignore[union-attr,return-value]

    def _owner_of(self, payment: Payment) -> int:
        """The owner number a write on `payment` is fenced on; a replica without its session owns nothing."""
        if not self.is_live():
            raise LostOwnership(f"payment {payment.txn_id}: this replica lost its store session, so it may no "
                                "longer own the payment; a completer finishes it")
        return self._liveness.number  # type: ignore[union-attr,return-value]

    # ---- start and stop ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, migrate (under a lock), take liveness. Raises StoreUnavailable with one masked line."""
        import asyncpg  # lazily: a gateway on SQLite never needs the driver

        o = self.options

        async def no_reset(_conn: Any) -> None:
            # The pool's default reset is an extra round trip per call; our calls leave no session state
            # (advisory locks here are transaction-scoped), and asyncpg still rolls back an open transaction.
            return None

        async def init(conn: Any) -> None:
            if self._query_logger is not None:
                conn.add_query_logger(self._query_logger)

        logging.getLogger(POOL_LOGGER).addFilter(self._pool_log_filter)
        try:
            self._pool = await asyncpg.create_pool(
                self._url, min_size=o.pool_min, max_size=o.pool_max, timeout=o.connect_timeout,
                command_timeout=o.command_timeout, server_settings=server_settings(o), reset=no_reset,
                init=init)
            async with self._pool.acquire(timeout=o.connect_timeout) as conn:
                durability = await conn.fetchval("SHOW synchronous_commit")
                if durability == "off":
                    raise StoreUnavailable(f"the payment store {self.display_url} runs with synchronous_commit "
                                           "off (a pooler dropping session settings?): commits would not be durable")
                applied = await sql.migrate(conn)
            if applied:
                log.info("store %s: applied schema migrations %s", self.display_url, applied)
            self._liveness = Liveness(
                lambda: asyncpg.connect(self._url, timeout=o.connect_timeout, server_settings=server_settings(o)),
                describe=self._describe, on_change=self._liveness_changed, check_interval=o.liveness_interval,
                check_timeout=o.liveness_timeout)
            await self._liveness.start()
        except BaseException as exc:
            await self.close()
            if isinstance(exc, StoreUnavailable) or not isinstance(exc, Exception):
                raise
            why = str(exc) if isinstance(exc, sql.SchemaTooNew) else self._describe(exc)
            raise StoreUnavailable(f"cannot use the payment store {self.display_url}: {why}") from None
        log.info("store %s: this replica is owner %s", self.display_url, self.owner_id)

    async def close(self) -> None:
        if self._finisher is not None:
            await asyncio.gather(self._finisher, return_exceptions=True)
        if self._liveness is not None:
            await self._liveness.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self.options.command_timeout)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - a pool whose store is gone
                pool.terminate()
        logging.getLogger(POOL_LOGGER).removeFilter(self._pool_log_filter)

    # ---- plumbing ---------------------------------------------------------------------------------------------
    def _describe(self, exc: BaseException) -> str:
        text = " ".join(str(exc).split()) or "no details"
        return scrub(f"{type(exc).__name__}: {text}", self._url)

    @asynccontextmanager
    async def _connection(self, what: str) -> AsyncIterator[Any]:
        """A pooled connection; connection trouble (refused, lost, timed out) comes out as StoreUnavailable."""
        if self._pool is None:
            raise StoreUnavailable(f"the payment store {self.display_url} is not open")
        try:
            async with self._pool.acquire(timeout=self.options.command_timeout) as conn:
                try:
                    yield conn
                except Exception as exc:
                    if is_broken(exc):
                        conn.terminate()  # the pool opens a fresh one for the next call
                    raise
        except (StoreUnavailable, LostOwnership):
            raise
        except Exception as exc:
            if not (is_unavailable(exc) or is_broken(exc)):
                raise
            raise StoreUnavailable(f"the payment store {self.display_url} is unavailable ({what}): "
                                   f"{self._describe(exc)}") from None

    def _unsettle(self, payment: Payment) -> None:
        """A write on `payment` may or may not have committed: make sure it ends up released, not stuck."""
        self._unsettled.append(payment)

    # ---- the payment's life -----------------------------------------------------------------------------------
    async def claim(self, username: str, key: str, from_account: str, to_account: str, amount: int,
                    may_insert: bool = True) -> Claim:
        me = self._me()
        fp = fingerprint(from_account, to_account, amount)
        attempt = Payment(0, new_txn_id(), username, key, from_account, to_account, amount,
                          Point.STARTED, None, 1)
        in_doubt: Payment | None = None
        try:
            async with self._connection("claim") as conn:
                for _ in range(5):
                    if may_insert:
                        in_doubt = attempt
                        rows = await conn.fetch(sql.CLAIM, username, key, fp, me, attempt.txn_id, from_account,
                                                to_account, amount)
                        in_doubt = None
                    else:  # today's configuration refuses a new key: only look for a stored one
                        rows = await conn.fetch(sql.FIND_KEY, username, key)
                        if not rows:
                            return Claim(ClaimKind.REFUSED)
                    new = [r for r in rows if r["new"]]
                    if new:
                        return Claim(ClaimKind.NEW, replace(attempt, id=new[0]["id"]))
                    if rows and (known := self._known(rows[0], fp, me)):
                        return known
                    # Undecided, or inserted by a concurrent claim after this statement's snapshot: decide
                    # under the row's lock.
                    async with conn.transaction():
                        row = await conn.fetchrow(sql.CLAIM_LOCKED, username, key)
                        if row is None and not may_insert:
                            return Claim(ClaimKind.REFUSED)
                        if row is None:
                            continue  # the other claim rolled back, or the key was swept: claim it afresh
                        if known := self._known(row, fp, me):
                            return known
                        previous = row["owner"]
                        epoch = await conn.fetchval(sql.RESUME, username, key, previous, me)
                        if epoch is None:
                            return Claim(ClaimKind.IN_FLIGHT, _payment(row))
                        in_doubt = replace(_payment(row), epoch=epoch)
                    resumed, in_doubt = in_doubt, None
                    return Claim(ClaimKind.RESUMED, resumed,
                                 previous_owner=None if previous is None else str(previous))
            raise StoreUnavailable(f"the payment store {self.display_url} kept changing key {key!r} under this "
                                   "claim; retry")
        except BaseException:
            if in_doubt is not None:
                self._unsettle(in_doubt)
            raise

    @staticmethod
    def _known(row: Any, fp: str, me: int) -> Claim | None:
        """What a found key means without taking it: a mismatch, a replay, or in flight here (a duplicate
        request); None when it is undecided and another owner's — the caller takes it over if that one is dead."""
        if row["fingerprint"] != fp:
            return Claim(ClaimKind.MISMATCH, _payment(row))
        if row["response"] is not None:
            return Claim(ClaimKind.REPLAY, _payment(row))
        if row["owner"] == me:
            return Claim(ClaimKind.IN_FLIGHT, _payment(row))
        return None

    async def decide(self, payment: Payment, commit: bool, status: str, message: str, response: bytes) -> None:
        """Record the decision and the client's response, durably, before any bank hears of it."""
        me = self._owner_of(payment)
        point = Point.COMMIT_DECIDED if commit else Point.ABORT_DECIDED
        async with self._connection("decide") as conn:
            decided = await conn.fetchval(sql.DECIDE, payment.username, payment.idem_key, me, payment.epoch,
                                          point.value, response, status, message)
        if decided is None:
            raise LostOwnership(f"payment {payment.txn_id} is not an undecided payment of owner {me} at epoch "
                                f"{payment.epoch}: another replica took it over, or it was let go")

    async def finish(self, payment: Payment) -> None:
        """Every bank acknowledged the decision: mark it finished and let it go."""
        if (payment.username, payment.idem_key) not in await self._finish_many([payment]):
            raise LostOwnership(f"payment {payment.txn_id} is not a decided payment of owner {self.owner_id} at "
                                f"epoch {payment.epoch}")

    def finish_later(self, payment: Payment) -> "asyncio.Future[None]":
        """`finish`, not awaited by the caller: finishes queued meanwhile share one statement. If it is lost,
        the payment stays decided and owned, and the completer re-sends the decision and finishes it."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._finish_queue.append((payment, future))
        if self._finisher is None or self._finisher.done():
            self._finisher = asyncio.ensure_future(self._drain_finishes())
        return future

    async def _drain_finishes(self) -> None:
        while self._finish_queue:
            batch = self._finish_queue[:self.options.finish_batch]
            del self._finish_queue[:len(batch)]
            try:
                done = await self._finish_many([p for p, _ in batch])
            except Exception as exc:  # noqa: BLE001 - handed to each waiter
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for payment, future in batch:
                if future.done():
                    continue
                if (payment.username, payment.idem_key) in done:
                    future.set_result(None)
                else:
                    future.set_exception(LostOwnership(f"payment {payment.txn_id} was not finished: not a decided "
                                                       f"payment of this owner at epoch {payment.epoch}"))

    async def _finish_many(self, payments: list[Payment]) -> set[tuple[str, str]]:
        if not payments:
            return set()
        me = self._owner_of(payments[0])
        async with self._connection("finish") as conn:
            rows = await conn.fetch(sql.FINISH, [p.username for p in payments], [p.idem_key for p in payments],
                                    [p.epoch for p in payments], me)
        return {(r["username"], r["idem_key"]) for r in rows}

    async def release(self, payment: Payment) -> None:
        """Let go of a payment this replica cannot push further now, so any completer (or a retry) takes it.
        Never raises: when the store is unreachable the release is retried by the next completer pass, and a
        replica that lost its session owns nothing to release."""
        if not self.is_live():
            return
        try:
            await self._release(payment)
        except LostOwnership:
            return  # the session was lost meanwhile: the old identity's payments are recovered as a dead owner's
        except StoreUnavailable as exc:
            log.warning("could not release payment %s now (%s); retrying at the next completer pass",
                        payment.txn_id, exc)
            self._unsettle(payment)

    async def _release(self, payment: Payment) -> None:
        async with self._connection("release") as conn:
            await conn.execute(sql.RELEASE, payment.username, payment.idem_key, self._owner_of(payment),
                               payment.epoch, payment.txn_id)

    async def _settle(self) -> None:
        while self._unsettled and self.is_live():
            payment = self._unsettled[0]
            await self._release(payment)  # StoreUnavailable: keep it for the next pass
            if self._unsettled and self._unsettled[0] is payment:
                self._unsettled.pop(0)

    async def take_over_abandoned(self, limit: int) -> list[Payment]:
        """Unfinished payments whose owner is dead or NULL, now this replica's (epoch bumped). A live owner's
        payment is never taken; concurrent completers skip each other's rows; a dead owner's payment is found
        by its owner, however many live-owned payments there are."""
        if not self.is_live():
            return []
        await self._settle()
        me = self._me()
        taken: list[Payment] = []
        try:
            async with self._connection("take-over") as conn:
                async with conn.transaction():  # explicit, so that a lost COMMIT leaves us knowing what we took
                    taken = [_payment(r) for r in await conn.fetch(sql.TAKE_OVER, me, limit)]
        except BaseException:
            for payment in taken:
                self._unsettle(payment)
            raise
        return taken

    async def owned_unfinished(self) -> list[Payment]:
        if not self.is_live():
            return []
        me = self._me()
        async with self._connection("owned payments") as conn:
            return [_payment(r) for r in await conn.fetch(sql.OWNED_UNFINISHED, me)]

    async def history(self, username: str, accounts: tuple[str, ...], limit: int) -> list[HistoryRow]:
        """Sent by the user (any status) and received into `accounts` (succeeded), newest first."""
        async with self._connection("history") as conn:
            rows = await conn.fetch(sql.HISTORY, username, list(accounts), limit)
        return [HistoryRow(r["txn_id"], r["username"], r["idem_key"], r["from_account"], r["to_account"], r["amount"],
                           r["status"], r["message"], r["created_at"], r["finished_at"]) for r in rows]

    async def sweep_keys(self, ttl_seconds: float) -> int:
        """Delete finished keys older than the TTL, a batch per transaction (their payments stay)."""
        return await self._sweep(sql.SWEEP_KEYS, float(ttl_seconds))

    async def _sweep(self, statement: str, *args: Any) -> int:
        batch = self.options.sweep_batch
        total = 0
        while True:
            async with self._connection("sweep") as conn:
                status = await conn.execute(statement, *args, batch)
            deleted = int(status.split()[-1])
            total += deleted
            if deleted < batch:
                return total

    # ---- sessions ---------------------------------------------------------------------------------------------
    async def create_session(self, username: str, credential: str, ttl: float) -> tuple[str, float]:
        token = new_token()
        async with self._connection("login") as conn:
            expires = await conn.fetchval(sql.CREATE_SESSION, token_key(token), username, credential, float(ttl))
        return token, expires

    async def resolve_session(self, token: str) -> tuple[str, str] | None:
        if (key := token_key(token)) is None:
            return None
        async with self._connection("session") as conn:
            row = await conn.fetchrow(sql.RESOLVE_SESSION, key)
        return None if row is None else (row["username"], row["credential"])

    async def end_session(self, token: str) -> str | None:
        if (key := token_key(token)) is None:
            return None
        async with self._connection("logout") as conn:
            return await conn.fetchval(sql.END_SESSION, key)

    async def sweep_sessions(self) -> int:
        return await self._sweep(sql.SWEEP_SESSIONS)
