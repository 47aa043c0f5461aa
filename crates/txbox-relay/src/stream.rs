//! One relay stream: lease, recover, then read → publish → record, until
//! shutdown.
//!
//! ```text
//! verify schema (once)
//! loop {                                   // leadership
//!     acquire lease (wait while another instance holds it)
//!     start publisher, recover position
//!     loop {                               // batches
//!         renew lease when less than ttl/2 is left
//!         read up to batch_size rows after the position (below xmin)
//!         none: wait for NOTIFY or poll_interval
//!         publish (one Kafka transaction, or all acknowledged)
//!         record the position in relay_streams (fencing token checked)
//!     }
//!     lease lost / producer fenced: drop the producer, back to acquiring
//! }
//! shutdown: finish (or abort) the batch in flight, release the lease
//! ```

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use txbox::db::{is_transient, Backoff};

use crate::config::{Mode, OnReject, RelayConfig};
use crate::cursor::{Cursor, OutboxRow, Position};
use crate::dead_letter::DeadLetters;
use crate::error::{Error, Result};
use crate::history::{Histories, HistoryCheck};
use crate::lease::{Lease, Leases};
use crate::prune_rounds::PruneInput;
use crate::publisher::{AtLeastOnce, PublishError, Publisher, PublisherSettings, Transactional};
use crate::report::StreamReport;

/// How long a batch in flight at shutdown may take to finish before it is
/// abandoned (exactly-once: aborted).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Everything one stream task needs.
#[derive(Debug)]
pub(crate) struct StreamTask {
    pub(crate) config: Arc<RelayConfig>,
    pub(crate) schema: txbox::Schema,
    pub(crate) pool: PgPool,
    pub(crate) stream: i32,
    pub(crate) wake: Arc<Notify>,
    pub(crate) cancel: CancellationToken,
    /// Where `/ready` learns that this stream stopped.
    pub(crate) health: Arc<crate::health::StreamHealth>,
}

/// Why the batch loop ended.
enum Exit {
    Shutdown,
    LeaseLost,
    Fatal(String),
    Stop(Error),
}

impl StreamTask {
    /// Runs the stream until shutdown or an error that needs a person.
    pub(crate) async fn run(self) -> StreamReport {
        let mut report = StreamReport::new(self.stream);
        if let Err(e) = self.run_inner(&mut report).await {
            tracing::error!(stream = self.stream, error = %e, "stream stopped");
            self.health.stopped(self.stream, &e);
            report.error = Some(e);
        }
        report
    }

    async fn run_inner(&self, report: &mut StreamReport) -> Result<()> {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        self.verify_schema(&backoff).await?;
        let leases = Leases::new(
            self.pool.clone(),
            &self.schema,
            self.config.instance.clone(),
            self.config.lease_ttl,
        );
        let (prune_tx, prune_rx) = watch::channel(PruneInput::default());
        let (alarm_tx, alarm_rx) = watch::channel(None);
        let prune_cancel = self.cancel.child_token();
        let pruner = self.spawn_pruner(prune_rx, alarm_tx, prune_cancel.clone());
        // Every instance running the stream, standby or leader, measures
        // the same stored position: the backlog shows while no one
        // publishes.
        let gauges = crate::backlog::spawn_gauges(
            crate::backlog::Backlogs::new(&self.schema),
            self.pool.clone(),
            self.stream,
            prune_cancel.clone(),
        );
        // Also stops the pruner and the gauges if this task is aborted.
        let _prune_guard = prune_cancel.clone().drop_guard();
        let guards = Guards {
            histories: Histories::new(&self.schema),
            prune_tx: &prune_tx,
            alarm: alarm_rx,
        };
        let led = self.lead(&leases, &backoff, &guards, report).await;
        // The pruner and the gauges end before this stream does, so before
        // the relay closes the pool under them.
        prune_cancel.cancel();
        let _ = pruner.await;
        let _ = gauges.await;
        led
    }

