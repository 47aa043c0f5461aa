//! Moving a row Kafka rejected for good into `relay_dead_letters`.

use sqlx::PgPool;

use crate::cursor::OutboxRow;
use crate::error::Result;

/// Moves rejected rows out of the outbox, keeping them for inspection.
///
/// The insert into `relay_dead_letters` and the delete from `outbox` are one
/// statement (so one transaction), and run only while the given fencing
/// token is still the stream's (the stream row is locked `FOR SHARE`, so a
/// concurrent takeover either sees the move or prevents it).
#[derive(Clone, Debug)]
pub(crate) struct DeadLetters {
    stream: i32,
    sql: String,
}

impl DeadLetters {
    pub(crate) fn new(schema: &txbox::Schema, stream: i32) -> Self {
        DeadLetters {
            stream,
            sql: format!(
                "WITH lease AS (
                    SELECT 1 FROM {streams} WHERE stream = $1 AND fencing_token = $2 FOR SHARE
                 ), moved AS (
                    DELETE FROM {outbox}
                     WHERE id = $3 AND stream = $1 AND EXISTS (SELECT 1 FROM lease)
                     RETURNING id, stream, txid, topic, key, payload, headers, event_id
                 )
                 INSERT INTO {dead} (outbox_id, stream, txid, topic, key, payload, headers, event_id, error)
                 SELECT id, stream, txid, topic, key, payload, headers, event_id, $4 FROM moved
                 ON CONFLICT (outbox_id) DO NOTHING",
                streams = schema.table("relay_streams"),
                outbox = schema.table("outbox"),
                dead = schema.table("relay_dead_letters"),
            ),
        }
    }

    /// Moves `row`; `false` when nothing moved because the lease is lost.
    pub(crate) async fn move_row(
        &self,
        pool: &PgPool,
        token: i64,
        row: &OutboxRow,
        error: &str,
    ) -> Result<bool> {
        let done = sqlx::query(&self.sql)
            .bind(self.stream)
            .bind(token)
            .bind(row.id)
            .bind(error)
            .execute(pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }
}
