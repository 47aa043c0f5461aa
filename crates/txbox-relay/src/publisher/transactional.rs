//! Exactly-once publishing: one Kafka transaction per batch, carrying the
//! rows and the stream's new position.

use std::fmt;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::position_topic::{self, PositionRecord};
use super::{abort_reason, blocking, classify, delivered, describe, enqueue, is_timeout};
use super::{mid_batch, record_for, Class};
use super::{PublishError, Published, PublisherSettings};
use crate::config::Mode;
use crate::cursor::{OutboxRow, Position};

/// How long `init_transactions` may take before the broker is declared
/// unable to do transactions (Kafka answers in well under a second once
/// its transaction coordinator is up).
const INIT_TIMEOUT: Duration = Duration::from_secs(20);
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);
const ABORT_TIMEOUT: Duration = Duration::from_secs(30);
/// Retriable commit failures (coordinator moving, timeout) are retried by
/// calling commit again, this many times, before the batch is aborted.
const COMMIT_ATTEMPTS: u32 = 5;
/// Upper bound on reading the position topic at recovery.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(120);

/// A transactional producer for one stream, `transactional.id =
/// {prefix}-{installation}-{schema}-{stream}`.
pub(crate) struct Transactional {
    producer: FutureProducer,
    settings: PublisherSettings,
    /// A transaction is open (begun, not yet committed or aborted).
    open: bool,
    /// `txbox_relay_commit_seconds{stream}`.
    commit_seconds: metrics::Histogram,
}

impl fmt::Debug for Transactional {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transactional")
            .field("transactional_id", &self.settings.transactional_id)
            .field("open", &self.open)
            .finish()
    }
}

impl Transactional {
    /// Creates the producer and makes it the stream's only live one:
    /// `init_transactions` fences every earlier producer with the same
    /// `transactional.id` and aborts its open transaction. Then recovers
    /// the position (the higher of the position topic's and `db_position`)
    /// and proves the broker can commit a transaction by committing one
    /// that re-records that position.
    pub(crate) async fn start(
        settings: PublisherSettings,
        db_position: Position,
    ) -> Result<(Self, Position), PublishError> {
        let producer = settings.connect(Mode::ExactlyOnce).await?;
        let p = producer.clone();
        let started = std::time::Instant::now();
        if let Err(e) = blocking(move || p.init_transactions(INIT_TIMEOUT)).await {
            let detail = format!(
                "init_transactions failed after {:.1}s: {}",
                started.elapsed().as_secs_f64(),
                describe(&e)
            );
            return Err(match classify(&e) {
                Class::Unsupported => PublishError::Unsupported(detail),
                _ if is_timeout(&e) => PublishError::Unsupported(detail),
                Class::Fatal => PublishError::Fatal(detail),
                _ => PublishError::Retry {
                    delivered: 0,
                    error: detail,
                },
            });
        }
        tracing::debug!(
            transactional_id = %settings.transactional_id,
            took_ms = started.elapsed().as_millis() as u64,
            "init_transactions done"
        );
        position_topic::ensure_topic(&settings)
            .await
            .map_err(|error| PublishError::Retry {
                delivered: 0,
                error,
            })?;
        let from_kafka = position_topic::read_latest(&settings, RECOVERY_TIMEOUT)
            .await
            .map_err(|error| PublishError::Retry {
                delivered: 0,
                error,
            })?;
        let position = from_kafka.unwrap_or(Position::START).max(db_position);
        tracing::info!(
            stream = settings.stream,
            position_topic = ?from_kafka.map(|p| p.to_string()),
            database = %db_position,
            resume_after = %position,
            "recovered position"
        );
        let commit_seconds = metrics::histogram!("txbox_relay_commit_seconds", "stream" => settings.stream.to_string());
        let mut publisher = Transactional {
            producer,
            settings,
            open: false,
            commit_seconds,
        };
        publisher.probe(position).await?;
        Ok((publisher, position))
    }

