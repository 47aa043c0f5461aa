//! The byte bound of backpressure on real Apache Kafka (ADR 0014): large
//! messages pause a partition long before the message count would, and
//! every message is still applied once, whole, in offset order.
//!
//! Its tests assert a process-wide metric, so they run one at a time
//! ([`SERIAL`]), and no other test shares their binary.

mod support;

use txbox::inbox::{BatchHandler, Inbox};
use txbox_testkit::kafka::{self, Record};
use txbox_testkit::{unique_name, CapturedMetrics, TestDb};

use support::{applied, consume, create_applied, RecordApplied, SlowRecordApplied};

/// Held by each test for its whole run: the pause counter is the process's.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One run of the inbox under a byte bound the count bound never reaches.
struct BytesRun {
    /// Topic, group and event-id prefix.
    name: &'static str,
    /// Messages produced to the one partition.
    messages: usize,
    /// Payload bytes per message.
    payload: usize,
    /// The inbox's `max_buffered_bytes`.
    max_bytes: usize,
    /// The inbox's `batch_size`.
    batch_size: usize,
}

/// Consumes `run` with `handler`. Returns the pauses counted during the
/// run, once every message was checked applied once, whole, in offset
/// order.
async fn pauses_consuming(run: BytesRun, handler: impl BatchHandler + 'static) -> u64 {
    let BytesRun {
        name,
        messages,
        payload,
        max_bytes,
        batch_size,
    } = run;
    txbox_testkit::init_tracing();
    let metrics = CapturedMetrics::install();
    let db = TestDb::new().await;
    create_applied(db.pool()).await;
    let broker = txbox_testkit::kafka().await;
    let topic = broker.topic(name, 1).await;
    let records = (0..messages)
        .map(|i| {
            Record::new("x".repeat(payload))
                .partition(0)
                .header("ce_id", format!("{name}-{i}"))
        })
        .collect();
    kafka::produce(broker.bootstrap(), &topic, records).await;

    let pauses_before = metrics.counter("txbox_inbox_backpressure_pauses_total");
    let group = unique_name(name);
    let builder = Inbox::builder(db.pool().clone())
        .brokers(broker.bootstrap())
        .group_id(&group)
        .batch_handler(&topic, handler)
        .batch_size(batch_size)
        .max_buffered(1_000_000)
        .max_buffered_bytes(max_bytes)
        .kafka_option("fetch.wait.max.ms", "10");
    consume(db.pool(), builder, &group, messages).await;

    let pauses = metrics.counter("txbox_inbox_backpressure_pauses_total") - pauses_before;
    let expected: Vec<(i64, i32)> = (0..messages as i64).map(|o| (o, payload as i32)).collect();
    let applied = applied(db.pool()).await;
    assert_eq!(applied.len(), messages, "each message applied once");
    assert_eq!(applied, expected, "in offset order, whole, none skipped");
    pauses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_messages_pause_a_partition_by_their_bytes_and_none_is_lost() {
    let _serial = SERIAL.lock().await;
    // Paused at 64 KiB buffered (about 8 messages), resumed at 32 KiB.
    let run = BytesRun {
        name: "backpressure-bytes",
        messages: 300,
        payload: 8 * 1024,
        max_bytes: 64 * 1024,
        batch_size: 4,
    };
    let pauses = pauses_consuming(run, RecordApplied).await;
    // librdkafka hands over what it prefetched much faster than the worker
    // commits: with 2.4 MB of input and a 64 KiB bound the partition is
    // paused again and again (36 times in three runs on the dev stack;
    // with the byte bound taken out, 0).
    assert!(
        pauses >= 5,
        "the byte bound paused the partition {pauses} times"
    );
}

/// A partition paused by its bytes is resumed only once the worker has
/// taken half of them, not as soon as the message count allows: every
/// pause is followed by at least half the byte bound's worth of messages
/// taken before the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_paused_by_its_bytes_resumes_only_once_half_of_them_are_taken() {
    let _serial = SERIAL.lock().await;
    const MESSAGES: usize = 120;
    // Paused at 128 KiB buffered (16 messages of about 8.4 KB each: the
    // payload, the event id and the message's own size), resumed at
    // 64 KiB (7 left), so each pause is followed by at least 8 messages
    // taken. A resume that went by the count alone would come at the poll
    // loop's next check (every 50 ms), about once per message of this
    // 50 ms handler: 105 pauses, measured with that fault put in; 12 without.
    const TAKEN_PER_PAUSE: usize = 8;
    let run = BytesRun {
        name: "backpressure-resume",
        messages: MESSAGES,
        payload: 8 * 1024,
        max_bytes: 128 * 1024,
        batch_size: 1,
    };
    let pauses = pauses_consuming(run, SlowRecordApplied).await;
    assert!(
        pauses >= 2,
        "the byte bound paused the partition {pauses} times"
    );
    let most = MESSAGES / TAKEN_PER_PAUSE + 1;
    assert!(
        pauses <= most as u64,
        "{pauses} pauses for {MESSAGES} messages: at most {most} if each resume waits for half \
         the bytes to be taken"
    );
}
