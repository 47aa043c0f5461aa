//! Producing test input and reading back what a consumer sees.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;

/// A record to produce.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// Partition; `None` lets the partitioner choose by key.
    pub partition: Option<i32>,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Payload; `None` for a tombstone.
    pub payload: Option<Vec<u8>>,
    /// Headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Record {
    /// A record with this payload.
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        Record {
            payload: Some(payload.into()),
            ..Record::default()
        }
    }
    /// To this partition.
    pub fn partition(mut self, p: i32) -> Self {
        self.partition = Some(p);
        self
    }
    /// With this key.
    pub fn key(mut self, k: impl Into<Vec<u8>>) -> Self {
        self.key = Some(k.into());
        self
    }
    /// With this header.
    pub fn header(mut self, k: &str, v: impl Into<Vec<u8>>) -> Self {
        self.headers.push((k.to_owned(), v.into()));
        self
    }
}

/// Produces `records` in order with an idempotent producer and waits for
/// every acknowledgement. Returns (partition, offset) of each.
///
/// Records are batched as a service's producer batches them (a few
/// milliseconds of linger), so consumers that resume mid-way (after a
/// crash, a rebalance or a backpressure pause) start fetches inside
/// multi-record batches, as they do in production.
///
/// # Panics
/// If any record is not acknowledged.
pub async fn produce(bootstrap: &str, topic: &str, records: Vec<Record>) -> Vec<(i32, i64)> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let mut futures = Vec::with_capacity(records.len());
    for r in &records {
        futures.push(send(&producer, topic, r).await);
    }
    let mut out = Vec::with_capacity(futures.len());
    for f in futures {
        let delivery = f
            .await
            .expect("delivery future")
            .expect("record acknowledged");
        out.push((delivery.partition, delivery.offset));
    }
    out
}

/// Produces `transactions` with a transactional producer (a fresh
/// `transactional.id`), in order, each committed (`true`) or aborted.
/// Needs a broker with Kafka transactions (Apache Kafka).
///
/// # Panics
/// If the broker refuses any step.
pub async fn produce_transactions(
    bootstrap: &str,
    topic: &str,
    transactions: Vec<(Vec<Record>, bool)>,
) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("transactional.id", crate::unique_name("txbox-test"))
        .create()
        .expect("transactional producer");
    let timeout = Duration::from_secs(30);
    tokio::task::block_in_place(|| producer.init_transactions(timeout)).expect("init_transactions");
    for (records, commit) in transactions {
        producer.begin_transaction().expect("begin_transaction");
        for r in &records {
            // Delivery is settled by the flush and the commit or abort below.
            drop(send(&producer, topic, r).await);
        }
        tokio::task::block_in_place(|| {
            // Written before an abort too: librdkafka's abort purges records
            // still queued in the client, which would leave nothing to abort.
            producer.flush(timeout)?;
            if commit {
                producer.commit_transaction(timeout)
            } else {
                producer.abort_transaction(timeout)
            }
        })
        .expect("flush, then commit or abort");
    }
}

/// Queues `r` on `producer`, waiting while its queue is full.
async fn send(producer: &FutureProducer, topic: &str, r: &Record) -> DeliveryFuture {
    let mut headers = OwnedHeaders::new();
    for (k, v) in &r.headers {
        headers = headers.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
    if let Some(p) = r.partition {
        rec = rec.partition(p);
    }
    if let Some(k) = &r.key {
        rec = rec.key(k.as_slice());
    }
    if let Some(p) = &r.payload {
        rec = rec.payload(p.as_slice());
    }
    loop {
        match producer.send_result(rec) {
            Ok(f) => return f,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                rec = back;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => panic!("cannot produce to {topic}: {e}"),
        }
    }
}

/// Options for [`consume_all`].
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    /// `isolation.level=read_committed` (hides aborted and open
    /// transactions on brokers that implement it).
    pub read_committed: bool,
    /// Stop once this many records were read (or at `timeout`).
    pub expect: usize,
    /// Upper bound on waiting.
    pub timeout: Duration,
}

/// A record as a consumer saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Payload.
    pub payload: Option<Vec<u8>>,
    /// Headers.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Consumed {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }
}

/// Reads every partition of `topic` from the beginning (no group, no
/// commits) until `expect` records arrived and then 500 ms pass quietly
/// (to catch extras), or `timeout` passes. Records come in per-partition
/// offset order.
pub async fn consume_all(bootstrap: &str, topic: &str, opts: ConsumeOptions) -> Vec<Consumed> {
    let bootstrap = bootstrap.to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || consume_blocking(&bootstrap, &topic, &opts))
        .await
        .expect("consumer thread")
}

fn consume_blocking(bootstrap: &str, topic: &str, opts: &ConsumeOptions) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", crate::unique_name("txbox-testkit-reader"))
        .set("enable.auto.commit", "false")
        .set(
            "isolation.level",
            if opts.read_committed {
                "read_committed"
            } else {
                "read_uncommitted"
            },
        )
        .create()
        .expect("consumer");
    let meta = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for t in meta.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .expect("partition offset");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let deadline = Instant::now() + opts.timeout;
    let mut out = Vec::new();
    let mut quiet_since: Option<Instant> = None;
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                quiet_since = None;
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Consumed {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    headers,
                });
            }
            Some(Err(_)) => {}
            None => {
                if out.len() >= opts.expect {
                    let since = *quiet_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= Duration::from_millis(500) {
                        break;
                    }
                }
            }
        }
    }
    out
}
