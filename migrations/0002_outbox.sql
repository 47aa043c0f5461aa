-- Outbox: events staged inside business transactions, published by the relay.

-- `txid` is the writing transaction's id. The relay reads rows in
-- (txid, id) order and only from transactions older than its snapshot's
-- xmin, so a row whose transaction commits late is never skipped (sequence
-- ids alone do not commit in order). `stream` shards rows by key hash so
-- several relay streams can publish in parallel while one key stays in one
-- stream.
--
-- The primary key is the relay's read order, so each staged row maintains a
-- single btree. `headers` holds only the caller's headers (and CloudEvents
-- type/source/content-type when given); the relay adds `ce_id` (from
-- `event_id`) and `ce_specversion` when it publishes.
CREATE TABLE outbox (
    id         bigint      GENERATED ALWAYS AS IDENTITY,
    txid       xid8        NOT NULL DEFAULT pg_current_xact_id(),
    stream     integer     NOT NULL DEFAULT 0,
    topic      text        NOT NULL,
    key        bytea,
    payload    bytea,
    headers    jsonb       NOT NULL DEFAULT '[]',
    event_id   uuid        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, txid, id)
);
