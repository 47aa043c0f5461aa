//! The relay's `txbox.relay.batch` span: one per batch, naming its stream,
//! mode, size, outbox ids and outcome, captured while it publishes to
//! Apache Kafka.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use txbox_relay::Mode;
use txbox_testkit::{kafka, CapturedSpan, CapturedSpans, TestDb};

/// The outbox ids of stream 0, in publishing order.
async fn ids(db: &TestDb) -> Vec<i64> {
    sqlx::query_scalar("SELECT id FROM txbox.outbox WHERE stream = 0 ORDER BY txid, id")
        .fetch_all(db.pool())
        .await
        .unwrap()
}

/// Publishes 25 rows in batches of 10 in `mode`, with outbox ids from
/// `first_id` (the spans of every test of the process are captured: ids
/// of their own tell this test's apart); returns the batch spans covering
/// these rows, and the rows' ids.
async fn batches(mode: Mode, first_id: i64) -> (Vec<CapturedSpan>, Vec<i64>) {
    let spans = CapturedSpans::install();
    let db = TestDb::new().await;
    sqlx::query(&format!(
        "ALTER TABLE txbox.outbox ALTER COLUMN id RESTART WITH {first_id}"
    ))
    .execute(db.pool())
    .await
    .unwrap();
    let broker = kafka().await;
    let topic = broker.topic("batch-span", 2).await;
    stage_many(db.pool(), &topic, 25, 5, 5).await;
    let ids = ids(&db).await;
    let mut cfg = config(&db, broker.bootstrap(), mode);
    cfg.batch_size = 10;
    let relay = Relay::start(cfg);
    drained(db.pool(), Duration::from_secs(60)).await;
    relay.stop().await;
    let ours = spans
        .named("txbox.relay.batch")
        .into_iter()
        .filter(|s| {
            s.field("first_id")
                .and_then(|id| id.parse::<i64>().ok())
                .is_some_and(|id| ids.contains(&id))
        })
        .collect();
    (ours, ids)
}

/// Every row is in exactly one batch span, in publishing order, each
/// span's fields naming its rows.
fn assert_cover(spans: &[CapturedSpan], ids: &[i64], mode: &str, outcome: &str) {
    assert_eq!(spans.len(), 3, "25 rows in batches of 10: {spans:#?}");
    let mut next = 0;
    for s in spans {
        assert_eq!(s.target, "txbox_relay::stream", "{s:?}");
        assert_eq!(s.field("stream"), Some("0"), "{s:?}");
        assert_eq!(s.field("mode"), Some(mode), "{s:?}");
        assert_eq!(s.field("outcome"), Some(outcome), "{s:?}");
        assert_eq!(s.field("error"), None, "{s:?}");
        let rows: usize = s.field("rows").unwrap().parse().unwrap();
        assert_eq!(
            s.field("first_id"),
            Some(ids[next].to_string().as_str()),
            "{s:?}"
        );
        assert_eq!(
            s.field("last_id"),
            Some(ids[next + rows - 1].to_string().as_str()),
            "{s:?}"
        );
        next += rows;
    }
    assert_eq!(next, ids.len(), "the spans cover every row once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_exactly_once_batch_has_a_span_with_its_committed_transaction() {
    let (spans, ids) = batches(Mode::ExactlyOnce, 1_000).await;
    assert_cover(&spans, &ids, "exactly-once", "committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_at_least_once_batch_has_a_span_with_its_acknowledgement() {
    let (spans, ids) = batches(Mode::AtLeastOnce, 2_000).await;
    assert_cover(&spans, &ids, "at-least-once", "acknowledged");
}
