//! Exactly-once mode's code paths on librdkafka's mock cluster, with
//! broker errors injected.
//!
//! The mock accepts transactions but does NOT hide aborted records from
//! read_committed consumers and does not fence by itself. So these tests
//! check the relay's reaction to each error class (retry the commit, abort
//! and retry the batch, stop on fencing) and that no row is skipped; they
//! cannot check read_committed visibility (aborted attempts show up here
//! as extra copies). `exactly_once.rs` checks visibility and fencing on Apache Kafka.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use txbox_relay::{Error, Mode, RelayConfig};
use txbox_testkit::{MockKafka, TestDb};

fn setup(db: &TestDb, mock: &MockKafka, topic: &str) -> RelayConfig {
    let mut cfg = config(db, &mock.bootstrap(), Mode::ExactlyOnce);
    cfg.batch_size = 100;
    cfg.prune_interval = Duration::from_secs(3600); // keep rows to compare
    mock.create_topic(topic, 3);
    // The mock has no CreateTopics; the relay finds the topic in metadata.
    mock.create_topic(&cfg.position_topic, 1);
    cfg
}

/// The last position record of stream 0 on the position topic.
async fn position_record(mock: &MockKafka, cfg: &RelayConfig) -> serde_json::Value {
    let records = consume(&mock.bootstrap(), &cfg.position_topic, 1, true).await;
    let last = records
        .iter()
        .rfind(|c| c.key.as_deref().is_some_and(|k| k.ends_with(b"/txbox/0")))
        .expect("a position record keyed {installation}/txbox/0");
    payload_json(last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_happy_path_publishes_rows_and_position() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let mock = MockKafka::new(3);
    let topic = txbox_testkit::unique_name("eos");
    let cfg = setup(&db, &mock, &topic);
    stage_many(db.pool(), &topic, 300, 20, 60).await;
    let staged = staged_ids(db.pool()).await;
    let max_id: i64 = sqlx::query_scalar("SELECT max(id) FROM txbox.outbox")
        .fetch_one(db.pool())
        .await
        .unwrap();
    let relay = Relay::start(cfg.clone());
    drained(db.pool(), Duration::from_secs(30)).await;
    let seen = consume(&mock.bootstrap(), &topic, 300, true).await;
    let t = tally(&seen, &staged);
    assert_eq!((t.missing, t.duplicates, t.unexpected), (0, 0, 0), "{t:?}");
    // Per key, published in staging order.
    let mut expected: std::collections::BTreeMap<Vec<u8>, Vec<String>> = Default::default();
    let rows: Vec<(Vec<u8>, String)> =
        sqlx::query_as("SELECT key, event_id::text FROM txbox.outbox ORDER BY txid, id")
            .fetch_all(db.pool())
            .await
            .unwrap();
    for (k, id) in rows {
        expected.entry(k).or_default().push(id);
    }
    if !expected.is_empty() {
        assert_eq!(by_key(&seen), expected);
    }
    let pos = position_record(&mock, &cfg).await;
    assert_eq!(pos["schema"], "txbox");
    assert_eq!(pos["stream"], 0);
    assert_eq!(pos["id"], max_id);
    let report = relay.stop().await;
    assert_eq!(report.published(), 300);
    assert_eq!(report.streams[0].batches, 3);
}

/// Coordinator errors on EndTxn and AddPartitionsToTxn are retried
/// (inside librdkafka, or by calling commit again); every row arrives,
/// none is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_errors_are_retried() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let mock = MockKafka::new(3);
    let topic = txbox_testkit::unique_name("eos-coord");
    let cfg = setup(&db, &mock, &topic);
    let relay = Relay::start(cfg);
    stage_many(db.pool(), &topic, 100, 20, 100).await;
    drained(db.pool(), Duration::from_secs(30)).await;

    use RDKafkaRespErr::*;
    mock.cluster().request_errors(
        RDKafkaApiKey::EndTxn,
        &[
            RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
            RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
            RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS,
        ],
    );
    mock.cluster().request_errors(
        RDKafkaApiKey::AddPartitionsToTxn,
        &[
            RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
            RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
        ],
    );
    stage_many(db.pool(), &topic, 200, 20, 50).await;
    drained(db.pool(), Duration::from_secs(60)).await;
    let staged = staged_ids(db.pool()).await;
    let seen = consume(&mock.bootstrap(), &topic, 300, true).await;
    let t = tally(&seen, &staged);
    println!("coordinator errors: {t:?}");
    assert_eq!((t.missing, t.unexpected), (0, 0), "{t:?}");
    let report = relay.stop().await;
    assert_eq!(report.published(), 300);
}

