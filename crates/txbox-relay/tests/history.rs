//! Relay positions belong to one database history (see `History`): after
//! a restore into a new cluster, or with the transaction counter behind the
//! stored position (a failover to a standby that was behind), the relay
//! stops the stream before publishing or pruning anything, and `txbox
//! relay re-anchor` moves the stream into the current history with no row
//! lost. Two installations sharing one Kafka cluster with default settings
//! each publish everything. Real PostgreSQL servers, Apache Kafka.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::*;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use txbox_relay::{Error, Histories, Mode, RelayConfig};
use txbox_testkit::{kafka, unique_name, PgServer, TestDb};

/// A relay configuration for `url`: exactly-once, fast polling, keeping
/// published rows (so the test can compare), unique Kafka names.
fn relay_config(url: &str, bootstrap: &str, txn: &str, positions: &str) -> RelayConfig {
    let mut c = RelayConfig::new(url, bootstrap);
    c.mode = Mode::ExactlyOnce;
    c.poll_interval = Duration::from_millis(50);
    c.lease_ttl = Duration::from_secs(3);
    c.instance = unique_name("relay");
    c.transactional_id_prefix = txn.to_owned();
    c.position_topic = positions.to_owned();
    c.prune_interval = Duration::from_millis(200);
    c
}

async fn pool(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(5)
        .connect(url)
        .await
        .unwrap()
}

async fn outbox_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM txbox.outbox")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Uses up `n` transaction ids, so that this cluster's history runs ahead
/// of a new cluster's.
async fn burn_xids(pool: &PgPool, n: usize) {
    for _ in 0..n {
        sqlx::query("SELECT pg_current_xact_id()")
            .execute(pool)
            .await
            .unwrap();
    }
}

/// How often each event id was seen.
fn counts(seen: &[txbox_testkit::kafka::Consumed]) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for c in seen {
        *out.entry(ce_id(c)).or_default() += 1;
    }
    out
}

/// The relay stops with `HistoryChanged`, having published and deleted
/// nothing.
async fn assert_refused(config: RelayConfig, pool: &PgPool, rows_before: i64, want: &str) {
    let run = txbox_relay::run(config, txbox_relay::CancellationToken::new());
    let err = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the relay went on publishing (and pruning) instead of refusing")
        .expect_err("the relay must refuse a position of another history");
    let text = err.to_string();
    assert!(
        matches!(
            err,
            Error::HistoryChanged { .. } | Error::StreamsFailed { .. }
        ),
        "{text}"
    );
    assert!(text.contains("cannot be trusted"), "{text}");
    assert!(text.contains(want), "{text}");
    assert!(text.contains("txbox relay re-anchor --stream 0"), "{text}");
    assert_eq!(outbox_rows(pool).await, rows_before, "nothing pruned");
}

