//! The relay against Apache Kafka and a real PostgreSQL, in at-least-once
//! mode: gap-safety against late commits, no publication of rolled-back
//! rows, per-key order, lease exclusivity and takeover, reject handling and
//! pruning. Exactly-once mode, crashes and fencing: `exactly_once.rs`.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use txbox::{Outbox, OutboxEvent};
use txbox_relay::{CancellationToken, Error, Mode, OnReject};
use txbox_testkit::{kafka, TestDb};

/// A row whose transaction took a lower outbox id but commits after a
/// higher one was published is still published (an id-based cursor would
/// skip it for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_commit_with_lower_id_is_not_skipped() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let broker = kafka().await;
    let topic = broker.topic("gap", 1).await;
    let outbox = Outbox::new(txbox::Schema::default());

    // B takes its transaction id first; A then inserts (lower row id,
    // higher txid); B inserts and commits while A stays open.
    let mut b = db.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *b)
        .await
        .unwrap();
    let mut a = db.pool().begin().await.unwrap();
    let a_id = outbox
        .stage(&mut a, event(&topic, "k-a", 0, 0))
        .await
        .unwrap();
    let a_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *a)
        .await
        .unwrap();
    let b_id = outbox
        .stage(&mut b, event(&topic, "k-b", 0, 1))
        .await
        .unwrap();
    let row_id = "SELECT id FROM txbox.outbox WHERE event_id = $1";
    let a_row: i64 = sqlx::query_scalar(row_id)
        .bind(a_id)
        .fetch_one(&mut *a)
        .await
        .unwrap();
    let b_row: i64 = sqlx::query_scalar(row_id)
        .bind(b_id)
        .fetch_one(&mut *b)
        .await
        .unwrap();
    b.commit().await.unwrap();
    assert!(
        a_row < b_row,
        "A has the lower id ({a_row} < {b_row}) but commits last"
    );

    // While A runs it is the transaction holding the relay's xmin back
    // (xmin is cluster-wide: a parallel test's older transaction may hold it
    // for a moment first).
    eventually(
        "A named as holding xmin back",
        Duration::from_secs(30),
        || async {
            txbox_relay::hold_back(db.pool())
                .await
                .unwrap()
                .is_some_and(|held| held.pid == a_pid)
        },
    )
    .await;

    let relay = Relay::start(config(&db, broker.bootstrap(), Mode::AtLeastOnce));
    let seen = consume(broker.bootstrap(), &topic, 1, false).await;
    assert_eq!(
        seen.iter().map(ce_id).collect::<Vec<_>>(),
        vec![b_id.to_string()],
        "B published, A not yet"
    );
    eventually(
        "position recorded past A's id",
        Duration::from_secs(10),
        || async { relay_row(db.pool()).await.2 == b_row },
    )
    .await;

    a.commit().await.unwrap();
    let seen = consume(broker.bootstrap(), &topic, 2, false).await;
    let ids: Vec<String> = seen.iter().map(ce_id).collect();
    assert_eq!(
        ids,
        vec![b_id.to_string(), a_id.to_string()],
        "A published after B, once"
    );
    relay.stop().await;
}

/// Staged rows of a rolled-back transaction do not exist, so they are
/// never published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_rows_are_never_published() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let broker = kafka().await;
    let topic = broker.topic("rollback", 1).await;
    let outbox = Outbox::new(txbox::Schema::default());
    let relay = Relay::start(config(&db, broker.bootstrap(), Mode::AtLeastOnce));

    let mut tx = db.pool().begin().await.unwrap();
    outbox
        .stage_all(&mut tx, (0..3).map(|i| event(&topic, "k", 0, i)))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut tx = db.pool().begin().await.unwrap();
    let sentinel = outbox
        .stage(&mut tx, event(&topic, "k", 0, 99))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    drained(db.pool(), Duration::from_secs(20)).await;
    let seen = consume(broker.bootstrap(), &topic, 1, false).await;
    assert_eq!(
        seen.iter().map(ce_id).collect::<Vec<_>>(),
        vec![sentinel.to_string()]
    );
    relay.stop().await;
}

