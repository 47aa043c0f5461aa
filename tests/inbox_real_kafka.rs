//! The inbox against Apache Kafka (ignored unless run with `KAFKA_BOOTSTRAP`
//! set, e.g. `docker compose up kafka`; `scripts/test` then includes them):
//! what only a real broker does.
//!
//! - A topic really deleted and created again (Tansu 0.6.0 never answers
//!   OFFSET_OUT_OF_RANGE; the mock-cluster test stands in a second cluster).
//! - Input written by a transactional producer: the consumer reads
//!   `read_committed` (librdkafka's default), so committed messages are
//!   applied once and aborted ones never, across the offsets taken by
//!   transaction markers (Tansu cannot commit a transaction; the mock cluster
//!   does not hide aborted records).

use std::time::Duration;

use txbox_testkit::{kafka, real_kafka, unique_name, Broker, TestDb};
use txbox_tests::{bank_inbox, consumed, recreated_topic_drill, Bank, RunningInbox};

/// The real broker's bootstrap servers and handle, and a database with the
/// bank's tables.
async fn setup() -> (String, Broker, TestDb) {
    txbox_testkit::init_tracing();
    let bootstrap = real_kafka();
    let broker = Broker::at(&bootstrap);
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    (bootstrap, broker, db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a real Apache Kafka: set KAFKA_BOOTSTRAP (docker compose up kafka)"]
async fn kafka_a_recreated_topic_is_applied_from_its_start_not_skipped() {
    let (bootstrap, broker, db) = setup().await;
    let topic = broker.topic("recreated", 1).await;
    recreated_topic_drill(db.pool(), &bootstrap, &topic, async || {
        broker.delete_topic(&topic).await;
        broker.create_topic(&topic, 1).await;
        bootstrap.clone()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a real Apache Kafka: set KAFKA_BOOTSTRAP (docker compose up kafka)"]
async fn kafka_committed_transactions_apply_once_and_aborted_ones_never() {
    let (bootstrap, broker, db) = setup().await;
    let topic = broker.topic("txn-input", 1).await;
    let group = unique_name("bank");
    let (first, aborted, last) = (
        Bank::deposits(20, 4),
        Bank::deposits(10, 4),
        Bank::deposits(20, 4),
    );
    kafka::produce_transactions(
        &bootstrap,
        &topic,
        vec![
            (Bank::records(&first), true),
            (Bank::records(&aborted), false),
            (Bank::records(&last), true),
        ],
    )
    .await;

    let inbox =
        RunningInbox::start(bank_inbox(db.pool(), &bootstrap, &group, &topic).batch_size(7));
    assert!(
        Bank::wait_processed(db.pool(), &group, 40, Duration::from_secs(60)).await,
        "committed deposits processed: position {}",
        consumed(db.pool(), &group).await
    );
    // Time for an aborted deposit to be (wrongly) applied after them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    inbox.stop().await;

    // Balances equal the committed deposits alone; an aborted one applied
    // would show in them and as an unexpected effect.
    let committed: Vec<_> = first.into_iter().chain(last).collect();
    Bank::assert_exactly_once(db.pool(), &committed).await;
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(db.pool())
        .await
        .expect("effects");
    assert_eq!(effects, 40, "{} aborted deposits applied", effects - 40);
    // The log: committed data 0-19, commit marker 20, aborted data 21-30,
    // abort marker 31, committed data 32-51, commit marker 52. The stored
    // position is past the last message the inbox was given; 52 also shows
    // the aborted records were really written (and filtered).
    let next = consumed(db.pool(), &group).await;
    assert_eq!(next, 52, "stored position");
}
