-- Two dedupe tables holding the same ids. `wide` is txbox's
-- inbox_processed as migration 0001 creates it: the primary key is the
-- group and the event id as text (about 80 bytes an entry for a UUID).
-- `narrow` keys the same row by a 16-byte digest of group and id (the
-- text kept in the row, not in the index).
DROP TABLE IF EXISTS wide, narrow;
CREATE TABLE wide (
    consumer_group text        NOT NULL,
    event_id       text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    "offset"       bigint      NOT NULL,
    processed_at   timestamptz NOT NULL DEFAULT now()
);
-- The same columns after the key (as the measured runs had them).
CREATE TABLE narrow (key uuid NOT NULL, LIKE wide INCLUDING DEFAULTS);
