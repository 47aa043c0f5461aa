//! Operating on dead letters: a replay request is taken by the running
//! inbox of the group, which puts the message back through its handler
//! (same event id, same position) and removes the dead letter only when
//! that commits; a replay that fails again keeps the dead letter with its
//! error; a discard needs a reason and leaves the row in the audit trail.
//! Both are dry runs unless executed.

use std::time::Duration;

use async_trait::async_trait;
use txbox::inbox::{DeadLetterFilter, DeadLetters, Handler, HandlerError, Inbox, InboxMessage, Tx};
use txbox::Schema;
use txbox_testkit::kafka::Record;
use txbox_testkit::{kafka, unique_name, TestDb};
use txbox_tests::RunningInbox;

/// Applies a message by inserting its event id (no dedupe of its own: a
/// second application is a second row), unless the id is in `blocked`.
struct Gated;

#[async_trait]
impl Handler for Gated {
    async fn handle(&self, tx: &mut Tx, msg: &InboxMessage) -> Result<(), HandlerError> {
        let blocked: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM blocked WHERE event_id = $1)")
                .bind(msg.event_id())
                .fetch_one(&mut **tx)
                .await?;
        if blocked {
            return Err(HandlerError::permanent(format!(
                "{} is blocked",
                msg.event_id()
            )));
        }
        sqlx::query(
            "INSERT INTO applied (event_id, topic, partition, \"offset\") VALUES ($1, $2, $3, $4)",
        )
        .bind(msg.event_id())
        .bind(msg.topic())
        .bind(msg.partition())
        .bind(msg.offset())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

async fn applied(db: &TestDb, event_id: &str) -> Vec<(String, i32, i64)> {
    sqlx::query_as("SELECT topic, partition, \"offset\" FROM applied WHERE event_id = $1")
        .bind(event_id)
        .fetch_all(db.pool())
        .await
        .unwrap()
}

async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_runs_the_handler_once_and_discard_leaves_an_audit_row() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let db = TestDb::new().await;
    sqlx::raw_sql(
        "CREATE TABLE blocked (event_id text PRIMARY KEY);
         CREATE TABLE applied (event_id text, topic text, partition int, \"offset\" bigint);
         INSERT INTO blocked VALUES ('evt-2'), ('evt-4');",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let topic = broker.topic("dead-ops", 1).await;
    let group = unique_name("ops");
    let records = (0..6)
        .map(|i| Record::new(format!("{i}").into_bytes()).header("ce_id", format!("evt-{i}")))
        .collect();
    kafka::produce(broker.bootstrap(), &topic, records).await;
    let inbox = RunningInbox::start(
        Inbox::builder(db.pool().clone())
            .brokers(broker.bootstrap())
            .group_id(&group)
            .handler(&topic, Gated),
    );
    let dead = DeadLetters::new(Schema::default());
    let of_group = DeadLetterFilter {
        group: Some(group.clone()),
        ..DeadLetterFilter::default()
    };
    wait_until("two dead letters", async || {
        dead.list(db.pool(), &of_group, 10).await.unwrap().len() == 2
    })
    .await;
    let listed = dead.list(db.pool(), &of_group, 10).await.unwrap();
    let (d4, d2) = (&listed[0], &listed[1]);
    assert_eq!((d2.event_id.as_str(), d2.offset), ("evt-2", 2));
    assert_eq!(d2.payload.as_deref(), Some(&b"2"[..]));
    let only = |d: &txbox::inbox::DeadLetter| DeadLetterFilter {
        ids: Some(vec![d.id]),
        ..DeadLetterFilter::default()
    };
    let by_error = DeadLetterFilter {
        error_contains: Some("EVT-4 IS BLOCKED".into()),
        ..of_group.clone()
    };
    assert_eq!(
        dead.list(db.pool(), &by_error, 10).await.unwrap()[0].id,
        d4.id
    );

    // Still blocked: the replay fails, the dead letter stays with its error.
    dead.request_replay(db.pool(), &only(d2), "ops-test", true)
        .await
        .unwrap();
    wait_until("the failed replay is recorded", async || {
        dead.list(db.pool(), &only(d2), 1).await.unwrap()[0].replay_attempts == 1
    })
    .await;
    let kept = &dead.list(db.pool(), &only(d2), 1).await.unwrap()[0];
    assert!(kept.replay_requested_at.is_none(), "the request is cleared");
    assert!(
        kept.replay_error
            .as_deref()
            .is_some_and(|e| e.contains("evt-2 is blocked")),
        "{kept:?}"
    );
    assert!(applied(&db, "evt-2").await.is_empty());

    // Unblocked: a dry run changes nothing; the request is then replayed
    // once, at the message's own position, and the dead letter is gone.
    sqlx::query("DELETE FROM blocked WHERE event_id = 'evt-2'")
        .execute(db.pool())
        .await
        .unwrap();
    let dry = dead
        .request_replay(db.pool(), &only(d2), "ops-test", false)
        .await
        .unwrap();
    assert_eq!(dry, vec![d2.id]);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        applied(&db, "evt-2").await.is_empty(),
        "a dry run replays nothing"
    );
    dead.request_replay(db.pool(), &only(d2), "ops-test", true)
        .await
        .unwrap();
    wait_until("the replay applied", async || {
        !applied(&db, "evt-2").await.is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        applied(&db, "evt-2").await,
        vec![(topic.clone(), 0, 2)],
        "once, at its position"
    );
    assert!(dead.list(db.pool(), &only(d2), 1).await.unwrap().is_empty());
    let processed: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM txbox.inbox_processed WHERE consumer_group = $1 AND event_id = 'evt-2')",
    )
    .bind(&group)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert!(processed, "the replayed id is recorded for dedupe again");

    // Discard: needs a reason; dry run by default; leaves the row in the audit.
    assert!(dead
        .discard(db.pool(), &only(d4), "ops-test", " ", true)
        .await
        .is_err());
    dead.discard(db.pool(), &only(d4), "ops-test", "known bad", false)
        .await
        .unwrap();
    assert_eq!(dead.list(db.pool(), &of_group, 10).await.unwrap().len(), 1);
    let gone = dead
        .discard(db.pool(), &only(d4), "ops-test", "known bad", true)
        .await
        .unwrap();
    assert_eq!(gone, vec![d4.id]);
    assert!(dead
        .list(db.pool(), &of_group, 10)
        .await
        .unwrap()
        .is_empty());
    inbox.stop().await;

    let audit: Vec<(i64, String, String, Option<String>, String)> = sqlx::query_as(
        "SELECT dead_letter_id, action, actor, reason, dead_letter->>'event_id'
         FROM txbox.dead_letter_audit ORDER BY id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(
        audit,
        vec![
            (
                d2.id,
                "replayed".into(),
                "ops-test".into(),
                None,
                "evt-2".into()
            ),
            (
                d4.id,
                "discarded".into(),
                "ops-test".into(),
                Some("known bad".into()),
                "evt-4".into()
            ),
        ]
    );
    // Every other message was applied once, and nothing twice.
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM applied")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(total, 5);
}
