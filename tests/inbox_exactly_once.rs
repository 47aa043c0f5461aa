//! The inbox applies every message once: in order per partition, with
//! offsets in Postgres, across replays under the same and under new offsets.
//! Real Postgres, Apache Kafka.

use std::sync::Arc;
use std::time::Duration;

use txbox::inbox::{Handler, HandlerError, Inbox, InboxMessage, Tx};
use txbox::{Outbox, Schema};
use txbox_testkit::kafka::Record;
use txbox_testkit::{kafka, unique_name, TestDb};
use txbox_tests::{
    bank_inbox, consumed, dead_letters, totals, wait_consumed, Bank, BatchBank, RunningInbox,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_message_applied_once_and_offsets_live_in_postgres() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("deposits", 3).await;
    let group = unique_name("bank");
    let deposits = Bank::deposits(600, 25);
    kafka::produce(broker.bootstrap(), &topic, Bank::records(&deposits)).await;

    let inbox = RunningInbox::start(
        bank_inbox(db.pool(), broker.bootstrap(), &group, &topic).batch_size(50),
    );
    assert!(
        Bank::wait_processed(db.pool(), &group, 600, Duration::from_secs(60)).await,
        "all processed"
    );
    inbox.stop().await;

    Bank::assert_exactly_once(db.pool(), &deposits).await;
    // Offsets: one row per partition, summing to every message consumed.
    let next: Vec<(i32, i64, i64)> = sqlx::query_as(
        "SELECT partition, next_offset, epoch FROM txbox.inbox_offsets WHERE consumer_group = $1 ORDER BY partition",
    )
    .bind(&group)
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(next.len(), 3);
    assert_eq!(next.iter().map(|r| r.1).sum::<i64>(), 600);
    assert!(next.iter().all(|r| r.2 >= 1));

    // Per-partition order: effects of one account (one key, one partition)
    // were applied in offset order = production order.
    let order: Vec<String> = sqlx::query_scalar(
        "SELECT event_id FROM effects WHERE account = 'acct-3' ORDER BY applied_at, ctid",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let produced: Vec<String> = deposits
        .iter()
        .filter(|(_, d)| d.account == "acct-3")
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(order, produced);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replays_change_nothing() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("replay", 2).await;
    let group = unique_name("bank");
    let deposits = Bank::deposits(200, 10);
    kafka::produce(broker.bootstrap(), &topic, Bank::records(&deposits)).await;

    let inbox = RunningInbox::start(bank_inbox(db.pool(), broker.bootstrap(), &group, &topic));
    assert!(Bank::wait_processed(db.pool(), &group, 200, Duration::from_secs(60)).await);
    inbox.stop().await;
    let before: Vec<(String, i64)> = sqlx::query_as("SELECT id, balance FROM account ORDER BY id")
        .fetch_all(db.pool())
        .await
        .unwrap();

    // 1. Rewind the group (the offsets are ours): every message is read again.
    sqlx::query("UPDATE txbox.inbox_offsets SET next_offset = 0 WHERE consumer_group = $1")
        .bind(&group)
        .execute(db.pool())
        .await
        .unwrap();
    // 2. Republish the same events (same ce_id) under new offsets.
    kafka::produce(broker.bootstrap(), &topic, Bank::records(&deposits)).await;

    let inbox = RunningInbox::start(bank_inbox(db.pool(), broker.bootstrap(), &group, &topic));
    // The rewound log now holds 400 records; wait until the group is past all.
    assert!(
        wait_consumed(db.pool(), &group, 400, Duration::from_secs(60)).await,
        "replay not consumed: at {} of 400",
        consumed(db.pool(), &group).await
    );
    inbox.stop().await;

    let after: Vec<(String, i64)> = sqlx::query_as("SELECT id, balance FROM account ORDER BY id")
        .fetch_all(db.pool())
        .await
        .unwrap();
    assert_eq!(before, after, "business state unchanged by both replays");
    Bank::assert_exactly_once(db.pool(), &deposits).await;
    // The totals survive the restart: 200 applied once, then the 400
    // records of the rewound log all dropped as duplicates.
    assert_eq!(totals(db.pool(), &group).await, (200, 400, 0));
}

/// The inbox inserts a batch's event ids with a plain INSERT while it sees no
/// duplicates; an id seen before (or twice in one batch) fails it, and the
/// batch is redone with ON CONFLICT. Only the new ids may run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_mixing_new_and_seen_event_ids_applies_only_the_new_ones() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("mixed", 1).await;
    let group = unique_name("bank");
    let seen = Bank::deposits(40, 4);
    kafka::produce(broker.bootstrap(), &topic, Bank::records(&seen)).await;
    let inbox = || {
        RunningInbox::start(
            bank_inbox(db.pool(), broker.bootstrap(), &group, &topic)
                .batch_size(100)
                .linger(Duration::from_millis(500)),
        )
    };
    let running = inbox();
    assert!(wait_consumed(db.pool(), &group, 40, Duration::from_secs(60)).await);
    running.stop().await;

    // One backlog, read as one batch: new deposits with seen ones between
    // them, and one new deposit twice.
    let new = Bank::deposits(30, 4);
    let mut mixed = Vec::new();
    for (i, d) in new.iter().enumerate() {
        mixed.push(d.clone());
        if i % 3 == 0 {
            mixed.push(seen[i].clone());
        }
    }
    mixed.push(new[7].clone());
    let total = 40 + mixed.len() as i64;
    kafka::produce(broker.bootstrap(), &topic, Bank::records(&mixed)).await;

    let running = inbox();
    assert!(
        wait_consumed(db.pool(), &group, total, Duration::from_secs(60)).await,
        "consumed {} of {total}",
        consumed(db.pool(), &group).await
    );
    running.stop().await;
    let all: Vec<_> = seen.into_iter().chain(new).collect();
    Bank::assert_exactly_once(db.pool(), &all).await;
}

