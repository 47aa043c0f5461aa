//! At-least-once publishing: an idempotent producer, and a batch counts
//! as published once every record of it is acknowledged.

use std::fmt;

use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;

use super::{classify, delivered, describe, enqueue, mid_batch, record_for, Class};
use super::{PublishError, Published, PublisherSettings};
use crate::config::Mode;
use crate::cursor::OutboxRow;

/// An idempotent producer (`enable.idempotence=true`, `acks=all`): no
/// duplicates from the producer's own retries, per-partition order kept.
pub(crate) struct AtLeastOnce {
    producer: FutureProducer,
    stream: i32,
}

impl fmt::Debug for AtLeastOnce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AtLeastOnce")
            .field("stream", &self.stream)
            .finish()
    }
}

impl AtLeastOnce {
    /// Creates the producer and checks the brokers answer.
    pub(crate) async fn start(settings: PublisherSettings) -> Result<Self, PublishError> {
        let producer = settings.connect(Mode::AtLeastOnce).await?;
        Ok(AtLeastOnce {
            producer,
            stream: settings.stream,
        })
    }

    /// Sends `rows` and waits for every acknowledgement. On failure, the
    /// error says how many leading rows are acknowledged (`delivered`), so
    /// the stream can record that much and retry the rest.
    pub(crate) async fn publish(&mut self, rows: &[OutboxRow]) -> Result<Published, PublishError> {
        let mut futures = Vec::with_capacity(rows.len());
        // A row refused before it was queued: (index, error, permanent).
        let mut refused: Option<(usize, String, Class)> = None;
        let mid = mid_batch(rows.len());
        for (i, row) in rows.iter().enumerate() {
            let rec = match record_for(row) {
                Ok(rec) => rec,
                Err(error) => {
                    refused = Some((i, error, Class::Permanent));
                    break;
                }
            };
            match enqueue(&self.producer, rec).await {
                Ok(f) => futures.push(f),
                Err(e) => {
                    refused = Some((i, describe(&e), classify(&e)));
                    break;
                }
            }
            if i + 1 == mid {
                txbox::crash_point!("relay.after_produce");
            }
        }
        txbox::crash_point!("relay.before_kafka_commit");
        let mut acked = 0;
        let mut failure: Option<(usize, KafkaError)> = None;
        for (i, f) in futures.into_iter().enumerate() {
            if let Err(e) = delivered(f).await {
                failure = Some((i, e));
                break;
            }
            acked += 1;
        }
        let (index, error, class) = match (failure, refused) {
            (None, None) => {
                return Ok(Published {
                    count: rows.len(),
                    last: rows.last().map(OutboxRow::position).unwrap_or_default(),
                })
            }
            (Some((i, e)), _) => (i, describe(&e), classify(&e)),
            (None, Some(r)) => r,
        };
        Err(match class {
            Class::Permanent => PublishError::Rejected {
                delivered: acked,
                index,
                error,
            },
            Class::Fatal => PublishError::Fatal(error),
            _ => PublishError::Retry {
                delivered: acked,
                error,
            },
        })
    }
}
