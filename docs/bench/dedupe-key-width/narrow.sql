INSERT INTO narrow (key, consumer_group, event_id, topic, partition, "offset")
    SELECT md5('bench-group' || chr(31) || u)::uuid, 'bench-group', u, 'input', 0, 0
      FROM (SELECT gen_random_uuid()::text AS u FROM generate_series(1, 100)) s
    ON CONFLICT DO NOTHING;
