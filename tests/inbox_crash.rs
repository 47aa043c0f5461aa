//! The failure drill: a consumer process is SIGKILLed at each crash window
//! of the inbox transaction, restarted, and the final state must equal one
//! application of every message. Real Postgres, Apache Kafka,
//! real processes, real SIGKILL.

use std::path::Path;
use std::time::Duration;

use txbox_testkit::process::Child;
use txbox_testkit::{kafka, unique_name, TestDb};
use txbox_tests::Bank;

const BIN: &str = env!("CARGO_BIN_EXE_inbox-chaos");

fn consumer(
    db: &TestDb,
    bootstrap: &str,
    topic: &str,
    group: &str,
    failpoints: Option<&str>,
) -> Child {
    let mut env = vec![
        ("TXBOX_DATABASE_URL", db.url()),
        ("TXBOX_KAFKA_BOOTSTRAP", bootstrap),
        ("CHAOS_TOPIC", topic),
        ("CHAOS_GROUP", group),
        ("CHAOS_BATCH", "10"),
    ];
    if let Some(fp) = failpoints {
        env.push(("FAILPOINTS", fp));
    }
    Child::spawn(Path::new(BIN), &[], &env)
}

/// Kills the consumer at `point` (on its `skip+1`th pass), restarts it,
/// and checks exactly-once.
async fn drill(point: &str, skip: u32) {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("drill", 2).await;
    let group = unique_name("bank");
    let deposits = Bank::deposits(300, 13);
    kafka::produce(broker.bootstrap(), &topic, Bank::records(&deposits)).await;

    let fp = format!("{point}={skip}*off->return");
    let mut victim = consumer(&db, broker.bootstrap(), &topic, &group, Some(&fp));
    victim.kill_at(point, Duration::from_secs(60)).await;

    // Both counts in one statement, so in one snapshot: a transaction of
    // another partition whose COMMIT reached the server before the kill can
    // still commit after it, between two separate queries.
    let (applied_at_kill, processed): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM effects), (SELECT count(*) FROM txbox.inbox_processed)",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert!(
        applied_at_kill < 300,
        "the kill came before the end ({applied_at_kill} applied)"
    );
    // Nothing half-done is visible: effects and processed ids agree.
    assert_eq!(
        applied_at_kill, processed,
        "effects and dedupe records commit together"
    );

    let mut survivor = consumer(&db, broker.bootstrap(), &topic, &group, None);
    let done = Bank::wait_processed(db.pool(), &group, 300, Duration::from_secs(90)).await;
    survivor.terminate();
    let code = survivor.wait().await;
    assert!(
        done,
        "restarted consumer did not finish; stderr:\n{}",
        survivor.stderr()
    );
    assert_eq!(
        code,
        Some(0),
        "graceful exit on SIGTERM; stderr:\n{}",
        survivor.stderr()
    );

    let problems = Bank::check_exactly_once(db.pool(), &deposits).await;
    assert!(
        problems.is_empty(),
        "after a kill at {point}: {problems:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_before_the_business_write() {
    drill("inbox.before_business_write", 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_after_the_business_write_before_commit() {
    drill("inbox.after_business_write", 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_after_the_fenced_advance_before_commit() {
    drill("inbox.before_commit", 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_after_commit() {
    drill("inbox.after_commit", 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_at_every_window_in_turn() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("drill", 3).await;
    let group = unique_name("bank");
    let deposits = Bank::deposits(400, 17);
    kafka::produce(broker.bootstrap(), &topic, Bank::records(&deposits)).await;
    for point in [
        "inbox.after_commit",
        "inbox.after_business_write",
        "inbox.before_commit",
        "inbox.before_business_write",
        "inbox.after_commit",
    ] {
        let mut victim = consumer(
            &db,
            broker.bootstrap(),
            &topic,
            &group,
            Some(&format!("{point}=3*off->return")),
        );
        victim.kill_at(point, Duration::from_secs(60)).await;
    }
    let mut survivor = consumer(&db, broker.bootstrap(), &topic, &group, None);
    let done = Bank::wait_processed(db.pool(), &group, 400, Duration::from_secs(90)).await;
    survivor.terminate();
    survivor.wait().await;
    assert!(done, "stderr:\n{}", survivor.stderr());
    Bank::assert_exactly_once(db.pool(), &deposits).await;
}
