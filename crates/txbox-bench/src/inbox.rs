//! The inbox over a pre-filled topic, doing the ceiling's business work.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;
use txbox::inbox::{BatchError, BatchHandler, Dedupe, Inbox, InboxMessage, Tx};
use txbox::{Outbox, OutboxEvent, Schema};

use crate::ceiling::BenchDb;
use crate::pg_io::checkpoint;
use crate::usage::{during, Usage};
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
        settle(tx, &self.outbox, &ids).await?;
        Ok(())
    }
}

/// The business work per batch, the same for the inbox, the hand-written
/// baseline and the ceilings: one `account` update per message (set-based)
/// and one outbox event per message, staged in one round trip.
pub(crate) async fn settle(
    tx: &mut Tx,
    outbox: &Outbox,
    accounts: &[i32],
) -> Result<(), txbox::Error> {
    sqlx::query("UPDATE account SET balance = balance + 1 WHERE id = ANY($1)")
        .bind(accounts)
        .execute(&mut **tx)
        .await?;
    let events = accounts.iter().map(|id| {
        OutboxEvent::new("out", &br#"{"kind":"PaymentSettled","amount":100}"#[..])
            .key(id.to_string())
    });
    outbox.stage_all(tx, events).await?;
    Ok(())
}

/// What one inbox run measured.
pub(crate) struct InboxRun {
    /// The inbox, messages/s.
    pub inbox: f64,
    /// The hand-written consumer ([`crate::baseline`]) on the same topic,
    /// messages/s.
    pub hand_written: f64,
    /// A plain consumer reading the same topic with no database work,
    /// messages/s: how fast the broker delivers it at all.
    pub consume_only: f64,
    /// Where the CPU went during the inbox's run (joining the group and
    /// stopping included).
    pub inbox_cpu: Usage,
    /// The same for the hand-written consumer's run.
    pub hand_cpu: Usage,
}

/// A pre-filled topic.
pub(crate) struct Filled {
    pub topic: String,
    pub messages: usize,
}

/// The event ids the benchmark's messages carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Ids {
    /// No `ce_id`: each message's event id is its position.
    None,
    /// Random UUIDs (v4): each dedupe insert lands anywhere in the index.
    Random,
    /// Time-ordered UUIDs (v7), as txbox's outbox gives its events: the
    /// inserts land at the index's right edge.
    TimeOrdered,
}

/// Fills a fresh topic of `partitions` partitions with `n` messages, each
/// an account id out of 100,000, round-robin over the partitions, with
/// `ids` as their `ce_id`.
pub(crate) async fn filled(
    bootstrap: &str,
    partitions: usize,
    n: usize,
    ids: Ids,
) -> anyhow::Result<Filled> {
    let broker = txbox_testkit::Broker::at(bootstrap);
    let topic = broker.topic("bench-in", partitions as i32).await;
    fill(bootstrap, &topic, n, partitions, ids).await?;
    Ok(Filled { topic, messages: n })
}

/// Which of the two consumers a round runs first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum First {
    HandWritten,
    Inbox,
}

impl First {
    /// The order of round `round` (from 0): hand-written first, inbox
    /// first, inbox first, hand-written first, and again (ABBA). The one
    /// that runs second meets the tables the first one grew and dirtied,
    /// and the autovacuum it set off; over four rounds each consumer takes
    /// each place twice.
    pub(crate) fn in_round(round: usize) -> Self {
        if matches!(round % 4, 0 | 3) {
            First::HandWritten
        } else {
            First::Inbox
        }
    }

    /// For the round's label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            First::HandWritten => "hand-written first",
            First::Inbox => "inbox first",
        }
    }
}

/// Fills a fresh topic with `n` messages, reads it once with a plain
/// consumer, then consumes it with the hand-written consumer and with the
/// inbox, in the order `first` says. Each of the two starts right after a
/// checkpoint (outside its CPU measure), so neither meets one the other
/// (or the ceilings before them) set off, and both pay the same full-page
/// images.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    db: &BenchDb,
    bootstrap: &str,
    shape: Shape,
    n: usize,
    key_order: txbox::outbox::KeyOrder,
    instances: usize,
    tuning: &Tuning,
    first: First,
) -> anyhow::Result<InboxRun> {
    let input = filled(bootstrap, shape.partitions, n, Ids::Random).await?;
    let consume_only = consume_only(bootstrap, &input.topic, n).await?;
    let hand_written = || async {
        checkpoint(&db.pool).await?;
        during(crate::baseline::run(
            &db.pool,
            bootstrap,
            &input.topic,
            shape.partitions,
            shape.batch,
            n,
        ))
        .await
    };
    let txbox = || async {
        checkpoint(&db.pool).await?;
        let c = Consumers {
            batch: shape.batch,
            key_order,
            dedupe: Dedupe::EventIds,
            group: None,
            instances,
            kafka: &tuning.kafka,
            max_buffered: tuning.max_buffered,
        };
        during(inbox(db, bootstrap, &input, c)).await
    };
    let ((hand_written, hand_cpu), (inbox, inbox_cpu)) = match first {
        First::HandWritten => {
            let h = hand_written().await?;
            (h, txbox().await?)
        }
        First::Inbox => {
            let i = txbox().await?;
            (hand_written().await?, i)
        }
    };
    Ok(InboxRun {
        inbox,
        hand_written,
        consume_only,
        inbox_cpu,
        hand_cpu,
    })
}