/// The outbox is dumped (`pg_dump`) from one cluster and restored into a
/// new one, whose transaction ids are far behind: rows staged after the
/// restore sort below the stored position. Resuming after it would skip
/// them, then prune them. The relay refuses; after `txbox relay re-anchor
/// --execute` it publishes every row of the new cluster (rows published
/// before the dump again, once more at most), none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_into_a_new_cluster_stops_the_stream_until_re_anchored() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let topic = broker.topic("restored", 2).await;
    let (txn, positions) = (unique_name("txn"), unique_name("positions"));

    let old = PgServer::start().await;
    let old_url = old.url("postgres");
    let old_pool = pool(&old_url).await;
    txbox::Migrator::new(txbox::Schema::default())
        .run(&old_pool)
        .await
        .unwrap();
    burn_xids(&old_pool, 300).await;
    stage_many(&old_pool, &topic, 200, 20, 50).await;
    let mut config = relay_config(&old_url, broker.bootstrap(), &txn, &positions);
    config.prune_interval = Duration::from_secs(3600); // the dump keeps them
    let relay = Relay::start(config);
    drained(&old_pool, Duration::from_secs(30)).await;
    relay.stop().await;

    let new = PgServer::start().await;
    let dump = std::env::temp_dir().join(format!("{}.dump", unique_name("outbox")));
    let dumped = Command::new(old.bindir().join("pg_dump"))
        .args(["-d", &old_url, "-n", "txbox", "-Fc", "-f"])
        .arg(&dump)
        .output()
        .unwrap();
    assert!(dumped.status.success(), "{dumped:?}");
    let restored = Command::new(new.bindir().join("pg_restore"))
        .args(["-d", &new.url("postgres")])
        .arg(&dump)
        .output()
        .unwrap();
    assert!(restored.status.success(), "{restored:?}");
    let _ = std::fs::remove_file(&dump);
    drop(old_pool);
    drop(old);

    let new_url = new.url("postgres");
    let new_pool = pool(&new_url).await;
    let before: Vec<String> = staged_ids(&new_pool).await;
    stage_many(&new_pool, &topic, 100, 20, 25).await;
    let staged = staged_ids(&new_pool).await;
    let fresh: Vec<&String> = staged.iter().filter(|id| !before.contains(id)).collect();
    assert_eq!((before.len(), fresh.len()), (200, 100));
    let max_new_txid: i64 =
        sqlx::query_scalar("SELECT max(txid)::text::bigint FROM txbox.outbox WHERE id > 200")
            .fetch_one(&new_pool)
            .await
            .unwrap();
    let stored_txid: i64 =
        sqlx::query_scalar("SELECT position_txid::text::bigint FROM txbox.relay_streams")
            .fetch_one(&new_pool)
            .await
            .unwrap();
    assert!(
        max_new_txid < stored_txid,
        "the new cluster's rows ({max_new_txid}) must sort below the stored position ({stored_txid})"
    );

    let config = relay_config(&new_url, broker.bootstrap(), &txn, &positions);
    assert_refused(config.clone(), &new_pool, 300, "database history").await;

    let histories = Histories::new(&txbox::Schema::default());
    let dry = histories
        .re_anchor(&new_pool, 0, false, false)
        .await
        .unwrap();
    assert!(dry.anchor.is_none(), "a dry run anchors nothing");
    assert_eq!(
        (dry.backlog, dry.stored_position.txid),
        (300, stored_txid as u64)
    );
    assert_refused(config.clone(), &new_pool, 300, "database history").await;
    let done = histories
        .re_anchor(&new_pool, 0, false, true)
        .await
        .unwrap();
    assert!(done.anchor.is_some());
    assert_eq!(
        done.rewritten, 300,
        "every row of the stream gets the re-anchor's id"
    );

    let relay = Relay::start(config);
    drained(&new_pool, Duration::from_secs(60)).await;
    relay.stop().await;
    let seen = consume(broker.bootstrap(), &topic, 200 + 300, true).await;
    let counts = counts(&seen);
    for id in &fresh {
        assert_eq!(
            counts.get(*id),
            Some(&1),
            "a row staged after the restore: published exactly once"
        );
    }
    for id in &before {
        let n = counts.get(id).copied().unwrap_or(0);
        assert!(
            (1..=2).contains(&n),
            "a row published before the dump: seen {n} times"
        );
    }
}

/// The stored position lies past the database's transaction counter, as
/// after a failover to an asynchronous standby that had not replayed that
/// far (or a point-in-time recovery): the relay refuses, prunes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_past_the_transaction_counter_stops_the_stream() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let broker = kafka().await;
    let topic = broker.topic("counter", 1).await;
    let config = relay_config(
        db.url(),
        broker.bootstrap(),
        &unique_name("txn"),
        &unique_name("positions"),
    );
    stage_many(db.pool(), &topic, 50, 5, 25).await;
    let relay = Relay::start(config.clone());
    drained(db.pool(), Duration::from_secs(30)).await;
    relay.stop().await;
    stage_many(db.pool(), &topic, 50, 5, 25).await;
    sqlx::query(
        "UPDATE txbox.relay_streams
            SET position_txid = (pg_snapshot_xmax(pg_current_snapshot())::text::bigint + 100000)::text::xid8",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let rows = outbox_rows(db.pool()).await;
    assert_refused(config, db.pool(), rows, "not below the database's next one").await;
}

