INSERT INTO wide (consumer_group, event_id, topic, partition, "offset")
    SELECT 'bench-group', gen_random_uuid()::text, 'input', 0, 0 FROM generate_series(1, 100)
    ON CONFLICT DO NOTHING;
