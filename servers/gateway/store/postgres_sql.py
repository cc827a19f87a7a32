"""The SQL of the PostgreSQL store: its migrations, and every statement the store runs, in one place.

Statements use asyncpg's `$n` parameters. Times are seconds since the epoch by the store's clock (`NOW`), so
replicas on machines whose clocks differ agree on TTLs and session expiry.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

# Advisory lock keys (the two-int form, so they cannot collide with a single-bigint key of another program):
# (OWNER_LOCK_SPACE, owner number) is held by a live replica for its whole life; MIGRATION_LOCK serialises
# schema upgrades. Advisory locks are per database, so two Strife stores in one cluster never interfere.
OWNER_LOCK_SPACE = 0x53545246  # "STRF"
MIGRATION_LOCK = (0x5354524D, 0)  # "STRM"

NOW = "extract(epoch FROM now())::float8"  # float8, as the columns: a numeric would hide their indexes

_PAYMENT = ("p.id, p.txn_id, k.username, k.idem_key, p.from_account, p.to_account, p.amount, k.recovery_point,"
            " k.response, k.epoch")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The numbered `.sql` files shipped in migrations/postgres, in order."""
    folder = resources.files("servers.gateway.store").joinpath("migrations", "postgres")
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d+)_(\w+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..n without gaps, found {[m.version for m in found]}")
    return found


class SchemaTooNew(Exception):
    """The database was migrated by a newer gateway."""


MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


async def migrate(conn, timeout: float = 600.0) -> list[int]:  # conn: asyncpg.Connection (imported lazily)
    """Apply every migration not yet applied, in one transaction under the migration lock; return the versions
    applied. Replicas starting at once on an empty database queue on the lock: the first creates everything,
    the others then find it done. Bounded by `timeout`, not by the serving statement timeout: a replica may wait
    behind another's long migration (an index on a big table), and must not give up on start for that."""
    applied_now: list[int] = []
    async with conn.transaction():
        await conn.execute(f"SET LOCAL statement_timeout = {int(timeout * 1000)}", timeout=timeout)
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", *MIGRATION_LOCK, timeout=timeout)
        await conn.execute(MIGRATIONS_TABLE, timeout=timeout)
        done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations", timeout=timeout)}
        known = migrations()
        if done and max(done) > len(known):
            # A newer gateway has changed the schema in ways this one does not know: refuse rather than guess.
            raise SchemaTooNew(f"its schema is at version {max(done)}, newer than this gateway knows ({len(known)}):"
                               " run the newer gateway, or restore a back-up of the database taken before it")
        for migration in known:
            if migration.version in done:
                continue
            await conn.execute(migration.sql, timeout=timeout)
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                               migration.version, migration.name, timeout=timeout)
            applied_now.append(migration.version)
    return applied_now


# ---- liveness (on the replica's own connection) -----------------------------------------------------------------
# A fresh owner number and its lock, in one statement: no row can name a number before its lock is held. The
# session is named after the number (pg_stat_activity.application_name), so an operator can tell which backend
# is which replica's liveness, and what ending it would do, without decoding advisory locks.
LIVENESS_APPLICATION = "strife-gateway-liveness owner="
TAKE_IDENTITY = (f"SELECT n, pg_try_advisory_lock({OWNER_LOCK_SPACE}, n), pg_backend_pid(),"
                 f" set_config('application_name', '{LIVENESS_APPLICATION}' || n, false)"
                 " FROM (SELECT nextval('owner_numbers')::integer AS n) AS fresh")
# After a lost session: end the old one if the server still has it (a false alarm, or a half-open socket), so
# its payments are free for take-over now rather than once TCP keepalives give up. Found by the lock it holds,
# never by a pid alone (a pid may have been reused by another session) — and by its mode: the owner's session
# lock is exclusive, while another replica probing that owner's liveness holds a shared one for an instant, and
# its connection must not be ended with it.
END_OLD_IDENTITY = (f"SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
                    f" AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                    f" AND classid = {OWNER_LOCK_SPACE}::oid AND objid = $1::integer::oid AND objsubid = 2"
                    " AND mode = 'ExclusiveLock' AND granted AND pid <> pg_backend_pid()")
PING = "SELECT 1"