/// Two services with databases of their own and the relay's default Kafka
/// names (transactional id prefix, position topic), on one Kafka cluster:
/// neither fences the other nor resumes from the other's position. Each
/// publishes all of its rows, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_installations_with_default_settings_share_a_kafka_cluster() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let defaults = RelayConfig::new("postgres://unused", broker.bootstrap());
    let mut relays = Vec::new();
    let mut dbs = Vec::new();
    for name in ["orders", "billing"] {
        let db = TestDb::new().await;
        let topic = broker.topic(name, 2).await;
        let mut c = config(&db, broker.bootstrap(), Mode::ExactlyOnce);
        c.transactional_id_prefix = defaults.transactional_id_prefix.clone();
        c.position_topic = defaults.position_topic.clone();
        c.prune_interval = Duration::from_secs(3600);
        relays.push(Relay::start(c));
        dbs.push((db, topic));
    }
    for _ in 0..4 {
        for (db, topic) in &dbs {
            stage_many(db.pool(), topic, 100, 10, 50).await;
        }
    }
    for (db, _) in &dbs {
        drained(db.pool(), Duration::from_secs(60)).await;
    }
    for relay in relays {
        let report = relay.stop().await;
        assert_eq!(
            (report.published(), report.streams[0].leaderships),
            (400, 1),
            "each relay leads once and publishes its 400 rows"
        );
    }
    for (db, topic) in &dbs {
        let staged = staged_ids(db.pool()).await;
        let seen = consume(broker.bootstrap(), topic, 400, true).await;
        let t = tally(&seen, &staged);
        assert_eq!((t.missing, t.duplicates, t.unexpected), (0, 0, 0), "{t:?}");
    }
}

/// A database copied inside its cluster (`CREATE DATABASE ... TEMPLATE`)
/// carries the original's installation id and relay positions. Its relay
/// refuses them (the database oid is part of the history) while the
/// original's goes on; `re-anchor --new-installation` makes the copy an
/// installation of its own, whose relay then publishes everything without
/// fencing the original's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_database_is_refused_until_it_becomes_an_installation_of_its_own() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let (original_topic, copy_topic) = (
        broker.topic("original", 1).await,
        broker.topic("copy", 1).await,
    );
    let (txn, positions) = (unique_name("txn"), unique_name("positions"));
    let original = TestDb::new().await;
    stage_many(original.pool(), &original_topic, 100, 10, 50).await;
    let mut config = relay_config(original.url(), broker.bootstrap(), &txn, &positions);
    config.prune_interval = Duration::from_secs(3600);
    let relay = Relay::start(config.clone());
    drained(original.pool(), Duration::from_secs(30)).await;
    relay.stop().await;

    // The copy: no session may be connected to the template meanwhile.
    original.pool().close().await;
    let copy_name = format!("{}_copy", original.name());
    let admin = pool(&txbox_testkit::admin_url()).await;
    sqlx::query(&format!(
        "CREATE DATABASE \"{copy_name}\" TEMPLATE \"{}\"",
        original.name()
    ))
    .execute(&admin)
    .await
    .unwrap();
    let copy_url = original.url().replace(original.name(), &copy_name);
    let copy_pool = pool(&copy_url).await;
    let original_pool = pool(original.url()).await;
    stage_many(&original_pool, &original_topic, 50, 10, 25).await;
    stage_many(&copy_pool, &copy_topic, 50, 10, 25).await;

    let original_relay = Relay::start(config.clone());
    let mut copy_config = config.clone();
    copy_config.database_url = copy_url.clone();
    copy_config.instance = unique_name("copy");
    assert_refused(copy_config.clone(), &copy_pool, 150, "database history").await;

    let histories = Histories::new(&txbox::Schema::default());
    let done = histories
        .re_anchor(&copy_pool, 0, true, true)
        .await
        .unwrap();
    assert_eq!(done.rewritten, 150);
    let copy_relay = Relay::start(copy_config);
    drained(&copy_pool, Duration::from_secs(60)).await;
    drained(&original_pool, Duration::from_secs(60)).await;
    for relay in [original_relay, copy_relay] {
        let report = relay.stop().await;
        assert_eq!(
            report.streams[0].leaderships, 1,
            "no relay fenced the other"
        );
    }
    // The copy published its copies of the original's first 100 rows once
    // more (same event ids, which a txbox inbox downstream drops).
    let original_seen = consume(broker.bootstrap(), &original_topic, 250, true).await;
    let t = tally(&original_seen, &staged_ids(&original_pool).await);
    assert_eq!(
        (t.missing, t.duplicates, t.unexpected),
        (0, 100, 0),
        "{t:?}"
    );
    let copy_seen = consume(broker.bootstrap(), &copy_topic, 50, true).await;
    let t = tally(&copy_seen, &staged_ids(&copy_pool).await[100..]);
    assert_eq!((t.missing, t.duplicates), (0, 0), "{t:?}");

    copy_pool.close().await;
    let _ = sqlx::query(&format!(
        "DROP DATABASE IF EXISTS \"{copy_name}\" WITH (FORCE)"
    ))
    .execute(&admin)
    .await;
}

