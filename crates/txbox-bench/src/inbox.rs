//! The inbox over a pre-filled topic, doing the ceiling's business work.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;
use txbox::inbox::{BatchError, BatchHandler, Inbox, InboxMessage, Tx};
use txbox::{Outbox, OutboxEvent, Schema};

use crate::ceiling::BenchDb;
use crate::Shape;

struct Settle {
    outbox: Outbox,
}

#[async_trait]
impl BatchHandler for Settle {
    async fn handle_batch(&self, tx: &mut Tx, messages: &[InboxMessage]) -> Result<(), BatchError> {
        let mut ids = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let text = m.text().map_err(|e| BatchError::at(i, e))?;
            let id: i32 = text
                .parse()
                .map_err(|_| BatchError::at(i, m.decode_error("not an account id", None)))?;
            ids.push(id);
        }
        sqlx::query("UPDATE account SET balance = balance + 1 WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut **tx)
            .await?;
        let events = ids.iter().map(|id| {
            OutboxEvent::new("out", &br#"{"kind":"PaymentSettled","amount":100}"#[..])
                .key(id.to_string())
        });
        self.outbox.stage_all(tx, events).await?;
        Ok(())
    }
}

/// What one inbox run measured.
pub(crate) struct InboxRun {
    /// The inbox, messages/s.
    pub inbox: f64,
    /// A plain consumer reading the same topic with no database work,
    /// messages/s: how fast the broker delivers it at all.
    pub consume_only: f64,
}

/// Fills a fresh topic with `n` messages, reads it once with a plain
/// consumer, then consumes it with the inbox.
pub(crate) async fn run(
    db: &BenchDb,
    bootstrap: &str,
    shape: Shape,
    n: usize,
    key_order: txbox::outbox::KeyOrder,
) -> anyhow::Result<InboxRun> {
    let broker = txbox_testkit::Broker::at(bootstrap);
    let topic = broker.topic("bench-in", shape.partitions as i32).await;
    fill(bootstrap, &topic, n, shape.partitions).await?;
    let consume_only = consume_only(bootstrap, &topic, n).await?;
    let group = txbox_testkit::unique_name("bench");

    let stop = CancellationToken::new();
    let inbox = Inbox::builder(db.pool.clone())
        .brokers(bootstrap)
        .group_id(&group)
        .batch_handler(
            &topic,
            Settle {
                outbox: Outbox::new(Schema::default()).key_order(key_order),
            },
        )
        .batch_size(shape.batch)
        .build()?;
    let s = stop.clone();
    let launched = Instant::now();
    let task = tokio::spawn(async move { inbox.run(async move { s.cancelled().await }).await });
    // Timed from the first commit, so joining the group (a rebalance of a
    // few seconds) is not counted as processing time.
    let mut first: Option<(Instant, i64)> = None;
    let started = loop {
        let consumed: i64 = sqlx::query_scalar(
            "SELECT COALESCE(sum(next_offset), 0)::bigint FROM txbox.inbox_offsets WHERE consumer_group = $1",
        )
        .bind(&group)
        .fetch_one(&db.pool)
        .await?;
        if consumed > 0 && first.is_none() {
            first = Some((Instant::now(), consumed));
        }
        if consumed as usize >= n {
            break first.unwrap_or((launched, 0));
        }
        if launched.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("inbox consumed only {consumed} of {n} in 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let elapsed = started.0.elapsed();
    stop.cancel();
    task.await??;
    Ok(InboxRun {
        inbox: (n as i64 - started.1) as f64 / elapsed.as_secs_f64(),
        consume_only,
    })
}

/// Reads all `n` messages of `topic` with a plain consumer (no group, no
/// database); returns messages/s from assignment to the last message.
async fn consume_only(bootstrap: &str, topic: &str, n: usize) -> anyhow::Result<f64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", txbox_testkit::unique_name("bench-read"))
            .set("enable.auto.commit", "false")
            .create()?;
        let meta = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        for t in meta.topics() {
            for p in t.partitions() {
                tpl.add_partition_offset(&topic, p.id(), rdkafka::Offset::Beginning)?;
            }
        }
        consumer.assign(&tpl)?;
        let started = Instant::now();
        let mut seen = 0usize;
        let deadline = Instant::now() + Duration::from_secs(300);
        while seen < n && Instant::now() < deadline {
            if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
                seen += 1;
            }
        }
        Ok(seen as f64 / started.elapsed().as_secs_f64())
    })
    .await?
}

async fn fill(bootstrap: &str, topic: &str, n: usize, partitions: usize) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .set("enable.idempotence", "true")
        .create()?;
    let mut pending = Vec::with_capacity(10_000);
    let mut rng_state: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..n {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        let account = (rng_state % 100_000 + 1).to_string();
        let id = uuid::Uuid::new_v4().to_string();
        let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: "ce_id",
            value: Some(&id),
        });
        let mut record = FutureRecord::<(), _>::to(topic)
            .payload(&account)
            .partition((i % partitions) as i32)
            .headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(f) => break pending.push(f),
                Err((_, back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
        if pending.len() == 10_000 {
            for f in pending.drain(..) {
                f.await?.map_err(|(e, _)| e)?;
            }
        }
    }
    for f in pending {
        f.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}