/// Writes one `ledger` row per event, keyed by its id, with no `ON
/// CONFLICT`: a second copy of an event fails on the key, and the handler
/// calls that permanent, as handlers that rely on the inbox's dedupe do.
struct Ledger;

#[async_trait::async_trait]
impl Handler for Ledger {
    async fn handle(&self, tx: &mut Tx, msg: &InboxMessage) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO ledger (event_id, payload) VALUES ($1, $2)")
            .bind(msg.event_id())
            .bind(msg.payload())
            .execute(&mut **tx)
            .await
            .map_err(|e| match e.as_database_error() {
                Some(d) if d.is_unique_violation() => HandlerError::permanent(e),
                _ => HandlerError::Database(e),
            })?;
        Ok(())
    }
}

/// In the steady state the handler runs before the event ids are inserted
/// (with the fenced advance, ADR 0013), so it can meet an event applied
/// before that came again under a new offset. When its own key refuses
/// it, that failure must not count: the batch is redone with the ids
/// checked first, the copy is dropped as a duplicate, and nothing is
/// dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_under_a_new_offset_is_dropped_even_when_the_handler_refuses_it() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let db = TestDb::new().await;
    sqlx::query("CREATE TABLE ledger (event_id text PRIMARY KEY, payload bytea)")
        .execute(db.pool())
        .await
        .unwrap();
    let topic = broker.topic("ledger", 1).await;
    let group = unique_name("ledger");
    let record = |id: &str| Record::new(id.as_bytes().to_vec()).header("ce_id", id.to_owned());
    let first: Vec<Record> = (0..20).map(|i| record(&format!("evt-{i}"))).collect();
    kafka::produce(broker.bootstrap(), &topic, first).await;
    let running = RunningInbox::start(
        Inbox::builder(db.pool().clone())
            .brokers(broker.bootstrap())
            .group_id(&group)
            .handler(&topic, Ledger)
            .batch_size(100),
    );
    assert!(wait_consumed(db.pool(), &group, 20, Duration::from_secs(60)).await);
    // A copy alone in its batch, then a new event (a clean batch: the
    // next one is taken optimistically again), then a copy among new
    // events, after one of them.
    for (records, want) in [
        (vec![record("evt-5")], 21),
        (vec![record("evt-20")], 22),
        (["evt-21", "evt-12", "evt-22"].map(record).to_vec(), 25),
    ] {
        kafka::produce(broker.bootstrap(), &topic, records).await;
        assert!(
            wait_consumed(db.pool(), &group, want, Duration::from_secs(60)).await,
            "consumed {} of {want}",
            consumed(db.pool(), &group).await
        );
    }
    running.stop().await;

    assert_eq!(
        dead_letters(db.pool()).await,
        0,
        "a duplicate was dead-lettered"
    );
    let ledger: Vec<String> = sqlx::query_scalar("SELECT event_id FROM ledger ORDER BY event_id")
        .fetch_all(db.pool())
        .await
        .unwrap();
    let mut want: Vec<String> = (0..23).map(|i| format!("evt-{i}")).collect();
    want.sort();
    assert_eq!(ledger, want);
    assert_eq!(
        totals(db.pool(), &group).await,
        (23, 2, 0),
        "applied, duplicates, dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_handler_applies_once_and_a_consumer_restart_resumes_from_postgres() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("batch", 2).await;
    let group = unique_name("bank");
    let first = Bank::deposits(300, 7);
    kafka::produce(broker.bootstrap(), &topic, Bank::records(&first)).await;

    let batch = || {
        Inbox::builder(db.pool().clone())
            .brokers(broker.bootstrap())
            .group_id(&group)
            .batch_handler(
                &topic,
                BatchBank(Arc::new(Bank::new(Outbox::new(Schema::default())))),
            )
            .batch_size(100)
    };
    let inbox = RunningInbox::start(batch());
    assert!(Bank::wait_processed(db.pool(), &group, 300, Duration::from_secs(60)).await);
    inbox.stop().await;

    let second = Bank::deposits(100, 7);
    kafka::produce(broker.bootstrap(), &topic, Bank::records(&second)).await;
    let inbox = RunningInbox::start(batch());
    assert!(Bank::wait_processed(db.pool(), &group, 400, Duration::from_secs(60)).await);
    inbox.stop().await;

    let all: Vec<_> = first.into_iter().chain(second).collect();
    Bank::assert_exactly_once(db.pool(), &all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_is_a_typed_error() {
    let db = TestDb::new().await;
    let bank = || Bank::new(Outbox::new(Schema::default()));
    let no_group = Inbox::builder(db.pool().clone())
        .brokers("127.0.0.1:1")
        .handler("t", bank())
        .build();
    assert!(matches!(no_group, Err(txbox::Error::Config(_))));
    let no_brokers = Inbox::builder(db.pool().clone())
        .group_id("g")
        .handler("t", bank())
        .build();
    assert!(matches!(no_brokers, Err(txbox::Error::Config(_))));
    let no_handler = Inbox::builder(db.pool().clone())
        .brokers("127.0.0.1:1")
        .group_id("g")
        .build();
    assert!(matches!(no_handler, Err(txbox::Error::Config(_))));

    // An unmigrated schema: run refuses at once with the migrate hint.
    let inbox = Inbox::builder(db.pool().clone())
        .schema(Schema::new("not_migrated").unwrap())
        .brokers("127.0.0.1:1")
        .group_id("g")
        .handler("t", bank())
        .build()
        .unwrap();
    let err = inbox.run(async {}).await.unwrap_err();
    assert!(matches!(err, txbox::Error::SchemaNotReady { .. }), "{err}");

    // Unreachable brokers: a Kafka error at start, not an endless wait.
    let unreachable = Inbox::builder(db.pool().clone())
        .brokers("127.0.0.1:1")
        .group_id("g")
        .handler("t", bank())
        .build()
        .unwrap();
    let err = unreachable.run(async {}).await.unwrap_err();
    assert!(matches!(err, txbox::Error::Kafka(_)), "{err}");

    // A topic that does not exist: a configuration error naming it.
    let broker = kafka().await;
    let missing = Inbox::builder(db.pool().clone())
        .brokers(broker.bootstrap())
        .group_id("g")
        .handler("no-such-topic-anywhere", bank())
        .build()
        .unwrap();
    let err = missing.run(async {}).await.unwrap_err();
    assert!(matches!(err, txbox::Error::Config(_)), "{err}");
    assert!(err.to_string().contains("no-such-topic-anywhere"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn positions_can_be_mirrored_to_kafka_for_lag_tools() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("mirror", 2).await;
    let group = unique_name("bank");
    let deposits = Bank::deposits(100, 5);
    kafka::produce(broker.bootstrap(), &topic, Bank::records(&deposits)).await;

    let inbox = RunningInbox::start(
        bank_inbox(db.pool(), broker.bootstrap(), &group, &topic)
            .mirror_offsets_to_kafka(Duration::from_millis(100)),
    );
    assert!(Bank::wait_processed(db.pool(), &group, 100, Duration::from_secs(60)).await);
    let in_postgres: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM txbox.inbox_offsets WHERE consumer_group = $1 ORDER BY partition",
    )
    .bind(&group)
    .fetch_all(db.pool())
    .await
    .unwrap();

    // Read the group's committed offsets as a lag tool would.
    let (bootstrap, t, g) = (broker.bootstrap().to_owned(), topic.clone(), group.clone());
    let in_kafka = tokio::task::spawn_blocking(move || {
        let reader: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", &g)
            .create()
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition(&t, 0);
        tpl.add_partition(&t, 1);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let c = reader
                .committed_offsets(tpl.clone(), Duration::from_secs(5))
                .unwrap();
            let got: Vec<(i32, i64)> = c
                .elements()
                .iter()
                .map(|e| (e.partition(), e.offset().to_raw().unwrap_or(-1)))
                .collect();
            if got.iter().map(|p| p.1).sum::<i64>() >= 100 || std::time::Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap();
    inbox.stop().await;
    assert_eq!(
        in_kafka, in_postgres,
        "Kafka's committed offsets mirror Postgres"
    );
}
