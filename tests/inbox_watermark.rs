//! The stored position as dedupe (ADR 0011): messages whose event id is
//! their position get no `inbox_processed` row, `Dedupe::OffsetsOnly`
//! records no id at all, and neither applies a message twice when the
//! position moves back (a replay), while a log declared new is applied.
//! Real Postgres, Apache Kafka.

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::PgPool;
use txbox::inbox::{
    Dedupe, Handler, HandlerError, Inbox, InboxMessage, PositionReset, ResetTo, Tx,
};
use txbox::Schema;
use txbox_testkit::kafka::{self, Record};
use txbox_testkit::{unique_name, TestDb};
use txbox_tests::{positions, totals, wait_position, RunningInbox};

/// Records every application of a message: no constraint, so a message
/// applied twice leaves two rows.
struct Recorder;

#[async_trait::async_trait]
impl Handler for Recorder {
    async fn handle(&self, tx: &mut Tx, msg: &InboxMessage) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO applied (\"offset\", event_id, body) VALUES ($1, $2, $3)")
            .bind(msg.offset())
            .bind(msg.event_id())
            .bind(msg.text()?)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

async fn setup(pool: &PgPool) {
    sqlx::query("CREATE TABLE applied (\"offset\" bigint NOT NULL, event_id text NOT NULL, body text NOT NULL)")
        .execute(pool)
        .await
        .expect("applied table");
}

/// A test's database, broker and topic.
struct On<'a> {
    pool: &'a PgPool,
    bootstrap: &'a str,
    topic: &'a str,
}

impl On<'_> {
    fn start(&self, group: &str, dedupe: Dedupe) -> RunningInbox {
        RunningInbox::start(
            Inbox::builder(self.pool.clone())
                .brokers(self.bootstrap)
                .group_id(group)
                .handler(self.topic, Recorder)
                .batch_size(7)
                .dedupe(dedupe),
        )
    }

    /// Runs `group` until partition 0 is stored at `to`.
    async fn consume_to(&self, group: &str, dedupe: Dedupe, to: i64) {
        let running = self.start(group, dedupe);
        assert!(
            wait_position(self.pool, group, 0, to).await,
            "partition 0 did not reach {to}"
        );
        running.stop().await;
    }
}

/// How many times each body was applied.
async fn applications(pool: &PgPool) -> BTreeMap<String, i64> {
    sqlx::query_as("SELECT body, count(*) FROM applied GROUP BY body")
        .fetch_all(pool)
        .await
        .expect("applications")
        .into_iter()
        .collect()
}

async fn id_rows(pool: &PgPool, group: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM txbox.inbox_processed WHERE consumer_group = $1")
        .bind(group)
        .fetch_one(pool)
        .await
        .expect("inbox_processed")
}

fn once(bodies: impl IntoIterator<Item = String>) -> BTreeMap<String, i64> {
    bodies.into_iter().map(|b| (b, 1)).collect()
}

