//! Exactly-once mode on Apache Kafka, the broker that implements
//! transactions, `read_committed` filtering and producer fencing.
//!
//! Each test ends with the same check, by a `read_committed` consumer:
//! every committed outbox row is visible exactly once, per key in staging
//! order, and no row of a rolled-back staging transaction ever is.
//!
//! - Crash windows: the `txbox-relay` binary is SIGKILLed mid-batch, after
//!   producing a batch but before the Kafka commit, after the Kafka commit
//!   but before the position reaches PostgreSQL, and in the middle of a
//!   prune; then restarted.
//! - The broker itself is `kill -9`ed mid-stream and restarted.
//! - Zombie: the leader is frozen (SIGSTOP) inside an open transaction
//!   whose records are written; another relay takes the stream over and
//!   publishes; the zombie is thawed and its commit must be fenced by the
//!   shared `transactional.id`.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use sqlx::PgPool;
use txbox_testkit::process::Child;
use txbox_testkit::{kafka, unique_name, Broker, KafkaServer, TestDb};

const ROWS: usize = 500;
const BATCH: usize = 100;

struct Setup {
    db: TestDb,
    bootstrap: String,
    topic: String,
    /// Committed event ids, in publishing order.
    staged: Vec<String>,
    /// Per key, the committed event ids in staging order.
    staged_by_key: BTreeMap<Vec<u8>, Vec<String>>,
    args: Vec<String>,
}