    /// Commits a transaction holding only the current position record. On
    /// a broker without EndTxn `init_transactions` succeeds but
    /// this commit fails with "not supported": refuse to run.
    async fn probe(&mut self, position: Position) -> Result<(), PublishError> {
        self.begin()?;
        let f = match self.enqueue_position(position).await {
            Ok(f) => f,
            Err(e) => return Err(self.fail(e).await),
        };
        if let Err(e) = delivered(f).await {
            return Err(self.fail(e).await);
        }
        self.commit(position, 0)
            .await
            .map(|_| ())
            .map_err(|e| match e {
                PublishError::Unsupported(detail) => PublishError::Unsupported(format!(
                    "probe transaction on the position topic: {detail}"
                )),
                other => other,
            })
    }

    fn begin(&mut self) -> Result<(), PublishError> {
        self.producer.begin_transaction().map_err(|e| {
            let detail = format!("begin_transaction: {}", describe(&e));
            match classify(&e) {
                Class::Fatal => PublishError::Fatal(detail),
                _ => PublishError::Retry {
                    delivered: 0,
                    error: detail,
                },
            }
        })?;
        self.open = true;
        Ok(())
    }

    async fn enqueue_position(
        &self,
        position: Position,
    ) -> Result<rdkafka::producer::DeliveryFuture, KafkaError> {
        let key = self.settings.position_key();
        let value = PositionRecord::new(&self.settings, position).to_json();
        let rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.settings.position_topic)
            .key(key.as_bytes())
            .payload(value.as_slice());
        enqueue(&self.producer, rec).await
    }

    /// Publishes `rows` and the position after the last of them in one
    /// transaction.
    pub(crate) async fn publish(&mut self, rows: &[OutboxRow]) -> Result<Published, PublishError> {
        let Some(last) = rows.last().map(OutboxRow::position) else {
            return Ok(Published {
                count: 0,
                last: Position::START,
            });
        };
        self.begin()?;
        let mut futures = Vec::with_capacity(rows.len());
        let mid = mid_batch(rows.len());
        for (i, row) in rows.iter().enumerate() {
            let rec = match record_for(row) {
                Ok(rec) => rec,
                Err(error) => return Err(self.reject(i, error).await),
            };
            match enqueue(&self.producer, rec).await {
                Ok(f) => futures.push(f),
                Err(e) if classify(&e) == Class::Permanent => {
                    return Err(self.reject(i, describe(&e)).await);
                }
                Err(e) => return Err(self.fail(e).await),
            }
            if i + 1 == mid {
                txbox::crash_point!("relay.after_produce");
            }
        }
        let position_future = match self.enqueue_position(last).await {
            Ok(f) => f,
            Err(e) => return Err(self.fail(e).await),
        };
        // Wait for every record, so a refused one is named, not just the
        // commit's "transaction failed".
        let mut first_permanent: Option<(usize, KafkaError)> = None;
        let mut first_other: Option<KafkaError> = None;
        for (i, f) in futures.into_iter().enumerate() {
            if let Err(e) = delivered(f).await {
                if classify(&e) == Class::Permanent {
                    first_permanent.get_or_insert((i, e));
                } else {
                    first_other.get_or_insert(e);
                }
            }
        }
        if let Err(e) = delivered(position_future).await {
            first_other.get_or_insert(e);
        }
        if let Some((i, e)) = first_permanent {
            return Err(self.reject(i, describe(&e)).await);
        }
        if let Some(e) = first_other {
            return Err(self.fail(e).await);
        }
        txbox::crash_point!("relay.before_kafka_commit");
        self.commit(last, rows.len()).await
    }

    /// Commits, retrying retriable failures; aborts otherwise.
    async fn commit(&mut self, last: Position, count: usize) -> Result<Published, PublishError> {
        settle(&self.producer).await;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let p = self.producer.clone();
            let started = std::time::Instant::now();
            let committed = blocking(move || p.commit_transaction(COMMIT_TIMEOUT)).await;
            self.commit_seconds.record(started.elapsed().as_secs_f64());
            let e = match committed {
                Ok(()) => {
                    self.open = false;
                    return Ok(Published { count, last });
                }
                Err(e) => e,
            };
            match classify(&e) {
                Class::Unsupported => {
                    // The transaction cannot end; drop the producer (a new
                    // one's init_transactions would abort it).
                    self.abandon(abort_reason(&e));
                    return Err(PublishError::Unsupported(format!(
                        "commit_transaction: {}",
                        describe(&e)
                    )));
                }
                Class::Fatal => {
                    self.abandon(abort_reason(&e));
                    return Err(PublishError::Fatal(format!(
                        "commit_transaction: {}",
                        describe(&e)
                    )));
                }
                Class::Retriable if attempt < COMMIT_ATTEMPTS => {
                    tracing::warn!(
                        stream = self.settings.stream,
                        attempt,
                        error = %describe(&e),
                        "commit_transaction failed; retrying the commit"
                    );
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                }
                _ => return Err(self.fail(e).await),
            }
        }
    }

    /// Aborts the open transaction and turns `e` into what the stream does
    /// next.
    async fn fail(&mut self, e: KafkaError) -> PublishError {
        let detail = describe(&e);
        match classify(&e) {
            Class::Fatal => {
                self.abandon(abort_reason(&e));
                PublishError::Fatal(detail)
            }
            Class::Unsupported => {
                self.abandon(abort_reason(&e));
                PublishError::Unsupported(detail)
            }
            _ => match self.abort(abort_reason(&e)).await {
                Ok(()) => PublishError::Retry {
                    delivered: 0,
                    error: detail,
                },
                Err(abort) => PublishError::Fatal(format!("{detail}; then abort failed: {abort}")),
            },
        }
    }

    /// Aborts, then reports row `index` as refused for good.
    async fn reject(&mut self, index: usize, error: String) -> PublishError {
        match self.abort("rejected").await {
            Ok(()) => PublishError::Rejected {
                delivered: 0,
                index,
                error,
            },
            Err(abort) => PublishError::Fatal(format!("{error}; then abort failed: {abort}")),
        }
    }

    /// Aborts the open transaction, if any, counting it under `reason`
    /// (see [`abort_reason`]).
    async fn abort(&mut self, reason: &'static str) -> Result<(), String> {
        if !self.open {
            return Ok(());
        }
        // Counted whether or not the abort call succeeds: the transaction
        // never commits (the next producer's `init_transactions`, or the
        // transaction timeout, aborts it otherwise).
        self.abandon(reason);
        for attempt in 1..=3u64 {
            let p = self.producer.clone();
            match blocking(move || p.abort_transaction(ABORT_TIMEOUT)).await {
                Ok(()) => return Ok(()),
                Err(e) if classify(&e) == Class::Retriable && attempt < 3 => {
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => return Err(describe(&e)),
            }
        }
        Err("abort_transaction did not finish".to_owned())
    }

    /// Marks the open transaction, if any, as ended without a commit and
    /// counts it in `txbox_relay_aborts_total{stream, reason}`.
    fn abandon(&mut self, reason: &'static str) {
        if std::mem::take(&mut self.open) {
            metrics::counter!(
                "txbox_relay_aborts_total",
                "stream" => self.settings.stream.to_string(),
                "reason" => reason
            )
            .increment(1);
        }
    }

    /// Aborts an open transaction (shutdown past the grace period, lease
    /// lost mid-batch): reason `abandoned`.
    pub(crate) async fn close(mut self) {
        if let Err(e) = self.abort("abandoned").await {
            tracing::warn!(stream = self.settings.stream, error = %e, "abort on close failed");
        }
    }
}

/// How long [`settle`] waits at most.
const SETTLE_LIMIT: Duration = Duration::from_millis(50);

/// Waits, briefly, until librdkafka counts no message of `producer` as
/// outstanding, so that the commit's flush finds nothing to wait for.
///
/// Every delivery report of the transaction has been awaited by now, but
/// librdkafka counts a message until the thread that served its report has
/// dropped it, a moment after the report's future resolved. When
/// rust-rdkafka's `commit_transaction` finds any message still counted, its
/// flush (`rd_kafka_flush(0)`, then `poll` for 100 ms, which runs to its
/// end) stalls the commit for 100 ms: that was the relay's latency p99 on
/// Apache Kafka. After [`SETTLE_LIMIT`] the commit goes ahead and flushes
/// as before; this wait changes nothing in what is committed.
async fn settle(producer: &FutureProducer) {
    let started = std::time::Instant::now();
    let mut spins = 0u32;
    while producer.in_flight_count() > 0 && started.elapsed() < SETTLE_LIMIT {
        spins += 1;
        if spins <= 64 {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}
