//! The consumer a team writes by hand from the common advice, as the
//! inbox's same-run baseline: an rdkafka consumer in a group, one task per
//! partition (its own queue, `split_partition_queue`), batches of up to
//! `batch` messages already fetched, each in one PostgreSQL transaction
//! that inserts the event ids into `processed_events` with `ON CONFLICT DO
//! NOTHING` and does the same business work as the inbox's handler for the
//! new ones; after the commit, the next offset is committed to Kafka
//! (asynchronously, as the advice goes: a lost commit only means
//! redeliveries, which the ids drop).
//!
//! What it does not do, and the inbox does: fence a consumer that lost its
//! partition (a zombie's transaction commits next to its successor's, which
//! only the ids keep apart), keep the position with the effects (a message
//! without an id is applied again after every crash between the two
//! commits), retry, dead-letter, or pause under backpressure.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Headers as _, Message};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use txbox::Outbox;

use crate::inbox::settle;

/// The baseline's dedupe table, as the advice writes it.
pub(crate) const TABLE: &str = "CREATE TABLE IF NOT EXISTS processed_events (
    event_id     text PRIMARY KEY,
    processed_at timestamptz NOT NULL DEFAULT now()
)";

/// Consumes `n` messages of `topic` (`partitions` partitions) with the
/// hand-written consumer; returns messages/s from its first commit to the
/// last message.
pub(crate) async fn run(
    pool: &PgPool,
    bootstrap: &str,
    topic: &str,
    partitions: usize,
    batch: usize,
    n: usize,
) -> anyhow::Result<f64> {
    sqlx::query(TABLE).execute(pool).await?;
    let consumer: Arc<StreamConsumer> = Arc::new(
        ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", txbox_testkit::unique_name("hand-written"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()?,
    );
    let done = Arc::new(AtomicU64::new(0));
    let first_commit: Arc<std::sync::OnceLock<(Instant, u64)>> = Arc::default();
    let mut tasks = Vec::new();
    for p in 0..partitions as i32 {
        let Some(queue) = consumer.split_partition_queue(topic, p) else {
            anyhow::bail!("cannot split partition {p}'s queue");
        };
        let (consumer, pool, done, first) = (
            consumer.clone(),
            pool.clone(),
            done.clone(),
            first_commit.clone(),
        );
        let topic = topic.to_owned();
        tasks.push(tokio::spawn(async move {
            let outbox = Outbox::new(txbox::Schema::default());
            loop {
                let mut ids: Vec<String> = Vec::with_capacity(batch);
                let mut accounts: Vec<i32> = Vec::with_capacity(batch);
                let mut last = 0;
                let take = |m: &rdkafka::message::BorrowedMessage<'_>,
                            ids: &mut Vec<String>,
                            accounts: &mut Vec<i32>|
                 -> anyhow::Result<i64> {
                    let id = m
                        .headers()
                        .and_then(|h| h.iter().find(|h| h.key == "ce_id"))
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_else(|| {
                            format!("{}/{}/{}", m.topic(), m.partition(), m.offset())
                        });
                    let account = std::str::from_utf8(m.payload().unwrap_or_default())?.parse()?;
                    ids.push(id);
                    accounts.push(account);
                    Ok(m.offset())
                };
                {
                    let m = queue.recv().await?;
                    last = take(&m, &mut ids, &mut accounts)?.max(last);
                }
                while ids.len() < batch {
                    match queue.recv().now_or_never() {
                        Some(m) => last = take(&m?, &mut ids, &mut accounts)?.max(last),
                        None => break,
                    }
                }
                let mut tx = pool.begin().await?;
                let fresh: HashSet<String> = sqlx::query_scalar(
                    "INSERT INTO processed_events (event_id) SELECT unnest($1::text[])
                     ON CONFLICT DO NOTHING RETURNING event_id",
                )
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
                let new: Vec<i32> = ids
                    .iter()
                    .zip(&accounts)
                    .filter(|(id, _)| fresh.contains(*id))
                    .map(|(_, a)| *a)
                    .collect();
                if !new.is_empty() {
                    settle(&mut tx, &outbox, &new).await?;
                }
                tx.commit().await?;
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&topic, p, Offset::Offset(last + 1))?;
                consumer.commit(&tpl, CommitMode::Async)?;
                let total = done.fetch_add(ids.len() as u64, Ordering::Relaxed) + ids.len() as u64;
                let _ = first.set((Instant::now(), total));
                if total >= n as u64 {
                    return anyhow::Ok(());
                }
            }
        }));
    }
    consumer.subscribe(&[topic])?;
    // The main queue serves the group's events (rebalances, commits'
    // results); every message goes to a partition's queue.
    let main = {
        let consumer = consumer.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = consumer.recv().await {
                    tracing::warn!(error = %e, "hand-written consumer");
                }
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    let outcome = loop {
        if done.load(Ordering::Relaxed) as usize >= n {
            break Ok(());
        }
        // A task ends early only on an error.
        if let Some(i) = tasks.iter().position(|t| t.is_finished()) {
            match tasks.swap_remove(i).await {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => break Err(e),
                Err(e) => break Err(e.into()),
            }
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!(
                "the hand-written consumer applied only {} of {n} in 10 minutes",
                done.load(Ordering::Relaxed)
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let finished = Instant::now();
    close(consumer, tasks, main).await?;
    outcome?;
    let applied = done.load(Ordering::Relaxed);
    let (start, before) = first_commit
        .get()
        .copied()
        .ok_or_else(|| anyhow::anyhow!("the hand-written consumer never committed"))?;
    Ok((applied - before) as f64 / finished.duration_since(start).as_secs_f64())
}

/// Stops the partition tasks, leaves the group and closes the consumer,
/// all before the next run starts. Dropping the last handle of a consumer
/// closes it, and blocks the thread until it has left its group: dropped
/// in an aborted task, it held one of the runtime's threads while the next
/// run was measured (49 s with the group still subscribed). Unsubscribed
/// first, with the main queue still served to take the revocation, it
/// took 0.7 s after 20,000 messages and 15 to 17 s after 400,000; on a
/// blocking thread, and awaited, it costs the benchmark time, not the
/// next run's figures.
async fn close(
    consumer: Arc<StreamConsumer>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    main: tokio::task::JoinHandle<()>,
) -> anyhow::Result<()> {
    for t in tasks {
        t.abort();
        let _ = t.await;
    }
    consumer.unsubscribe();
    tokio::time::sleep(Duration::from_millis(200)).await;
    main.abort();
    let _ = main.await;
    let closing = Instant::now();
    tokio::task::spawn_blocking(move || drop(consumer)).await?;
    tracing::debug!(
        ms = closing.elapsed().as_millis(),
        "hand-written consumer closed"
    );
    Ok(())
}
