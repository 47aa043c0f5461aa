//! At-least-once mode when messages in the middle of a batch time out, on
//! librdkafka's mock cluster: three brokers each lead one partition, and
//! for 2.5 s one of them is unreachable, or answers 3 s late, past the
//! producer's `message.timeout.ms` of 1 s. That partition's rows (every
//! third key, interleaved through each batch) time out while the other
//! partitions' rows are acknowledged; the relay records the rows before
//! the first failed one and retries the rest. Checked: no row lost, and
//! per key the rows in staging order, each re-send a suffix that resumes
//! before where the previous copy stopped (ADR 0004's third duplicate
//! window).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use txbox_relay::Mode;
use txbox_testkit::kafka::Consumed;
use txbox_testkit::{unique_name, MockKafka, TestDb};

/// The broker that leads partition 2.
const BROKER: i32 = 3;
const PARTITION: i32 = 2;

/// What happens to [`BROKER`] for 2.5 s.
#[derive(Clone, Copy, Debug)]
enum Trouble {
    /// Down: its partition's rows are never written, and time out.
    Unreachable,
    /// Answers 3 s late: its partition's rows are written, and time out
    /// all the same.
    Slow,
}

struct Outcome {
    seen: Vec<Consumed>,
    tally: Tally,
}

async fn timeouts_mid_batch(trouble: Trouble) -> Outcome {
    txbox_testkit::init_tracing();
    let started = Instant::now();
    let db = TestDb::new().await;
    let mock = MockKafka::new(3);
    let topic = unique_name("timeouts");
    mock.create_topic(&topic, 3);
    for partition in 0..3 {
        mock.cluster()
            .partition_leader(&topic, partition, Some(partition + 1))
            .unwrap();
    }
    let mut cfg = config(&db, &mock.bootstrap(), Mode::AtLeastOnce);
    cfg.batch_size = 200;
    cfg.prune_interval = Duration::from_secs(3600);
    cfg.kafka.insert("message.timeout.ms".into(), "1000".into());
    let relay = Relay::start(cfg);
    // Warm up: producer id, metadata and connections to every leader.
    stage_many(db.pool(), &topic, 30, 12, 30).await;
    drained(db.pool(), Duration::from_secs(30)).await;

    let cluster = mock.cluster();
    match trouble {
        Trouble::Unreachable => cluster.broker_down(BROKER).unwrap(),
        Trouble::Slow => cluster
            .broker_round_trip_time(BROKER, Duration::from_secs(3))
            .unwrap(),
    }
    stage_many(db.pool(), &topic, 600, 12, 50).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let during = unpublished(db.pool()).await;
    match trouble {
        Trouble::Unreachable => cluster.broker_up(BROKER).unwrap(),
        Trouble::Slow => cluster
            .broker_round_trip_time(BROKER, Duration::ZERO)
            .unwrap(),
    }
    drained(db.pool(), Duration::from_secs(60)).await;
    let report = relay.stop().await;

    let staged = staged_ids(db.pool()).await;
    let seen = consume(&mock.bootstrap(), &topic, staged.len(), false).await;
    let t = tally(&seen, &staged);
    println!(
        "{trouble:?}: {t:?}; {during} rows unpublished during the trouble; {:?}",
        report.streams[0]
    );
    assert_eq!((t.missing, t.unexpected), (0, 0), "no row lost: {t:?}");
    assert!(during > 0, "the broker's trouble held rows back");
    let retries = report.streams[0].retries;
    assert!(retries >= 1, "the batch failed part-way and was retried");
    assert!(
        t.duplicates as u64 <= retries * 200,
        "each failure re-sends one batch at most: {t:?}, {retries} retries"
    );

    // Per key: staging order, re-sends resuming where rows were not yet
    // recorded, nothing skipped.
    let keys: Vec<(Vec<u8>, String)> =
        sqlx::query_as("SELECT key, event_id::text FROM txbox.outbox ORDER BY txid, id")
            .fetch_all(db.pool())
            .await
            .unwrap();
    let mut expected: BTreeMap<Vec<u8>, Vec<String>> = BTreeMap::new();
    for (key, id) in keys {
        expected.entry(key).or_default().push(id);
    }
    let seen_by_key = by_key(&seen);
    assert_eq!(
        seen_by_key.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    let mut resent = 0;
    for (key, ids) in &seen_by_key {
        let runs = resend_runs(ids, &expected[key]).unwrap_or_else(|e| {
            panic!("key {}: {e}", String::from_utf8_lossy(key));
        });
        if runs.len() > 1 {
            resent += 1;
        }
    }
    println!(
        "{trouble:?}: {resent} of {} keys had rows sent again",
        expected.len()
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    Outcome { seen, tally: t }
}

/// Copies of the rows of [`PARTITION`] beyond the first.
fn duplicates_in_partition(seen: &[Consumed]) -> usize {
    let rows: Vec<String> = seen
        .iter()
        .filter(|c| c.partition == PARTITION)
        .map(ce_id)
        .collect();
    let distinct: std::collections::HashSet<&String> = rows.iter().collect();
    rows.len() - distinct.len()
}

/// The leader of one partition is unreachable: its rows time out unwritten.
/// The acknowledged rows of the other partitions after the first failed
/// row are sent again; the unreachable partition's rows appear once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_an_unreachable_partition_time_out_and_are_resent_in_order() {
    let out = timeouts_mid_batch(Trouble::Unreachable).await;
    assert!(
        out.tally.duplicates > 0,
        "acknowledged rows were re-sent: {:?}",
        out.tally
    );
    assert_eq!(
        duplicates_in_partition(&out.seen),
        0,
        "rows that were never written are written once"
    );
}

/// The leader of one partition answers too late: its rows are written but
/// time out, so they are sent again too (a timed-out row may have been
/// written; the re-send is a new message to the idempotent producer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_but_timed_out_are_resent_in_order() {
    let out = timeouts_mid_batch(Trouble::Slow).await;
    assert!(
        duplicates_in_partition(&out.seen) > 0,
        "rows written but timed out are written again: {:?}",
        out.tally
    );
}
