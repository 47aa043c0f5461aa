-- Relay dead letters get an id of their own.
--
-- They were keyed by the outbox row's id, and the move (delete from the
-- outbox, insert here) skipped a conflicting insert: an outbox id seen
-- before (an identity restarted by a restore, a dead letter kept from an
-- earlier life of the table) lost the row. Now every move inserts; the
-- outbox id stays, indexed, for look-ups.
ALTER TABLE relay_dead_letters DROP CONSTRAINT relay_dead_letters_pkey;
ALTER TABLE relay_dead_letters ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY;
CREATE INDEX relay_dead_letters_outbox_id ON relay_dead_letters (outbox_id);
