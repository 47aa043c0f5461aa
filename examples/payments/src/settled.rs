//! `--read-settled N`: what a downstream service sees of `payments.settled`.
//!
//! Reads the topic from its beginning as a `read_committed` consumer (the
//! isolation level a consumer of transactional output uses), until `N`
//! events or a quiet timeout, and counts them by `ce_id`: with the relay in
//! exactly-once mode every settled payment appears once and nothing from an
//! aborted Kafka transaction appears at all.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// What the reader saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Records read.
    pub records: usize,
    /// Distinct event ids (`ce_id`).
    pub distinct: usize,
    /// Records whose `ce_id` was seen before.
    pub duplicates: usize,
}

/// Reads `topic` from the beginning, read_committed, until `want`
/// distinct events were seen or nothing arrived for `quiet`.
pub fn read(brokers: &str, topic: &str, want: usize, quiet: Duration) -> anyhow::Result<Seen> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "payments-settled-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .context("creating the read_committed consumer")?;
    let meta = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("reading metadata of {topic}"))?;
    let mut tpl = TopicPartitionList::new();
    for p in meta.topics().iter().flat_map(|t| t.partitions()) {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;

    let mut ids: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut seen = Seen::default();
    let mut last = Instant::now();
    while ids.len() < want && last.elapsed() < quiet {
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg.context("reading payments.settled")?;
        last = Instant::now();
        let id = msg
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "ce_id"))
            .and_then(|h| h.value)
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        seen.records += 1;
        if seen.records <= 3 {
            println!(
                "  {}[{}]@{}: {}",
                msg.topic(),
                msg.partition(),
                msg.offset(),
                String::from_utf8_lossy(msg.payload().unwrap_or_default())
            );
        }
        *ids.entry(id).or_default() += 1;
    }
    seen.distinct = ids.len();
    seen.duplicates = seen.records - seen.distinct;
    Ok(seen)
}
