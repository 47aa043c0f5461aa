//! One partition's worker: batches, applies in offset order, isolates
//! failures, retries, dead-letters.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::buffered::Buffered;
use super::commit::{self, sqlstate_is, Attempt, Ctx, Failure, IdInsert, Position, Route};
use super::config::FailureAction;
use super::handler::HandlerError;
use super::shared::Shared;
use super::InboxMessage;
use crate::db::is_transient;

/// Why a worker stopped.
#[derive(Debug)]
pub(crate) enum Stop {
    /// Revoked, or the inbox is shutting down.
    Cancelled,
    /// Another consumer owns the partition now.
    Fenced,
    /// A message failed and the policy is to stop the partition.
    Stopped,
}

enum Outcome {
    /// Committed (or nothing left to do); `duplicates`: some messages were
    /// dropped as seen before.
    Done { duplicates: bool },
    Failed {
        index: Option<usize>,
        error: HandlerError,
    },
}

pub(crate) struct PartitionWorker {
    pub shared: Arc<Shared>,
    pub route: Route,
    pub pos: Position,
    pub rx: mpsc::UnboundedReceiver<InboxMessage>,
    pub buffered: Arc<Buffered>,
    pub cancel: CancellationToken,
    pub committed: Arc<AtomicI64>,
    /// The offset of the last message taken from the queue.
    pub last_taken: Option<i64>,
    /// A message that ended the previous batch by going backwards: it opens
    /// the next one.
    pub held: Option<InboxMessage>,
    /// `Optimistic` while batches hold only new event ids; `Checked` from a
    /// transaction that dropped duplicates (a replay tends to go on) or
    /// whose handler failed, until a whole batch goes through with neither.
    pub id_insert: IdInsert,
}

impl PartitionWorker {
    pub(crate) async fn run(mut self) -> Stop {
        tracing::info!(topic = %self.pos.topic, partition = self.pos.partition,
            epoch = self.pos.epoch, next_offset = self.pos.next_offset, "partition claimed");
        let stop = loop {
            let Some(batch) = self.next_batch().await else {
                break Stop::Cancelled;
            };
            self.count_skipped(&batch);
            if let Err(stop) = self.follow_rewind(&batch).await {
                break stop;
            }
            if let Err(stop) = self.process(batch).await {
                break stop;
            }
        };
        match &stop {
            Stop::Fenced => {
                metrics::counter!("txbox_inbox_fenced_total").increment(1);
                tracing::warn!(topic = %self.pos.topic, partition = self.pos.partition,
                    epoch = self.pos.epoch, "fenced: partition reassigned; in-flight work rolled back");
            }
            Stop::Stopped => {
                metrics::counter!("txbox_inbox_partitions_stopped_total").increment(1);
                tracing::error!(topic = %self.pos.topic, partition = self.pos.partition,
                    next_offset = self.pos.next_offset,
                    "partition stopped: it resumes at this offset after a restart or rebalance")
            }
            Stop::Cancelled => {
                tracing::debug!(topic = %self.pos.topic, partition = self.pos.partition, "partition released")
            }
        }
        stop
    }

    /// Records that Postgres now holds `next` as the partition's position.
    fn advance_to(&mut self, next: i64) {
        self.pos.next_offset = next;
        self.pos.consumed_until = self.pos.consumed_until.max(next);
        self.committed.store(next, Ordering::Relaxed);
    }