/// The inbox's settings a run may change from their defaults.
#[derive(Debug, Default)]
pub(crate) struct Tuning {
    /// librdkafka properties for the inboxes' consumers.
    pub kafka: Vec<(String, String)>,
    /// `InboxBuilder::max_buffered`.
    pub max_buffered: Option<usize>,
}

/// How the inbox consumes in one run.
pub(crate) struct Consumers<'a> {
    pub batch: usize,
    pub key_order: txbox::outbox::KeyOrder,
    pub dedupe: Dedupe,
    /// The group (default: a new one).
    pub group: Option<&'a str>,
    /// Inboxes in the group, each its own Kafka consumer and pool (in this
    /// process: they share its cores).
    pub instances: usize,
    /// librdkafka properties for the inboxes' consumers.
    pub kafka: &'a [(String, String)],
    /// `InboxBuilder::max_buffered` (default: the inbox's).
    pub max_buffered: Option<usize>,
}

/// Consumes `input` with txbox inboxes; returns messages/s from the first
/// commit to the last.
pub(crate) async fn inbox(
    db: &BenchDb,
    bootstrap: &str,
    input: &Filled,
    c: Consumers<'_>,
) -> anyhow::Result<f64> {
    let n = input.messages;
    let group = c
        .group
        .map_or_else(|| txbox_testkit::unique_name("bench"), str::to_owned);
    let stop = CancellationToken::new();
    let launched = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..c.instances.max(1) {
        let pool = if c.instances > 1 {
            db.pool_like().await?
        } else {
            db.pool.clone()
        };
        let inbox = Inbox::builder(pool)
            .brokers(bootstrap)
            .group_id(&group)
            .batch_handler(
                &input.topic,
                Settle {
                    outbox: Outbox::new(Schema::default()).key_order(c.key_order),
                },
            )
            .batch_size(c.batch)
            .dedupe(c.dedupe);
        let inbox = match c.max_buffered {
            Some(n) => inbox.max_buffered(n),
            None => inbox,
        };
        let inbox = c
            .kafka
            .iter()
            .fold(inbox, |b, (k, v)| b.kafka_option(k, v))
            .build()?;
        let s = stop.clone();
        tasks.spawn(async move { inbox.run(async move { s.cancelled().await }).await });
    }
    // Timed from the first commit, so joining the group (a rebalance of a
    // few seconds) is not counted as processing time.
    let mut first: Option<(Instant, i64)> = None;
    let started = loop {
        let consumed: i64 = sqlx::query_scalar(
            "SELECT COALESCE(sum(next_offset), 0)::bigint FROM txbox.inbox_offsets
             WHERE consumer_group = $1 AND topic = $2",
        )
        .bind(&group)
        .bind(&input.topic)
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
        if let Some(done) = tasks.try_join_next() {
            done??;
            anyhow::bail!("an inbox stopped at {consumed} of {n}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let elapsed = started.0.elapsed();
    stop.cancel();
    let closing = Instant::now();
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    tracing::debug!(ms = closing.elapsed().as_millis(), "inbox stopped");
    Ok((n as i64 - started.1) as f64 / elapsed.as_secs_f64())
}

/// Reads all `n` messages of `topic` with a plain consumer (no group, no
/// database); returns messages/s from assignment to the last message.
pub(crate) async fn consume_only(bootstrap: &str, topic: &str, n: usize) -> anyhow::Result<f64> {
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

async fn fill(
    bootstrap: &str,
    topic: &str,
    n: usize,
    partitions: usize,
    ids: Ids,
) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .set("enable.idempotence", "true")
        .create()?;
    let mut pending = Pending::new();
    let mut rng_state: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..n {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        let account = (rng_state % 100_000 + 1).to_string();
        let id = match ids {
            Ids::TimeOrdered => uuid::Uuid::now_v7().to_string(),
            _ => uuid::Uuid::new_v4().to_string(),
        };
        let mut record = FutureRecord::<(), _>::to(topic)
            .payload(&account)
            .partition((i % partitions) as i32);
        if ids != Ids::None {
            record = record.headers(rdkafka::message::OwnedHeaders::new().insert(
                rdkafka::message::Header {
                    key: "ce_id",
                    value: Some(&id),
                },
            ));
        }
        pending.send(&producer, record).await?;
    }
    pending.settle().await
}

/// Records sent and not yet acknowledged, awaited 10,000 at a time.
pub(crate) struct Pending(Vec<DeliveryFuture>);

impl Pending {
    pub(crate) fn new() -> Self {
        Pending(Vec::with_capacity(10_000))
    }

    /// Queues `record`, waiting while librdkafka's queue is full; awaits
    /// every pending acknowledgement once 10,000 are pending.
    pub(crate) async fn send<K, P>(
        &mut self,
        producer: &FutureProducer,
        mut record: FutureRecord<'_, K, P>,
    ) -> anyhow::Result<()>
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
    {
        loop {
            match producer.send_result(record) {
                Ok(f) => break self.0.push(f),
                Err((_, back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
        if self.0.len() == 10_000 {
            self.settle_some().await?;
        }
        Ok(())
    }

    async fn settle_some(&mut self) -> anyhow::Result<()> {
        for f in self.0.drain(..) {
            f.await?.map_err(|(e, _)| e)?;
        }
        Ok(())
    }

    /// Awaits every pending acknowledgement; fails on the first refusal.
    pub(crate) async fn settle(mut self) -> anyhow::Result<()> {
        self.settle_some().await
    }
}