# ---- the payment's life -----------------------------------------------------------------------------------------
# Claim, one round trip: insert the key (and its payment) unless it exists; if it existed before this
# statement, return it. A key inserted by a concurrent transaction after this statement's snapshot returns no
# row at all (ON CONFLICT waited for it, the snapshot cannot see it): the caller then reads it with FOR UPDATE.
# $1 username, $2 key, $3 fingerprint, $4 owner, $5 txn_id, $6 from, $7 to, $8 amount.
CLAIM = f"""
WITH inserted AS (
    INSERT INTO idempotency_keys (username, idem_key, fingerprint, payment_id, recovery_point, owner, epoch,
                                  created_at, last_run_at)
    VALUES ($1, $2, $3, nextval('payment_ids'), 'started', $4, 1, {NOW}, {NOW})
    ON CONFLICT DO NOTHING
    RETURNING payment_id, created_at
), payment AS (
    INSERT INTO payments (id, txn_id, username, idem_key, from_account, to_account, amount, status, created_at)
    SELECT payment_id, $5, $1, $2, $6, $7, $8, 'processing', created_at FROM inserted
    RETURNING id, txn_id, from_account, to_account, amount
)
SELECT true AS new, id, txn_id, $1 AS username, $2 AS idem_key, from_account, to_account, amount,
       'started' AS recovery_point, NULL::bytea AS response, 1::bigint AS epoch, $3 AS fingerprint, $4 AS owner
FROM payment
UNION ALL
SELECT false, {_PAYMENT}, k.fingerprint, k.owner
FROM idempotency_keys k JOIN payments p ON p.id = k.payment_id
WHERE k.username = $1 AND k.idem_key = $2"""

# A key as it stands (a claim that may not insert one: today's configuration refuses the request).
FIND_KEY = f"""
SELECT false AS new, {_PAYMENT}, k.fingerprint, k.owner
FROM idempotency_keys k JOIN payments p ON p.id = k.payment_id
WHERE k.username = $1 AND k.idem_key = $2"""
CLAIM_LOCKED = FIND_KEY + "\nFOR UPDATE OF k"

# Resume an undecided payment (its row locked by the caller's transaction) whose owner $3 is dead or NULL: the
# probe and the epoch bump commit together. A shared probe never blocks another prober, only a live owner.
# $1 username, $2 key, $3 previous owner (NULL: let go), $4 me.
RESUME = f"""
UPDATE idempotency_keys SET owner = $4, epoch = epoch + 1, last_run_at = {NOW}
WHERE username = $1 AND idem_key = $2 AND owner IS NOT DISTINCT FROM $3::integer AND recovery_point = 'started'
  AND ($3::integer IS NULL OR pg_try_advisory_xact_lock_shared({OWNER_LOCK_SPACE}, $3::integer))
RETURNING epoch"""

# Record the decision and the response, fenced on owner, epoch and the recovery point, in one statement.
# $1 username, $2 key, $3 owner, $4 epoch, $5 decided point, $6 response, $7 status, $8 message.
DECIDE = f"""
WITH decided AS (
    UPDATE idempotency_keys SET recovery_point = $5, response = $6, finished_at = {NOW}, last_run_at = {NOW}
    WHERE username = $1 AND idem_key = $2 AND owner = $3 AND epoch = $4 AND recovery_point = 'started'
    RETURNING payment_id
)
UPDATE payments p SET status = $7, message = $8, finished_at = {NOW}
FROM decided WHERE p.id = decided.payment_id
RETURNING p.id"""

# Finish several payments at once (fenced each on its epoch). $1 usernames, $2 keys, $3 epochs, $4 owner.
FINISH = f"""
UPDATE idempotency_keys k SET recovery_point = 'finished', owner = NULL, last_run_at = {NOW}
FROM unnest($1::text[], $2::text[], $3::bigint[]) AS f(username, idem_key, epoch)
WHERE k.username = f.username AND k.idem_key = f.idem_key AND k.epoch = f.epoch AND k.owner = $4
  AND k.recovery_point IN ('commit_decided', 'abort_decided')
RETURNING k.username, k.idem_key"""

# Let go of one payment. The txn id pins the exact payment: a claim whose reply was lost is released by it,
# and must not release a later claim of the same key. $1 username, $2 key, $3 owner, $4 epoch, $5 txn_id.
RELEASE = """
UPDATE idempotency_keys k SET owner = NULL
FROM payments p
WHERE k.username = $1 AND k.idem_key = $2 AND k.owner = $3 AND k.epoch = $4 AND p.id = k.payment_id
  AND p.txn_id = $5 AND k.recovery_point <> 'finished'"""

