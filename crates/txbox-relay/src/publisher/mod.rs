//! Getting a batch of outbox rows into Kafka, in one of two ways.
//!
//! - [`Transactional`] (exactly-once mode): one Kafka transaction per batch
//!   holding the rows *and* one record of the stream's new position on the
//!   position topic (the KIP-618 idea: the read position commits atomically
//!   with what was read). After a crash, the position is recovered from that
//!   topic with a `read_committed` consumer.
//! - [`AtLeastOnce`]: an idempotent producer; the batch counts as published
//!   when every record is acknowledged, and the stream then writes the
//!   position to PostgreSQL. A crash in between re-publishes that batch.
//!
//! Both send rows in `(txid, id)` order with `partitioner=murmur2_random`
//! (the Java client's key hashing), so one key's rows land in one partition
//! in order, and both report a failure as a [`PublishError`] telling the
//! stream what to do next.

mod at_least_once;
mod classify;
mod position_topic;
mod transactional;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;

pub(crate) use at_least_once::AtLeastOnce;
pub(crate) use classify::{abort_reason, classify, describe, is_timeout, Class};
pub(crate) use transactional::Transactional;

use crate::config::{Mode, RelayConfig};
use crate::cursor::{OutboxRow, Position};
use crate::history::History;

/// What a publisher needs to know about its stream.
#[derive(Clone, Debug)]
pub(crate) struct PublisherSettings {
    pub(crate) brokers: String,
    pub(crate) schema: String,
    pub(crate) stream: i32,
    pub(crate) transactional_id: String,
    /// This installation's id (see [`History`]): part of the transactional
    /// id and of the position key, so that relays of two installations
    /// sharing a Kafka cluster neither fence each other nor read each
    /// other's positions.
    pub(crate) installation: uuid::Uuid,
    /// The anchor positions are recorded with (see [`History`]); recovery
    /// ignores position records of another.
    pub(crate) history: String,
    pub(crate) position_topic: String,
    pub(crate) kafka: BTreeMap<String, String>,
}

impl PublisherSettings {
    pub(crate) fn new(
        config: &RelayConfig,
        stream: i32,
        history: &History,
        anchor: String,
    ) -> Self {
        PublisherSettings {
            brokers: config.brokers.clone(),
            schema: config.schema.clone(),
            stream,
            transactional_id: format!(
                "{}-{}-{}-{}",
                config.transactional_id_prefix,
                history.installation.simple(),
                config.schema,
                stream
            ),
            installation: history.installation,
            history: anchor,
            position_topic: config.position_topic.clone(),
            kafka: config.kafka.clone(),
        }
    }

    /// The key of this stream's records on the position topic.
    pub(crate) fn position_key(&self) -> String {
        format!(
            "{}/{}/{}",
            self.installation.simple(),
            self.schema,
            self.stream
        )
    }

    /// Settings every client of the relay shares: brokers, then the user's
    /// pass-through options.
    pub(crate) fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.kafka {
            c.set(k, v);
        }
        c
    }

    /// The producer's settings for `mode`. Defaults the user may override
    /// come first; the settings the guarantees rest on come last.
    pub(crate) fn producer_config(&self, mode: Mode) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        c.set(
            "client.id",
            format!("txbox-relay-{}-{}", self.schema, self.stream),
        );
        c.set("partitioner", "murmur2_random");
        // The whole batch is queued at once and then awaited: waiting for
        // more records to arrive only delays it.
        c.set("linger.ms", "1");
        c.set("queue.buffering.max.messages", "200000");
        match mode {
            // librdkafka lowers message.timeout.ms to this when larger.
            Mode::ExactlyOnce => c.set("transaction.timeout.ms", "30000"),
            Mode::AtLeastOnce => c.set("message.timeout.ms", "30000"),
        };
        for (k, v) in &self.kafka {
            c.set(k, v);
        }
        c.set("enable.idempotence", "true");
        c.set("acks", "all");
        if mode == Mode::ExactlyOnce {
            c.set("transactional.id", &self.transactional_id);
        }
        c
    }

    /// Creates the producer for `mode` and checks that the brokers answer,
    /// so that a broker that is down is retried rather than misjudged.
    pub(crate) async fn connect(&self, mode: Mode) -> Result<FutureProducer, PublishError> {
        let producer: FutureProducer = self
            .producer_config(mode)
            .create()
            .map_err(|e| PublishError::Fatal(format!("cannot create producer: {e}")))?;
        let p = producer.clone();
        blocking(move || {
            p.client()
                .fetch_metadata(None, Duration::from_secs(10))
                .map(|_| ())
        })
        .await
        .map_err(|e| PublishError::Retry {
            delivered: 0,
            error: format!("brokers unreachable: {e}"),
        })?;
        Ok(producer)
    }
}

