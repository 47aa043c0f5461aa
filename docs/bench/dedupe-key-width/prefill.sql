-- :n random ids into both tables (the same ids), then the primary keys
-- (built sorted), vacuumed, analyzed, and a checkpoint.
SET maintenance_work_mem = '1GB';
ALTER TABLE wide DROP CONSTRAINT IF EXISTS wide_pkey;
ALTER TABLE narrow DROP CONSTRAINT IF EXISTS narrow_pkey;
CREATE TEMP TABLE ids AS SELECT gen_random_uuid()::text AS u FROM generate_series(1, :n);
INSERT INTO wide (consumer_group, event_id, topic, partition, "offset")
    SELECT 'bench-group', u, 'input', 0, 0 FROM ids;
INSERT INTO narrow (key, consumer_group, event_id, topic, partition, "offset")
    SELECT md5('bench-group' || chr(31) || u)::uuid, 'bench-group', u, 'input', 0, 0 FROM ids;
DROP TABLE ids;
ALTER TABLE wide ADD PRIMARY KEY (consumer_group, event_id);
ALTER TABLE narrow ADD PRIMARY KEY (key);
VACUUM ANALYZE wide;
VACUUM ANALYZE narrow;
CHECKPOINT;
