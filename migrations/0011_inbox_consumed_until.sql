-- The offset watermark as dedupe (ADR 0011). `consumed_until` is the
-- highest `next_offset` the group has committed on the partition's current
-- log: every offset below it was applied, dropped as a duplicate or
-- dead-lettered, in a transaction that also advanced the position. A
-- message whose event id is its own position (no id header) and whose
-- offset is below it is a redelivery, so the inbox needs no id row for it;
-- with `Dedupe::OffsetsOnly` no message needs one.
--
-- It differs from `next_offset` only after the position is moved back by
-- hand (`txbox offsets reset`, a replay): the replayed offsets stay
-- consumed. When Kafka moves a partition back because its log is new
-- (recreated or truncated), the inbox moves both back.
--
-- Existing rows start at their position or, for a partition moved back by
-- a replay that is still running, past the highest offset whose id was
-- recorded (one scan of inbox_processed). Rows advanced afterwards by a
-- version without the column are raised to their position at the next
-- claim and at every reset.
ALTER TABLE inbox_offsets ADD COLUMN consumed_until bigint NOT NULL DEFAULT 0;
UPDATE inbox_offsets SET consumed_until = next_offset;
UPDATE inbox_offsets o
   SET consumed_until = p.recorded_until
  FROM (SELECT consumer_group, topic, partition, max("offset") + 1 AS recorded_until
          FROM inbox_processed
         GROUP BY consumer_group, topic, partition) p
 WHERE p.consumer_group = o.consumer_group AND p.topic = o.topic
   AND p.partition = o.partition AND p.recorded_until > o.consumed_until;
