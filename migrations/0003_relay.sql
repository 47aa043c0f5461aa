-- Relay: stream ownership (lease + fencing token), position and dead letters.

-- One row per relay stream. A relay instance owns a stream while its lease
-- is current; each acquisition increments `fencing_token`, and every write
-- the relay makes checks it, so an instance whose lease lapsed cannot write.
-- The position is the last published (txid, id); in exactly-once mode the
-- authoritative copy travels inside the Kafka transaction and this row is
-- written after the Kafka commit (it bounds pruning).
CREATE TABLE relay_streams (
    stream           integer     PRIMARY KEY,
    owner            text,
    fencing_token    bigint      NOT NULL DEFAULT 0,
    lease_expires_at timestamptz,
    position_txid    xid8        NOT NULL DEFAULT '0',
    position_id      bigint      NOT NULL DEFAULT 0,
    published        bigint      NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Rows Kafka rejected permanently, moved here when the relay is configured
-- to dead-letter instead of stopping.
CREATE TABLE relay_dead_letters (
    outbox_id  bigint      PRIMARY KEY,
    stream     integer     NOT NULL,
    txid       xid8        NOT NULL,
    topic      text        NOT NULL,
    key        bytea,
    payload    bytea,
    headers    jsonb       NOT NULL DEFAULT '[]',
    event_id   uuid        NOT NULL,
    error      text        NOT NULL,
    failed_at  timestamptz NOT NULL DEFAULT now()
);
