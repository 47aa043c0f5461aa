-- Two dedupe tables holding the same ids. `wide` is txbox's
-- inbox_processed as the migrations leave it (0001, with 0004's byte-order
-- COLLATE "C" on the key's columns): the primary key is the group and the
-- event id as text (about 80 bytes an entry for a UUID). `narrow` keys the
-- same row by a 16-byte digest of group and id (the text kept in the row,
-- not in the index). Both have the BRIN index on `processed_at` that the
-- pruner uses. The primary keys are added by prefill.sql.
DROP TABLE IF EXISTS wide, narrow;
CREATE TABLE wide (
    consumer_group text COLLATE "C" NOT NULL,
    event_id       text COLLATE "C" NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    "offset"       bigint      NOT NULL,
    processed_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX wide_age ON wide USING brin (processed_at);
-- The same columns (and collations) after the key.
CREATE TABLE narrow (key uuid NOT NULL, LIKE wide INCLUDING DEFAULTS);
CREATE INDEX narrow_age ON narrow USING brin (processed_at);