    async fn verify_schema(&self, backoff: &Backoff) -> Result<()> {
        let migrator = txbox::Migrator::new(self.schema.clone());
        let mut attempt = 0;
        loop {
            match migrator.verify(&self.pool).await {
                Ok(()) => return Ok(()),
                Err(txbox::Error::Database(e)) if is_transient(&e) => {
                    attempt += 1;
                    tracing::warn!(stream = self.stream, error = %e, "database unavailable; retrying");
                    if !self.pause(backoff.delay(attempt)).await {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sleeps, or returns false at once on shutdown.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            () = self.cancel.cancelled() => false,
            () = tokio::time::sleep(d) => true,
        }
    }

    /// The leadership loop: acquire, publish until the lease or producer
    /// is lost, repeat.
    async fn lead(
        &self,
        leases: &Leases,
        backoff: &Backoff,
        guards: &Guards<'_>,
        report: &mut StreamReport,
    ) -> Result<()> {
        let stream = self.stream;
        let ttl = self.config.lease_ttl;
        let mut attempt = 0;
        let mut waiting_logged = false;
        while !self.cancel.is_cancelled() {
            let mut lease = match leases.try_acquire(stream).await {
                Ok(Some(lease)) => lease,
                Ok(None) => {
                    if !waiting_logged {
                        let holder = leases.holder(stream).await.ok().flatten();
                        tracing::info!(stream, holder = ?holder, "stream is held by another instance; waiting");
                        waiting_logged = true;
                    }
                    metrics::gauge!("txbox_relay_leader", "stream" => stream.to_string()).set(0.0);
                    self.pause((ttl / 4).min(Duration::from_secs(1))).await;
                    continue;
                }
                Err(Error::Database(e)) if is_transient(&e) => {
                    attempt += 1;
                    tracing::warn!(stream, error = %e, "lease acquisition failed; retrying");
                    self.pause(backoff.delay(attempt)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            waiting_logged = false;
            report.leaderships += 1;
            tracing::info!(stream, token = lease.token(), instance = %leases.instance(), "acquired stream lease");
            metrics::gauge!("txbox_relay_leader", "stream" => stream.to_string()).set(1.0);
            // The stored position must belong to this database's history.
            let current = match guards.histories.current(&self.pool).await {
                Ok(current) => current,
                Err(e) => {
                    let _ = leases.release(&lease).await;
                    if matches!(&e, Error::Database(d) if is_transient(d)) {
                        attempt += 1;
                        tracing::warn!(stream, error = %e, "reading the database history failed; retrying");
                        self.pause(backoff.delay(attempt)).await;
                        continue;
                    }
                    return Err(e);
                }
            };
            let (history, xmax) = &current;
            match Histories::check(stream, lease.history(), lease.position(), history, *xmax) {
                Ok(HistoryCheck::Same) => {}
                Ok(HistoryCheck::Unanchored) => {
                    let anchor = history.new_anchor();
                    tracing::info!(stream, anchor = %anchor, position = %lease.position(), "anchoring the stream in this database's history");
                    match leases.anchor(&mut lease, anchor).await {
                        Ok(true) => {}
                        Ok(false) => {
                            let _ = leases.release(&lease).await;
                            continue;
                        }
                        Err(e) => {
                            let _ = leases.release(&lease).await;
                            attempt += 1;
                            tracing::warn!(stream, error = %e, "anchoring the stream failed; retrying");
                            self.pause(backoff.delay(attempt)).await;
                            continue;
                        }
                    }
                }
                Err(e) => {
                    history_changed(stream);
                    let _ = leases.release(&lease).await;
                    return Err(e);
                }
            }
            let anchor = lease.history().unwrap_or_default().to_owned();
            let settings = PublisherSettings::new(&self.config, stream, history, anchor);
            let started = match self.config.mode {
                Mode::ExactlyOnce => Transactional::start(settings, lease.position())
                    .await
                    .map(|(p, pos)| (Publisher::Transactional(p), pos)),
                Mode::AtLeastOnce => AtLeastOnce::start(settings)
                    .await
                    .map(|p| (Publisher::AtLeastOnce(p), lease.position())),
            };
            let (publisher, position) = match started {
                // A position recovered from Kafka (ahead of the database's)
                // must be below the transaction counter too.
                Ok((publisher, position)) if position != lease.position() => {
                    if let Err(e) =
                        Histories::check(stream, lease.history(), position, history, *xmax)
                    {
                        history_changed(stream);
                        publisher.close().await;
                        let _ = leases.release(&lease).await;
                        return Err(e);
                    }
                    (publisher, position)
                }
                Ok(started) => started,
                Err(PublishError::Unsupported(detail)) => {
                    let _ = leases.release(&lease).await;
                    return Err(Error::TransactionsUnsupported {
                        brokers: self.config.brokers.clone(),
                        detail,
                    });
                }
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(stream, error = ?e, "cannot start the publisher; retrying");
                    let _ = leases.release(&lease).await;
                    self.pause(backoff.delay(attempt)).await;
                    continue;
                }
            };
            attempt = 0;
            let mut run = Leader {
                task: self,
                leases,
                lease,
                publisher,
                position,
                cursor: Cursor::new(&self.schema, stream),
                dead_letters: DeadLetters::new(&self.schema, stream),
                backoff: *backoff,
                guards,
            };
            let exit = match run.store_recovered_position().await {
                Ok(()) => run.publish_loop(report).await,
                Err(exit) => exit,
            };
            let Leader {
                lease, publisher, ..
            } = run;
            publisher.close().await;
            metrics::gauge!("txbox_relay_leader", "stream" => stream.to_string()).set(0.0);
            match exit {
                Exit::Shutdown => {
                    if let Err(e) = leases.release(&lease).await {
                        tracing::warn!(stream, error = %e, "could not release the lease; it lapses after the TTL");
                    }
                    tracing::info!(stream, "released stream lease");
                    return Ok(());
                }
                Exit::Stop(e) => {
                    let _ = leases.release(&lease).await;
                    return Err(e);
                }
                Exit::LeaseLost => {
                    tracing::warn!(
                        stream,
                        token = lease.token(),
                        "lease lost; stopped publishing"
                    );
                }
                Exit::Fatal(reason) => {
                    tracing::warn!(stream, token = lease.token(), reason = %reason, "producer unusable (fenced or fatal error); stopped publishing");
                    let _ = leases.release(&lease).await;
                    self.pause(ttl / 4).await;
                }
            }
        }
        Ok(())
    }
}

/// The state of one leadership term.
struct Leader<'a> {
    task: &'a StreamTask,
    leases: &'a Leases,
    lease: Lease,
    publisher: Publisher,
    position: Position,
    cursor: Cursor,
    dead_letters: DeadLetters,
    backoff: Backoff,
    guards: &'a Guards<'a>,
}

/// What a stream's leadership terms share: the history checks, the
/// pruner's input, and the pruner's alarm when it finds the stored
/// position in another history.
struct Guards<'a> {
    histories: Histories,
    prune_tx: &'a watch::Sender<PruneInput>,
    alarm: watch::Receiver<Option<(Position, String)>>,
}

/// The span of one batch, `txbox.relay.batch`: its stream, mode, size and
/// outbox ids; `outcome` (and `error`) are recorded when known.
fn batch_span(stream: i32, mode: Mode, rows: &[OutboxRow]) -> tracing::Span {
    tracing::info_span!(
        "txbox.relay.batch",
        stream,
        mode = %mode,
        rows = rows.len(),
        first_id = rows.first().map_or(0, |r| r.id),
        last_id = rows.last().map_or(0, |r| r.id),
        outcome = tracing::field::Empty,
        error = tracing::field::Empty,
    )
}

/// What became of a batch, for its span: in exactly-once mode the Kafka
/// transaction's end (`committed`; `aborted`, to be retried; `rejected`,
/// aborted for a row Kafka refuses), in at-least-once mode
/// `acknowledged`, `failed` (to be retried from the first row not
/// acknowledged) or `rejected`; in both `fatal` (producer fenced or
/// unusable: the transaction does not commit) or `unsupported`. A batch
/// dropped because the lease was lost or shutdown's grace ran out is
/// `abandoned`.
fn outcome(
    mode: Mode,
    result: &std::result::Result<crate::publisher::Published, PublishError>,
) -> &'static str {
    match (result, mode) {
        (Ok(_), Mode::ExactlyOnce) => "committed",
        (Ok(_), Mode::AtLeastOnce) => "acknowledged",
        (Err(PublishError::Retry { .. }), Mode::ExactlyOnce) => "aborted",
        (Err(PublishError::Retry { .. }), Mode::AtLeastOnce) => "failed",
        (Err(PublishError::Rejected { .. }), _) => "rejected",
        (Err(PublishError::Fatal(_)), _) => "fatal",
        (Err(PublishError::Unsupported(_)), _) => "unsupported",
    }
}

/// Counts a stream stopped for a changed database history.
pub(crate) fn history_changed(stream: i32) {
    metrics::counter!("txbox_relay_history_changed_total", "stream" => stream.to_string())
        .increment(1);
}

impl Leader<'_> {
    async fn publish_loop(&mut self, report: &mut StreamReport) -> Exit {
        let stream = self.task.stream;
        let config = &self.task.config;
        let ttl = config.lease_ttl;
        let idle_wait = config.poll_interval.min(ttl / 4);
        let stream_label = stream.to_string();
        let mut attempt: u32 = 0;
        let mut prefetched: Option<(Position, Vec<OutboxRow>)> = None;
        // Rows still to publish one at a time, to find which row of a
        // refused batch Kafka refuses (see the `Rejected` arm).
        let mut isolate: usize = 0;
        let lead = (self.lease.token(), self.lease.position());
        self.guards.prune_tx.send_modify(|p| p.lead = Some(lead));
        loop {
            if self.task.cancel.is_cancelled() {
                return Exit::Shutdown;
            }
            if let Some((position, reason)) = self.guards.alarm.borrow().clone() {
                return Exit::Stop(Error::HistoryChanged {
                    stream,
                    position,
                    reason,
                });
            }
            if self.lease.remaining() < ttl / 2 {
                match self.leases.renew(&mut self.lease).await {
                    Ok(true) => {}
                    Ok(false) => return Exit::LeaseLost,
                    Err(e) => {
                        if self.lease.remaining().is_zero() {
                            return Exit::LeaseLost;
                        }
                        attempt += 1;
                        tracing::warn!(stream, error = %e, "lease renewal failed; retrying");
                        self.task.pause(self.backoff.delay(attempt)).await;
                        continue;
                    }
                }
            }
            let read_started = Instant::now();
            let limit = if isolate > 0 { 1 } else { config.batch_size };
            let rows = match prefetched.take() {
                Some((after, rows)) if after == self.position && isolate == 0 => rows,
                _ => match self
                    .cursor
                    .read(&self.task.pool, self.position, limit)
                    .await
                {
                    Ok(rows) => rows,
                    Err(Error::Database(e)) if is_transient(&e) => {
                        attempt += 1;
                        tracing::warn!(stream, error = %e, "outbox read failed; retrying");
                        self.task.pause(self.backoff.delay(attempt)).await;
                        continue;
                    }
                    Err(e) => return Exit::Stop(e),
                },
            };
            if rows.is_empty() {
                tokio::select! {
                    () = self.task.cancel.cancelled() => {}
                    () = self.task.wake.notified() => {}
                    () = tokio::time::sleep(idle_wait) => {}
                }
                continue;
            }
            // Publish only with at least half the TTL left.
            if self.lease.remaining() < ttl / 2 {
                continue;
            }
            let publish_started = Instant::now();
            let span = batch_span(stream, config.mode, &rows);
            // A full batch suggests more rows: read the next batch while
            // this one is in flight (used only if this one succeeds).
            let (published, next) = if rows.len() == config.batch_size {
                let cursor = self.cursor.clone();
                let pool = self.task.pool.clone();
                let after = rows
                    .last()
                    .map(OutboxRow::position)
                    .unwrap_or(self.position);
                let limit = config.batch_size;
                let prefetch = async move { (after, cursor.read(&pool, after, limit).await) };
                let (published, next) = tokio::join!(
                    self.publish_guarded(&rows).instrument(span.clone()),
                    prefetch
                );
                (published, Some(next))
            } else {
                (
                    self.publish_guarded(&rows).instrument(span.clone()).await,
                    None,
                )
            };
            let result = match published {
                Ok(result) => result,
                Err(exit) => {
                    span.record("outcome", "abandoned");
                    return exit;
                }
            };
            span.record("outcome", outcome(config.mode, &result));
            if let Err(
                PublishError::Retry { error, .. }
                | PublishError::Rejected { error, .. }
                | PublishError::Fatal(error)
                | PublishError::Unsupported(error),
            ) = &result
            {
                span.record("error", error.as_str());
            }
            let record_started = Instant::now();
            match result {
                Ok(done) => {
                    txbox::crash_point!("relay.after_kafka_commit");
                    if let Err(exit) = self
                        .record(done.last, done.count)
                        .instrument(span.clone())
                        .await
                    {
                        return exit;
                    }
                    txbox::crash_point!("relay.after_db_position");
                    span.in_scope(|| {
                        tracing::debug!(
                            read_ms = (publish_started - read_started).as_secs_f64() * 1e3,
                            publish_ms = (record_started - publish_started).as_secs_f64() * 1e3,
                            record_ms = record_started.elapsed().as_secs_f64() * 1e3,
                            position = %done.last,
                            "batch published"
                        )
                    });
                    attempt = 0;
                    isolate = isolate.saturating_sub(done.count);
                    if let Some((after, Ok(rows))) = next {
                        if !rows.is_empty() {
                            prefetched = Some((after, rows));
                        }
                    }
                    report.published += done.count as u64;
                    report.batches += 1;
                    metrics::counter!("txbox_relay_published_total", "stream" => stream_label.clone())
                        .increment(done.count as u64);
                    metrics::counter!("txbox_relay_batches_total", "stream" => stream_label.clone()).increment(1);
                }
                Err(PublishError::Retry { delivered, error }) => {
                    if let Err(exit) = self
                        .record_prefix(&rows, delivered, report)
                        .instrument(span.clone())
                        .await
                    {
                        return exit;
                    }
                    isolate = isolate.saturating_sub(delivered);
                    attempt += 1;
                    report.retries += 1;
                    metrics::counter!("txbox_relay_retries_total", "stream" => stream_label.clone()).increment(1);
                    tracing::warn!(stream, attempt, error = %error, after = %self.position, "publish failed; retrying from the last published row");
                    self.task.pause(self.backoff.delay(attempt)).await;
                }
                Err(PublishError::Rejected {
                    delivered,
                    index,
                    error,
                }) => {
                    if let Err(exit) = self
                        .record_prefix(&rows, delivered, report)
                        .instrument(span.clone())
                        .await
                    {
                        return exit;
                    }
                    let Some(row) = rows.get(index) else {
                        return Exit::Fatal(format!("rejected row index {index} out of range"));
                    };
                    // A broker refuses a whole record batch (all of one
                    // partition's rows in a produce request) when one of
                    // its records is too large, and every row of it fails
                    // with the same error: the row named may be innocent.
                    // Publish what was not published one row at a time
                    // until a row is refused alone; only that one is.
                    if rows.len() > 1 {
                        isolate = rows.len() - delivered;
                        tracing::warn!(stream, outbox_id = row.id, topic = %row.topic, error = %error,
                            rows = isolate, "Kafka refused a row of the batch; publishing the rest one row at a time to find the row it refuses");
                        continue;
                    }
                    isolate = 0;
                    match config.on_reject {
                        OnReject::Stop => {
                            return Exit::Stop(Error::Rejected {
                                stream,
                                outbox_id: row.id,
                                topic: row.topic.clone(),
                                reason: error,
                            })
                        }
                        OnReject::DeadLetter => match self.dead_letter(row, &error).await {
                            Ok(()) => {
                                report.dead_lettered += 1;
                                metrics::counter!("txbox_relay_dead_letters_total", "stream" => stream_label.clone())
                                    .increment(1);
                            }
                            Err(exit) => return exit,
                        },
                    }
                }
                Err(PublishError::Fatal(reason)) => return Exit::Fatal(reason),
                Err(PublishError::Unsupported(detail)) => {
                    return Exit::Stop(Error::TransactionsUnsupported {
                        brokers: config.brokers.clone(),
                        detail,
                    })
                }
            }
        }
    }

    /// Publishes one batch while renewing the lease on a timer. On
    /// shutdown the batch gets [`SHUTDOWN_GRACE`] to finish; after that it
    /// is dropped, and the caller's `close` aborts an open transaction.
    ///
    /// A lost lease does not drop the batch either: its transaction may
    /// already be committing on a blocking thread, and Kafka, not the
    /// lease, decides whether it lands (a successor's producer fences
    /// it). The batch gets the same grace to end, so its outcome is known
    /// and logged and `close` never races an in-flight commit; the caller
    /// then finds the lease gone when it writes the position (the token
    /// check refuses it).
    async fn publish_guarded(
        &mut self,
        rows: &[OutboxRow],
    ) -> std::result::Result<std::result::Result<crate::publisher::Published, PublishError>, Exit>
    {
        let ttl = self.task.config.lease_ttl;
        let leases = self.leases;
        let lease = &mut self.lease;
        let cancel = &self.task.cancel;
        let publish = self.publisher.publish(rows);
        tokio::pin!(publish);
        let mut renew_at = Instant::now() + ttl / 3;
        let mut give_up_at: Option<Instant> = None;
        let mut lost = false;
        loop {
            tokio::select! {
                r = &mut publish => return Ok(r),
                () = tokio::time::sleep_until(renew_at), if !lost => {
                    match leases.renew(lease).await {
                        Ok(true) => {}
                        Ok(false) => lost = true,
                        Err(e) => tracing::warn!(stream = lease.stream(), error = %e, "lease renewal failed during publish"),
                    }
                    if lease.remaining().is_zero() {
                        lost = true;
                    }
                    if lost {
                        tracing::warn!(stream = lease.stream(), token = lease.token(),
                            "lease lost during a publish; waiting for the batch in flight to end");
                        give_up_at.get_or_insert(Instant::now() + SHUTDOWN_GRACE);
                    }
                    renew_at = Instant::now() + ttl / 3;
                }
                () = cancel.cancelled(), if give_up_at.is_none() => {
                    give_up_at = Some(Instant::now() + SHUTDOWN_GRACE);
                }
                () = async {
                    match give_up_at {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => return Err(if lost && !cancel.is_cancelled() { Exit::LeaseLost } else { Exit::Shutdown }),
            }
        }
    }

    /// A position recovered from Kafka ahead of the database's (a relay
    /// died between the Kafka commit and the position write) is written
    /// at once: until then `relay_streams`, and so `txbox status` and the
    /// backlog gauges, would count rows already published as waiting on a
    /// stream with nothing new to publish.
    async fn store_recovered_position(&mut self) -> std::result::Result<(), Exit> {
        if self.position == self.lease.position() {
            return Ok(());
        }
        tracing::info!(stream = self.task.stream, position = ?self.position,
            "storing the position recovered from Kafka");
        self.record(self.position, 0).await
    }

    /// Writes the position to `relay_streams`, retrying transient errors
    /// while the lease lasts.
    async fn record(&mut self, last: Position, count: usize) -> std::result::Result<(), Exit> {
        let mut attempt = 0;
        loop {
            match self
                .leases
                .record_position(&mut self.lease, last, count as u64)
                .await
            {
                Ok(true) => {
                    self.position = last;
                    let token = self.lease.token();
                    self.guards.prune_tx.send_modify(|p| {
                        p.lead = Some((token, last));
                        p.published += count as u64;
                    });
                    return Ok(());
                }
                Ok(false) => return Err(Exit::LeaseLost),
                Err(Error::Database(e))
                    if is_transient(&e) && !self.lease.remaining().is_zero() =>
                {
                    attempt += 1;
                    tracing::warn!(stream = self.task.stream, error = %e, "position write failed; retrying");
                    tokio::time::sleep(self.backoff.delay(attempt)).await;
                }
                Err(e) => {
                    return Err(if self.lease.remaining().is_zero() {
                        Exit::LeaseLost
                    } else {
                        Exit::Stop(e)
                    })
                }
            }
        }
    }

    /// At-least-once: records the acknowledged prefix of a failed batch,
    /// so a retry re-sends only what is not known to be out.
    async fn record_prefix(
        &mut self,
        rows: &[OutboxRow],
        delivered: usize,
        report: &mut StreamReport,
    ) -> std::result::Result<(), Exit> {
        if delivered == 0 {
            return Ok(());
        }
        let Some(last) = rows.get(delivered - 1).map(OutboxRow::position) else {
            return Ok(());
        };
        self.record(last, delivered).await?;
        report.published += delivered as u64;
        metrics::counter!("txbox_relay_published_total", "stream" => self.task.stream.to_string())
            .increment(delivered as u64);
        Ok(())
    }

    async fn dead_letter(&mut self, row: &OutboxRow, error: &str) -> std::result::Result<(), Exit> {
        let mut attempt = 0;
        loop {
            match self
                .dead_letters
                .move_row(&self.task.pool, self.lease.token(), row, error)
                .await
            {
                Ok(true) => {
                    tracing::warn!(
                        stream = self.task.stream,
                        outbox_id = row.id,
                        topic = %row.topic,
                        event_id = %row.event_id,
                        error,
                        "Kafka rejected the row for good; moved it to relay_dead_letters"
                    );
                    return Ok(());
                }
                Ok(false) => return Err(Exit::LeaseLost),
                Err(Error::Database(e)) if is_transient(&e) => {
                    attempt += 1;
                    self.task.pause(self.backoff.delay(attempt)).await;
                    if self.task.cancel.is_cancelled() {
                        return Err(Exit::Shutdown);
                    }
                }
                Err(e) => return Err(Exit::Stop(e)),
            }
        }
    }
}
