-- The gateway's store on PostgreSQL: payments (history, kept), idempotency keys (swept after the TTL), sessions.
-- Applied once, in one transaction, under the migration lock (postgres_sql.MIGRATION_LOCK).

-- Every replica draws a fresh owner number at start (and again after losing its store session) and holds the
-- session-level advisory lock (OWNER_LOCK_SPACE, number) for as long as it is that owner. Never reused.
CREATE SEQUENCE owner_numbers AS integer MINVALUE 1 NO CYCLE;

-- Drawn inside the claim statement, so that the key row (inserted first) can name its payment.
CREATE SEQUENCE payment_ids AS bigint MINVALUE 1 NO CYCLE;

CREATE TABLE payments (
    id bigint PRIMARY KEY DEFAULT nextval('payment_ids'),
    txn_id text NOT NULL UNIQUE,
    username text NOT NULL,
    idem_key text NOT NULL,
    from_account text NOT NULL,
    to_account text NOT NULL,
    amount bigint NOT NULL CHECK (amount > 0),  -- paise
    status text NOT NULL CHECK (status IN ('processing', 'succeeded', 'declined', 'failed')),
    message text NOT NULL DEFAULT '',
    created_at double precision NOT NULL,       -- seconds since the epoch, by the store's clock
    finished_at double precision
);
ALTER SEQUENCE payment_ids OWNED BY payments.id;
-- History reads each source newest first and stops after `limit` rows: sent by the user, and received
-- (succeeded only: the partial index holds exactly the rows that source may return).
CREATE INDEX payments_sent ON payments (username, id);
CREATE INDEX payments_received ON payments (to_account, id) WHERE status = 'succeeded';

CREATE TABLE idempotency_keys (
    username text NOT NULL,
    idem_key text NOT NULL,
    fingerprint text NOT NULL,
    -- Checked at the end of the claim statement, which inserts the key before its payment.
    payment_id bigint NOT NULL REFERENCES payments (id),
    recovery_point text NOT NULL
        CHECK (recovery_point IN ('started', 'commit_decided', 'abort_decided', 'finished')),
    owner integer,                   -- the owner number executing it; NULL: let go, any completer may take it
    epoch bigint NOT NULL DEFAULT 1, -- bumped by every take-over; every write compares owner and epoch
    response bytea,                  -- the client's response, stored with the decision
    created_at double precision NOT NULL,
    last_run_at double precision NOT NULL,
    finished_at double precision,    -- when it was decided: the TTL counts from here
    PRIMARY KEY (username, idem_key),
    CHECK ((recovery_point = 'started') = (response IS NULL))
);
-- Who holds unfinished payments (a handful of rows: the payments in flight), for take-over and the completer.
CREATE INDEX keys_unfinished_by_owner ON idempotency_keys (owner) WHERE recovery_point <> 'finished';
CREATE INDEX keys_finished_at ON idempotency_keys (finished_at) WHERE recovery_point = 'finished';

-- Only a SHA-256 of each token is stored: a copy of the database hands out no live token.
CREATE TABLE sessions (
    token_hash text PRIMARY KEY,
    username text NOT NULL,
    credential text NOT NULL,        -- an opaque fingerprint of the credential the login used
    created_at double precision NOT NULL,
    expires_at double precision NOT NULL,
    revoked_at double precision      -- logged out: kept until it expires, so the holder's repeated Logout is known
);
CREATE INDEX sessions_expiry ON sessions (expires_at);
