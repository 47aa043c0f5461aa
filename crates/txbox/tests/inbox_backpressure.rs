//! Backpressure on real Apache Kafka: a partition whose worker falls
//! `max_buffered` behind is paused and resumed again and again, and every
//! message is still applied once, in offset order, without the partition
//! waiting out librdkafka's idle wake-up (up to a second) at each resume.

mod support;

use txbox::inbox::Inbox;
use txbox_testkit::kafka::{self, Record};
use txbox_testkit::{unique_name, TestDb};

use support::{applied, consume, create_applied, RecordApplied};

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
