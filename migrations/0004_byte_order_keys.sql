-- Byte-order comparison for the inbox's text keys.
--
-- Event ids, consumer groups and topic names are opaque identifiers: only
-- equality matters, never a linguistic order. Under the database's default
-- collation (en_US.UTF-8, C.UTF-8...) every btree comparison on them goes
-- through the C library's strcoll; with COLLATE "C" it is a byte compare.
-- The dedupe insert probes `inbox_processed`'s primary key once per message,
-- so this is on every inbox commit's path. Equality is unchanged (every
-- deterministic collation compares equal strings equal), so no stored id
-- changes meaning. Rebuilds the two primary keys.
ALTER TABLE inbox_processed
    ALTER COLUMN consumer_group TYPE text COLLATE "C",
    ALTER COLUMN event_id TYPE text COLLATE "C";

ALTER TABLE inbox_offsets
    ALTER COLUMN consumer_group TYPE text COLLATE "C",
    ALTER COLUMN topic TYPE text COLLATE "C";
