//! The position topic: where exactly-once mode keeps each stream's
//! position, inside the same Kafka transaction as the rows.
//!
//! One record per batch, key `{installation}/{schema}/{stream}`, value
//! `{"transactional_id":..,"history":..,"schema":..,"stream":..,"txid":..,"id":..}`.
//! The topic is compacted, so it keeps about one record per stream of each
//! installation. Recovery reads it with a `read_committed` consumer from
//! the beginning to the end and takes the highest position under the
//! stream's key, of its transactional id and of the database's current
//! history (positions only grow within a history, so that is the last one
//! committed; a position of another history orders nothing here).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;
use serde::{Deserialize, Serialize};

use super::PublisherSettings;
use crate::cursor::Position;

/// The value of a position record.
///
/// `transactional_id` tells apart two relays whose schema and stream ids
/// coincide on one position topic (two services, both with schema
/// `txbox`); `history` the database history the position was recorded in.
/// Recovery ignores records of another `transactional_id` or history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PositionRecord {
    #[serde(default)]
    pub(crate) transactional_id: String,
    #[serde(default)]
    pub(crate) history: String,
    pub(crate) schema: String,
    pub(crate) stream: i32,
    pub(crate) txid: u64,
    pub(crate) id: i64,
}

impl PositionRecord {
    pub(crate) fn new(settings: &PublisherSettings, position: Position) -> Self {
        PositionRecord {
            transactional_id: settings.transactional_id.clone(),
            history: settings.history.clone(),
            schema: settings.schema.clone(),
            stream: settings.stream,
            txid: position.txid,
            id: position.id,
        }
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

const META_TIMEOUT: Duration = Duration::from_secs(10);

/// The recovery consumers' context. rdkafka hands every error event to
/// the context's `error` before `poll` returns it, the end of a partition
/// (`enable.partition.eof`, how the read knows it is done) included, and
/// the default context logs them all as errors; the end of a partition is
/// no failure, so it is logged at debug. Other errors go to the default
/// context, as for every other client.
struct RecoveryContext;

impl ClientContext for RecoveryContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error, KafkaError::Global(RDKafkaErrorCode::PartitionEOF)) {
            tracing::debug!(reason, "position topic read to the end");
        } else {
            DefaultClientContext.error(error, reason);
        }
    }
}

impl ConsumerContext for RecoveryContext {}

type RecoveryConsumer = BaseConsumer<RecoveryContext>;

fn consumer(
    settings: &PublisherSettings,
    isolation: &str,
    eof: bool,
) -> Result<RecoveryConsumer, KafkaError> {
    settings
        .client_config()
        .set(
            "group.id",
            format!(
                "txbox-relay-recovery-{}-{}",
                settings.schema, settings.stream
            ),
        )
        .set("enable.auto.commit", "false")
        .set("allow.auto.create.topics", "false")
        .set("isolation.level", isolation)
        .set("enable.partition.eof", if eof { "true" } else { "false" })
        .create_with_context(RecoveryContext)
}

/// The topic's partition ids, or `None` when it does not exist.
fn partitions(c: &RecoveryConsumer, topic: &str) -> Result<Option<Vec<i32>>, KafkaError> {
    let meta = c.fetch_metadata(Some(topic), META_TIMEOUT)?;
    Ok(meta
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .and_then(|t| {
            let ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
            (t.error().is_none() && !ids.is_empty()).then_some(ids)
        }))
}

