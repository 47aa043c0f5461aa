//! Input written by a transactional producer: the inbox reads
//! `read_committed` (librdkafka's default), so committed messages are
//! applied once and aborted ones never, across the offsets taken by
//! transaction markers. Apache Kafka (the mock cluster does not hide
//! aborted records).

use std::time::Duration;

use txbox_testkit::{kafka, unique_name, TestDb};
use txbox_tests::{bank_inbox, consumed, Bank, RunningInbox};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn committed_transactions_apply_once_and_aborted_ones_never() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let broker = kafka().await;
    let bootstrap = broker.bootstrap();
    let topic = broker.topic("txn-input", 1).await;
    let group = unique_name("bank");
    let (first, aborted, last) = (
        Bank::deposits(20, 4),
        Bank::deposits(10, 4),
        Bank::deposits(20, 4),
    );
    kafka::produce_transactions(
        bootstrap,
        &topic,
        vec![
            (Bank::records(&first), true),
            (Bank::records(&aborted), false),
            (Bank::records(&last), true),
        ],
    )
    .await;

    let inbox = RunningInbox::start(bank_inbox(db.pool(), bootstrap, &group, &topic).batch_size(7));
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
