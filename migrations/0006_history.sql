-- Relay positions tied to one database history.
--
-- A relay position (txid, id) only means something in the history of
-- transaction ids it was recorded in. After a pg_dump/restore into a new
-- cluster, a logical-replication cutover or point-in-time recovery, newly
-- staged rows can sort at or below a stored position: they would never be
-- read, then be pruned. Each installation of the schema gets an id here;
-- the relay records `{installation}@{system_identifier}` with every
-- position (in `relay_streams.history` and in its Kafka position records)
-- and refuses to go on, or to prune, in another history until an operator
-- re-anchors the stream (`txbox relay re-anchor`).

CREATE TABLE installation (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    id         uuid        NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO installation DEFAULT VALUES;

-- The history the stream's position belongs to; NULL until the relay first
-- records a position after this migration (it then anchors the stream).
ALTER TABLE relay_streams ADD COLUMN history text;
