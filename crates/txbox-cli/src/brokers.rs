//! Reading a topic's log from the brokers: bounds, offsets by time and the
//! timestamp of one message. Blocking librdkafka calls, each bounded by
//! [`TIMEOUT`]; call them from `spawn_blocking`.

use std::time::Duration;

use anyhow::Context as _;
use txbox::rdkafka::config::ClientConfig;
use txbox::rdkafka::consumer::{BaseConsumer, Consumer};
use txbox::rdkafka::message::Message;
use txbox::rdkafka::{Offset, TopicPartitionList};

/// How long one broker request may take.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(10);

/// A client of the brokers, for reads only (no group, no commits).
pub(crate) struct Log {
    consumer: BaseConsumer,
    brokers: String,
}

impl Log {
    /// Connects to `brokers` with extra librdkafka `options`.
    pub(crate) fn connect(brokers: &str, options: &[(String, String)]) -> anyhow::Result<Log> {
        let mut config = ClientConfig::new();
        // A group id only so librdkafka allows assign(): the client never
        // joins the group nor commits.
        config
            .set("group.id", "txbox-cli-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true");
        for (k, v) in options {
            config.set(k, v);
        }
        config.set("bootstrap.servers", brokers);
        Ok(Log {
            consumer: config.create().context("Kafka client")?,
            brokers: brokers.to_owned(),
        })
    }

    /// The partition's log start and end (the high watermark).
    pub(crate) fn bounds(&self, topic: &str, partition: i32) -> anyhow::Result<(i64, i64)> {
        self.consumer
            .fetch_watermarks(topic, partition, TIMEOUT)
            .with_context(|| {
                format!(
                    "cannot read the bounds of {topic} partition {partition} from {}",
                    self.brokers
                )
            })
    }

    /// The offset of the first message of each partition whose timestamp is
    /// at or after `millis` (ms since the epoch); the log end when every
    /// message is older.
    pub(crate) fn offsets_for_time(
        &self,
        topic: &str,
        partitions: &[i32],
        millis: i64,
    ) -> anyhow::Result<Vec<(i32, i64)>> {
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            tpl.add_partition_offset(topic, p, Offset::Offset(millis))
                .with_context(|| format!("{topic} partition {p}"))?;
        }
        let found = self
            .consumer
            .offsets_for_times(tpl, TIMEOUT)
            .with_context(|| {
                format!(
                    "cannot look up offsets by time on {topic} from {}",
                    self.brokers
                )
            })?;
        partitions
            .iter()
            .map(|&p| {
                let elem = found
                    .find_partition(topic, p)
                    .with_context(|| format!("no answer for {topic} partition {p}"))?;
                elem.error()
                    .with_context(|| format!("{topic} partition {p}"))?;
                match elem.offset() {
                    Offset::Offset(o) if o >= 0 => Ok((p, o)),
                    // No message at or after the time: the log end.
                    _ => Ok((p, self.bounds(topic, p)?.1)),
                }
            })
            .collect()
    }

    /// The timestamp (ms since the epoch) of the first message at or after
    /// `offset`, if one arrives within `wait` and carries a timestamp.
    pub(crate) fn timestamp_at(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        wait: Duration,
    ) -> anyhow::Result<Option<i64>> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
            .with_context(|| format!("{topic} partition {partition}"))?;
        self.consumer.assign(&tpl).context("assign")?;
        // One poll: a message, or the end of the partition (or an error):
        // then no timestamp.
        let found = match self.consumer.poll(wait) {
            Some(Ok(m)) => m.timestamp().to_millis(),
            Some(Err(_)) | None => None,
        };
        self.consumer.unassign().context("unassign")?;
        Ok(found)
    }
}
