//! Exactly-once mode against Apache Kafka (ignored unless run with
//! `KAFKA_BOOTSTRAP` set, e.g. `docker compose up kafka`; `scripts/test`
//! then includes them): the only broker here that
//! implements transactions, read_committed filtering and fencing.
//!
//! - Crash windows: the binary is SIGKILLed before the Kafka commit, after
//!   it but before the PostgreSQL position write, and mid-batch; restarted;
//!   a read_committed consumer must see every row exactly once.
//! - Zombie: an instance parked with an open transaction is fenced by the
//!   next owner's `init_transactions` (same `transactional.id`): its
//!   transaction is aborted and invisible, and nothing is duplicated.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use txbox_testkit::process::Child;
use txbox_testkit::{real_kafka, unique_name, Broker, TestDb};

const ROWS: usize = 500;
const BATCH: usize = 100;

struct Setup {
    db: TestDb,
    bootstrap: String,
    topic: String,
    staged: Vec<String>,
    args: Vec<String>,
}

async fn setup(bootstrap: String) -> Setup {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let broker = Broker::at(&bootstrap);
    let topic = broker.topic("eos", 3).await;
    stage_many(db.pool(), &topic, ROWS, 40, 50).await;
    let staged = staged_ids(db.pool()).await;
    let args = vec![
        "--database-url".to_owned(),
        db.url().to_owned(),
        "--brokers".to_owned(),
        bootstrap.clone(),
        "--mode".to_owned(),
        "exactly-once".to_owned(),
        "--batch-size".to_owned(),
        BATCH.to_string(),
        "--poll-interval".to_owned(),
        "50ms".to_owned(),
        "--lease-ttl".to_owned(),
        "3s".to_owned(),
        "--position-topic".to_owned(),
        unique_name("positions"),
        "--transactional-id-prefix".to_owned(),
        unique_name("txn"),
    ];
    Setup {
        db,
        bootstrap,
        topic,
        staged,
        args,
    }
}

fn spawn(s: &Setup, instance: &str, failpoints: Option<&str>) -> Child {
    let mut args: Vec<&str> = s.args.iter().map(String::as_str).collect();
    args.extend(["--instance", instance]);
    let mut envs = vec![("RUST_LOG", "info")];
    if let Some(fp) = failpoints {
        envs.push(("FAILPOINTS", fp));
    }
    Child::spawn(Path::new(env!("CARGO_BIN_EXE_txbox-relay")), &args, &envs)
}

async fn exactly_once_seen(s: &Setup) {
    let seen = consume(&s.bootstrap, &s.topic, ROWS, true).await;
    let t = tally(&seen, &s.staged);
    println!("read_committed consumer: {} records, {t:?}", seen.len());
    assert_eq!((t.missing, t.duplicates, t.unexpected), (0, 0, 0), "{t:?}");
}

async fn crash_and_restart(point: &str) {
    let b = real_kafka();
    let s = setup(b).await;
    let instance = unique_name("eos");
    let mut first = spawn(&s, &instance, Some(&format!("{point}=2*off->return")));
    first.kill_at(point, Duration::from_secs(60)).await;
    let mut second = spawn(&s, &instance, None);
    drained(s.db.pool(), Duration::from_secs(60)).await;
    second.terminate();
    assert_eq!(second.wait_within(Duration::from_secs(30)).await, Some(0));
    exactly_once_seen(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Apache Kafka: set KAFKA_BOOTSTRAP (docker compose up kafka)"]
async fn eos_killed_before_kafka_commit() {
    crash_and_restart("relay.before_kafka_commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Apache Kafka: set KAFKA_BOOTSTRAP (docker compose up kafka)"]
async fn eos_killed_after_kafka_commit_before_db_position() {
    crash_and_restart("relay.after_kafka_commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Apache Kafka: set KAFKA_BOOTSTRAP (docker compose up kafka)"]
async fn eos_killed_mid_batch() {
    crash_and_restart("relay.after_produce").await;
}

/// Instance A parks with an open transaction (a zombie: alive, lease
/// lapsing). B takes the stream after the TTL; its init_transactions with
/// the same transactional.id fences A and aborts A's transaction. A
/// read_committed consumer sees every row exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Apache Kafka: set KAFKA_BOOTSTRAP (docker compose up kafka)"]
async fn eos_zombie_is_fenced_by_transactional_id() {
    let b = real_kafka();
    let s = setup(b).await;
    let mut zombie = spawn(
        &s,
        "zombie-a",
        Some("relay.before_kafka_commit=2*off->return"),
    );
    assert!(
        zombie
            .wait_for_stderr(
                "TXBOX_CRASH_POINT relay.before_kafka_commit",
                Duration::from_secs(60)
            )
            .await,
        "{}",
        zombie.stderr()
    );
    let mut successor = spawn(&s, "successor-b", None);
    drained(s.db.pool(), Duration::from_secs(60)).await;
    assert_eq!(
        relay_row(s.db.pool()).await.0.as_deref(),
        Some("successor-b")
    );
    exactly_once_seen(&s).await;
    zombie.kill().await;
    successor.terminate();
    assert_eq!(
        successor.wait_within(Duration::from_secs(30)).await,
        Some(0)
    );
}
