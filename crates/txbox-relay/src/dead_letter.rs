//! Moving a row Kafka rejected for good into `relay_dead_letters`.

use sqlx::PgPool;

use crate::cursor::OutboxRow;
use crate::error::{Error, Result};

/// Moves rejected rows out of the outbox, keeping them for inspection.
///
/// The insert into `relay_dead_letters` and the delete from `outbox` are one
/// statement in one transaction, and run only while the given fencing
/// token is still the stream's (the stream row is locked `FOR SHARE`, so a
/// concurrent takeover either sees the move or prevents it). The
/// transaction commits only if the row deleted is the row inserted: a move
/// never loses a row.
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
                 , kept AS (
                    INSERT INTO {dead} (outbox_id, stream, txid, topic, key, payload, headers, event_id, error)
                    SELECT id, stream, txid, topic, key, payload, headers, event_id, $4 FROM moved
                    RETURNING 1
                 )
                 SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM kept)",
                streams = schema.table("relay_streams"),
                outbox = schema.table("outbox"),
                dead = schema.table("relay_dead_letters"),
            ),
        }
    }

    /// Moves `row`; `false` when nothing moved because the lease is lost.
    ///
    /// # Errors
    /// [`Error::Operation`] (and nothing changed) if the dead letter was not
    /// written for the row deleted; database errors.
    pub(crate) async fn move_row(
        &self,
        pool: &PgPool,
        token: i64,
        row: &OutboxRow,
        error: &str,
    ) -> Result<bool> {
        let mut tx = pool.begin().await?;
        let (moved, kept): (i64, i64) = sqlx::query_as(&self.sql)
            .bind(self.stream)
            .bind(token)
            .bind(row.id)
            .bind(error)
            .fetch_one(&mut *tx)
            .await?;
        if moved != kept {
            tx.rollback().await?;
            return Err(Error::Operation(
                format!(
                    "stream {}: moving outbox row {} to the dead letters deleted {moved} row(s) and kept {kept}; \
                     rolled back, the row stays in the outbox",
                    self.stream, row.id
                )
                .into(),
            ));
        }
        tx.commit().await?;
        Ok(moved == 1)
    }
}
