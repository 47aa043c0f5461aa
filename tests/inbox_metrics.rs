//! What the inbox measures, checked against what it did: the offsets Kafka
//! delivered no record for (transaction markers and aborted records of a
//! transactional producer's input), the size of each committed
//! transaction, and its duration. Real PostgreSQL, Apache Kafka.
//!
//! Alone in its test binary: it asserts process-wide metric values.

use std::time::Duration;

use txbox_testkit::{kafka, unique_name, CapturedMetrics, TestDb};
use txbox_tests::{bank_inbox, Bank, RunningInbox};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skipped_offsets_batch_sizes_and_transaction_times_are_measured() {
    txbox_testkit::init_tracing();
    let metrics = CapturedMetrics::install();
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let broker = kafka().await;
    let topic = broker.topic("measured", 1).await;
    let group = unique_name("bank");
    // Committed transactions of 10 and one aborted transaction of 5:
    //   0-9 m10 | 11-20 m21 | aborted 22-26 m27 | 28-37 m38 | 39-48 m49 | 50-59 m60
    // A read_committed consumer sees 50 records and skips 1 + 7 + 1 + 1
    // offsets between them (the last marker has no record after it).
    let committed: Vec<_> = (0..5).map(|_| Bank::deposits(10, 4)).collect();
    let aborted = Bank::deposits(5, 4);
    let mut transactions: Vec<_> = committed.iter().map(|d| (Bank::records(d), true)).collect();
    transactions.insert(2, (Bank::records(&aborted), false));
    kafka::produce_transactions(broker.bootstrap(), &topic, transactions).await;

    let inbox = RunningInbox::start(
        bank_inbox(db.pool(), broker.bootstrap(), &group, &topic).batch_size(8),
    );
    assert!(
        Bank::wait_processed(db.pool(), &group, 50, Duration::from_secs(60)).await,
        "the 50 committed deposits processed"
    );
    inbox.stop().await;
    let all: Vec<_> = committed.concat();
    Bank::assert_exactly_once(db.pool(), &all).await;

    assert_eq!(metrics.counter("txbox_inbox_offsets_skipped_total"), 10);
    let sizes = metrics.histogram("txbox_inbox_batch_size");
    assert_eq!(
        sizes.iter().sum::<f64>(),
        50.0,
        "every message in one committed batch: {sizes:?}"
    );
    assert!(sizes.iter().all(|&s| (1.0..=8.0).contains(&s)), "{sizes:?}");
    let seconds = metrics.histogram("txbox_inbox_transaction_seconds");
    assert_eq!(
        seconds.len(),
        sizes.len(),
        "one duration per committed transaction"
    );
    assert!(seconds.iter().all(|&s| s > 0.0 && s < 30.0), "{seconds:?}");
}
