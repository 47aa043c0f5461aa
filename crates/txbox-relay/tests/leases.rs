//! Stream leases between real `txbox-relay` processes: one publisher per
//! stream, whatever the processes are called, and a takeover only once the
//! holder's lease has lapsed. Real PostgreSQL, Apache Kafka.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use txbox_testkit::process::Child;
use txbox_testkit::{kafka, unique_name, TestDb};

const ROWS: usize = 600;

/// At-least-once relay arguments for these tests: a 3 s lease, no pruning
/// (the tests compare the outbox with what was published).
fn lease_args<'a>(db: &'a TestDb, bootstrap: &'a str, position_topic: &'a str) -> Vec<&'a str> {
    binary_args(
        db,
        bootstrap,
        &[
            "--lease-ttl",
            "3s",
            "--position-topic",
            position_topic,
            "--prune-interval",
            "1h",
        ],
    )
}

fn spawn(args: &[&str], instance: &str) -> Child {
    let mut all = args.to_vec();
    all.extend(["--instance", instance]);
    Child::spawn(
        Path::new(env!("CARGO_BIN_EXE_txbox-relay")),
        &all,
        &[("RUST_LOG", "info")],
    )
}

/// Two processes started with the same `--instance` (a fixed name across
/// a rolling restart, or pid 1 in two containers): the second must not
/// take the first one's current lease by its name. Exactly one publishes
/// (one acquisition, token 1) while both run; the second takes over only
/// after the first dies and its lease lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_with_one_instance_name_publish_one_at_a_time() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let broker = kafka().await;
    let topic = broker.topic("same-name", 2).await;
    let position_topic = unique_name("positions");
    let args = lease_args(&db, broker.bootstrap(), &position_topic);
    let mut first = spawn(&args, "relay-same");
    eventually(
        "the first process leads",
        Duration::from_secs(20),
        || async { relay_row(db.pool()).await.1 == 1 },
    )
    .await;
    let second = spawn(&args, "relay-same");
    assert!(
        second
            .wait_for_stderr("held by another instance; waiting", Duration::from_secs(20))
            .await,
        "{}",
        second.stderr()
    );
    stage_many(db.pool(), &topic, ROWS, 40, 50).await;
    drained(db.pool(), Duration::from_secs(30)).await;
    let (owner, token, _, published) = relay_row(db.pool()).await;
    assert_eq!(
        (owner.as_deref(), token, published),
        (Some("relay-same"), 1, ROWS as i64),
        "one acquisition: the second process never took the lease"
    );
    assert!(
        !second.stderr_contains("acquired stream lease"),
        "{}",
        second.stderr()
    );

    first.kill().await;
    let killed = Instant::now();
    eventually(
        "the second process takes over",
        Duration::from_secs(15),
        || async { relay_row(db.pool()).await.1 == 2 },
    )
    .await;
    assert!(
        killed.elapsed() >= Duration::from_secs(1),
        "took over {:?} after the kill: before the 3 s lease could lapse",
        killed.elapsed()
    );
    stage_many(db.pool(), &topic, ROWS, 40, 50).await;
    drained(db.pool(), Duration::from_secs(30)).await;
    let staged = staged_ids(db.pool()).await;
    let seen = consume(broker.bootstrap(), &topic, 2 * ROWS, false).await;
    let t = tally(&seen, &staged);
    assert_eq!((t.missing, t.duplicates, t.unexpected), (0, 0, 0), "{t:?}");
    let mut second = second;
    second.terminate();
    assert_eq!(second.wait_within(Duration::from_secs(30)).await, Some(0));
}

/// The holder is alive but frozen (SIGSTOP: a long pause, a descheduled
/// VM): it cannot renew, so its lease lapses and a standby takes over.
/// Thawed, the old holder finds its token changed at its next write and
/// stops publishing; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_holder_loses_the_stream_when_its_lease_lapses() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let broker = kafka().await;
    let topic = broker.topic("frozen-holder", 2).await;
    let position_topic = unique_name("positions");
    let args = lease_args(&db, broker.bootstrap(), &position_topic);
    let holder = spawn(&args, "relay-a");
    eventually("relay-a leads", Duration::from_secs(20), || async {
        relay_row(db.pool()).await.0.as_deref() == Some("relay-a")
    })
    .await;
    let standby = spawn(&args, "relay-b");
    stage_many(db.pool(), &topic, ROWS, 40, 50).await;
    drained(db.pool(), Duration::from_secs(30)).await;

    holder.freeze();
    let frozen = Instant::now();
    stage_many(db.pool(), &topic, ROWS, 40, 50).await;
    eventually("relay-b takes over", Duration::from_secs(15), || async {
        relay_row(db.pool()).await.0.as_deref() == Some("relay-b")
    })
    .await;
    assert!(
        frozen.elapsed() >= Duration::from_secs(1),
        "taken over {:?} after the freeze: before the lease could lapse",
        frozen.elapsed()
    );
    drained(db.pool(), Duration::from_secs(30)).await;
    holder.thaw();
    assert!(
        holder
            .wait_for_stderr("lease lost; stopped publishing", Duration::from_secs(20))
            .await,
        "the thawed holder did not notice it lost the stream:\n{}",
        holder.stderr()
    );
    assert_eq!(relay_row(db.pool()).await.0.as_deref(), Some("relay-b"));

    let staged = staged_ids(db.pool()).await;
    let seen = consume(broker.bootstrap(), &topic, 2 * ROWS, false).await;
    let t = tally(&seen, &staged);
    assert_eq!((t.missing, t.unexpected), (0, 0), "{t:?}");
    for mut p in [holder, standby] {
        p.terminate();
        assert_eq!(p.wait_within(Duration::from_secs(30)).await, Some(0));
    }
}
