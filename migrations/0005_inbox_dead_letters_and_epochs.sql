-- Inbox: one dead letter per dead-lettered message; epochs never reused.

-- A dead letter was unique on (group, topic, partition, offset), and the
-- insert skipped a conflicting row. Offsets are positions in one log, not
-- message identities: after a topic is deleted and recreated, its new log
-- reuses them, and a poison message of the new log at an offset the old
-- log's dead letter held was skipped with no row, while its offset
-- advanced. Nothing else is unique about a dead letter either (the same
-- event id can fail again once its dedupe row is pruned), and none is
-- needed: each dead letter is written in the transaction that advances the
-- fenced offset past its message, so a retried or zombie write rolls back
-- with that advance. The row's own id is the key; the position stays
-- indexed for lookups.
ALTER TABLE inbox_dead_letters
    DROP CONSTRAINT inbox_dead_letters_consumer_group_topic_partition_offset_key;
CREATE INDEX inbox_dead_letters_position
    ON inbox_dead_letters (consumer_group, topic, partition, "offset");

-- Epochs were 1 for a new offsets row and + 1 on each claim, so a row an
-- operator deleted came back with epoch 1, and a consumer still holding
-- epoch 1 at the same offset passed the fence. Claims now take the next
-- value of one sequence for all rows, never handed out before, so no row's
-- new epoch equals one a consumer was given earlier, deleted rows
-- included. The sequence starts above every epoch stored now (epochs of
-- rows deleted before this migration are not known).
CREATE SEQUENCE inbox_epochs AS bigint OWNED BY inbox_offsets.epoch;
SELECT setval('inbox_epochs', COALESCE(max(epoch), 0) + 1, false) FROM inbox_offsets;
ALTER TABLE inbox_offsets ALTER COLUMN epoch SET DEFAULT nextval('inbox_epochs');
