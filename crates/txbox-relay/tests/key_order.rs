//! Per-key order on Apache Kafka when transactions contend on one key.
//!
//! The relay publishes in `(txid, id)` order, and a transaction's id comes
//! from its first write. The expected orders here never come from that
//! ORDER BY: they come from the commit order a test forces (one transaction
//! commits while the other waits), or from the business values a row lock
//! hands out (balances read by `UPDATE ... RETURNING` under the account's
//! lock). With the default `KeyOrder::FirstWrite` the forced interleaving
//! publishes the earlier writer's event first although it committed last;
//! with `KeyOrder::Commit` a `read_committed` consumer sees commit order.
//! Also: the relay prunes order heads that no longer constrain anything,
//! and keeps those that do.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use sqlx::{PgPool, Postgres, Transaction};
use txbox::outbox::KeyOrder;
use txbox::{Outbox, OutboxEvent, Schema};
use txbox_relay::Mode;
use txbox_testkit::xid::sqlstate;
use txbox_testkit::{kafka, TestDb};

async fn setup(db: &TestDb) {
    sqlx::raw_sql(
        "CREATE TABLE noise (id bigint GENERATED ALWAYS AS IDENTITY, at timestamptz DEFAULT now());
         CREATE TABLE account (id text PRIMARY KEY, balance bigint NOT NULL DEFAULT 0);",
    )
    .execute(db.pool())
    .await
    .unwrap();
}

fn outbox(order: KeyOrder) -> Outbox {
    Outbox::new(Schema::default())
        .notify(txbox::outbox::DEFAULT_NOTIFY_CHANNEL)
        .key_order(order)
}

/// [`txbox_testkit::xid::begin_writing`] into this test's `noise` table.
async fn begin_writing(pool: &PgPool) -> (Transaction<'static, Postgres>, u64) {
    txbox_testkit::xid::begin_writing(pool, "noise").await
}

/// What a `read_committed` consumer of `topic` sees, as `ce_id`s in
/// offset order (one partition).
async fn published(bootstrap: &str, topic: &str, n: usize) -> Vec<String> {
    let mut seen = consume(bootstrap, topic, n, true).await;
    seen.sort_by_key(|c| c.offset);
    seen.iter().map(ce_id).collect()
}

/// Default mode, the problem: T1 makes its first write, then T2 does,
/// stages key k and commits; T1 stages k and commits last. The relay
/// publishes T1's event first, against commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_write_order_publishes_the_earlier_writer_first() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    setup(&db).await;
    let broker = kafka().await;
    let topic = broker.topic("first-write", 1).await;
    let outbox = outbox(KeyOrder::FirstWrite);

    let (mut t1, x1) = begin_writing(db.pool()).await;
    let (mut t2, x2) = begin_writing(db.pool()).await;
    assert!(x1 < x2);
    let second = outbox
        .stage(&mut t2, event(&topic, "k", 2, 1))
        .await
        .unwrap();
    t2.commit().await.unwrap();
    let last = outbox
        .stage(&mut t1, event(&topic, "k", 1, 1))
        .await
        .unwrap();
    t1.commit().await.unwrap();

    let relay = Relay::start(config(&db, broker.bootstrap(), Mode::ExactlyOnce));
    assert_eq!(
        published(broker.bootstrap(), &topic, 2).await,
        vec![last.to_string(), second.to_string()],
        "first-write order: T1 (committed last) is published first"
    );
    relay.stop().await;
}

/// Commit mode, the same interleaving: T1's staging fails with 40001; its
/// retry commits after T2, and a `read_committed` consumer sees T2's event
/// then T1's, the commit order the test forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_order_publishes_in_commit_order() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    setup(&db).await;
    let broker = kafka().await;
    let topic = broker.topic("commit-order", 1).await;
    let outbox = outbox(KeyOrder::Commit);
    let relay = Relay::start(config(&db, broker.bootstrap(), Mode::ExactlyOnce));

    let (mut t1, x1) = begin_writing(db.pool()).await;
    let (mut t2, x2) = begin_writing(db.pool()).await;
    assert!(x1 < x2);
    let first = outbox
        .stage(&mut t2, event(&topic, "k", 2, 1))
        .await
        .unwrap();
    t2.commit().await.unwrap();
    let err = outbox
        .stage(&mut t1, event(&topic, "k", 1, 1))
        .await
        .expect_err("T1 may not stage k behind T2");
    assert_eq!(sqlstate(&err).as_deref(), Some("40001"), "{err}");
    assert!(err.is_transient());
    t1.rollback().await.unwrap();

    // The retry: a new transaction, a new (higher) id.
    let (mut retry, x3) = begin_writing(db.pool()).await;
    assert!(x3 > x2);
    let second = outbox
        .stage(&mut retry, event(&topic, "k", 1, 1))
        .await
        .unwrap();
    retry.commit().await.unwrap();

    assert_eq!(
        published(broker.bootstrap(), &topic, 2).await,
        vec![first.to_string(), second.to_string()],
        "commit order: T2, then T1's retry"
    );
    relay.stop().await;
}

