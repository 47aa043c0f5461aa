//! Messages the inbox cannot apply as given, and how each one ends: as one
//! dead letter holding its bytes (or a stopped partition), never an advance
//! with nothing stored. Real Postgres, Apache Kafka.
//!
//! - a poison message at an offset whose dead letter from a deleted log is
//!   still stored;
//! - a dead-letter insert that writes no row.

use std::time::Duration;

use sqlx::PgPool;
use txbox::db::Backoff;
use txbox::inbox::{Inbox, InboxBuilder, RetryPolicy};
use txbox::{Outbox, Schema};
use txbox_testkit::kafka::Record;
use txbox_testkit::{kafka, unique_name, Broker, TestDb};
use txbox_tests::{
    consumed, dead_letters, wait_consumed, wait_position, Bank, Deposit, RunningInbox,
};

/// event_id, offset, key, payload, attempts, error, headers
type DeadLetter = (
    String,
    i64,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    i32,
    String,
    serde_json::Value,
);

async fn dead_letters_of(pool: &PgPool, group: &str) -> Vec<DeadLetter> {
    sqlx::query_as(
        "SELECT event_id, \"offset\", key, payload, attempts, error, headers
         FROM txbox.inbox_dead_letters WHERE consumer_group = $1 ORDER BY id",
    )
    .bind(group)
    .fetch_all(pool)
    .await
    .expect("dead letters")
}

fn fast_retry(attempts: u32) -> RetryPolicy {
    RetryPolicy::attempts(attempts).backoff(Backoff::new(
        Duration::from_millis(10),
        Duration::from_millis(50),
    ))
}

fn inbox(db: &TestDb, broker: &Broker, group: &str) -> InboxBuilder {
    Inbox::builder(db.pool().clone())
        .brokers(broker.bootstrap())
        .group_id(group)
        .batch_size(10)
        .retry(fast_retry(3))
}

fn bank() -> Bank {
    Bank::new(Outbox::new(Schema::default()))
}

/// `before`, then `poison`, then `after`: the records of a one-partition
/// topic, with the deposits around the poison.
fn around(poison: Vec<Record>) -> (Vec<Record>, Vec<(String, Deposit)>) {
    around_then(poison, 3)
}

/// Three deposits, then `poison`, then `after` deposits.
fn around_then(poison: Vec<Record>, after: usize) -> (Vec<Record>, Vec<(String, Deposit)>) {
    let before = Bank::deposits(3, 2);
    let after = Bank::deposits(after, 2);
    let mut records = Bank::records(&before);
    records.extend(poison);
    records.extend(Bank::records(&after));
    (records, before.into_iter().chain(after).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_message_at_an_offset_with_a_dead_letter_from_a_deleted_log_is_stored() {
    txbox_testkit::init_tracing();
    let broker = txbox_testkit::kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("reused-offset", 1).await;
    let group = unique_name("bank");
    let poison = |id: &str| Record::new(&b"{not json"[..]).header("ce_id", id);

    let (old, old_good) = around_then(vec![poison("old-poison")], 6);
    kafka::produce(broker.bootstrap(), &topic, old).await;
    let h = RunningInbox::start(inbox(&db, broker, &group).handler(&topic, bank()));
    assert!(
        wait_position(db.pool(), &group, 0, 10).await,
        "old log consumed"
    );
    h.stop().await;

    // The topic is recreated; its new log (shorter: the stored position is
    // out of its range, and the inbox follows Kafka back to its start) has
    // a different poison message at the same offset, 3.
    broker.delete_topic(&topic).await;
    broker.create_topic(&topic, 1).await;
    let (new, new_good) = around(vec![poison("new-poison")]);
    kafka::produce(broker.bootstrap(), &topic, new).await;
    let h = RunningInbox::start(inbox(&db, broker, &group).handler(&topic, bank()));
    assert!(
        Bank::wait_processed(db.pool(), &group, 17, Duration::from_secs(60)).await,
        "new log consumed"
    );
    h.stop().await;

    let dead = dead_letters_of(db.pool(), &group).await;
    let stored: Vec<(&str, i64, Option<&[u8]>)> = dead
        .iter()
        .map(|d| (d.0.as_str(), d.1, d.3.as_deref()))
        .collect();
    assert_eq!(
        stored,
        vec![
            ("old-poison", 3, Some(&b"{not json"[..])),
            ("new-poison", 3, Some(&b"{not json"[..]))
        ],
        "each log's poison message has its own dead letter"
    );
    let all: Vec<_> = old_good.into_iter().chain(new_good).collect();
    Bank::assert_exactly_once(db.pool(), &all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_that_stores_no_row_stops_the_partition_instead_of_skipping() {
    txbox_testkit::init_tracing();
    let broker = txbox_testkit::kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    // The insert succeeds and writes nothing (as a trigger or rule of an
    // operator's could make it).
    sqlx::raw_sql(
        "CREATE FUNCTION discard() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
         CREATE TRIGGER discard BEFORE INSERT ON txbox.inbox_dead_letters
             FOR EACH ROW EXECUTE FUNCTION discard();",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let topic = broker.topic("discarded", 1).await;
    let group = unique_name("bank");
    let (records, good) = around(vec![
        Record::new(&b"garbage"[..]).header("ce_id", "poison-1")
    ]);
    kafka::produce(broker.bootstrap(), &topic, records).await;

    let h = RunningInbox::start(inbox(&db, broker, &group).handler(&topic, bank()));
    assert!(wait_consumed(db.pool(), &group, 3, Duration::from_secs(60)).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        consumed(db.pool(), &group).await,
        3,
        "the position does not pass a poison message whose dead letter was not stored"
    );
    h.stop().await;
    assert_eq!(dead_letters(db.pool()).await, 0);

    sqlx::query("DROP TRIGGER discard ON txbox.inbox_dead_letters")
        .execute(db.pool())
        .await
        .unwrap();
    let h = RunningInbox::start(inbox(&db, broker, &group).handler(&topic, bank()));
    assert!(wait_consumed(db.pool(), &group, 7, Duration::from_secs(60)).await);
    h.stop().await;
    let dead = dead_letters_of(db.pool(), &group).await;
    assert_eq!(
        dead.iter().map(|d| (d.0.as_str(), d.1)).collect::<Vec<_>>(),
        vec![("poison-1", 3)]
    );
    Bank::assert_exactly_once(db.pool(), &good).await;
}