# Take over abandoned payments, in one statement (one transaction): find the owners of unfinished payments by a
# loose index scan (one probe per owner, however many payments each holds), keep those whose lock is free,
# then lock their payments and the let-go ones, skipping rows another completer holds, and bump each epoch.
# $1 me, $2 limit.
TAKE_OVER = f"""
WITH RECURSIVE owners(owner) AS (
    (SELECT owner FROM idempotency_keys WHERE recovery_point <> 'finished' AND owner IS NOT NULL
     ORDER BY owner LIMIT 1)
    UNION ALL
    SELECT (SELECT k.owner FROM idempotency_keys k WHERE k.recovery_point <> 'finished' AND k.owner > o.owner
            ORDER BY k.owner LIMIT 1)
    FROM owners o WHERE o.owner IS NOT NULL
), dead AS (
    SELECT coalesce(array_agg(owner), '{{}}') AS owners FROM owners
    WHERE owner IS NOT NULL AND owner <> $1 AND pg_try_advisory_xact_lock_shared({OWNER_LOCK_SPACE}, owner)
), candidates AS (
    SELECT k.username, k.idem_key FROM idempotency_keys k
    WHERE k.recovery_point <> 'finished' AND (k.owner IS NULL OR k.owner = ANY ((SELECT owners FROM dead)::integer[]))
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), taken AS (
    UPDATE idempotency_keys k SET owner = $1, epoch = k.epoch + 1, last_run_at = {NOW}
    FROM candidates c WHERE k.username = c.username AND k.idem_key = c.idem_key
    RETURNING k.username, k.idem_key, k.payment_id, k.recovery_point, k.response, k.epoch
)
SELECT {_PAYMENT.replace("k.", "t.")} FROM taken t JOIN payments p ON p.id = t.payment_id ORDER BY p.id"""

OWNED_UNFINISHED = f"""
SELECT {_PAYMENT} FROM idempotency_keys k JOIN payments p ON p.id = k.payment_id
WHERE k.recovery_point <> 'finished' AND k.owner = $1 ORDER BY p.id"""

# One indexed read per source, each stopping after `limit` rows, merged: sent by the user (any status), and
# received into each of the accounts (succeeded only). UNION drops a payment between two accounts of the user.
# $1 username, $2 accounts, $3 limit.
_HISTORY_COLUMNS = ("id, txn_id, username, idem_key, from_account, to_account, amount, status, message, created_at,"
                    " finished_at")
HISTORY = f"""
SELECT {_HISTORY_COLUMNS} FROM (
    (SELECT {_HISTORY_COLUMNS} FROM payments WHERE username = $1 ORDER BY id DESC LIMIT $3)
    UNION
    (SELECT r.* FROM unnest($2::text[]) AS a(account) CROSS JOIN LATERAL (
        SELECT {_HISTORY_COLUMNS} FROM payments WHERE to_account = a.account AND status = 'succeeded'
        ORDER BY id DESC LIMIT $3) AS r)
) AS h ORDER BY id DESC LIMIT $3"""

# A batch of finished keys older than the TTL ($1 seconds), oldest first; $2 batch size. Rows another sweeper
# is deleting are skipped, not waited for. The ORDER BY keeps the batch on the index (without it the planner may
# scan from the table's start until it has a batch), and the rows are deleted by the tuple ids just locked: a
# join back on the key would be hashed over a scan of the whole table.
SWEEP_KEYS = f"""
DELETE FROM idempotency_keys WHERE ctid = ANY (ARRAY(
    SELECT ctid FROM idempotency_keys
    WHERE recovery_point = 'finished' AND finished_at < {NOW} - $1::float8
    ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED))"""

# ---- sessions ---------------------------------------------------------------------------------------------------
CREATE_SESSION = f"""
INSERT INTO sessions (token_hash, username, credential, created_at, expires_at)
VALUES ($1, $2, $3, {NOW}, {NOW} + $4::float8) RETURNING expires_at"""
RESOLVE_SESSION = (f"SELECT username, credential FROM sessions WHERE token_hash = $1 AND expires_at > {NOW}"
                   " AND revoked_at IS NULL")
# Logged out once: a second Logout by its holder (a lost reply) still finds it and answers OK.
END_SESSION = (f"UPDATE sessions SET revoked_at = coalesce(revoked_at, {NOW}) WHERE token_hash = $1"
               f" AND expires_at > {NOW} RETURNING username")
SWEEP_SESSIONS = f"""
DELETE FROM sessions WHERE ctid = ANY (ARRAY(
    SELECT ctid FROM sessions WHERE expires_at <= {NOW} ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED))"""