const TASKS: usize = 8;
const TXS_PER_TASK: usize = 200;
const ACCOUNTS: usize = 3;

/// What one contention run produced.
struct Contention {
    /// Per account, the balances in the order a `read_committed` consumer
    /// saw their events.
    seen: BTreeMap<String, Vec<i64>>,
    /// Per account, its final balance.
    balances: BTreeMap<String, i64>,
    /// Transactions retried after 40001/40P01.
    retries: usize,
    elapsed: Duration,
}

impl Contention {
    /// Adjacent pairs of one account's events out of balance order.
    fn inversions(&self) -> usize {
        self.seen
            .values()
            .map(|b| b.windows(2).filter(|w| w[1] < w[0]).count())
            .sum()
    }
}

/// `TASKS` concurrent tasks, each running `TXS_PER_TASK` transactions:
/// an unrelated first write, then `UPDATE account ... RETURNING balance`
/// on one of `ACCOUNTS` shared accounts (the row lock hands out balances
/// 1, 2, 3... in lock order, which is commit order), then an event keyed
/// by the account carrying the balance; retried on 40001/40P01. The relay
/// (exactly-once) publishes while they run.
async fn contend(order: KeyOrder) -> Contention {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    setup(&db).await;
    sqlx::query("INSERT INTO account (id) SELECT 'acct-' || g FROM generate_series(0, $1 - 1) g")
        .bind(ACCOUNTS as i32)
        .execute(db.pool())
        .await
        .unwrap();
    let broker = kafka().await;
    let topic = broker.topic("contention", 4).await;
    let mut cfg = config(&db, broker.bootstrap(), Mode::ExactlyOnce);
    cfg.batch_size = 200;
    let relay = Relay::start(cfg);

    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let pool = db.pool().clone();
            let topic = topic.clone();
            let outbox = outbox(order);
            tokio::spawn(async move {
                let mut retries = 0;
                for i in 0..TXS_PER_TASK {
                    let account = format!("acct-{}", (task + i) % ACCOUNTS);
                    let mut attempts = 0;
                    loop {
                        attempts += 1;
                        assert!(attempts < 1000, "{account}: no commit in 1000 attempts");
                        // Work between the first write and the lock (a
                        // handler decoding, looking something up), so
                        // that transactions overlap: 0 to 499 µs.
                        let pause = Duration::from_micros(
                            ((task * 7919 + i * 104_729 + attempts * 31) % 500) as u64,
                        );
                        match one_deposit(&pool, &outbox, &topic, &account, pause).await {
                            Ok(()) => break,
                            Err(e) if e.is_transient() => retries += 1,
                            Err(e) => panic!("deposit failed: {e}"),
                        }
                    }
                }
                retries
            })
        })
        .collect();
    let mut retries = 0;
    for t in tasks {
        retries += t.await.unwrap();
    }
    let elapsed = started.elapsed();

    let total = TASKS * TXS_PER_TASK;
    let seen = consume(broker.bootstrap(), &topic, total, true).await;
    relay.stop().await;
    assert_eq!(seen.len(), total, "every committed event once");
    let mut sorted: Vec<_> = seen.iter().collect();
    sorted.sort_by_key(|c| (c.partition, c.offset));
    let mut by_account: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for c in sorted {
        let p = payload_json(c);
        by_account
            .entry(p["account"].as_str().unwrap().to_owned())
            .or_default()
            .push(p["balance"].as_i64().unwrap());
    }
    let balances: BTreeMap<String, i64> = sqlx::query_as("SELECT id, balance FROM account")
        .fetch_all(db.pool())
        .await
        .unwrap()
        .into_iter()
        .collect();
    Contention {
        seen: by_account,
        balances,
        retries,
        elapsed,
    }
}

