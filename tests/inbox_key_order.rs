//! A `KeyOrder::Commit` conflict inside an inbox handler is a transient
//! database error: the batch is retried without using up an attempt, so
//! with a one-attempt retry policy nothing is dead-lettered.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgPool;
use txbox::db::Backoff;
use txbox::inbox::{Handler, HandlerError, Inbox, InboxMessage, RetryPolicy, Tx};
use txbox::outbox::KeyOrder;
use txbox::{Outbox, OutboxEvent, Schema};
use txbox_testkit::{kafka, unique_name, TestDb};
use txbox_tests::{dead_letters, wait_consumed, Bank, Deposit, RunningInbox};

/// Stages one event keyed by the deposit's account. The first time it
/// sees a message, it has the inbox's transaction take its id (as a first
/// write would), then another transaction, begun after it, stages the same
/// key and commits first: the handler's staging then fails with 40001,
/// counted in `conflicts`. It returns that error with `?` for even amounts
/// and wrapped as retryable for odd ones.
struct Interfered {
    outbox: Outbox,
    pool: PgPool,
    seen: Mutex<HashSet<String>>,
    conflicts: Arc<AtomicU32>,
}

impl Interfered {
    fn event(account: &str, by: &str) -> Result<OutboxEvent, HandlerError> {
        Ok(OutboxEvent::json(
            "balances",
            &serde_json::json!({ "account": account, "by": by }),
        )
        .map_err(HandlerError::permanent)?
        .key(account.to_owned()))
    }
}

#[async_trait]
impl Handler for Interfered {
    async fn handle(&self, tx: &mut Tx, msg: &InboxMessage) -> Result<(), HandlerError> {
        let d: Deposit = msg.json()?;
        let first_time = self
            .seen
            .lock()
            .map_err(|_| HandlerError::permanent("poisoned"))?
            .insert(msg.event_id().to_owned());
        if first_time {
            sqlx::query("SELECT pg_current_xact_id()")
                .execute(&mut **tx)
                .await?;
            let mut other = self.pool.begin().await?;
            self.outbox
                .stage(&mut other, Self::event(&d.account, "other")?)
                .await?;
            other.commit().await?;
        }
        let staged = self
            .outbox
            .stage(tx, Self::event(&d.account, "handler")?)
            .await;
        if let Err(txbox::Error::Database(e)) = &staged {
            if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("40001") {
                self.conflicts.fetch_add(1, Ordering::SeqCst);
            }
        }
        if d.amount % 2 == 0 {
            staged?;
        } else {
            staged.map_err(HandlerError::retryable)?;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_order_conflict_in_a_handler_is_retried_without_an_attempt() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let db = TestDb::new().await;
    let topic = broker.topic("key-order", 1).await;
    let group = unique_name("key-order");
    // One account per message: the interfering transaction never waits
    // for a head the handler's batch already holds.
    let deposits = Bank::deposits(6, 6);
    kafka::produce(broker.bootstrap(), &topic, Bank::records(&deposits)).await;

    let outbox = Outbox::new(Schema::default()).key_order(KeyOrder::Commit);
    let conflicts = Arc::new(AtomicU32::new(0));
    let h = RunningInbox::start(
        Inbox::builder(db.pool().clone())
            .brokers(broker.bootstrap())
            .group_id(&group)
            .handler(
                &topic,
                Interfered {
                    outbox,
                    pool: db.pool().clone(),
                    seen: Mutex::new(HashSet::new()),
                    conflicts: conflicts.clone(),
                },
            )
            // Batches of one: a counted failure goes straight to the
            // one-attempt policy (a failing larger batch is split first,
            // and the message would pass on its second run).
            .batch_size(1)
            .retry(RetryPolicy::attempts(1).backoff(Backoff::new(
                Duration::from_millis(10),
                Duration::from_millis(50),
            ))),
    );
    assert!(
        wait_consumed(db.pool(), &group, 6, Duration::from_secs(60)).await,
        "consumed every message"
    );
    h.stop().await;
    assert_eq!(
        conflicts.load(Ordering::SeqCst),
        6,
        "each message met the conflict once"
    );
    assert_eq!(dead_letters(db.pool()).await, 0, "no attempt was used up");

    // Per account: the other transaction's event, then the handler's
    // (committed after it, on a retry).
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT convert_from(payload, 'UTF8')::jsonb->>'account',
                convert_from(payload, 'UTF8')::jsonb->>'by'
           FROM txbox.outbox ORDER BY txid, id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), 12, "{rows:?}");
    for (_, d) in &deposits {
        let by: Vec<&str> = rows
            .iter()
            .filter(|(a, _)| a == &d.account)
            .map(|(_, by)| by.as_str())
            .collect();
        assert_eq!(by, ["other", "handler"], "{}", d.account);
    }
}
