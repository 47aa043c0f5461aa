//! Zombie consumers: a consumer that lost its partition while inside a
//! transaction cannot commit for it. Two real consumer processes in one
//! group on Apache Kafka; the first is frozen (SIGSTOP) inside its handler's
//! transaction until the group gives its partition to the second, then
//! thawed: its commit must be fenced, and every message applied once.

use std::path::Path;
use std::time::Duration;

use txbox_testkit::process::Child;
use txbox_testkit::{kafka, unique_name, TestDb};
use txbox_tests::Bank;

const BIN: &str = env!("CARGO_BIN_EXE_inbox-chaos");

async fn epoch(db: &TestDb, group: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(max(epoch), 0) FROM txbox.inbox_offsets WHERE consumer_group = $1",
    )
    .bind(group)
    .fetch_one(db.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_consumer_is_fenced_when_it_wakes() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("zombie", 1).await;
    let group = unique_name("bank");
    let deposits = Bank::deposits(60, 6);
    kafka::produce(broker.bootstrap(), &topic, Bank::records(&deposits)).await;

    let env = |slow: bool| {
        let mut e = vec![
            ("TXBOX_DATABASE_URL", db.url()),
            ("TXBOX_KAFKA_BOOTSTRAP", broker.bootstrap()),
            ("CHAOS_TOPIC", topic.as_str()),
            ("CHAOS_GROUP", group.as_str()),
            ("CHAOS_BATCH", "10"),
            ("CHAOS_SESSION_MS", "6000"),
        ];
        if slow {
            e.push(("CHAOS_SLOW_OFFSET", "25"));
            e.push(("CHAOS_SLOW_SECS", "2"));
        }
        e
    };
    let mut zombie = Child::spawn(Path::new(BIN), &[], &env(true));
    assert!(
        zombie
            .wait_for_stderr("TXBOX_CHAOS_IN_HANDLER 25", Duration::from_secs(60))
            .await,
        "zombie never reached the slow message:\n{}",
        zombie.stderr()
    );
    // Inside the transaction for offsets 20..30: freeze it there.
    zombie.freeze();
    let applied_before: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(db.pool())
        .await
        .unwrap();
    // Batches (at most 10) take what is already buffered, so the frozen one
    // starts somewhere in 16..=25; message 25 is in it and not applied.
    assert!(
        (16..=25).contains(&applied_before),
        "batches before the frozen one committed, the frozen one did not ({applied_before} applied)"
    );

    let mut successor = Child::spawn(Path::new(BIN), &[], &env(false));
    // The group expels the silent member and assigns the partition to the
    // successor, which claims it: the epoch moves to 2.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while epoch(&db, &group).await < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "successor never claimed the partition:\n{}",
            successor.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Wake the zombie: its handler finishes and it tries to commit.
    zombie.thaw();
    assert!(
        zombie
            .wait_for_stderr("fenced", Duration::from_secs(30))
            .await,
        "the zombie's commit was not fenced:\n{}",
        zombie.stderr()
    );
    let done = Bank::wait_processed(db.pool(), &group, 60, Duration::from_secs(60)).await;
    successor.terminate();
    zombie.terminate();
    successor.wait().await;
    zombie.wait().await;
    assert!(done, "successor did not finish:\n{}", successor.stderr());

    Bank::assert_exactly_once(db.pool(), &deposits).await;
}