/// A batch made it: `count` rows, up to `last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Published {
    pub(crate) count: usize,
    pub(crate) last: Position,
}

/// Why a batch did not (fully) make it, and what is known to be out.
#[derive(Debug)]
pub(crate) enum PublishError {
    /// Transient: back off, then retry from the first row not known to be
    /// published. The first `delivered` rows are (at-least-once only; a
    /// transaction that failed was aborted, so there it is always 0).
    Retry { delivered: usize, error: String },
    /// Row `index` will never be accepted as it is. The rows before it are
    /// published in at-least-once mode (`delivered == index`); in
    /// exactly-once mode the transaction was aborted (`delivered == 0`).
    Rejected {
        delivered: usize,
        index: usize,
        error: String,
    },
    /// The producer is unusable (fenced, fatal error): drop it and go
    /// back to acquiring the lease.
    Fatal(String),
    /// The broker lacks transactions.
    Unsupported(String),
}

/// The two ways to publish, behind one interface.
#[derive(Debug)]
pub(crate) enum Publisher {
    Transactional(Transactional),
    AtLeastOnce(AtLeastOnce),
}

impl Publisher {
    /// Publishes `rows` (non-empty, in cursor order).
    pub(crate) async fn publish(&mut self, rows: &[OutboxRow]) -> Result<Published, PublishError> {
        match self {
            Publisher::Transactional(p) => p.publish(rows).await,
            Publisher::AtLeastOnce(p) => p.publish(rows).await,
        }
    }

    /// Ends any open transaction (aborting it) before the publisher is
    /// dropped on shutdown or lease loss.
    pub(crate) async fn close(self) {
        if let Publisher::Transactional(p) = self {
            p.close().await;
        }
    }
}

/// Builds the Kafka record for `row`, or says why the row is unusable.
///
/// The stored headers are sent as they are, after the CloudEvents identity
/// headers: `ce_id` is the row's event id (the value downstream inboxes
/// dedupe on) and `ce_specversion` is `1.0`.
pub(crate) fn record_for(row: &OutboxRow) -> Result<FutureRecord<'_, [u8], [u8]>, String> {
    let mut headers = txbox::Headers::from_json_str(&row.headers)
        .map_err(|e| format!("headers are not in txbox's stored form: {e}"))?;
    headers.set("ce_id", row.event_id.to_string());
    headers.set("ce_specversion", "1.0");
    let mut rec: FutureRecord<'_, [u8], [u8]> =
        FutureRecord::to(&row.topic).headers(headers.to_kafka());
    if let Some(k) = &row.key {
        rec = rec.key(k.as_slice());
    }
    if let Some(p) = &row.payload {
        rec = rec.payload(p.as_slice());
    }
    Ok(rec)
}

/// Enqueues a record, waiting while librdkafka's queue is full.
pub(crate) async fn enqueue(
    producer: &FutureProducer,
    mut rec: FutureRecord<'_, [u8], [u8]>,
) -> Result<DeliveryFuture, KafkaError> {
    loop {
        match producer.send_result(rec) {
            Ok(f) => return Ok(f),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                rec = back;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Waits for one delivery report.
pub(crate) async fn delivered(f: DeliveryFuture) -> Result<(), KafkaError> {
    match f.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(KafkaError::Canceled),
    }
}

/// Runs a blocking librdkafka call off the async threads.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, KafkaError>
where
    F: FnOnce() -> Result<T, KafkaError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(KafkaError::Canceled))
}

/// The index where the crash point `relay.after_produce` fires: after
/// half the batch (at least one row) was handed to the producer.
pub(crate) fn mid_batch(len: usize) -> usize {
    (len / 2).max(1)
}
