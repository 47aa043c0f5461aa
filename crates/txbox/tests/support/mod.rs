//! What the backpressure tests share: a handler recording what it applied,
//! and a run of an inbox until it has consumed a partition.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::PgPool;
use txbox::inbox::{BatchError, BatchHandler, InboxBuilder, InboxMessage, Tx};

/// Records each message's offset and payload size in `applied`, in the
/// order the inbox applies them.
pub struct RecordApplied;

#[async_trait]
impl BatchHandler for RecordApplied {
    async fn handle_batch(&self, tx: &mut Tx, messages: &[InboxMessage]) -> Result<(), BatchError> {
        let offsets: Vec<i64> = messages.iter().map(InboxMessage::offset).collect();
        let sizes: Vec<i32> = messages
            .iter()
            .map(|m| m.payload().map_or(0, |p| p.len() as i32))
            .collect();
        sqlx::query(
            "INSERT INTO applied (kafka_offset, size) SELECT * FROM unnest($1::bigint[], $2::int[])",
        )
        .bind(&offsets)
        .bind(&sizes)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

/// Creates the table [`RecordApplied`] writes.
pub async fn create_applied(pool: &PgPool) {
    sqlx::query(
        "CREATE TABLE applied (seq bigserial PRIMARY KEY, kafka_offset bigint NOT NULL, \
         size int NOT NULL)",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// Runs the inbox `builder` builds until `group`'s partition 0 is consumed
/// up to `messages`, failing after 60 s, and stops it.
pub async fn consume(pool: &PgPool, builder: InboxBuilder, group: &str, messages: usize) {
    let inbox = builder.build().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move { inbox.run(async move { s.cancelled().await }).await });
    let started = Instant::now();
    let deadline = Duration::from_secs(60);
    loop {
        let next: Option<i64> = sqlx::query_scalar(
            "SELECT next_offset FROM txbox.inbox_offsets WHERE consumer_group = $1 AND partition = 0",
        )
        .bind(group)
        .fetch_optional(pool)
        .await
        .unwrap();
        if next == Some(messages as i64) {
            break;
        }
        assert!(
            started.elapsed() < deadline,
            "the inbox reached offset {next:?} of {messages} in {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// What [`RecordApplied`] recorded: (offset, payload size), in the order
/// applied.
pub async fn applied(pool: &PgPool) -> Vec<(i64, i32)> {
    sqlx::query_as("SELECT kafka_offset, size FROM applied ORDER BY seq")
        .fetch_all(pool)
        .await
        .unwrap()
}
