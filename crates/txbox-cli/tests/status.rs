//! `txbox status`: inbox lag against the brokers' log end, relay backlogs
//! and leases, dead letters, the reasons a person is needed and the exit
//! code. Real Postgres and Apache Kafka.

mod common;

use std::time::Duration;

use common::{txbox, wait_log_ends};
use serde_json::Value;
use txbox_testkit::kafka::Record;
use txbox_testkit::{kafka, TestDb};

/// `txbox status --json` and `args`: the exit code and the document.
fn status_json(db: &TestDb, args: &[&str]) -> (Option<i32>, Value) {
    let mut all = vec!["status", "--json"];
    all.extend_from_slice(args);
    let out = txbox(db, &all);
    let doc = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {out:?}"));
    (out.status.code(), doc)
}

fn reasons(doc: &Value) -> Vec<String> {
    doc["reasons"]
        .as_array()
        .expect("reasons")
        .iter()
        .map(|r| r.as_str().expect("reason text").to_owned())
        .collect()
}

async fn exec(db: &TestDb, sql: &str) {
    sqlx::query(sql)
        .execute(db.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Stages one outbox row on `stream` in its own transaction, created
/// `age` ago; returns its `(txid, id)`.
async fn stage(db: &TestDb, stream: i32, age: &str) -> (String, i64) {
    sqlx::query_as(
        "INSERT INTO txbox.outbox (stream, topic, payload, event_id, created_at)
         VALUES ($1, 'payments', 'x', gen_random_uuid(), now() - $2::interval)
         RETURNING txid::text, id",
    )
    .bind(stream)
    .bind(age)
    .fetch_one(db.pool())
    .await
    .expect("stage outbox row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_lag_backlog_dead_letters_and_exits_2() {
    let db = TestDb::new().await;
    let broker = kafka().await;
    let topic = broker.topic("status", 1).await;
    let records = (0..10).map(|i| Record::new(format!("m{i}"))).collect();
    kafka::produce(broker.bootstrap(), &topic, records).await;
    wait_log_ends(broker.bootstrap(), &topic, &[10]).await;
    sqlx::query(
        "INSERT INTO txbox.inbox_offsets (consumer_group, topic, partition, next_offset, epoch,
                                          applied, duplicates, dead_lettered)
         VALUES ('ledger', $1, 0, 4, 1, 3, 7, 1)",
    )
    .bind(&topic)
    .execute(db.pool())
    .await
    .expect("seed position");
    exec(
        &db,
        "INSERT INTO txbox.inbox_dead_letters
           (consumer_group, topic, partition, \"offset\", event_id, error, attempts, first_failed_at, last_failed_at)
         VALUES ('ledger', 'payments', 0, 2, 'e-2', 'boom', 3, now(), now())",
    )
    .await;
    // Stream 0: published up to its first row, two more waiting, and the
    // lease of its last owner expired a minute ago.
    let (txid, id) = stage(&db, 0, "30 seconds").await;
    stage(&db, 0, "20 seconds").await;
    stage(&db, 0, "10 seconds").await;
    sqlx::query(
        "INSERT INTO txbox.relay_streams
           (stream, owner, fencing_token, lease_expires_at, position_txid, position_id, published)
         VALUES (0, 'relay-a', 3, now() - interval '1 minute', $1::xid8, $2, 1)",
    )
    .bind(&txid)
    .bind(id)
    .execute(db.pool())
    .await
    .expect("seed relay stream");
    // Stream 1: recorded in another database's history.
    exec(
        &db,
        "INSERT INTO txbox.relay_streams (stream, history) VALUES (1, 'elsewhere~1')",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let (code, doc) = status_json(
        &db,
        &["--brokers", broker.bootstrap(), "--hold-back-alert", "1h"],
    );
    assert_eq!(code, Some(2), "{doc:#}");
    assert_eq!(doc["needs_attention"], true);
    let inbox = &doc["inbox"][0];
    assert_eq!(inbox["group"], "ledger");
    assert_eq!(inbox["next_offset"], 4);
    assert_eq!(inbox["log_end"], 10);
    assert_eq!(inbox["lag"], 6, "{doc:#}");
    assert_eq!(
        (
            &inbox["applied"],
            &inbox["duplicates"],
            &inbox["dead_lettered"]
        ),
        (&3.into(), &7.into(), &1.into()),
        "totals as stored"
    );
    assert!(inbox["owner"].is_null());
    let lag_s = inbox["lag_seconds"].as_f64().expect("lag in seconds");
    assert!(
        (1.0..600.0).contains(&lag_s),
        "the message at offset 4 is over a second old: {lag_s}"
    );
    assert_eq!(doc["inbox_dead_letters"][0]["group"], "ledger");
    assert_eq!(doc["inbox_dead_letters"][0]["count"], 1);

    let s0 = &doc["relay"][0];
    assert_eq!(s0["stream"], 0);
    assert_eq!(s0["owner"], "relay-a");
    assert_eq!(s0["lease_live"], false);
    assert_eq!(
        s0["backlog"], 2,
        "rows past (txid, id) of the first: {doc:#}"
    );
    let age = s0["oldest_unpublished_age_seconds"]
        .as_f64()
        .expect("oldest age");
    assert!(
        (20.0..600.0).contains(&age),
        "the oldest unpublished row is the one staged 20 s ago: {age}"
    );
    assert_eq!(doc["relay"][1]["history"], "changed");

    let why = reasons(&doc);
    assert_eq!(why.len(), 3, "{why:#?}");
    assert!(
        why.iter().any(|r| r.contains("relay stream 0")
            && r.contains("2 unpublished")
            && r.contains("expired")),
        "{why:#?}"
    );
    assert!(
        why.iter()
            .any(|r| r.contains("relay stream 1") && r.contains("re-anchor")),
        "{why:#?}"
    );
    assert!(
        why.iter()
            .any(|r| r.contains("inbox group ledger: 1 dead letter")),
        "{why:#?}"
    );

    // The tables say the same, with the same exit code.
    let human = txbox(
        &db,
        &[
            "status",
            "--brokers",
            broker.bootstrap(),
            "--hold-back-alert",
            "1h",
        ],
    );
    assert_eq!(human.status.code(), Some(2), "{human:?}");
    let out = String::from_utf8_lossy(&human.stdout);
    assert!(
        out.contains(&format!("ledger\t{topic}\t0\t4\t10\t6\t")),
        "{out}"
    );
    assert!(out.contains("needs attention:"), "{out}");
}

#[tokio::test]
async fn status_of_a_healthy_schema_exits_0_and_a_long_transaction_exits_2() {
    let db = TestDb::new().await;
    exec(
        &db,
        "INSERT INTO txbox.inbox_offsets (consumer_group, topic, partition, next_offset, epoch, owner)
         VALUES ('ledger', 'payments', 0, 3, 1, 'host-a:1')",
    )
    .await;
    // A backlog is fine while a relay holds the stream's lease.
    stage(&db, 0, "1 second").await;
    exec(
        &db,
        "INSERT INTO txbox.relay_streams (stream, owner, fencing_token, lease_expires_at)
         VALUES (0, 'relay-a', 1, now() + interval '1 hour')",
    )
    .await;

    let (code, doc) = status_json(&db, &["--hold-back-alert", "1h"]);
    assert_eq!(code, Some(0), "{doc:#}");
    assert!(reasons(&doc).is_empty(), "{doc:#}");
    assert_eq!(doc["brokers"], false);
    assert!(doc["inbox"][0]["lag"].is_null(), "no brokers: lag unknown");
    assert_eq!(doc["relay"][0]["backlog"], 1);
    assert_eq!(doc["relay"][0]["lease_live"], true);
    let human = txbox(&db, &["status", "--hold-back-alert", "1h"]);
    assert_eq!(human.status.code(), Some(0), "{human:?}");
    assert!(
        String::from_utf8_lossy(&human.stdout).contains("ok: nothing needs attention"),
        "{human:?}"
    );

    // A transaction with an xid, open for over a second, holds the relay back.
    let mut tx = db.pool().begin().await.expect("begin");
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *tx)
        .await
        .expect("take an xid");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, doc) = status_json(&db, &["--hold-back-alert", "1s"]);
    tx.rollback().await.expect("rollback");
    assert_eq!(code, Some(2), "{doc:#}");
    assert!(doc["hold_back"]["pid"].as_i64().is_some(), "{doc:#}");
    assert!(
        reasons(&doc)
            .iter()
            .any(|r| r.contains("holding the relay back")),
        "{doc:#}"
    );
}

#[test]
fn status_help_documents_the_exit_codes() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_txbox"))
        .args(["status", "--help"])
        .output()
        .expect("run txbox");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        help.contains("Exit codes") && help.contains("2  something needs a person"),
        "{help}"
    );
}