/// 3,000 events over 200 keys from 4 concurrent writers, relayed while
/// they write. Per key, Kafka's order (offset order in the key's
/// partition) must equal the relay's `(txid, id)` order. With concurrent
/// writers that is the order the transactions got their ids (first
/// write), and within a transaction the staging order; each writer's own
/// sequence per key must therefore rise too. Nothing lost, nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_under_concurrent_writers() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let broker = kafka().await;
    let topic = broker.topic("order", 4).await;
    let mut cfg = config(&db, broker.bootstrap(), Mode::AtLeastOnce);
    cfg.batch_size = 250;
    cfg.prune_interval = Duration::from_secs(3600); // keep rows to compare
    let relay = Relay::start(cfg);

    const WRITERS: usize = 4;
    const TXS: usize = 25;
    const PER_TX: usize = 30;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let pool = db.pool().clone();
            let topic = topic.clone();
            tokio::spawn(async move {
                let outbox = Outbox::new(txbox::Schema::default())
                    .notify(txbox::outbox::DEFAULT_NOTIFY_CHANNEL);
                let mut seq = 0;
                for t in 0..TXS {
                    let mut tx = pool.begin().await.unwrap();
                    let events: Vec<_> = (0..PER_TX)
                        .map(|i| {
                            seq += 1;
                            let key = format!("k{}", (w * 7919 + t * 31 + i * 13) % 200);
                            event(&topic, &key, w, seq)
                        })
                        .collect();
                    outbox.stage_all(&mut tx, events).await.unwrap();
                    tx.commit().await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let total = WRITERS * TXS * PER_TX;
    drained(db.pool(), Duration::from_secs(60)).await;
    let staged = staged_ids(db.pool()).await;
    assert_eq!(staged.len(), total);
    let seen = consume(broker.bootstrap(), &topic, total, false).await;
    let t = tally(&seen, &staged);
    assert_eq!((t.missing, t.duplicates, t.unexpected), (0, 0, 0), "{t:?}");

    // Expected per key: the (txid, id) order of the outbox.
    let keys: Vec<(Vec<u8>, String)> = sqlx::query_as(
        "SELECT key, event_id::text FROM txbox.outbox WHERE stream = 0 ORDER BY txid, id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let mut expected: HashMap<Vec<u8>, Vec<String>> = HashMap::new();
    for (k, id) in keys {
        expected.entry(k).or_default().push(id);
    }
    let actual = by_key(&seen);
    assert_eq!(actual.len(), 200);
    for (k, ids) in &actual {
        assert_eq!(
            Some(ids),
            expected.get(k),
            "order of key {}",
            String::from_utf8_lossy(k)
        );
    }
    // Each writer's sequence rises per key.
    let mut last: HashMap<(u64, String), u64> = HashMap::new();
    let mut sorted: Vec<_> = seen.iter().collect();
    sorted.sort_by_key(|c| (c.partition, c.offset));
    for c in sorted {
        let p = payload_json(c);
        let k = (
            p["writer"].as_u64().unwrap(),
            p["key"].as_str().unwrap().to_owned(),
        );
        let seq = p["seq"].as_u64().unwrap();
        if let Some(prev) = last.insert(k.clone(), seq) {
            assert!(prev < seq, "writer {} key {}: {seq} after {prev}", k.0, k.1);
        }
    }
    relay.stop().await;
}

/// Two relay instances of one stream: one leads and publishes, the other
/// waits. The leader dies without releasing its lease; the other takes
/// over once the lease TTL passed and publishes the rest. Every row
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_after_lease_ttl() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let broker = kafka().await;
    let topic = broker.topic("zombie", 2).await;
    let mut a_cfg = config(&db, broker.bootstrap(), Mode::AtLeastOnce);
    a_cfg.lease_ttl = Duration::from_secs(2);
    a_cfg.instance = "relay-a".into();
    let mut b_cfg = a_cfg.clone();
    b_cfg.instance = "relay-b".into();

    let a = Relay::start(a_cfg);
    eventually("relay-a leads", Duration::from_secs(10), || async {
        relay_row(db.pool()).await.0.as_deref() == Some("relay-a")
    })
    .await;
    let b = Relay::start(b_cfg);
    stage_many(db.pool(), &topic, 1000, 50, 100).await;
    drained(db.pool(), Duration::from_secs(30)).await;
    let (owner, token, _, published) = relay_row(db.pool()).await;
    assert_eq!(
        owner.as_deref(),
        Some("relay-a"),
        "the standby never took the stream"
    );
    assert_eq!((token, published), (1, 1000));

    a.kill().await;
    let killed = Instant::now();
    let lease_left: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM lease_expires_at - now())::float8 FROM txbox.relay_streams WHERE stream = 0",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert!(lease_left > 0.0, "relay-a's lease was current when it died");
    stage_many(db.pool(), &topic, 1000, 50, 100).await;
    eventually("relay-b takes over", Duration::from_secs(15), || async {
        relay_row(db.pool()).await.0.as_deref() == Some("relay-b")
    })
    .await;
    let waited = killed.elapsed().as_secs_f64();
    assert!(
        waited >= lease_left - 0.1,
        "took over after {waited:.2}s, before the lease ({lease_left:.2}s left) lapsed"
    );
    drained(db.pool(), Duration::from_secs(30)).await;

    let staged = staged_ids(db.pool()).await;
    let seen = consume(broker.bootstrap(), &topic, 2000, false).await;
    let t = tally(&seen, &staged);
    assert_eq!((t.distinct, t.missing, t.duplicates), (2000, 0, 0), "{t:?}");
    let report = b.stop().await;
    assert_eq!(
        report.published(),
        1000,
        "the standby published only the second half"
    );
    assert_eq!(report.streams[0].leaderships, 1);
    assert_eq!(
        relay_row(db.pool()).await.0,
        None,
        "lease released on shutdown"
    );
}

/// A row Kafka refuses for good: with `on_reject = stop` the stream stops
/// with an error naming the row and topic; with `dead-letter` the row moves
/// to relay_dead_letters (token-checked, one transaction) and the rest is
/// published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_rows_stop_or_dead_letter() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let broker = kafka().await;
    let topic = broker.topic("reject", 1).await;
    let big = txbox::OutboxEvent::new(&topic, vec![b'x'; 20_000]).key("k");
    let big_id = big.id();
    stage(db.pool(), vec![event(&topic, "k", 0, 1)]).await;
    stage(db.pool(), vec![big]).await;
    stage(db.pool(), vec![event(&topic, "k", 0, 3)]).await;
    let row_id: i64 = sqlx::query_scalar("SELECT id FROM txbox.outbox WHERE event_id = $1")
        .bind(big_id)
        .fetch_one(db.pool())
        .await
        .unwrap();

    let mut cfg = config(&db, broker.bootstrap(), Mode::AtLeastOnce);
    cfg.kafka.insert("message.max.bytes".into(), "10000".into());
    let err = txbox_relay::run(cfg.clone(), txbox_relay::CancellationToken::new())
        .await
        .expect_err("stops on the rejected row");
    match &err {
        Error::Rejected {
            outbox_id,
            topic: t,
            ..
        } => {
            assert_eq!((*outbox_id, t.as_str()), (row_id, topic.as_str()));
        }
        other => panic!("expected Rejected, got {other}"),
    }
    assert!(
        err.to_string().contains(&format!("outbox row {row_id}")),
        "{err}"
    );
    assert_eq!(
        unpublished(db.pool()).await,
        2,
        "the row and the one behind it wait"
    );

    cfg.on_reject = OnReject::DeadLetter;
    let relay = Relay::start(cfg);
    drained(db.pool(), Duration::from_secs(20)).await;
    let report = relay.stop().await;
    assert_eq!(report.dead_lettered(), 1);
    let (dead_id, error): (i64, String) =
        sqlx::query_as("SELECT outbox_id, error FROM txbox.relay_dead_letters")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(dead_id, row_id);
    assert!(error.to_lowercase().contains("size"), "{error}");
    let seen = consume(broker.bootstrap(), &topic, 2, false).await;
    let seqs: Vec<u64> = seen
        .iter()
        .map(|c| payload_json(c)["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 3]);
}

/// A dead letter already exists for the rejected row's outbox id (an
/// identity restarted by a restore, a dead letter kept from before): the
/// move still keeps the row, as a second dead letter, and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_for_a_reused_outbox_id_loses_nothing() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let broker = kafka().await;
    let topic = broker.topic("reject-reused", 1).await;
    let big = txbox::OutboxEvent::new(&topic, vec![b'x'; 20_000]).key("k");
    let big_id = big.id();
    stage(db.pool(), vec![big]).await;
    stage(db.pool(), vec![event(&topic, "k", 0, 2)]).await;
    let row_id: i64 = sqlx::query_scalar("SELECT id FROM txbox.outbox WHERE event_id = $1")
        .bind(big_id)
        .fetch_one(db.pool())
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO txbox.relay_dead_letters (outbox_id, stream, txid, topic, event_id, error)
         VALUES ($1, 0, '1', 'an-earlier-life', gen_random_uuid(), 'kept from before')",
    )
    .bind(row_id)
    .execute(db.pool())
    .await
    .unwrap();

    let mut cfg = config(&db, broker.bootstrap(), Mode::AtLeastOnce);
    cfg.kafka.insert("message.max.bytes".into(), "10000".into());
    cfg.on_reject = OnReject::DeadLetter;
    let relay = Relay::start(cfg);
    drained(db.pool(), Duration::from_secs(20)).await;
    let report = relay.stop().await;
    assert_eq!(report.dead_lettered(), 1);
    let kept: Vec<(String, Option<uuid::Uuid>)> = sqlx::query_as(
        "SELECT topic, event_id FROM txbox.relay_dead_letters WHERE outbox_id = $1 ORDER BY id",
    )
    .bind(row_id)
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(kept.len(), 2, "both dead letters kept: {kept:?}");
    assert_eq!(
        (kept[1].0.as_str(), kept[1].1),
        (topic.as_str(), Some(big_id))
    );
    let seen = consume(broker.bootstrap(), &topic, 1, false).await;
    assert_eq!(seen.len(), 1, "the row behind it is published");
}

