//! The inbox's SQL, built once per inbox with the schema quoted.

use super::config::Waits;
use crate::schema::Schema;

#[derive(Debug)]
pub(crate) struct Statements {
    /// Opens every inbox transaction, with its lock and idle bounds
    /// ([`Waits::begin`]).
    pub begin: String,
    /// $1 group, $2 topic, $3 partition: (epoch, next_offset) if present.
    pub select_offset: String,
    /// Claims a partition ($5 owner, $6 [`Statements::epochs`]): creates
    /// its row at $4, or gives it a new epoch. Either way the epoch is the
    /// next value of the `inbox_epochs` sequence, never given out before: a
    /// zombie's epoch cannot match it, even after the row was deleted and
    /// created again. Returns (next_offset, epoch, consumed_until), the
    /// watermark raised to the position if below it (a row advanced by a
    /// version that did not keep it).
    pub claim: String,
    /// Inserts event ids; returns the ones not seen before.
    pub insert_processed: String,
    /// Fenced advance: $1 new next_offset, $2 group, $3 topic, $4 partition,
    /// $5 epoch, $6 expected next_offset; adds $7 applied, $8 duplicates
    /// and $9 dead-lettered to the partition's totals; `consumed_until`
    /// rises to $1 if below it.
    pub advance: String,
    /// The fenced advance ([`Statements::advance`], $1 to $9) and, only if
    /// it moved the position, a plain insert of event ids expected to be
    /// new ($10 ids, $11 their offsets), which fails with a unique
    /// violation on an id seen before. Returns (rows advanced, ids
    /// inserted).
    pub advance_recording: String,
    /// Inserts one dead letter. Plain: nothing about a dead letter is
    /// unique but its id, and the caller checks that one row was written.
    pub dead_letter: String,
    pub prune: String,
    /// Takes one dead letter whose replay was requested ($1 group, $2
    /// topics with a handler here), locked, skipping those another
    /// consumer of the group is replaying.
    pub replay_take: String,
    /// Forgets an event id ($1 group, $2 id), so the replay runs the handler.
    pub replay_forget: String,
    /// Records the replay in the audit trail and deletes the dead letter ($1 id).
    pub replay_done: String,
    /// A failed replay ($1 id, $2 error): the request is cleared.
    pub replay_failed: String,
    /// The epoch sequence's qualified name, bound as a `regclass` text.
    pub epochs: String,
}

impl Statements {
    pub(crate) fn new(schema: &Schema, waits: Waits) -> Self {
        let offsets = schema.table("inbox_offsets");
        let processed = schema.table("inbox_processed");
        let dead = schema.table("inbox_dead_letters");
        let advance = format!(
            "UPDATE {offsets} SET next_offset = $1, updated_at = now(),
                    applied = applied + $7, duplicates = duplicates + $8,
                    dead_lettered = dead_lettered + $9,
                    consumed_until = greatest(consumed_until, $1)
             WHERE consumer_group = $2 AND topic = $3 AND partition = $4
               AND epoch = $5 AND next_offset = $6"
        );
        Statements {
            begin: waits.begin(),
            select_offset: format!(
                "SELECT epoch, next_offset FROM {offsets}
                 WHERE consumer_group = $1 AND topic = $2 AND partition = $3"
            ),
            claim: format!(
                "INSERT INTO {offsets} AS o (consumer_group, topic, partition, next_offset, consumed_until,
                                          epoch, owner)
                 VALUES ($1, $2, $3, $4, $4, nextval($6::regclass), $5)
                 ON CONFLICT (consumer_group, topic, partition) DO UPDATE
                 SET epoch = greatest(EXCLUDED.epoch, o.epoch + 1), owner = EXCLUDED.owner, assigned_at = now(),
                     consumed_until = greatest(o.consumed_until, o.next_offset)
                 RETURNING next_offset, epoch, consumed_until"
            ),
            insert_processed: format!(
                "INSERT INTO {processed} (consumer_group, event_id, topic, partition, \"offset\")
                 SELECT $1, u.id, $3, $4, u.off FROM unnest($2::text[], $5::int8[]) AS u(id, off)
                 ON CONFLICT (consumer_group, event_id) DO NOTHING
                 RETURNING event_id"
            ),
            // Reading `advanced` runs the update first: a fenced consumer
            // inserts no id, so it never waits on its successor's.
            advance_recording: format!(
                "WITH advanced AS ({advance} RETURNING 1),
                 recorded AS (
                     INSERT INTO {processed} (consumer_group, event_id, topic, partition, \"offset\")
                     SELECT $2, u.id, $3, $4, u.off FROM unnest($10::text[], $11::int8[]) AS u(id, off)
                     WHERE EXISTS (SELECT 1 FROM advanced)
                     RETURNING 1)
                 SELECT (SELECT count(*) FROM advanced), (SELECT count(*) FROM recorded)"
            ),
            advance,
            dead_letter: format!(
                "INSERT INTO {dead} (consumer_group, topic, partition, \"offset\", event_id, key, payload,
                                     headers, error, attempts, first_failed_at, last_failed_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
            ),
            replay_take: format!(
                "SELECT id, topic, partition, \"offset\", event_id, key, payload, headers,
                        replay_requested_by
                 FROM {dead}
                 WHERE consumer_group = $1 AND replay_requested_at IS NOT NULL AND topic = ANY($2)
                 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
            ),
            replay_forget: format!(
                "DELETE FROM {processed} WHERE consumer_group = $1 AND event_id = $2"
            ),
            replay_done: format!(
                "WITH audit AS (
                     INSERT INTO {audit} (kind, dead_letter_id, action, actor, dead_letter)
                     SELECT 'inbox', d.id, 'replayed', COALESCE(d.replay_requested_by, 'unknown'), to_jsonb(d)
                     FROM {dead} d WHERE d.id = $1
                     RETURNING dead_letter_id)
                 DELETE FROM {dead} WHERE id = (SELECT dead_letter_id FROM audit)",
                audit = schema.table("dead_letter_audit")
            ),
            replay_failed: format!(
                "UPDATE {dead} SET replay_requested_at = NULL, replay_attempts = replay_attempts + 1,
                                   replay_error = $2
                 WHERE id = $1"
            ),
            epochs: schema.table("inbox_epochs"),
            prune: format!(
                "DELETE FROM {processed} WHERE ctid = ANY(ARRAY(
                     SELECT ctid FROM {processed}
                     WHERE consumer_group = $1 AND processed_at < now() - make_interval(secs => $2)
                     LIMIT $3))"
            ),
        }
    }
}
