//! Messages the inbox cannot apply as given, and how each one ends: as one
//! dead letter holding its bytes (or a stopped partition, when configured),
//! never an endless retry, a silent stall, or an advance with nothing
//! stored. Real Postgres, Apache Kafka.
//!
//! - a poison message at an offset whose dead letter from a deleted log is
//!   still stored;
//! - a dead-letter insert that writes no row;
//! - an event id with a NUL byte (valid UTF-8, refused by Postgres `text`);
//! - a header value with a NUL byte (refused by `jsonb` as `\u0000`);
//! - a handler that swallows a database error, leaving the transaction
//!   aborted (SQLSTATE 25P02 at the offset advance);
//! - a handler whose writes violate a deferred constraint (SQLSTATE 23503
//!   at COMMIT);
//! - a handler that panics (one message at a time, and in a batch);
//! - arbitrary bytes in payloads, keys, header names and values, and event
//!   ids (a property test).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use sqlx::PgPool;
use txbox::db::Backoff;
use txbox::inbox::{
    BatchError, BatchHandler, FailureAction, Handler, HandlerError, Inbox, InboxBuilder,
    InboxMessage, RetryPolicy, Tx,
};
use txbox::{Headers, Outbox, Schema};
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

fn deposit(account: &str, id: &str) -> Record {
    Record::new(
        serde_json::to_vec(&Deposit {
            account: account.into(),
            amount: 1,
        })
        .expect("json"),
    )
    .header("ce_id", id)
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

/// Accounts whose deposits a [`Troubled`] handler mishandles.
const SWALLOWS: &str = "swallows-db-error";
const PANICS: &str = "panics";
const DEFERRED: &str = "violates-deferred-fk";

/// The bank, except that a deposit to [`SWALLOWS`] runs a failing statement
/// and returns `Ok` anyway (the transaction is left aborted), and one to
/// [`PANICS`] panics, and one to [`DEFERRED`] writes a row whose deferred
/// foreign key fails at COMMIT (table `deferred_child`, see
/// [`Troubled::setup`]). Counts the calls for each.
#[derive(Clone)]
struct Troubled {
    bank: Bank,
    calls: Arc<Mutex<HashMap<String, u32>>>,
}

impl Troubled {
    fn new() -> Self {
        Troubled {
            bank: bank(),
            calls: Arc::default(),
        }
    }

    async fn setup(pool: &PgPool) {
        sqlx::raw_sql(
            "CREATE TABLE deferred_parent (id bigint PRIMARY KEY);
             CREATE TABLE deferred_child (parent bigint NOT NULL
                 REFERENCES deferred_parent DEFERRABLE INITIALLY DEFERRED);",
        )
        .execute(pool)
        .await
        .expect("deferred tables");
    }

    fn calls(&self, account: &str) -> u32 {
        self.calls
            .lock()
            .unwrap()
            .get(account)
            .copied()
            .unwrap_or(0)
    }

    async fn apply(&self, tx: &mut Tx, msg: &InboxMessage) -> Result<(), HandlerError> {
        let d: Deposit = msg.json()?;
        *self
            .calls
            .lock()
            .unwrap()
            .entry(d.account.clone())
            .or_default() += 1;
        match d.account.as_str() {
            SWALLOWS => {
                // The error is dropped: the handler "succeeds" with its
                // transaction aborted.
                let _ = sqlx::query("SELECT 1 / 0").execute(&mut **tx).await;
                Ok(())
            }
            PANICS => panic!("the handler panics on account {PANICS}"),
            DEFERRED => {
                sqlx::query("INSERT INTO deferred_child (parent) VALUES (-1)")
                    .execute(&mut **tx)
                    .await?;
                self.bank.handle(tx, msg).await
            }
            _ => self.bank.handle(tx, msg).await,
        }
    }
}

#[async_trait::async_trait]
impl Handler for Troubled {
    async fn handle(&self, tx: &mut Tx, msg: &InboxMessage) -> Result<(), HandlerError> {
        self.apply(tx, msg).await
    }
}

#[async_trait::async_trait]
impl BatchHandler for Troubled {
    async fn handle_batch(&self, tx: &mut Tx, msgs: &[InboxMessage]) -> Result<(), BatchError> {
        for m in msgs {
            // No index: the inbox has to find the culprit by bisecting.
            self.apply(tx, m).await?;
        }
        Ok(())
    }
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

/// A trigger on `table` that makes every insert succeed and write nothing.
async fn discard_inserts(pool: &PgPool, table: &str) {
    sqlx::raw_sql(&format!(
        "CREATE OR REPLACE FUNCTION discard() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
         CREATE TRIGGER discard BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION discard();"
    ))
    .execute(pool)
    .await
    .unwrap();
}

/// Drops the trigger of [`discard_inserts`] from `table`.
async fn keep_inserts(pool: &PgPool, table: &str) {
    sqlx::raw_sql(&format!("DROP TRIGGER discard ON {table}"))
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_that_stores_no_row_stops_the_partition_instead_of_skipping() {
    txbox_testkit::init_tracing();
    let broker = txbox_testkit::kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    // The insert succeeds and writes nothing (as a trigger or rule of an
    // operator's could make it).
    discard_inserts(db.pool(), "txbox.inbox_dead_letters").await;
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

    keep_inserts(db.pool(), "txbox.inbox_dead_letters").await;
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

/// In the steady state the event ids are inserted by the statement that
/// advances the position (ADR 0013). When a trigger discards them, the
/// position does not move past messages whose ids were not stored (their
/// copies would no longer be dropped): the partition stops, nothing
/// commits, and once the trigger is gone every message is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn event_ids_a_trigger_discards_stop_the_partition_instead_of_committing() {
    txbox_testkit::init_tracing();
    let broker = txbox_testkit::kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    discard_inserts(db.pool(), "txbox.inbox_processed").await;
    let topic = broker.topic("ids-discarded", 1).await;
    let group = unique_name("bank");
    let deposits = Bank::deposits(5, 2);
    kafka::produce(broker.bootstrap(), &topic, Bank::records(&deposits)).await;

    let h = RunningInbox::start(inbox(&db, broker, &group).handler(&topic, bank()));
    assert!(
        wait_position(db.pool(), &group, 0, 0).await,
        "the partition was claimed"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(
        (consumed(db.pool(), &group).await, effects),
        (0, 0),
        "nothing committed while the ids could not be stored"
    );
    h.stop().await;

    keep_inserts(db.pool(), "txbox.inbox_processed").await;
    let h = RunningInbox::start(inbox(&db, broker, &group).handler(&topic, bank()));
    assert!(wait_consumed(db.pool(), &group, 5, Duration::from_secs(60)).await);
    h.stop().await;
    assert_eq!(dead_letters(db.pool()).await, 0);
    Bank::assert_exactly_once(db.pool(), &deposits).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_id_with_a_nul_byte_is_dead_lettered() {
    txbox_testkit::init_tracing();
    let broker = txbox_testkit::kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("nul-id", 1).await;
    let group = unique_name("bank");
    let (records, good) = around(vec![deposit("acct-nul", "evt\0nul")]);
    kafka::produce(broker.bootstrap(), &topic, records).await;

    let h = RunningInbox::start(inbox(&db, broker, &group).handler(&topic, bank()));
    assert!(
        wait_consumed(db.pool(), &group, 7, Duration::from_secs(30)).await,
        "consumed past the message: {} of 7",
        consumed(db.pool(), &group).await
    );
    h.stop().await;
    let dead = dead_letters_of(db.pool(), &group).await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    let (id, offset, _, _, attempts, error, headers) = &dead[0];
    assert_eq!(
        (id.as_str(), *offset, *attempts),
        ("evt\u{FFFD}nul", 3, 1),
        "stored with the NUL replaced, at once (retrying cannot help)"
    );
    assert!(error.contains("NUL"), "{error}");
    assert_eq!(
        Headers::from_json(headers).unwrap().get("ce_id"),
        Some(&b"evt\0nul"[..]),
        "the exact id is kept in the headers"
    );
    // The handler never ran for it: no effect on acct-nul.
    Bank::assert_exactly_once(db.pool(), &good).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn header_values_with_nul_bytes_are_kept_in_the_dead_letter() {
    txbox_testkit::init_tracing();
    let broker = txbox_testkit::kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("nul-header", 1).await;
    let group = unique_name("bank");
    let applied_with_nul = (
        "ok-nul-header".to_owned(),
        Deposit {
            account: "acct-0".into(),
            amount: 1,
        },
    );
    let (records, mut good) = around(vec![
        Record::new(&b"{not json"[..])
            .header("ce_id", "poison-nul-header")
            .header("trace", &b"a\0b"[..])
            .header("bin", vec![0xff, 0x00]),
        deposit("acct-0", "ok-nul-header").header("trace", &b"\0"[..]),
    ]);
    good.push(applied_with_nul);
    kafka::produce(broker.bootstrap(), &topic, records).await;

    let h = RunningInbox::start(inbox(&db, broker, &group).handler(&topic, bank()));
    assert!(
        wait_consumed(db.pool(), &group, 8, Duration::from_secs(30)).await,
        "consumed past the message: {} of 8",
        consumed(db.pool(), &group).await
    );
    h.stop().await;
    let dead = dead_letters_of(db.pool(), &group).await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!((dead[0].0.as_str(), dead[0].1), ("poison-nul-header", 3));
    let mut want = Headers::new();
    want.insert("ce_id", "poison-nul-header");
    want.insert("trace", &b"a\0b"[..]);
    want.insert("bin", vec![0xff, 0x00]);
    assert_eq!(
        Headers::from_json(&dead[0].6).unwrap(),
        want,
        "headers kept byte for byte"
    );
    Bank::assert_exactly_once(db.pool(), &good).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_that_swallows_a_database_error_is_retried_then_dead_lettered() {
    txbox_testkit::init_tracing();
    let broker = txbox_testkit::kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("swallowed", 1).await;
    let group = unique_name("bank");
    let (records, good) = around(vec![deposit(SWALLOWS, "swallow-1")]);
    kafka::produce(broker.bootstrap(), &topic, records).await;

    let h = RunningInbox::start(inbox(&db, broker, &group).handler(&topic, Troubled::new()));
    assert!(
        wait_consumed(db.pool(), &group, 7, Duration::from_secs(30)).await,
        "consumed past the message: {} of 7",
        consumed(db.pool(), &group).await
    );
    h.stop().await;
    let dead = dead_letters_of(db.pool(), &group).await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    let (id, offset, _, _, attempts, error, _) = &dead[0];
    assert_eq!((id.as_str(), *offset, *attempts), ("swallow-1", 3, 3));
    assert!(error.contains("aborted"), "{error}");
    Bank::assert_exactly_once(db.pool(), &good).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deferred_constraint_violated_at_commit_is_retried_then_dead_lettered() {
    txbox_testkit::init_tracing();
    let broker = txbox_testkit::kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    Troubled::setup(db.pool()).await;
    let topic = broker.topic("deferred", 1).await;
    let group = unique_name("bank");
    let (records, good) = around(vec![deposit(DEFERRED, "deferred-1")]);
    kafka::produce(broker.bootstrap(), &topic, records).await;

    let h = RunningInbox::start(inbox(&db, broker, &group).handler(&topic, Troubled::new()));
    assert!(
        wait_consumed(db.pool(), &group, 7, Duration::from_secs(30)).await,
        "consumed past the message: {} of 7",
        consumed(db.pool(), &group).await
    );
    h.stop().await;
    let dead = dead_letters_of(db.pool(), &group).await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    let (id, offset, _, _, attempts, error, _) = &dead[0];
    assert_eq!((id.as_str(), *offset, *attempts), ("deferred-1", 3, 3));
    assert!(error.contains("foreign key"), "{error}");
    Bank::assert_exactly_once(db.pool(), &good).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panicking_handler_is_retried_then_dead_lettered_and_the_partition_goes_on() {
    txbox_testkit::init_tracing();
    let broker = txbox_testkit::kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("panics", 1).await;
    let group = unique_name("bank");
    let (records, good) = around(vec![deposit(PANICS, "panic-1")]);
    kafka::produce(broker.bootstrap(), &topic, records).await;

    let h = RunningInbox::start(inbox(&db, broker, &group).handler(&topic, Troubled::new()));
    assert!(
        wait_consumed(db.pool(), &group, 7, Duration::from_secs(30)).await,
        "consumed past the message: {} of 7",
        consumed(db.pool(), &group).await
    );
    h.stop().await;
    let dead = dead_letters_of(db.pool(), &group).await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    let (id, offset, _, _, attempts, error, _) = &dead[0];
    assert_eq!((id.as_str(), *offset, *attempts), ("panic-1", 3, 3));
    assert!(
        error.contains("panicked") && error.contains("the handler panics"),
        "{error}"
    );
    Bank::assert_exactly_once(db.pool(), &good).await;
    assert_eq!(txbox_tests::totals(db.pool(), &group).await, (6, 0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_handler_that_panics_or_swallows_errors_is_bisected_to_the_culprits() {
    txbox_testkit::init_tracing();
    let broker = txbox_testkit::kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("batch-panics", 1).await;
    let group = unique_name("bank");
    let first = Bank::deposits(5, 2);
    let second = Bank::deposits(5, 2);
    let third = Bank::deposits(5, 2);
    let mut records = Bank::records(&first);
    records.push(deposit(PANICS, "panic-1"));
    records.extend(Bank::records(&second));
    records.push(deposit(SWALLOWS, "swallow-1"));
    records.extend(Bank::records(&third));
    kafka::produce(broker.bootstrap(), &topic, records).await;

    let h = RunningInbox::start(inbox(&db, broker, &group).batch_handler(&topic, Troubled::new()));
    assert!(
        wait_consumed(db.pool(), &group, 17, Duration::from_secs(30)).await,
        "consumed past both: {} of 17",
        consumed(db.pool(), &group).await
    );
    h.stop().await;
    let dead = dead_letters_of(db.pool(), &group).await;
    assert_eq!(
        dead.iter()
            .map(|d| (d.0.as_str(), d.1, d.4))
            .collect::<Vec<_>>(),
        vec![("panic-1", 5, 3), ("swallow-1", 11, 3)]
    );
    let good: Vec<_> = first.into_iter().chain(second).chain(third).collect();
    Bank::assert_exactly_once(db.pool(), &good).await;
}

/// With `StopPartition`, a panic and an aborted transaction use up the
/// retry policy's attempts and then stop the partition: the handler is not
/// called again, the position stays before the message, nothing is
/// dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stop_partition_stops_after_the_attempts_for_panics_and_aborted_transactions() {
    txbox_testkit::init_tracing();
    let broker = txbox_testkit::kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let mut good = Vec::new();
    let mut running = Vec::new();
    for account in [PANICS, SWALLOWS] {
        let topic = broker.topic("stopped", 1).await;
        let group = unique_name("bank");
        let deposits = Bank::deposits(2, 2);
        let mut records = Bank::records(&deposits);
        records.push(deposit(account, &format!("{account}-1")));
        kafka::produce(broker.bootstrap(), &topic, records).await;
        let handler = Troubled::new();
        let h = RunningInbox::start(
            inbox(&db, broker, &group)
                .handler(&topic, handler.clone())
                .on_failure(FailureAction::StopPartition),
        );
        good.extend(deposits);
        running.push((account, group, handler, h));
    }
    for (account, group, handler, _) in &running {
        assert!(wait_consumed(db.pool(), group, 2, Duration::from_secs(60)).await);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while handler.calls(account) < 3 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls: Vec<u32> = running.iter().map(|r| r.2.calls(r.0)).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for ((account, group, handler, _), before) in running.iter().zip(&calls) {
        let now = handler.calls(account);
        assert!(
            (3..=6).contains(before) && now == *before,
            "{account}: called {before} times, then {now}: the attempts, then no more"
        );
        assert_eq!(
            consumed(db.pool(), group).await,
            2,
            "{account}: stopped before it"
        );
    }
    for (_, _, _, h) in running {
        h.stop().await;
    }
    assert_eq!(dead_letters(db.pool()).await, 0);
    Bank::assert_exactly_once(db.pool(), &good).await;
}

/// Applies messages whose payload starts with an odd byte, recording what
/// it saw; refuses the others (permanently).
struct Echo;

#[async_trait::async_trait]
impl Handler for Echo {
    async fn handle(&self, tx: &mut Tx, msg: &InboxMessage) -> Result<(), HandlerError> {
        match msg.payload() {
            Some([first, ..]) if first % 2 == 1 => {
                let (names, values): (Vec<&str>, Vec<Option<&[u8]>>) = msg.headers().iter().unzip();
                sqlx::query(
                    "INSERT INTO echoed (\"offset\", key, payload, header_names, header_values)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(msg.offset())
                .bind(msg.key())
                .bind(msg.payload())
                .bind(&names)
                .bind(&values)
                .execute(&mut **tx)
                .await?;
                Ok(())
            }
            _ => Err(HandlerError::permanent(
                "payload empty or starting with an even byte",
            )),
        }
    }
}

#[derive(Debug, Clone)]
struct Arbitrary {
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    /// Appended to a unique prefix, so ids of different cases never collide.
    event_id: Option<Vec<u8>>,
    /// librdkafka hands header names to the consumer as C strings: a name
    /// with a NUL arrives cut at it, so names here have none.
    headers: Vec<(String, Vec<u8>)>,
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    // Bytes that matter more often: NUL, invalid UTF-8, and the rest.
    prop::collection::vec(
        prop_oneof![Just(0u8), Just(0xffu8), Just(0xc3u8), any::<u8>()],
        0..max,
    )
}

fn arbitrary() -> impl Strategy<Value = Arbitrary> {
    (
        prop::option::of(bytes(16)),
        prop::option::weighted(0.9, bytes(48)),
        prop::option::weighted(0.8, bytes(12)),
        prop::collection::vec(("[^\u{0}]{0,6}", bytes(16)), 0..4),
    )
        .prop_map(|(key, payload, event_id, headers)| Arbitrary {
            key,
            payload,
            event_id,
            headers,
        })
}

/// Every message, whatever its bytes, is either applied with exactly those
/// bytes visible to the handler or dead-lettered with exactly those bytes
/// stored, and the position moves past it.
#[test]
fn arbitrary_bytes_are_applied_or_dead_lettered_byte_for_byte() {
    txbox_testkit::init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let (db, broker, topic, group, h) = rt.block_on(async {
        let broker = txbox_testkit::kafka().await;
        let db = TestDb::new().await;
        sqlx::query(
            "CREATE TABLE echoed (\"offset\" bigint PRIMARY KEY, key bytea, payload bytea,
                                  header_names text[] NOT NULL, header_values bytea[] NOT NULL)",
        )
        .execute(db.pool())
        .await
        .unwrap();
        let topic = broker.topic("arbitrary", 1).await;
        let group = unique_name("echo");
        let h = RunningInbox::start(
            Inbox::builder(db.pool().clone())
                .brokers(broker.bootstrap())
                .group_id(&group)
                .handler(&topic, Echo)
                .retry(fast_retry(1)),
        );
        (db, broker, topic, group, h)
    });
    let mut runner = TestRunner::new(Config {
        cases: 16,
        // A stalled partition fails every later case: shrinking then
        // only repeats the timeout.
        max_shrink_iters: 8,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&prop::collection::vec(arbitrary(), 1..4), |messages| {
        rt.block_on(check(&db, broker, &topic, &group, &messages))
    });
    rt.block_on(h.stop());
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// key, payload, header names, header values (as the handler saw them)
type Echoed = (Option<Vec<u8>>, Option<Vec<u8>>, Vec<String>, Vec<Vec<u8>>);
/// key, payload, headers, error (of a dead letter)
type Stored = (Option<Vec<u8>>, Option<Vec<u8>>, serde_json::Value, String);

async fn check(
    db: &TestDb,
    broker: &Broker,
    topic: &str,
    group: &str,
    messages: &[Arbitrary],
) -> Result<(), TestCaseError> {
    let records: Vec<Record> = messages
        .iter()
        .map(|m| {
            let mut r = Record {
                partition: Some(0),
                key: m.key.clone(),
                payload: m.payload.clone(),
                headers: m.headers.clone(),
            };
            if let Some(id) = &m.event_id {
                let mut full = uuid::Uuid::new_v4().simple().to_string().into_bytes();
                full.extend_from_slice(id);
                r.headers.push(("ce_id".into(), full));
            }
            r
        })
        .collect();
    let placed = kafka::produce(broker.bootstrap(), topic, records.clone()).await;
    let next = placed.last().map_or(0, |p| p.1 + 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while consumed(db.pool(), group).await < next {
        prop_assert!(
            tokio::time::Instant::now() < deadline,
            "the position did not pass offset {}: {}",
            next - 1,
            consumed(db.pool(), group).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (r, (_, offset)) in records.iter().zip(&placed) {
        let mut headers = Headers::new();
        for (k, v) in &r.headers {
            headers.insert(k.clone(), v.clone());
        }
        let id = r
            .headers
            .iter()
            .rev()
            .find(|h| h.0 == "ce_id")
            .and_then(|h| std::str::from_utf8(&h.1).ok());
        let nul_id = id.is_some_and(|id| id.contains('\0'));
        let applies = !nul_id
            && r.payload
                .as_deref()
                .is_some_and(|p| p.first().is_some_and(|b| b % 2 == 1));
        let echoed: Option<Echoed> = sqlx::query_as(
            "SELECT key, payload, header_names, header_values FROM echoed WHERE \"offset\" = $1",
        )
        .bind(offset)
        .fetch_optional(db.pool())
        .await
        .unwrap();
        let dead: Vec<Stored> = sqlx::query_as(
            "SELECT key, payload, headers, error FROM txbox.inbox_dead_letters
                 WHERE consumer_group = $1 AND \"offset\" = $2",
        )
        .bind(group)
        .bind(offset)
        .fetch_all(db.pool())
        .await
        .unwrap();
        if applies {
            prop_assert!(dead.is_empty(), "offset {offset} applied and dead-lettered");
            let (key, payload, names, values) = echoed.ok_or_else(|| {
                TestCaseError::fail(format!("offset {offset} neither applied nor dead-lettered"))
            })?;
            prop_assert_eq!(&key, &r.key);
            prop_assert_eq!(&payload, &r.payload);
            let seen: Vec<(String, Vec<u8>)> = names.into_iter().zip(values).collect();
            prop_assert_eq!(&seen, &r.headers);
        } else {
            prop_assert!(echoed.is_none(), "offset {offset} should not have applied");
            prop_assert_eq!(dead.len(), 1, "offset {}: one dead letter", offset);
            let (key, payload, stored, error) = &dead[0];
            prop_assert_eq!(key, &r.key);
            prop_assert_eq!(payload, &r.payload);
            prop_assert_eq!(&Headers::from_json(stored).unwrap(), &headers);
            if nul_id {
                prop_assert!(error.contains("NUL"), "{}", error);
            }
        }
    }
    Ok(())
}