/// A database with `ROWS` committed rows over 40 keys, and rolled-back
/// staging transactions between them; relay arguments for exactly-once
/// mode against `broker`, then `extra`.
async fn setup(broker: &Broker, extra: &[&str]) -> Setup {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let topic = broker.topic("eos", 3).await;
    for _ in 0..5 {
        stage_rolled_back(db.pool(), &topic, 10).await;
        stage_many(db.pool(), &topic, ROWS / 5, 40, 50).await;
    }
    let staged = staged_ids(db.pool()).await;
    let staged_by_key = staged_by_key(db.pool()).await;
    let mut args: Vec<String> = [
        "--database-url",
        db.url(),
        "--brokers",
        broker.bootstrap(),
        "--mode",
        "exactly-once",
        "--batch-size",
        &BATCH.to_string(),
        "--poll-interval",
        "50ms",
        "--lease-ttl",
        "3s",
        "--position-topic",
        &unique_name("positions"),
        "--transactional-id-prefix",
        &unique_name("txn"),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    Setup {
        db,
        bootstrap: broker.bootstrap().to_owned(),
        topic,
        staged,
        staged_by_key,
        args,
    }
}

/// Stages `n` rows in a transaction that rolls back: they never exist.
async fn stage_rolled_back(pool: &PgPool, topic: &str, n: usize) {
    let outbox = txbox::Outbox::new(txbox::Schema::default());
    let mut tx = pool.begin().await.unwrap();
    outbox
        .stage_all(&mut tx, (0..n).map(|i| event(topic, "k-rolled-back", 9, i)))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
}

/// Per key, the committed event ids of stream 0 in staging order.
async fn staged_by_key(pool: &PgPool) -> BTreeMap<Vec<u8>, Vec<String>> {
    let rows: Vec<(Vec<u8>, String)> = sqlx::query_as(
        "SELECT key, event_id::text FROM txbox.outbox WHERE stream = 0 ORDER BY txid, id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut out: BTreeMap<Vec<u8>, Vec<String>> = BTreeMap::new();
    for (key, id) in rows {
        out.entry(key).or_default().push(id);
    }
    out
}

fn spawn(s: &Setup, instance: &str, failpoints: Option<&str>) -> Child {
    let mut args: Vec<&str> = s.args.iter().map(String::as_str).collect();
    args.extend(["--instance", instance]);
    let mut envs = vec![("RUST_LOG", "info,txbox_relay=debug")];
    if let Some(fp) = failpoints {
        envs.push(("FAILPOINTS", fp));
    }
    Child::spawn(Path::new(env!("CARGO_BIN_EXE_txbox-relay")), &args, &envs)
}

/// What a `read_committed` consumer sees: every committed row once, per
/// key in staging order, nothing else.
async fn assert_exactly_once_in_order(s: &Setup) {
    let seen = consume(&s.bootstrap, &s.topic, s.staged.len(), true).await;
    let t = tally(&seen, &s.staged);
    println!("read_committed consumer: {} records, {t:?}", seen.len());
    assert_eq!(
        (t.missing, t.duplicates, t.unexpected),
        (0, 0, 0),
        "missing, duplicated, unexpected (a rolled-back row, or another test's): {t:?}"
    );
    assert_eq!(
        by_key(&seen),
        s.staged_by_key,
        "per key, Kafka's order is the staging order"
    );
}

async fn stop(mut relay: Child) {
    relay.stop().await;
}

/// Kills the relay at `point` on its third pass, restarts it, and checks
/// the outcome once the restarted relay has published everything.
async fn crash_and_restart(point: &str, extra: &[&str]) {
    let s = setup(kafka().await, extra).await;
    let mut first = spawn(
        &s,
        &unique_name("eos"),
        Some(&format!("{point}=2*off->return")),
    );
    first.kill_at(point, Duration::from_secs(60)).await;
    let second = spawn(&s, &unique_name("eos"), None);
    // It takes over once the dead relay's lease lapses (3 s), and recovers.
    assert!(
        second
            .wait_for_stderr("acquired stream lease", Duration::from_secs(30))
            .await,
        "{}",
        second.stderr()
    );
    drained(s.db.pool(), Duration::from_secs(60)).await;
    stop(second).await;
    assert_exactly_once_in_order(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_batch() {
    crash_and_restart("relay.after_produce", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_producing_before_the_kafka_commit() {
    crash_and_restart("relay.before_kafka_commit", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_kafka_commit_before_the_db_position() {
    crash_and_restart("relay.after_kafka_commit", &[]).await;
}

/// Pruning deletes in statements of 20 rows; the relay dies after some of
/// a round's statements. What was deleted was published; nothing
/// unpublished is deleted, nothing is published twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_prune() {
    crash_and_restart(
        "relay.during_prune",
        &["--prune-batch", "20", "--prune-interval", "100ms"],
    )
    .await;
}

/// The broker's JVM is killed with SIGKILL while the relay publishes (an
/// open transaction is likely), and started again on the same data. The
/// relay waits it out; staging goes on throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_mid_stream() {
    let server = KafkaServer::start().await;
    let broker = server.broker();
    // No pruning: the rows staged during the run are compared at the end.
    let mut s = setup(&broker, &["--prune-interval", "1h"]).await;
    let relay = spawn(&s, &unique_name("eos"), None);
    eventually("the relay publishes", Duration::from_secs(60), || async {
        relay_row(s.db.pool()).await.3 >= 200
    })
    .await;
    // More rows while the broker is down and after it is back.
    let writer = {
        let (pool, topic) = (s.db.pool().clone(), s.topic.clone());
        tokio::spawn(async move {
            for _ in 0..20 {
                stage_many(&pool, &topic, 25, 40, 25).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    server.kill().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.restart().await;
    writer.await.unwrap();
    s.staged = staged_ids(s.db.pool()).await;
    s.staged_by_key = staged_by_key(s.db.pool()).await;
    drained(s.db.pool(), Duration::from_secs(120)).await;
    stop(relay).await;
    assert_eq!(s.staged.len(), ROWS + 500);
    assert_exactly_once_in_order(&s).await;
}

/// Relay A is frozen with SIGSTOP inside an open Kafka transaction whose
/// records the broker has (acknowledged, not committed). Relay B takes
/// the stream once A's lease lapses; its `init_transactions` with the same
/// `transactional.id` fences A's producer and aborts A's transaction. A is
/// thawed: its commit must fail, and it must not write its position.
///
/// Without fencing A's commit would succeed on waking and its batch would
/// be visible twice: A is thawed well within its transaction timeout, so
/// no broker-side timeout can hide that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_is_fenced_when_it_wakes() {
    let s = setup(kafka().await, &[]).await;
    let mut zombie = spawn(
        &s,
        "relay-a",
        Some("relay.before_kafka_commit=2*off->return(freeze)"),
    );
    zombie
        .wait_frozen_at("relay.before_kafka_commit", Duration::from_secs(60))
        .await;
    let frozen_at = Instant::now();
    let successor = spawn(&s, "relay-b", None);
    // B's recovery reads the position topic read_committed, which an open
    // transaction of A would hold up until A's transaction timed out (30
    // s): fencing aborts it at once.
    assert!(
        tokio::time::timeout(
            Duration::from_secs(20),
            drained(s.db.pool(), Duration::from_secs(60))
        )
        .await
        .is_ok(),
        "relay-b did not publish everything within 20 s of taking over from a frozen leader:\n{}",
        successor.stderr()
    );
    let (owner, token, ..) = relay_row(s.db.pool()).await;
    assert_eq!(owner.as_deref(), Some("relay-b"));

    zombie.thaw();
    assert!(
        frozen_at.elapsed() < Duration::from_secs(25),
        "frozen for {:?}: the 30 s transaction timeout could abort the zombie's \
         transaction instead of fencing, so this run proves nothing",
        frozen_at.elapsed()
    );
    assert!(
        zombie
            .wait_for_stderr("stopped publishing", Duration::from_secs(30))
            .await,
        "the thawed zombie's producer was not fenced:\n{}",
        zombie.stderr()
    );
    assert!(
        zombie.stderr_contains("fenced by a newer instance"),
        "the zombie stopped for another reason than fencing:\n{}",
        zombie.stderr()
    );
    // Its position was not written, and the stream stays with B.
    let (owner_after, token_after, ..) = relay_row(s.db.pool()).await;
    assert_eq!(
        (owner_after.as_deref(), token_after),
        (Some("relay-b"), token)
    );
    assert_exactly_once_in_order(&s).await;
    zombie.kill().await;
    stop(successor).await;
}