/// Published rows are pruned behind the position, in small batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_rows_are_pruned() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let broker = kafka().await;
    let topic = broker.topic("prune", 1).await;
    let mut cfg = config(&db, broker.bootstrap(), Mode::AtLeastOnce);
    cfg.prune_batch = 100;
    cfg.prune_interval = Duration::from_millis(100);
    stage_many(db.pool(), &topic, 1000, 10, 250).await;
    let relay = Relay::start(cfg);
    eventually("outbox pruned", Duration::from_secs(30), || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM txbox.outbox")
            .fetch_one(db.pool())
            .await
            .unwrap()
            == 0
    })
    .await;
    let (_, _, _, published) = relay_row(db.pool()).await;
    assert_eq!(published, 1000);
    relay.stop().await;
}

/// A stream that has drained a backlog prunes it in rounds that follow one
/// another at once, while other streams go on staging. Outbox ids are
/// shared by every stream, so the drained stream's position moves by the
/// other streams' ids too; its pruner judges whether the publisher is
/// draining by the rows the stream published, not by that distance (which
/// here would make every round wait the interval).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_stream_prunes_at_once_while_other_streams_stage() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let broker = kafka().await;
    let topic = broker.topic("prune-streams", 2).await;
    let keys = |stream: i32| -> Vec<String> {
        (0..)
            .map(|i| format!("k{i}"))
            .filter(|k| txbox::outbox::stream_for_key(k.as_bytes(), 2) == stream)
            .take(10)
            .collect()
    };
    let (k0, k1) = (keys(0), keys(1));
    let stage_rows = {
        let pool = db.pool().clone();
        let outbox = Outbox::new(txbox::Schema::default()).streams(2).unwrap();
        move |rows: Vec<OutboxEvent>| {
            let (pool, outbox) = (pool.clone(), outbox.clone());
            async move { stage_in(&pool, &outbox, rows).await }
        }
    };
    // Stream 0's backlog: three full prune rounds of one-row statements
    // (each round at least 2 s: the pruner pauses 20 ms between them).
    let backlog = 300;
    for chunk in 0..backlog / 100 {
        let rows = (0..100)
            .map(|i| event(&topic, &k0[i % k0.len()], 0, chunk * 100 + i))
            .collect();
        stage_rows(rows).await;
    }
    // Rows staged later take higher ids: these count the backlog alone.
    let last_of_backlog: i64 = sqlx::query_scalar("SELECT max(id) FROM txbox.outbox")
        .fetch_one(db.pool())
        .await
        .unwrap();
    let backlog_left = {
        let pool = db.pool().clone();
        move || {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM txbox.outbox WHERE stream = 0 AND id <= $1",
                )
                .bind(last_of_backlog)
                .fetch_one(&pool)
                .await
                .unwrap()
            }
        }
    };
    let interval = Duration::from_secs(12);
    let mut cfg = config(&db, broker.bootstrap(), Mode::AtLeastOnce);
    cfg.streams = vec![0, 1];
    cfg.prune_batch = 1;
    cfg.prune_interval = interval;
    let relay = Relay::start(cfg);
    // Meanwhile, every 500 ms, one row on stream 0 and 100 on stream 1:
    // stream 0 publishes about 30 rows from one round to the next, fewer
    // than a round deletes, while its position moves by about 3,000 ids.
    let stop = CancellationToken::new();
    let stager = tokio::spawn({
        let (stop, stage_rows, topic) = (stop.clone(), stage_rows.clone(), topic.clone());
        async move {
            let mut seq = backlog;
            while !stop.is_cancelled() {
                let mut rows = vec![event(&topic, &k0[seq % k0.len()], 0, seq)];
                rows.extend((0..100).map(|i| event(&topic, &k1[i % k1.len()], 1, seq * 100 + i)));
                stage_rows(rows).await;
                seq += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });
    // The first round, an interval in, follows the publication of the
    // whole backlog: it takes its interval after it. The second follows
    // 30-odd published rows: the third runs at once and ends the backlog.
    // With a wait after every round, the third would start more than two
    // intervals after the first ended.
    eventually("the first prune round", interval * 3, || async {
        backlog_left().await <= 200
    })
    .await;
    let first_ended = Instant::now();
    eventually(
        "the rest of stream 0's backlog pruned",
        interval * 2,
        || async { backlog_left().await == 0 },
    )
    .await;
    println!(
        "stream 0's backlog pruned {:?} after its first round",
        first_ended.elapsed()
    );
    stop.cancel();
    stager.await.unwrap();
    relay.stop().await;
}
