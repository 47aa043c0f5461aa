-- Running totals per partition, kept in the row the inbox's fenced advance
-- updates anyway, in the same statement and transaction as the effects:
-- what the group applied, dropped as duplicates and dead-lettered, across
-- process restarts (the process's metrics start from zero at each start).
-- `txbox status` shows them. Adding columns with a constant default
-- rewrites nothing.
ALTER TABLE inbox_offsets
    ADD COLUMN applied       bigint NOT NULL DEFAULT 0,
    ADD COLUMN duplicates    bigint NOT NULL DEFAULT 0,
    ADD COLUMN dead_lettered bigint NOT NULL DEFAULT 0;
