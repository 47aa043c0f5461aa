//! Backpressure on real Apache Kafka: a partition whose worker falls
//! `max_buffered` behind is paused and resumed again and again, and every
//! message is still applied once, in offset order, without the partition
//! waiting out librdkafka's idle wake-up (up to a second) at each resume.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use txbox::inbox::{BatchError, BatchHandler, Inbox, InboxMessage, Tx};
use txbox_testkit::kafka::{self, Record};
use txbox_testkit::{unique_name, TestDb};

/// Records each message's offset, in the order the inbox applies them.
struct RecordOffsets;

#[async_trait]
impl BatchHandler for RecordOffsets {
    async fn handle_batch(&self, tx: &mut Tx, messages: &[InboxMessage]) -> Result<(), BatchError> {
        let offsets: Vec<i64> = messages.iter().map(InboxMessage::offset).collect();
        sqlx::query("INSERT INTO applied (kafka_offset) SELECT unnest($1::bigint[])")
            .bind(&offsets)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_partition_resumes_at_once_and_loses_nothing() {
    txbox_testkit::init_tracing();
    const MESSAGES: usize = 5_000;
    // Paused every 100 messages buffered, resumed at 50: about a hundred
    // pause/resume cycles on one partition.
    const MAX_BUFFERED: usize = 100;
    let db = TestDb::new().await;
    sqlx::query("CREATE TABLE applied (seq bigserial PRIMARY KEY, kafka_offset bigint NOT NULL)")
        .execute(db.pool())
        .await
        .unwrap();
    let broker = txbox_testkit::kafka().await;
    let topic = broker.topic("backpressure", 1).await;
    let records = (0..MESSAGES)
        .map(|i| {
            Record::new(format!("m{i}"))
                .partition(0)
                .header("ce_id", uuid::Uuid::new_v4().to_string())
        })
        .collect();
    kafka::produce(broker.bootstrap(), &topic, records).await;

    let group = unique_name("backpressure");
    let inbox = Inbox::builder(db.pool().clone())
        .brokers(broker.bootstrap())
        .group_id(&group)
        .batch_handler(&topic, RecordOffsets)
        .batch_size(10)
        .max_buffered(MAX_BUFFERED)
        // A fetch in flight at the end of the log would otherwise hold a
        // resumed partition back for up to 500 ms (librdkafka's default
        // long poll), which is not what this test is about.
        .kafka_option("fetch.wait.max.ms", "10")
        .build()
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move { inbox.run(async move { s.cancelled().await }).await });

    // With the wake-up after each resume this takes about 2 s on the dev
    // stack; without it about 11 s (resumed partitions waited for
    // librdkafka's broker thread to wake up on its own). The bound only
    // catches a partition that stops flowing.
    let started = Instant::now();
    let deadline = Duration::from_secs(60);
    loop {
        let next: Option<i64> = sqlx::query_scalar(
            "SELECT next_offset FROM txbox.inbox_offsets WHERE consumer_group = $1 AND partition = 0",
        )
        .bind(&group)
        .fetch_optional(db.pool())
        .await
        .unwrap();
        if next == Some(MESSAGES as i64) {
            break;
        }
        assert!(
            started.elapsed() < deadline,
            "the inbox reached offset {next:?} of {MESSAGES} in {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    task.await.unwrap().unwrap();

    let applied: Vec<i64> = sqlx::query_scalar("SELECT kafka_offset FROM applied ORDER BY seq")
        .fetch_all(db.pool())
        .await
        .unwrap();
    let expected: Vec<i64> = (0..MESSAGES as i64).collect();
    assert_eq!(applied.len(), MESSAGES, "each message applied once");
    assert_eq!(applied, expected, "in offset order, none skipped");
}