/// After a failover to a standby that was behind (or a point-in-time
/// recovery), the position on Kafka, from the lost timeline, is past the
/// database's counter; installation and cluster are the same. The relay
/// refuses it; re-anchoring retires every position recorded before, on
/// Kafka too, so the relay then publishes the rows instead of refusing
/// again (or, once the counter passed the old position, skipping them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_anchoring_retires_a_kafka_position_from_a_lost_timeline() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let broker = kafka().await;
    let topic = broker.topic("timeline", 1).await;
    let (txn, positions) = (unique_name("txn"), unique_name("positions"));
    let config = relay_config(db.url(), broker.bootstrap(), &txn, &positions);
    stage_many(db.pool(), &topic, 50, 5, 25).await;
    let relay = Relay::start(config.clone());
    drained(db.pool(), Duration::from_secs(30)).await;
    relay.stop().await;

    // The lost timeline's last position record: committed on Kafka, far
    // past this database's transaction counter, under the stream's anchor.
    let (installation, anchor, xmax): (uuid::Uuid, String, i64) = sqlx::query_as(
        "SELECT i.id, s.history, pg_snapshot_xmax(pg_current_snapshot())::text::bigint
           FROM txbox.installation i, txbox.relay_streams s WHERE s.stream = 0",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    let record = serde_json::json!({
        "transactional_id": format!("{txn}-{}-txbox-0", installation.simple()),
        "history": anchor,
        "schema": "txbox",
        "stream": 0,
        "txid": xmax + 100_000,
        "id": 1_000_000,
    });
    txbox_testkit::kafka::produce(
        broker.bootstrap(),
        &positions,
        vec![txbox_testkit::kafka::Record::new(record.to_string())
            .key(format!("{}/txbox/0", installation.simple()))],
    )
    .await;
    stage_many(db.pool(), &topic, 50, 5, 25).await;
    let rows = outbox_rows(db.pool()).await;
    assert_refused(
        config.clone(),
        db.pool(),
        rows,
        "not below the database's next one",
    )
    .await;

    let histories = Histories::new(&txbox::Schema::default());
    histories
        .re_anchor(db.pool(), 0, false, true)
        .await
        .unwrap();
    let relay = Relay::start(config);
    drained(db.pool(), Duration::from_secs(30)).await;
    relay.stop().await;
    let staged = staged_ids(db.pool()).await;
    let seen = consume(broker.bootstrap(), &topic, 150, true).await;
    let counts = counts(&seen);
    assert!(
        staged.iter().all(|id| counts.contains_key(id)),
        "every row published after re-anchoring"
    );
}
