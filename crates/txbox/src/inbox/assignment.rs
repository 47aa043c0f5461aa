//! Partition assignment: claim in Postgres, then assign at the stored offset.
//!
//! On every assignment the consumer gives each partition a new epoch in
//! `inbox_offsets` (the next value of the `inbox_epochs` sequence, never
//! given out before) and reads its `next_offset` *before* telling
//! librdkafka to assign, and assigns at exactly that offset. Nothing is
//! fetched from a position Postgres did not choose, so there is nothing to
//! discard. The new epoch fences any other consumer still working on the
//! partition: its commit checks the epoch under the row lock and rolls
//! back.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use futures::FutureExt as _;

use super::buffered::Buffered;
use super::commit::{IdInsert, Position};
use super::config::StartFrom;
use super::message::panic_message;
use super::partition::PartitionWorker;
use super::shared::Shared;
use super::InboxMessage;

/// A partition this consumer currently owns.
#[derive(Debug)]
pub(crate) struct Slot {
    pub tx: mpsc::UnboundedSender<InboxMessage>,
    pub buffered: Arc<Buffered>,
    pub cancel: CancellationToken,
    pub paused: bool,
    /// The partition's committed next offset (-1 before the first commit),
    /// published by the worker for the informational mirror to Kafka.
    pub committed: Arc<AtomicI64>,
    /// The value last mirrored to Kafka.
    pub mirrored: i64,
}

pub(crate) type Key = (Arc<str>, i32);

/// The consumer context: owns the partition registry and runs claims.
pub(crate) struct InboxContext {
    pub shared: Arc<Shared>,
    pub slots: Mutex<HashMap<Key, Slot>>,
    pub workers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    pub shutdown: CancellationToken,
    pub handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for InboxContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxContext").finish_non_exhaustive()
    }
}

impl ClientContext for InboxContext {}

impl ConsumerContext for InboxContext {
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        // Only the informational mirror commits to Kafka.
        match result {
            Ok(()) => tracing::debug!(partitions = offsets.count(), "offsets mirrored to Kafka"),
            Err(e) => {
                tracing::warn!(error = %e, "mirroring offsets to Kafka failed (informational only)")
            }
        }
    }

    fn rebalance(
        &self,
        base: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(base.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let parts: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS {
            // Tests stall here to make a zombie: a consumer whose workers
            // go on with the partitions the group already gave away.
            crate::delay_point!("inbox.before_release");
        }
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.assign(base, &parts, tpl);
                let assigned = if cooperative {
                    base.incremental_assign(tpl)
                } else {
                    base.assign(tpl)
                };
                // librdkafka keeps an application's pause across a
                // rebalance: a partition paused for backpressure (or a
                // stopped one) when it was revoked would never be fetched
                // again once assigned back. Its new worker starts with an
                // empty buffer, unpaused.
                assigned.and_then(|()| base.resume(tpl))
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.release(&parts);
                if cooperative {
                    base.incremental_unassign(tpl)
                } else {
                    base.unassign()
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; releasing all partitions");
                self.release_all();
                base.unassign()
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "applying the assignment failed");
        }
    }
}