/// Creates the position topic (one partition, `cleanup.policy=compact`)
/// unless it exists. "Already exists" from a concurrent creator is fine.
pub(crate) async fn ensure_topic(settings: &PublisherSettings) -> Result<(), String> {
    let topic = settings.position_topic.clone();
    let s = settings.clone();
    let exists = super::blocking(move || {
        let c = consumer(&s, "read_uncommitted", false)?;
        Ok(partitions(&c, &s.position_topic)?.is_some())
    })
    .await
    .map_err(|e| format!("metadata for position topic {topic:?}: {e}"))?;
    if exists {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = settings
        .client_config()
        .create()
        .map_err(|e| format!("admin client: {e}"))?;
    let opts = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(10)));
    let mut last_error = String::new();
    // Broker default replication first (KIP-464), then 1 for brokers that
    // want a number (single-node test brokers).
    for replication in [-1, 1] {
        let new = NewTopic::new(&topic, 1, TopicReplication::Fixed(replication))
            .set("cleanup.policy", "compact");
        match admin.create_topics([&new], &opts).await {
            Ok(results) => match results.into_iter().next() {
                Some(Ok(_)) | Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) | None => {
                    tracing::info!(topic = %topic, "created position topic");
                    return Ok(());
                }
                Some(Err((_, code))) => last_error = code.to_string(),
            },
            Err(e) => last_error = e.to_string(),
        }
    }
    Err(format!(
        "position topic {topic:?} does not exist and could not be created: {last_error}"
    ))
}

/// Reads the position topic to its end as a `read_committed` consumer and
/// returns the highest position recorded under this stream's key.
///
/// "The end" is the high watermark when recovery starts (after
/// `init_transactions`, so this stream's own last transaction is decided).
/// Another stream's open transaction on the same partition holds the last
/// stable offset below it; recovery waits for that transaction to end
/// (bounded by its `transaction.timeout.ms`), up to `timeout`.
pub(crate) async fn read_latest(
    settings: &PublisherSettings,
    timeout: Duration,
) -> Result<Option<Position>, String> {
    let s = settings.clone();
    tokio::task::spawn_blocking(move || read_latest_blocking(&s, Instant::now() + timeout))
        .await
        .map_err(|e| format!("position reader thread: {e}"))?
}

fn read_latest_blocking(
    settings: &PublisherSettings,
    deadline: Instant,
) -> Result<Option<Position>, String> {
    let topic = settings.position_topic.as_str();
    let key = settings.position_key();
    let k = |e: KafkaError| format!("reading position topic {topic:?}: {e}");
    let uncommitted = consumer(settings, "read_uncommitted", false).map_err(k)?;
    let committed = consumer(settings, "read_committed", true).map_err(k)?;
    let Some(ids) = partitions(&committed, topic).map_err(k)? else {
        return Err(format!("position topic {topic:?} does not exist"));
    };
    let mut tpl = TopicPartitionList::new();
    let mut pending = BTreeSet::new();
    for p in ids {
        let (low, high) = uncommitted
            .fetch_watermarks(topic, p, META_TIMEOUT)
            .map_err(k)?;
        if high <= low {
            continue;
        }
        // A read_committed client's ListOffsets returns the last stable
        // offset: wait until every transaction before `high` is decided.
        loop {
            let (_, stable) = committed
                .fetch_watermarks(topic, p, META_TIMEOUT)
                .map_err(k)?;
            if stable >= high {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "position topic {topic:?} partition {p}: an open transaction holds the last stable offset at {stable} \
                     below the end {high}; retrying"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .map_err(k)?;
        pending.insert(p);
    }
    if pending.is_empty() {
        return Ok(None);
    }
    committed.assign(&tpl).map_err(k)?;
    let mut best: Option<Position> = None;
    while !pending.is_empty() {
        if Instant::now() > deadline {
            return Err(format!(
                "position topic {topic:?}: partitions {pending:?} not read to the end in time; retrying"
            ));
        }
        match committed.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                pending.remove(&p);
            }
            Some(Err(e)) => return Err(k(e)),
            Some(Ok(m)) => {
                if m.key() != Some(key.as_bytes()) {
                    continue;
                }
                let Some(value) = m.payload() else { continue };
                let rec: PositionRecord = serde_json::from_slice(value).map_err(|e| {
                    format!(
                        "position topic {topic:?} partition {} offset {}: record for {key} is not a position ({e})",
                        m.partition(),
                        m.offset()
                    )
                })?;
                if rec.transactional_id != settings.transactional_id
                    || rec.history != settings.history
                {
                    continue;
                }
                let pos = Position {
                    txid: rec.txid,
                    id: rec.id,
                };
                best = best.max(Some(pos));
            }
        }
    }
    Ok(best)
}
