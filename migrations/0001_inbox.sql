-- Inbox: consumer positions, processed event ids and dead letters.
-- Applied by `txbox migrate` with search_path set to the txbox schema, so no
-- statement here names a schema.

-- One row per (consumer group, topic, partition). `next_offset` is the only
-- source of truth for where a group resumes. `epoch` is bumped each time a
-- consumer is assigned the partition; every commit checks it (fencing).
-- Updated on every inbox commit: fillfactor leaves room for HOT updates.
CREATE TABLE inbox_offsets (
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    next_offset    bigint      NOT NULL,
    epoch          bigint      NOT NULL DEFAULT 1,
    owner          text,
    assigned_at    timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
) WITH (fillfactor = 50);

-- Event ids a group has handled (or dead-lettered), for dedupe across
-- redeliveries, replays under new offsets and other topics. Append-only;
-- pruned in small batches by age (BRIN index: cheap to maintain on append).
CREATE TABLE inbox_processed (
    consumer_group text        NOT NULL,
    event_id       text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    "offset"       bigint      NOT NULL,
    processed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, event_id)
);
CREATE INDEX inbox_processed_age ON inbox_processed USING brin (processed_at);

-- Messages the handler could not apply (permanent error, undecodable,
-- retries exhausted). Written in the same transaction that advances the
-- offset past them: nothing is lost.
CREATE TABLE inbox_dead_letters (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer_group  text        NOT NULL,
    topic           text        NOT NULL,
    partition       integer     NOT NULL,
    "offset"        bigint      NOT NULL,
    event_id        text        NOT NULL,
    key             bytea,
    payload         bytea,
    headers         jsonb       NOT NULL DEFAULT '[]',
    error           text        NOT NULL,
    attempts        integer     NOT NULL,
    first_failed_at timestamptz NOT NULL,
    last_failed_at  timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (consumer_group, topic, partition, "offset")
);