impl InboxContext {
    pub(crate) fn slots(&self) -> MutexGuard<'_, HashMap<Key, Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn assign(
        &self,
        base: &BaseConsumer<Self>,
        parts: &[(String, i32)],
        tpl: &mut TopicPartitionList,
    ) {
        // The claim runs on this (the polling) thread: block_in_place lets
        // the runtime move other tasks, including workers finishing a
        // commit on a partition we are about to fence, to other threads.
        let claims = tokio::task::block_in_place(|| {
            // All at once: one partition whose row is still locked (by a
            // zombie's transaction, until PostgreSQL ends it) delays the
            // others' claims by nothing.
            self.handle.block_on(async {
                futures::future::join_all(
                    parts
                        .iter()
                        .map(|(topic, partition)| self.claim(base, topic, *partition)),
                )
                .await
                .into_iter()
                .collect::<Option<Vec<Position>>>()
            })
        });
        let Some(claims) = claims else {
            tracing::info!("shutting down during assignment; not starting workers");
            return;
        };
        for pos in claims {
            if let Err(e) =
                tpl.set_partition_offset(&pos.topic, pos.partition, Offset::Offset(pos.next_offset))
            {
                tracing::error!(error = %e, topic = %pos.topic, partition = pos.partition, "cannot set assignment offset");
                continue;
            }
            self.start_worker(pos);
        }
    }

    /// Gives the partition a new epoch (creating the row at the start
    /// position if new) and returns the position. Retries until it
    /// succeeds or the inbox stops.
    async fn claim(
        &self,
        base: &BaseConsumer<Self>,
        topic: &str,
        partition: i32,
    ) -> Option<Position> {
        let s = &self.shared;
        let mut failures = 0u32;
        loop {
            match self.try_claim(base, topic, partition).await {
                Ok(pos) => return Some(pos),
                Err(e) => {
                    failures += 1;
                    let delay = s
                        .opts
                        .retry
                        .backoff
                        .delay(failures)
                        .min(Duration::from_secs(5));
                    if matches!(&e, crate::Error::Database(d) if super::commit::sqlstate_is(d, |c| c == "55P03"))
                    {
                        metrics::counter!("txbox_inbox_claim_lock_timeouts_total").increment(1);
                        tracing::warn!(
                            topic,
                            partition,
                            retry_in_ms = delay.as_millis() as u64,
                            "cannot claim partition: another transaction holds its offsets row \
                             (a consumer that lost the partition, frozen before its COMMIT?); \
                             retrying until PostgreSQL ends it (transaction_idle_timeout)"
                        );
                    } else {
                        tracing::warn!(topic, partition, error = %e, retry_in_ms = delay.as_millis() as u64,
                            "cannot claim partition; retrying");
                    }
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn try_claim(
        &self,
        base: &BaseConsumer<Self>,
        topic: &str,
        partition: i32,
    ) -> crate::Result<Position> {
        let s = &self.shared;
        // A stored position out of the log's range (the topic was recreated,
        // or retention removed it) is not checked here: the broker answers
        // the fetch with OFFSET_OUT_OF_RANGE, `auto.offset.reset` moves it,
        // and the worker follows a move backwards (`follow_rewind`).
        let initial = match s.opts.start_from {
            StartFrom::Earliest => 0,
            StartFrom::Latest => {
                let existing: Option<(i64, i64)> = sqlx::query_as(&s.sql.select_offset)
                    .bind(&s.group)
                    .bind(topic)
                    .bind(partition)
                    .fetch_optional(&s.pool)
                    .await?;
                match existing {
                    Some((_, next)) => next,
                    None => {
                        base.fetch_watermarks(topic, partition, Duration::from_secs(10))?
                            .1
                    }
                }
            }
        };
        // In a transaction of its own with the inbox's lock bound: a zombie
        // frozen between its fenced advance and COMMIT holds the row's lock,
        // and this claim runs inside the rebalance callback. Waiting without
        // a bound would stall every partition of this consumer; instead the
        // claim fails with 55P03 and is retried (logged) until PostgreSQL
        // ends the zombie's idle transaction.
        let mut tx = s.pool.begin_with(s.sql.begin.clone()).await?;
        let (next_offset, epoch, consumed_until): (i64, i64, i64) = sqlx::query_as(&s.sql.claim)
            .bind(&s.group)
            .bind(topic)
            .bind(partition)
            .bind(initial)
            .bind(&s.owner)
            .bind(&s.sql.epochs)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Position {
            topic: Arc::from(topic),
            partition,
            epoch,
            next_offset,
            consumed_until,
        })
    }

    fn start_worker(&self, pos: Position) {
        let key: Key = (pos.topic.clone(), pos.partition);
        let Some(route) = self.shared.routes.get(&*pos.topic).cloned() else {
            tracing::error!(topic = %pos.topic, "assigned a topic with no handler");
            return;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let buffered = Arc::new(Buffered::default());
        let committed = Arc::new(AtomicI64::new(-1));
        let cancel = self.shutdown.child_token();
        // Below its watermark the partition is being replayed (its position
        // was moved back): copies are the rule there.
        let id_insert = if pos.next_offset < pos.consumed_until {
            IdInsert::Checked
        } else {
            IdInsert::Optimistic
        };
        let worker = PartitionWorker {
            shared: self.shared.clone(),
            route,
            pos,
            rx,
            buffered: buffered.clone(),
            cancel: cancel.clone(),
            committed: committed.clone(),
            last_taken: None,
            held: None,
            id_insert,
        };
        let old = self.slots().insert(
            key,
            Slot {
                tx,
                buffered,
                cancel,
                paused: false,
                committed,
                mirrored: -1,
            },
        );
        if let Some(old) = old {
            old.cancel.cancel();
        }
        let handle = self.handle.spawn(async move {
            let (topic, partition) = (worker.pos.topic.clone(), worker.pos.partition);
            // Handler panics are caught where the handler runs; this is for
            // the inbox's own. The partition stays paused, as when stopped.
            if let Err(panic) = AssertUnwindSafe(worker.run()).catch_unwind().await {
                metrics::counter!("txbox_inbox_partitions_stopped_total").increment(1);
                tracing::error!(%topic, partition, panic = panic_message(panic.as_ref()),
                    "partition worker panicked; the partition is stopped until a restart or rebalance");
            }
        });
        let mut workers = self
            .workers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        workers.retain(|h| !h.is_finished());
        workers.push(handle);
    }

    fn release(&self, parts: &[(String, i32)]) {
        let mut slots = self.slots();
        for (topic, partition) in parts {
            let key: Key = (Arc::from(topic.as_str()), *partition);
            if let Some(slot) = slots.remove(&key) {
                slot.cancel.cancel();
            }
        }
    }

    pub(crate) fn release_all(&self) {
        for (_, slot) in self.slots().drain() {
            slot.cancel.cancel();
        }
    }

    /// Hands a message to its partition's worker. Returns the partition to
    /// pause when the worker's queue is over the limit.
    pub(crate) fn dispatch(&self, msg: InboxMessage) -> Option<Key> {
        let key: Key = (msg.topic.clone(), msg.partition);
        let mut slots = self.slots();
        let slot = slots.get_mut(&key)?;
        // Count before sending: the worker uncounts once it has received.
        let bytes = msg.buffered_size();
        let reached = slot.buffered.add(bytes, self.shared.opts.buffer_bounds());
        if slot.tx.send(msg).is_err() {
            // The worker stopped (failure policy): keep the partition paused.
            slot.buffered.undo(bytes);
            slot.paused = true;
            return Some(key);
        }
        if reached && !slot.paused {
            metrics::counter!("txbox_inbox_backpressure_pauses_total").increment(1);
            slot.paused = true;
            return Some(key);
        }
        None
    }

    /// Positions committed in Postgres since the last call, for the
    /// informational mirror to Kafka.
    pub(crate) fn unmirrored(&self) -> Vec<(Key, i64)> {
        let mut out = Vec::new();
        for (key, slot) in self.slots().iter_mut() {
            let committed = slot.committed.load(Ordering::Relaxed);
            if committed >= 0 && committed != slot.mirrored {
                slot.mirrored = committed;
                out.push((key.clone(), committed));
            }
        }
        out
    }

    /// Partitions paused for backpressure whose queue has drained.
    pub(crate) fn drained(&self) -> Vec<Key> {
        let bounds = self.shared.opts.buffer_bounds();
        let mut out = Vec::new();
        for (key, slot) in self.slots().iter_mut() {
            if slot.paused && !slot.tx.is_closed() && slot.buffered.is_drained(bounds) {
                slot.paused = false;
                out.push(key.clone());
            }
        }
        out
    }
}