/// An abortable error (UNKNOWN_PRODUCER_ID on Produce): the transaction
/// is aborted and the batch retried from the last committed position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abortable_error_aborts_and_retries_the_batch() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let mock = MockKafka::new(3);
    let topic = txbox_testkit::unique_name("eos-abort");
    let cfg = setup(&db, &mock, &topic);
    let relay = Relay::start(cfg);
    stage_many(db.pool(), &topic, 100, 20, 100).await;
    drained(db.pool(), Duration::from_secs(30)).await;

    mock.cluster().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_PRODUCER_ID],
    );
    stage_many(db.pool(), &topic, 100, 20, 100).await;
    drained(db.pool(), Duration::from_secs(60)).await;
    let staged = staged_ids(db.pool()).await;
    let seen = consume(&mock.bootstrap(), &topic, 200, true).await;
    let t = tally(&seen, &staged);
    // The aborted attempt's records are visible on the mock (it does not
    // filter aborted transactions): they are the only duplicates allowed.
    println!("abortable: {t:?}");
    assert_eq!((t.missing, t.unexpected), (0, 0), "{t:?}");
    assert!(t.duplicates <= 100, "{t:?}");
    let report = relay.stop().await;
    assert!(
        report.streams[0].retries >= 1,
        "the batch was retried: {:?}",
        report.streams[0]
    );
    assert_eq!(report.published(), 200);
}

/// Fenced: another instance took the stream (its lease in PostgreSQL, and
/// its init_transactions fenced our producer: injected PRODUCER_FENCED on
/// EndTxn). The relay stops publishing at once, drops the producer and
/// waits for leadership; it produces nothing more and records nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_producer_stops_and_waits_for_leadership() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let mock = MockKafka::new(3);
    let topic = txbox_testkit::unique_name("eos-fenced");
    let mut cfg = setup(&db, &mock, &topic);
    // Long TTL: no renewal is due, so the relay learns of the takeover
    // from Kafka, not from a failed lease renewal.
    cfg.lease_ttl = Duration::from_secs(60);
    let relay = Relay::start(cfg);
    stage_many(db.pool(), &topic, 100, 20, 100).await;
    drained(db.pool(), Duration::from_secs(30)).await;
    let (_, token, position_before, _) = relay_row(db.pool()).await;

    sqlx::query(
        "UPDATE txbox.relay_streams
            SET owner = 'other', fencing_token = fencing_token + 1, lease_expires_at = now() + interval '1 hour'
          WHERE stream = 0",
    )
    .execute(db.pool())
    .await
    .unwrap();
    mock.cluster().request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
    );
    stage_many(db.pool(), &topic, 100, 20, 100).await;

    // The failed (fenced) attempt's records are visible on the mock; after
    // it, nothing more is produced.
    let first = consume(&mock.bootstrap(), &topic, 200, false).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = consume(&mock.bootstrap(), &topic, first.len(), false).await;
    assert_eq!(
        later.len(),
        first.len(),
        "no rows produced after being fenced"
    );
    assert!(first.len() <= 200, "one attempt at most: {}", first.len());
    let (owner, token_now, position_now, _) = relay_row(db.pool()).await;
    assert_eq!(owner.as_deref(), Some("other"));
    assert_eq!(token_now, token + 1);
    assert_eq!(
        position_now, position_before,
        "a fenced relay records nothing"
    );

    let report = relay.stop().await;
    assert_eq!(
        report.streams[0].leaderships, 1,
        "never re-acquired while 'other' holds it"
    );
    assert_eq!(report.published(), 100);
}

/// Exactly-once mode needs transactions. A broker that grants producer ids
/// but has no EndTxn (Tansu 0.6 is one; here the mock with EndTxn
/// switched off) fails the start-up probe transaction, and the relay
/// refuses with a clear message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_is_refused_without_transactions() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let mock = MockKafka::new(1);
    mock.cluster()
        .apiversion(RDKafkaApiKey::EndTxn, None, None)
        .unwrap();
    let topic = txbox_testkit::unique_name("eos");
    let cfg = setup(&db, &mock, &topic);
    let bootstrap = mock.bootstrap();
    let started = Instant::now();
    let err = txbox_relay::run(cfg.clone(), txbox_relay::CancellationToken::new())
        .await
        .expect_err("exactly-once must be refused");
    let text = err.to_string();
    assert!(
        matches!(err, Error::TransactionsUnsupported { .. }),
        "{text}"
    );
    assert!(
        text.contains("does not support Kafka transactions"),
        "{text}"
    );
    assert!(text.contains("--mode at-least-once"), "{text}");
    assert!(text.contains(&bootstrap), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "detected in {:?}",
        started.elapsed()
    );
    assert_eq!(relay_row(db.pool()).await.0, None, "lease released");

    // The binary says the same and exits non-zero.
    let mut child = txbox_testkit::process::Child::spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_txbox-relay")),
        &[
            "--database-url",
            db.url(),
            "--brokers",
            &bootstrap,
            "--position-topic",
            &cfg.position_topic,
            "--transactional-id-prefix",
            &cfg.transactional_id_prefix,
        ],
        &[],
    );
    let code = child.wait_within(Duration::from_secs(30)).await;
    assert_eq!(code, Some(1));
    assert!(
        child.stderr_contains("does not support Kafka transactions"),
        "{}",
        child.stderr()
    );
}