/// Messages without an id header: their ids are their positions. No id row
/// is written, a replay by hand applies nothing twice (the watermark stays
/// where it was), a recreated topic whose log Kafka rewinds into consumed
/// offsets stops the partition until the operator declares the log new,
/// and then each of its messages is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn position_ids_get_no_rows_and_a_replay_applies_nothing_twice() {
    txbox_testkit::init_tracing();
    let broker = txbox_testkit::kafka().await;
    let db = TestDb::new().await;
    let pool = db.pool();
    setup(pool).await;
    let topic = broker.topic("watermark", 1).await;
    let on = On {
        pool,
        bootstrap: broker.bootstrap(),
        topic: &topic,
    };
    let group = unique_name("watermark");
    let bodies = |from: usize, to: usize, tag: &str| -> Vec<String> {
        (from..to).map(|i| format!("{tag}-{i}")).collect()
    };
    let records = |b: &[String]| {
        b.iter()
            .map(|b| Record::new(b.as_bytes()).partition(0))
            .collect()
    };
    let first = bodies(0, 20, "old");
    kafka::produce(broker.bootstrap(), &topic, records(&first)).await;
    on.consume_to(&group, Dedupe::EventIds, 20).await;
    assert_eq!(applications(pool).await, once(first.clone()));
    assert_eq!(id_rows(pool, &group).await, 0, "position ids need no row");

    // Replay from 0: the 20 consumed are duplicates, 5 new ones applied.
    PositionReset::new(Schema::default(), &group, &topic, ResetTo::Offset(0))
        .apply(pool)
        .await
        .expect("reset");
    let more = bodies(20, 25, "old");
    kafka::produce(broker.bootstrap(), &topic, records(&more)).await;
    on.consume_to(&group, Dedupe::EventIds, 25).await;
    let old: Vec<String> = first.iter().chain(&more).cloned().collect();
    assert_eq!(
        applications(pool).await,
        once(old.clone()),
        "replay applied something twice"
    );
    assert_eq!(
        totals(pool, &group).await,
        (25, 20, 0),
        "applied, duplicates, dead-lettered"
    );
    assert_eq!(id_rows(pool, &group).await, 0);

    // The topic is recreated with 10 new messages: Kafka rewinds the
    // partition (25 is past the new log's end) into offsets 0 to 9, which
    // were consumed on a log the inbox cannot tell from this one (a
    // truncated log looks the same). Neither skipping nor applying them is
    // safe: the partition stops where it is, applying nothing.
    broker.delete_topic(&topic).await;
    broker.create_topic(&topic, 1).await;
    let new = bodies(0, 10, "new");
    kafka::produce(broker.bootstrap(), &topic, records(&new)).await;
    let running = on.start(&group, Dedupe::EventIds);
    let watched = tokio::time::Instant::now() + Duration::from_secs(8);
    while tokio::time::Instant::now() < watched {
        assert_eq!(
            positions(pool, &group).await[0].1,
            25,
            "the position moved on a rewind into consumed offsets"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stop().await;
    assert_eq!(
        applications(pool).await,
        once(old.clone()),
        "nothing applied or skipped"
    );

    // Declared new: applied once each.
    PositionReset::new(Schema::default(), &group, &topic, ResetTo::Offset(0))
        .new_log()
        .apply(pool)
        .await
        .expect("reset to a new log");
    let consumed_until: i64 = sqlx::query_scalar(
        "SELECT consumed_until FROM txbox.inbox_offsets WHERE consumer_group = $1",
    )
    .bind(&group)
    .fetch_one(pool)
    .await
    .expect("watermark");
    assert_eq!(consumed_until, 0, "a new log starts unconsumed");
    on.consume_to(&group, Dedupe::EventIds, 10).await;
    let want = once(old.into_iter().chain(new));
    assert_eq!(applications(pool).await, want, "the new log applied once");
}

/// Messages with ids of their own, 5 of them sent again under new offsets
/// (a producer's retry without idempotence). `EventIds` drops the 5 by
/// their ids; `OffsetsOnly` keeps no id row and applies them: the boundary
/// its documentation names. Both drop a replay of consumed offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offsets_only_keeps_no_ids_and_drops_redeliveries_but_not_resends() {
    txbox_testkit::init_tracing();
    let broker = txbox_testkit::kafka().await;
    let db = TestDb::new().await;
    let pool = db.pool();
    setup(pool).await;
    let topic = broker.topic("offsets-only", 1).await;
    let on = On {
        pool,
        bootstrap: broker.bootstrap(),
        topic: &topic,
    };
    let mut records: Vec<Record> = (0..20)
        .map(|i| {
            Record::new(format!("event-{i}").into_bytes())
                .partition(0)
                .header("ce_id", format!("id-{i}"))
        })
        .collect();
    records.extend((0..5).map(|i| {
        Record::new(format!("event-{i}").into_bytes())
            .partition(0)
            .header("ce_id", format!("id-{i}"))
    }));
    kafka::produce(broker.bootstrap(), &topic, records).await;
    let count_by_id = |pool: PgPool| async move {
        sqlx::query_as::<_, (String, i64)>(
            "SELECT event_id, count(*) FROM applied GROUP BY event_id",
        )
        .fetch_all(&pool)
        .await
        .expect("applied")
        .into_iter()
        .collect::<BTreeMap<String, i64>>()
    };

    let by_ids = unique_name("ids");
    on.consume_to(&by_ids, Dedupe::EventIds, 25).await;
    let applied = count_by_id(pool.clone()).await;
    assert!(
        applied.values().all(|&n| n == 1) && applied.len() == 20,
        "{applied:?}"
    );
    assert_eq!(id_rows(pool, &by_ids).await, 20);
    assert_eq!(totals(pool, &by_ids).await, (20, 5, 0));

    sqlx::query("TRUNCATE applied")
        .execute(pool)
        .await
        .expect("truncate");
    let by_offsets = unique_name("offsets");
    on.consume_to(&by_offsets, Dedupe::OffsetsOnly, 25).await;
    let applied = count_by_id(pool.clone()).await;
    let twice = applied.values().filter(|&&n| n == 2).count();
    assert_eq!(
        (applied.len(), twice),
        (20, 5),
        "the resends are applied: {applied:?}"
    );
    assert_eq!(id_rows(pool, &by_offsets).await, 0, "no id rows");

    // A replay of the whole log applies nothing.
    PositionReset::new(Schema::default(), &by_offsets, &topic, ResetTo::Offset(0))
        .apply(pool)
        .await
        .expect("reset");
    let running = on.start(&by_offsets, Dedupe::OffsetsOnly);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while totals(pool, &by_offsets).await.1 < 25 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stop().await;
    assert_eq!(
        totals(pool, &by_offsets).await,
        (25, 25, 0),
        "replayed as duplicates"
    );
    assert_eq!(
        count_by_id(pool.clone()).await,
        applied,
        "nothing applied twice by the replay"
    );
}
