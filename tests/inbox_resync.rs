//! The window where the inbox cannot know whether its transaction landed,
//! made exact: the `COMMIT` of a batch's transaction reaches PostgreSQL and
//! commits, and the connection breaks before the reply comes back. The
//! worker retries; its fenced advance then matches no row, the stored
//! position is found under its own epoch and past its own, and it resyncs
//! (`Attempt::Resync`): the batch is neither applied twice nor taken for a
//! fence. Real PostgreSQL behind a protocol-aware proxy, Apache Kafka.
//!
//! Alone in its test binary: it asserts process-wide metric counts.

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use txbox_testkit::{kafka, unique_name, CapturedMetrics, CommitReply, PgProxy, TestDb};
use txbox_tests::{bank_inbox, consumed, positions, wait_consumed, Bank, RunningInbox};

/// The inbox's fenced advance (`Statements::advance`).
const ADVANCE: &str = "inbox_offsets\" SET next_offset";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_whose_reply_is_lost_is_resynced_not_applied_again() {
    txbox_testkit::init_tracing();
    let metrics = CapturedMetrics::install();
    let broker = kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let proxy = PgProxy::start_for(db.url()).await;
    let through_proxy = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(proxy.connect_options(db.url()))
        .await
        .expect("connect through the proxy");
    let topic = broker.topic("resync", 1).await;
    let group = unique_name("bank");
    // The bank is not idempotent: a second application adds to the balance
    // and appends a second `effects` row.
    let deposits = Bank::deposits(20, 3);
    let (first, second) = deposits.split_at(10);
    kafka::produce(broker.bootstrap(), &topic, Bank::records(first)).await;

    proxy.arm_commit_cut(ADVANCE);
    let inbox = RunningInbox::start(
        bank_inbox(&through_proxy, broker.bootstrap(), &group, &topic)
            .batch_size(100)
            .linger(Duration::from_millis(500)),
    );
    let cut = proxy
        .wait_for_cut(Duration::from_secs(60))
        .await
        .expect("the first batch's COMMIT was cut");
    assert!(cut.statement.contains(ADVANCE), "{cut:?}");
    assert_eq!(
        cut.reply,
        CommitReply::Committed,
        "PostgreSQL committed the batch whose reply was lost"
    );
    let (_, at_cut, epoch) = positions(db.pool(), &group).await[0];
    assert!(at_cut > 0, "the cut transaction advanced the position");

    assert!(
        wait_consumed(db.pool(), &group, 10, Duration::from_secs(60)).await,
        "the first messages are consumed: at {}",
        consumed(db.pool(), &group).await
    );
    // The partition goes on: neither stopped nor fenced.
    kafka::produce(broker.bootstrap(), &topic, Bank::records(second)).await;
    assert!(
        wait_consumed(db.pool(), &group, 20, Duration::from_secs(60)).await,
        "the partition goes on after the resync: at {}",
        consumed(db.pool(), &group).await
    );
    assert!(inbox.is_running());
    inbox.stop().await;

    Bank::assert_exactly_once(db.pool(), &deposits).await;
    assert_eq!(
        positions(db.pool(), &group).await,
        vec![(0, 20, epoch)],
        "past every message, under the epoch of the first claim"
    );
    assert_eq!(proxy.cuts().len(), 1, "one connection was cut");
    assert!(
        metrics.counter("txbox_inbox_db_retries_total") >= 1,
        "the transaction was retried"
    );
    assert_eq!(
        metrics.counter("txbox_inbox_resyncs_total"),
        1,
        "one resync"
    );
    assert_eq!(metrics.counter("txbox_inbox_fenced_total"), 0, "not fenced");
    assert_eq!(
        metrics.counter("txbox_inbox_partitions_stopped_total"),
        0,
        "not stopped"
    );
}