    /// Our epoch holds but Postgres stores another position than ours: an
    /// earlier commit of ours landed although its acknowledgement was lost
    /// (the connection broke after `COMMIT` was sent). Take the stored
    /// position; the messages below it are applied already.
    fn resync(&mut self, next: i64) {
        metrics::counter!("txbox_inbox_resyncs_total").increment(1);
        tracing::info!(topic = %self.pos.topic, partition = self.pos.partition,
            from = self.pos.next_offset, to = next,
            "resynced offset from database (an earlier commit landed unacknowledged)");
        self.advance_to(next);
    }

    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            pool: &self.shared.pool,
            sql: &self.shared.sql,
            group: &self.shared.group,
            dedupe: self.shared.opts.dedupe,
            idle_timeout: self.shared.opts.waits.idle,
        }
    }

    /// Takes the next batch: up to `batch_size` messages in ascending
    /// offsets, waiting at most `linger` for it to fill. A message whose
    /// offset goes backwards (Kafka rewound the partition) ends the batch and
    /// opens the next one.
    async fn next_batch(&mut self) -> Option<Vec<InboxMessage>> {
        if self.cancel.is_cancelled() {
            return None;
        }
        // Received from the queue now (a held message was counted when
        // it was received): messages, bytes.
        let mut received = (0usize, 0usize);
        let first = match self.held.take() {
            Some(m) => m,
            None => {
                let m = tokio::select! {
                    biased;
                    _ = self.cancel.cancelled() => return None,
                    m = self.rx.recv() => m?,
                };
                received = (1, m.buffered_size());
                m
            }
        };
        let opts = &self.shared.opts;
        let mut batch = vec![first];
        let deadline = Instant::now() + opts.linger;
        while batch.len() < opts.batch_size && self.held.is_none() {
            let next = match self.rx.try_recv() {
                Ok(m) => m,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if Instant::now() >= deadline {
                        break;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => break,
                        m = self.rx.recv() => match m {
                            Some(m) => m,
                            None => break,
                        },
                    }
                }
            };
            received = (received.0 + 1, received.1 + next.buffered_size());
            if batch.last().is_some_and(|last| next.offset <= last.offset) {
                self.held = Some(next);
            } else {
                batch.push(next);
            }
        }
        if self
            .buffered
            .take(received.0, received.1, opts.buffer_bounds())
        {
            self.shared.drained.notify_one();
        }
        Some(batch)
    }

    /// Counts the offsets Kafka delivered no record for, between the last
    /// message taken (or the stored position) and each message of `batch`.
    /// Kafka leaves such gaps on purpose (transaction markers, aborted
    /// records, compaction, retention), so they are no error; the counter
    /// and a debug line naming the range let an operator see a broker
    /// skipping data.
    fn count_skipped(&self, batch: &[InboxMessage]) {
        let mut expected = self
            .last_taken
            .map_or(self.pos.next_offset, |last| last + 1);
        for m in batch {
            if m.offset > expected {
                let skipped = m.offset - expected;
                metrics::counter!("txbox_inbox_offsets_skipped_total")
                    .increment(u64::try_from(skipped).unwrap_or(0));
                tracing::debug!(topic = %self.pos.topic, partition = self.pos.partition,
                    from = expected, to = m.offset - 1, skipped,
                    "no records at these offsets (transaction markers, aborted records, \
                     compaction or retention)");
            }
            expected = expected.max(m.offset + 1);
        }
    }

    /// Kafka delivers a partition in offset order from where it was
    /// assigned; it only goes back when the position was out of range, i.e.
    /// the log was deleted and recreated (or truncated), and
    /// `auto.offset.reset` moved the fetch to the new log's start. Messages
    /// of the new log are then below the stored position and would be
    /// skipped as consumed: move the stored position back to them first
    /// (fenced, in its own transaction), so the new log is applied. Event-id
    /// dedupe still skips any event applied before. Where only the watermark
    /// would dedupe (messages without ids of their own, or
    /// `Dedupe::OffsetsOnly`) below `consumed_until`, the partition stops
    /// instead, for an operator (ADR 0011).
    async fn follow_rewind(&mut self, batch: &[InboxMessage]) -> Result<(), Stop> {
        let Some(head) = batch.first() else {
            return Ok(());
        };
        let first = head.offset;
        let expected = self
            .last_taken
            .map_or(self.pos.next_offset, |last| last + 1);
        self.last_taken = batch.last().map(InboxMessage::offset);
        if first >= expected {
            return Ok(());
        }
        metrics::counter!("txbox_inbox_rewinds_total").increment(1);
        // Messages that only the watermark dedupes, at offsets this group
        // consumed: a truncated log's old records, or a recreated log's new
        // ones. Nothing tells the two apart, so neither skipping them nor
        // applying them is safe: hold the partition where it is.
        let dedupe = self.shared.opts.dedupe;
        if first < self.pos.consumed_until && batch.iter().any(|m| !dedupe.records(m)) {
            tracing::error!(topic = %self.pos.topic, partition = self.pos.partition,
                expected, delivered = first, stored = self.pos.next_offset,
                consumed_until = self.pos.consumed_until,
                "Kafka rewound the partition (auto.offset.reset) into offsets this group \
                 consumed, and these messages have no event id of their own (or the inbox \
                 dedupes by offsets only): a truncated log cannot be told from a recreated \
                 one, so the partition is stopped where it is. If the topic was recreated, \
                 stop the group and run `txbox offsets reset --to-earliest --new-log`; if \
                 the log was truncated, `txbox offsets reset --to-latest` (or the offset to \
                 resume from)");
            return Err(Stop::Stopped);
        }
        tracing::error!(topic = %self.pos.topic, partition = self.pos.partition,
            expected, delivered = first, stored = self.pos.next_offset,
            "Kafka rewound the partition (auto.offset.reset): its log was recreated or \
             truncated, or the position was set past its end; moving the stored position \
             back to follow it (event ids already processed are still skipped)");
        self.bookkeep(Bookkeeping::Reposition(first)).await?;
        // The new log may repeat events of the old one.
        self.id_insert = IdInsert::Checked;
        Ok(())
    }

    /// Applies a batch; on a handler failure, commits what precedes the
    /// failing message, retries it alone, then goes on with the rest.
    async fn process(&mut self, batch: Vec<InboxMessage>) -> Result<(), Stop> {
        let mut queue = VecDeque::from([batch]);
        // Whether the batch went through without duplicates or failures:
        // the next one then records its ids optimistically again.
        let mut clean = true;
        while let Some(mut chunk) = queue.pop_front() {
            let outcome = self.apply(&mut chunk).await?;
            clean &= matches!(outcome, Outcome::Done { duplicates: false });
            match outcome {
                Outcome::Done { .. } => {}
                Outcome::Failed { error, .. } if chunk.len() == 1 => {
                    if let Some(msg) = chunk.pop() {
                        self.retry_single(msg, error).await?;
                    }
                }
                Outcome::Failed { index, .. } => {
                    // Isolate: [..i] good prefix, [i] the culprit, [i+1..] the
                    // rest. Without an index, bisect.
                    let mid = index
                        .filter(|&i| i < chunk.len())
                        .unwrap_or(chunk.len() / 2);
                    let mut right = chunk.split_off(mid);
                    if index.is_some() && !right.is_empty() {
                        let rest = right.split_off(1);
                        if !rest.is_empty() {
                            queue.push_front(rest);
                        }
                    }
                    queue.push_front(right);
                    if !chunk.is_empty() {
                        queue.push_front(chunk);
                    }
                }
            }
        }
        if clean {
            self.id_insert = IdInsert::Optimistic;
        }
        Ok(())
    }

    /// One transaction, retried through database outages and resyncs.
    async fn apply(&mut self, chunk: &mut Vec<InboxMessage>) -> Result<Outcome, Stop> {
        let mut db_failures = 0u32;
        loop {
            if self.cancel.is_cancelled() {
                return Err(Stop::Cancelled);
            }
            let next = self.pos.next_offset;
            chunk.retain(|m| m.offset >= next);
            let Some(last) = chunk.last().map(InboxMessage::offset) else {
                return Ok(Outcome::Done { duplicates: false });
            };
            let span = tracing::info_span!("txbox.inbox.batch", group = %self.shared.group,
                topic = %self.pos.topic, partition = self.pos.partition,
                first_offset = chunk.first().map_or(last, InboxMessage::offset),
                last_offset = last, messages = chunk.len(), outcome = tracing::field::Empty);
            let started = Instant::now();
            let attempt = commit::apply(self.ctx(), &self.route, &self.pos, chunk, self.id_insert)
                .instrument(span.clone())
                .await;
            span.record("outcome", attempt.outcome());
            match attempt {
                Attempt::Committed {
                    applied,
                    duplicates,
                } => {
                    metrics::histogram!("txbox_inbox_transaction_seconds")
                        .record(started.elapsed().as_secs_f64());
                    metrics::histogram!("txbox_inbox_batch_size").record(chunk.len() as f64);
                    self.advance_to(last + 1);
                    if duplicates > 0 {
                        self.id_insert = IdInsert::Checked;
                    }
                    metrics::counter!("txbox_inbox_messages_total", "outcome" => "applied")
                        .increment(applied as u64);
                    if duplicates > 0 {
                        metrics::counter!("txbox_inbox_messages_total", "outcome" => "duplicate")
                            .increment(duplicates as u64);
                        tracing::debug!(duplicates, "skipped already-processed event ids");
                    }
                    return Ok(Outcome::Done {
                        duplicates: duplicates > 0,
                    });
                }
                Attempt::Resync { next_offset } => self.resync(next_offset),
                Attempt::Fenced => return Err(Stop::Fenced),
                // Failed checked (`commit::apply` redoes an optimistic
                // failure checked): its retries are too, so the handler does
                // not run twice each time.
                Attempt::HandlerFailed { error, .. } if error.is_transient_db() => {
                    self.id_insert = IdInsert::Checked;
                    db_failures += 1;
                    self.db_backoff(db_failures, &error.to_string()).await?;
                }
                Attempt::HandlerFailed { index, error } => {
                    self.id_insert = IdInsert::Checked;
                    return Ok(Outcome::Failed { index, error });
                }
                Attempt::Unwritten { what, rows } => return Err(self.unwritten(what, rows)),
                Attempt::Db(e) => {
                    db_failures += 1;
                    self.db_backoff(db_failures, &e.to_string()).await?;
                    if !is_transient(&e) {
                        tracing::error!(error = %e, "inbox transaction failed with a non-transient database error; retrying");
                    }
                }
            }
        }
    }

    async fn db_backoff(&self, failures: u32, error: &str) -> Result<(), Stop> {
        metrics::counter!("txbox_inbox_db_retries_total").increment(1);
        let delay = self
            .shared
            .opts
            .retry
            .backoff
            .delay(failures)
            .min(Duration::from_secs(5));
        tracing::warn!(topic = %self.pos.topic, partition = self.pos.partition, error,
            retry_in_ms = delay.as_millis() as u64, "database unavailable; will retry (a commit that landed unacknowledged is resynced, not applied again)");
        self.sleep(delay).await
    }

    async fn sleep(&self, d: Duration) -> Result<(), Stop> {
        tokio::select! {
            _ = self.cancel.cancelled() => Err(Stop::Cancelled),
            _ = tokio::time::sleep(d) => Ok(()),
        }
    }

    async fn retry_single(&mut self, msg: InboxMessage, first: HandlerError) -> Result<(), Stop> {
        let policy = self.shared.opts.retry;
        let first_failed_at = Utc::now();
        let mut attempts = 1u32;
        let mut error = first;
        while !error.is_permanent() && attempts < policy.max_attempts {
            tracing::warn!(topic = %msg.topic, partition = msg.partition, offset = msg.offset,
                attempt = attempts, error = %error.chain(), "handler failed; will retry");
            metrics::counter!("txbox_inbox_retries_total").increment(1);
            self.sleep(policy.backoff.delay(attempts)).await?;
            let mut one = vec![msg.clone()];
            match self.apply(&mut one).await? {
                Outcome::Done { .. } => return Ok(()),
                Outcome::Failed { error: e, .. } => {
                    attempts += 1;
                    error = e;
                }
            }
        }
        let failure = Failure {
            message: &msg,
            error: error.chain(),
            attempts,
            first_failed_at,
        };
        match self.shared.opts.on_failure {
            FailureAction::StopPartition => {
                tracing::error!(topic = %msg.topic, partition = msg.partition, offset = msg.offset,
                    attempts, error = %failure.error, "message failed; stopping partition");
                Err(Stop::Stopped)
            }
            FailureAction::DeadLetter => self.dead_letter(&failure).await,
        }
    }

    async fn dead_letter(&mut self, failure: &Failure<'_>) -> Result<(), Stop> {
        if self.bookkeep(Bookkeeping::DeadLetter(failure)).await? {
            metrics::counter!("txbox_inbox_messages_total", "outcome" => "dead_lettered")
                .increment(1);
            tracing::error!(topic = %failure.message.topic, partition = failure.message.partition,
                offset = failure.message.offset, event_id = %failure.message.event_id,
                attempts = failure.attempts, error = %failure.error, "message dead-lettered");
        }
        Ok(())
    }

    /// Commits a transaction that moves the position without running the
    /// handler, retrying through database failures and resyncs. Returns
    /// false when the position already stood where the operation leads
    /// (nothing was written).
    async fn bookkeep(&mut self, op: Bookkeeping<'_>) -> Result<bool, Stop> {
        let mut db_failures = 0u32;
        loop {
            if self.cancel.is_cancelled() {
                return Err(Stop::Cancelled);
            }
            if op.done(self.pos.next_offset) {
                return Ok(false);
            }
            let attempt = match op {
                Bookkeeping::DeadLetter(f) => commit::dead_letter(self.ctx(), &self.pos, f).await,
                Bookkeeping::Reposition(to) => commit::reposition(self.ctx(), &self.pos, to).await,
            };
            match attempt {
                Attempt::Committed { .. } => {
                    self.advance_to(op.next_offset());
                    return Ok(true);
                }
                Attempt::Resync { next_offset } => self.resync(next_offset),
                Attempt::Fenced => return Err(Stop::Fenced),
                // The database refuses what the row holds (data exception,
                // constraint): retrying writes the same row. Stop, with the
                // position before the message, rather than loop.
                Attempt::Db(e)
                    if sqlstate_is(&e, |c| c.starts_with("22") || c.starts_with("23")) =>
                {
                    tracing::error!(topic = %self.pos.topic, partition = self.pos.partition,
                        next_offset = self.pos.next_offset, error = %e,
                        "the database refuses the row; rolled back, stopping the partition");
                    return Err(Stop::Stopped);
                }
                Attempt::Db(e) => {
                    db_failures += 1;
                    self.db_backoff(db_failures, &e.to_string()).await?;
                }
                Attempt::HandlerFailed { .. } => return Err(Stop::Stopped),
                Attempt::Unwritten { what, rows } => return Err(self.unwritten(what, rows)),
            }
        }
    }

    /// A row that had to be written was not (a trigger or rule discarded
    /// it). Going on would advance past a message with nothing stored, and
    /// retrying would discard it again: stop the partition.
    fn unwritten(&self, what: &str, rows: u64) -> Stop {
        tracing::error!(topic = %self.pos.topic, partition = self.pos.partition,
            next_offset = self.pos.next_offset, what, rows,
            "the database wrote no row for the {what} (a trigger or rule on its table?); \
             rolled back, stopping the partition rather than advancing past the message");
        Stop::Stopped
    }
}

/// A position move that runs no handler.
#[derive(Clone, Copy)]
enum Bookkeeping<'a> {
    /// Dead-letter this message and advance past it.
    DeadLetter(&'a Failure<'a>),
    /// Move the position back to this offset (Kafka rewound the partition).
    Reposition(i64),
}

impl Bookkeeping<'_> {
    /// The partition's next offset once this is committed.
    fn next_offset(self) -> i64 {
        match self {
            Bookkeeping::DeadLetter(f) => f.message.offset + 1,
            Bookkeeping::Reposition(to) => to,
        }
    }

    /// True when a partition at `next_offset` needs no such move.
    fn done(self, next_offset: i64) -> bool {
        match self {
            Bookkeeping::DeadLetter(f) => next_offset > f.message.offset,
            Bookkeeping::Reposition(to) => next_offset <= to,
        }
    }
}
