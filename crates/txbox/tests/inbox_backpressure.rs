//! Backpressure on real Apache Kafka: a partition whose worker falls
//! `max_buffered` behind is paused and resumed again and again, and every
//! message is still applied once, in offset order, without the partition
//! waiting out librdkafka's idle wake-up (up to a second) at each resume.

mod support;

use std::time::Duration;

use txbox::inbox::Inbox;
use txbox_testkit::kafka::{self, Record};
use txbox_testkit::{unique_name, TestDb};

use support::{applied, consume, create_applied, wait_consumed, RecordApplied, SlowRecordApplied};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_partition_resumes_at_once_and_loses_nothing() {
    txbox_testkit::init_tracing();
    const MESSAGES: usize = 5_000;
    // Paused every 100 messages buffered, resumed at 50: about a hundred
    // pause/resume cycles on one partition.
    const MAX_BUFFERED: usize = 100;
    let db = TestDb::new().await;
    create_applied(db.pool()).await;
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
    let builder = Inbox::builder(db.pool().clone())
        .brokers(broker.bootstrap())
        .group_id(&group)
        .batch_handler(&topic, RecordApplied)
        .batch_size(10)
        .max_buffered(MAX_BUFFERED)
        // A fetch in flight at the end of the log would otherwise hold a
        // resumed partition back for up to 500 ms (librdkafka's default
        // long poll), which is not what this test is about.
        .kafka_option("fetch.wait.max.ms", "10");
    // With the wake-up after each resume this takes about 2 s on the dev
    // stack; without it about 11 s (resumed partitions waited for
    // librdkafka's broker thread to wake up on its own). The 60 s bound
    // only catches a partition that stops flowing.
    consume(db.pool(), builder, &group, MESSAGES).await;

    let expected: Vec<(i64, i32)> = (0..MESSAGES as i64)
        .map(|o| (o, format!("m{o}").len() as i32))
        .collect();
    let applied = applied(db.pool()).await;
    assert_eq!(applied.len(), MESSAGES, "each message applied once");
    assert_eq!(applied, expected, "in offset order, none skipped");
}

/// librdkafka keeps an application's pause on a partition across a
/// rebalance: a partition paused for backpressure when it was revoked, and
/// assigned back to the same consumer, was never fetched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_paused_when_revoked_is_fetched_again_once_assigned_back() {
    txbox_testkit::init_tracing();
    const PER_PARTITION: usize = 1000;
    let db = TestDb::new().await;
    create_applied(db.pool()).await;
    let broker = txbox_testkit::kafka().await;
    let topic = broker.topic("backpressure-rebalance", 2).await;
    let records = (0..2 * PER_PARTITION)
        .map(|i| {
            Record::new(format!("m{i}"))
                .partition((i % 2) as i32)
                .header("ce_id", uuid::Uuid::new_v4().to_string())
        })
        .collect();
    kafka::produce(broker.bootstrap(), &topic, records).await;

    let group = unique_name("backpressure-rebalance");
    // Paused at 20 buffered, resumed at 10, 10 per slow batch: each
    // partition is paused nearly all the time.
    let inbox = || {
        Inbox::builder(db.pool().clone())
            .brokers(broker.bootstrap())
            .group_id(&group)
            .batch_handler(&topic, SlowRecordApplied)
            .batch_size(10)
            .max_buffered(20)
            .kafka_option("fetch.wait.max.ms", "10")
            .build()
            .unwrap()
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let start = |inbox: Inbox| {
        let s = stop.clone();
        tokio::spawn(async move { inbox.run(async move { s.cancelled().await }).await })
    };
    let first = start(inbox());
    let within = Duration::from_secs(60);
    wait_consumed(db.pool(), &group, 100, within, "the first inbox alone").await;
    // A second member: the group rebalances, every partition is revoked
    // from the first (paused, with its buffer full), and one is assigned
    // back to it. Without the resume, that one is never fetched again.
    let second = start(inbox());
    let within = Duration::from_secs(90);
    wait_consumed(db.pool(), &group, 2 * PER_PARTITION, within, "the group").await;
    stop.cancel();
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    // Each partition was claimed again in the rebalance (its epoch counts
    // claims): the test met the case it is about.
    let epochs: Vec<i64> = sqlx::query_scalar(
        "SELECT epoch FROM txbox.inbox_offsets WHERE consumer_group = $1 ORDER BY partition",
    )
    .bind(&group)
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert!(
        epochs.len() == 2 && epochs.iter().all(|&e| e >= 2),
        "both partitions claimed again while consuming: epochs {epochs:?}"
    );
    let applied = applied(db.pool()).await;
    assert_eq!(
        applied.len(),
        2 * PER_PARTITION,
        "each message applied once"
    );
    let mut offsets: Vec<i64> = applied.into_iter().map(|(o, _)| o).collect();
    offsets.sort_unstable();
    offsets.dedup();
    assert_eq!(
        offsets.len(),
        PER_PARTITION,
        "every offset of both partitions applied"
    );
}
