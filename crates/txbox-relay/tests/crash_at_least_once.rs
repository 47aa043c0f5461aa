//! Crash windows in at-least-once mode: the `txbox-relay` binary (built
//! with its `failpoints` feature for tests) is SIGKILLed at a named step,
//! restarted, and what a consumer of Apache Kafka saw is counted
//! against the committed outbox: nothing may be missing, and duplicates
//! (always byte-identical, same `ce_id`) are bounded by one batch.
//!
//! Crash points, each on the third batch (`2*off->return`) of 100 rows:
//! - `relay.after_produce`: half the batch handed to the producer;
//! - `relay.before_kafka_commit`: the whole batch handed over, before
//!   waiting for acknowledgements (at-least-once's "flush");
//! - `relay.after_kafka_commit`: every row acknowledged, before the
//!   position write to PostgreSQL (the duplicate window: exactly one batch);
//! - `relay.after_db_position`: after the position write (no duplicates).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use txbox_testkit::process::Child;
use txbox_testkit::{kafka, unique_name, TestDb};

const ROWS: usize = 600;
const BATCH: usize = 100;

async fn crash_and_restart(point: &str) -> Tally {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let broker = kafka().await;
    let topic = broker.topic("crash", 3).await;
    stage_many(db.pool(), &topic, ROWS, 40, 50).await;
    let staged = staged_ids(db.pool()).await;
    let bin = Path::new(env!("CARGO_BIN_EXE_txbox-relay"));
    let instance = unique_name("crash");
    let position_topic = unique_name("positions");
    let batch = BATCH.to_string();
    let args = binary_args(
        &db,
        broker.bootstrap(),
        &[
            "--batch-size",
            &batch,
            "--lease-ttl",
            "3s",
            "--instance",
            &instance,
            "--position-topic",
            &position_topic,
        ],
    );
    let spec = format!("{point}=2*off->return");
    let mut first = Child::spawn(bin, &args, &[("FAILPOINTS", &spec), ("RUST_LOG", "info")]);
    first.kill_at(point, Duration::from_secs(60)).await;
    let (_, _, _, published_before) = relay_row(db.pool()).await;

    // Restarted under the same instance name: it waits out the dead
    // process's lease (3 s) like any other instance.
    let mut second = Child::spawn(bin, &args, &[("RUST_LOG", "info")]);
    drained(db.pool(), Duration::from_secs(60)).await;
    second.terminate();
    let code = second.wait_within(Duration::from_secs(20)).await;
    assert_eq!(
        code,
        Some(0),
        "clean exit on SIGTERM; stderr:\n{}",
        second.stderr()
    );
    assert_eq!(
        relay_row(db.pool()).await.0,
        None,
        "lease released on SIGTERM"
    );

    let seen = consume(broker.bootstrap(), &topic, ROWS, false).await;
    let t = tally(&seen, &staged);
    println!(
        "{point}: recorded before the crash {published_before}, consumer saw {} records: {t:?}",
        seen.len()
    );
    assert_eq!(t.missing, 0, "{point}: lost rows: {t:?}");
    assert_eq!(t.unexpected, 0, "{point}: {t:?}");
    assert!(
        t.duplicates <= BATCH,
        "{point}: more than one batch duplicated: {t:?}"
    );
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_batch() {
    crash_and_restart("relay.after_produce").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_produce_before_acknowledgements() {
    crash_and_restart("relay.before_kafka_commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_delivery_before_position_write() {
    let t = crash_and_restart("relay.after_kafka_commit").await;
    assert_eq!(
        t.duplicates, BATCH,
        "exactly the acknowledged batch is published again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_position_write() {
    let t = crash_and_restart("relay.after_db_position").await;
    assert_eq!(t.duplicates, 0);
}
