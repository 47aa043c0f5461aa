-- Outbox: events staged inside business transactions, published by the relay.

-- `txid` is the writing transaction's id. The relay reads rows in
-- (txid, id) order and only from transactions older than its snapshot's
-- xmin, so a row whose transaction commits late is never skipped (sequence
-- ids alone do not commit in order). `stream` shards rows by key hash so
-- several relay streams can publish in parallel while one key stays in one
-- stream.
CREATE TABLE outbox (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    txid       xid8        NOT NULL DEFAULT pg_current_xact_id(),
    stream     integer     NOT NULL DEFAULT 0,
    topic      text        NOT NULL,
    key        bytea,
    payload    bytea,
    headers    jsonb       NOT NULL DEFAULT '[]',
    event_id   uuid        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_stream_position ON outbox (stream, txid, id);
