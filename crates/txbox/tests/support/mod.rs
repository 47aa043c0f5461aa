//! What the backpressure tests share: a handler recording what it applied,
//! a slower one, and a run of an inbox until its group has consumed its
//! input.

// Each test binary compiles this module and uses part of it.
#![allow(dead_code)]

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

/// Sleeps 50 ms per batch, then records it as [`RecordApplied`] does: a
/// worker this slow keeps its partition paused for backpressure.
pub struct SlowRecordApplied;

#[async_trait]
impl BatchHandler for SlowRecordApplied {
    async fn handle_batch(&self, tx: &mut Tx, messages: &[InboxMessage]) -> Result<(), BatchError> {
        tokio::time::sleep(Duration::from_millis(50)).await;
        RecordApplied.handle_batch(tx, messages).await
    }
}

/// Runs the inbox `builder` builds until `group` has consumed `messages`,
/// failing after 60 s, and stops it.
pub async fn consume(pool: &PgPool, builder: InboxBuilder, group: &str, messages: usize) {
    let inbox = builder.build().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move { inbox.run(async move { s.cancelled().await }).await });
    wait_consumed(pool, group, messages, Duration::from_secs(60), "the inbox").await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Waits until `group` has consumed at least `messages` (the sum of its
/// partitions' positions); fails, naming `who`, after `within`.
pub async fn wait_consumed(
    pool: &PgPool,
    group: &str,
    messages: usize,
    within: Duration,
    who: &str,
) {
    let started = Instant::now();
    loop {
        let consumed: i64 = sqlx::query_scalar(
            "SELECT COALESCE(sum(next_offset), 0)::bigint FROM txbox.inbox_offsets \
             WHERE consumer_group = $1",
        )
        .bind(group)
        .fetch_one(pool)
        .await
        .unwrap();
        if consumed as usize >= messages {
            return;
        }
        assert!(
            started.elapsed() < within,
            "{who} consumed {consumed} of {messages} in {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What [`RecordApplied`] recorded: (offset, payload size), in the order
/// applied.
pub async fn applied(pool: &PgPool) -> Vec<(i64, i32)> {
    sqlx::query_as("SELECT kafka_offset, size FROM applied ORDER BY seq")
        .fetch_all(pool)
        .await
        .unwrap()
}