/// One transaction of [`contend`].
async fn one_deposit(
    pool: &PgPool,
    outbox: &Outbox,
    topic: &str,
    account: &str,
    pause: Duration,
) -> txbox::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO noise DEFAULT VALUES")
        .execute(&mut *tx)
        .await?;
    tokio::time::sleep(pause).await;
    let (balance,): (i64,) =
        sqlx::query_as("UPDATE account SET balance = balance + 1 WHERE id = $1 RETURNING balance")
            .bind(account)
            .fetch_one(&mut *tx)
            .await?;
    let event = OutboxEvent::json(
        topic,
        &serde_json::json!({ "account": account, "balance": balance }),
    )?
    .key(account);
    outbox.stage(&mut tx, event).await?;
    tx.commit().await?;
    Ok(())
}

/// Commit mode under contention: per account, the balances a
/// `read_committed` consumer sees are 1, 2, ..., N: strictly increasing,
/// nothing missing, nothing twice. (Run with `KeyOrder::FirstWrite`, the
/// same test finds inversions: see `contention_inverts_first_write_order`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contended_accounts_publish_balances_in_commit_order() {
    let run = contend(KeyOrder::Commit).await;
    eprintln!(
        "commit order: {} transactions in {:.2?}, {} retries, {} inversions",
        TASKS * TXS_PER_TASK,
        run.elapsed,
        run.retries,
        run.inversions()
    );
    assert_eq!(run.seen.len(), ACCOUNTS);
    for (account, seen) in &run.seen {
        let n = run.balances[account];
        assert_eq!(
            seen,
            &(1..=n).collect::<Vec<_>>(),
            "{account}: balances in publish order"
        );
    }
    assert!(run.retries > 0, "the test made transactions contend");
}

/// The same contention with the default `KeyOrder::FirstWrite`: the relay
/// publishes in first-write order, and with transactions overlapping some
/// of an account's balances come out of order (200 to 270 of 1,600 pairs in
/// every run so far; none would mean the transactions never overlapped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contention_inverts_first_write_order() {
    let run = contend(KeyOrder::FirstWrite).await;
    eprintln!(
        "first-write order: {} transactions in {:.2?}, {} retries, {} inversions",
        TASKS * TXS_PER_TASK,
        run.elapsed,
        run.retries,
        run.inversions()
    );
    assert!(
        run.inversions() > 0,
        "first-write order published every account in balance order"
    );
}

async fn heads(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT convert_from(key, 'UTF8') FROM txbox.outbox_key_order ORDER BY key")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// The relay deletes order heads below the snapshot's xmin, in batches,
/// and keeps the others: the head of `k-held`, written by a transaction
/// that committed while an older one (T_old) still runs, is what makes
/// T_old's staging of `k-held` fail; deleting it would let T_old publish
/// first. A head a running transaction has locked (`k-0`, restaged) is
/// skipped. Once those transactions end, every head goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_prunes_order_heads_that_constrain_nothing() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    setup(&db).await;
    let broker = kafka().await;
    let topic = broker.topic("heads", 1).await;
    let outbox = outbox(KeyOrder::Commit);
    for k in 0..5 {
        let (mut tx, _) = begin_writing(db.pool()).await;
        outbox
            .stage(&mut tx, event(&topic, &format!("k-{k}"), 0, k))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let (mut old, _) = begin_writing(db.pool()).await;
    let (mut newer, _) = begin_writing(db.pool()).await;
    outbox
        .stage(&mut newer, event(&topic, "k-held", 0, 5))
        .await
        .unwrap();
    newer.commit().await.unwrap();
    let (mut open, _) = begin_writing(db.pool()).await;
    outbox
        .stage(&mut open, event(&topic, "k-0", 0, 6))
        .await
        .unwrap();
    assert_eq!(heads(db.pool()).await.len(), 6);

    let mut cfg = config(&db, broker.bootstrap(), Mode::AtLeastOnce);
    cfg.prune_batch = 2;
    cfg.prune_interval = Duration::from_millis(100);
    let relay = Relay::start(cfg);
    let kept = vec!["k-0".to_owned(), "k-held".to_owned()];
    eventually(
        "heads of ended transactions pruned",
        Duration::from_secs(30),
        || async { heads(db.pool()).await == kept },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(heads(db.pool()).await, kept, "after more prune rounds");

    let err = outbox
        .stage(&mut old, event(&topic, "k-held", 0, 7))
        .await
        .expect_err("the kept head still orders k-held");
    assert_eq!(sqlstate(&err).as_deref(), Some("40001"), "{err}");
    old.rollback().await.unwrap();
    open.commit().await.unwrap();
    eventually("every head pruned", Duration::from_secs(30), || async {
        heads(db.pool()).await.is_empty()
    })
    .await;
    relay.stop().await;
}
