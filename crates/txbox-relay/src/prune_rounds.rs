//! When a stream's pruner runs. Beside each stream's publisher a task
//! deletes the published rows (and key order heads) with a [`Pruner`], in
//! rounds of up to [`PRUNE_BATCHES_PER_ROUND`] statements, with a pause
//! of `prune_interval` after each round, or none after a full round while
//! the publisher is not draining a backlog itself; each round resumes
//! where the last one of the same fencing token stopped. It never prunes
//! in another database history than the published position's: it stops
//! and raises the stream's alarm instead.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cursor::Position;
use crate::error::Error;
use crate::history::Histories;
use crate::prune::Pruner;
use crate::stream::{history_changed, StreamTask};

/// Prune statements per prune round at most.
const PRUNE_BATCHES_PER_ROUND: usize = 100;

/// What a stream's pruner reads from its publisher: the leader's fencing
/// token and published position, once there is a leader, and how many rows
/// the stream has published since its task started (over every leadership
/// term), which tells the pruner whether the publisher is draining a
/// backlog.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PruneInput {
    pub(crate) lead: Option<(i64, Position)>,
    pub(crate) published: u64,
}

impl StreamTask {
    /// Starts the stream's pruner: it prunes up to the position `rx`
    /// gives, under its fencing token, until `cancel`; it sends the stored
    /// position and the reason on `alarm`, and ends, when that position
    /// belongs to another database history.
    pub(crate) fn spawn_pruner(
        &self,
        mut rx: watch::Receiver<PruneInput>,
        alarm: watch::Sender<Option<(Position, String)>>,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let pruner = Pruner::new(&self.schema, self.stream, self.config.prune_batch);
        let histories = Histories::new(&self.schema);
        let pool = self.pool.clone();
        let interval = self.config.prune_interval;
        let stream = self.stream;
        // The most rows a round deletes.
        let capacity = PRUNE_BATCHES_PER_ROUND as u64 * pruner.batch_size().unsigned_abs();
        tokio::spawn(async move {
            let mut pruned_upto = Position::START;
            // Whether the next round starts at once (see
            // `prune_again_at_once`), and the stream's rows published
            // before the last round (none before the first).
            let mut behind = false;
            let mut published_before = 0;
            // Where the last round of this token stopped deleting.
            let mut resume: Option<(i64, Position)> = None;
            loop {
                let wait = if behind { Duration::ZERO } else { interval };
                behind = false;
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                let PruneInput {
                    lead: Some((token, upto)),
                    published,
                } = *rx.borrow_and_update()
                else {
                    continue;
                };
                match pruner
                    .prune_key_order(&pool, token, PRUNE_BATCHES_PER_ROUND)
                    .await
                {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(stream, deleted = n, "pruned key order heads"),
                    Err(e) => {
                        tracing::warn!(stream, error = %e, "pruning key order heads failed; retrying later")
                    }
                }
                if upto <= pruned_upto {
                    continue;
                }
                // Never prune in another history than the position's: the
                // rows at or below it may be new ones, never published.
                match histories.verify_stream(&pool, stream).await {
                    Ok(_) => {}
                    Err(Error::HistoryChanged {
                        position, reason, ..
                    }) => {
                        tracing::error!(stream, position = %position, reason = %reason, "not pruning: the stored position belongs to another database history");
                        history_changed(stream);
                        alarm.send_replace(Some((position, reason)));
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(stream, error = %e, "history check before pruning failed; retrying later");
                        continue;
                    }
                }
                let pruned = tokio::select! {
                    // Each batch is a statement of its own: stopping between
                    // or inside one leaves nothing half done.
                    () = cancel.cancelled() => return,
                    pruned = pruner.prune_after(
                        &pool,
                        token,
                        prune_resume_point(resume, token, upto),
                        upto,
                        PRUNE_BATCHES_PER_ROUND,
                    ) => pruned,
                };
                match pruned {
                    Ok((n, last)) => {
                        resume = Some((token, last));
                        if n > 0 {
                            tracing::debug!(stream, deleted = n, upto = %upto, "pruned outbox");
                            metrics::counter!("txbox_relay_pruned_total", "stream" => stream.to_string()).increment(n);
                        }
                        if n < capacity {
                            pruned_upto = upto;
                        }
                        behind = prune_again_at_once(
                            n,
                            published.saturating_sub(published_before),
                            capacity,
                        );
                        published_before = published;
                    }
                    Err(e) => tracing::warn!(stream, error = %e, "prune failed; retrying later"),
                }
            }
        })
    }
}

/// Where the next prune round of `token` up to `upto` starts: after the
/// last row the previous round deleted, if that round ran under the same
/// token and that row is at or before `upto`; otherwise from the stream's
/// start. Under one token the position never moves back (unless a history
/// check is about to stop the stream), and nothing at or before a
/// published position is staged later, so the rows before the resume point
/// are gone. A new token (another leader, or this one after losing the
/// lease) may hold a position another leader's rounds never reached, and a
/// resume point past `upto` would skip nothing but is not trusted either.
fn prune_resume_point(resume: Option<(i64, Position)>, token: i64, upto: Position) -> Position {
    resume
        .filter(|(t, p)| *t == token && *p <= upto)
        .map_or(Position::START, |(_, p)| p)
}

/// Whether the next prune round starts at once rather than an interval
/// later: the last round deleted `deleted` rows, its most (`capacity`), so
/// published rows are left behind (a drained backlog), and the stream
/// published fewer than that many rows (`published_since`) since the round
/// before, so its publisher is not draining a backlog itself: while it is,
/// publishing comes first and pruning takes its interval.
///
/// The stream's own published rows, not the distance its position moved:
/// outbox ids are shared by every stream, so the position of one of many
/// streams moves by the rows of all of them.
fn prune_again_at_once(deleted: u64, published_since: u64, capacity: u64) -> bool {
    deleted >= capacity && published_since < capacity
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(txid: u64, id: i64) -> Position {
        Position { txid, id }
    }

    #[test]
    fn a_prune_round_resumes_only_under_its_own_token_and_below_the_position() {
        let last = at(10, 500);
        // The same token, the position at or past the last deleted row.
        assert_eq!(prune_resume_point(Some((7, last)), 7, at(12, 900)), last);
        assert_eq!(prune_resume_point(Some((7, last)), 7, last), last);
        // A new token starts over: its rounds never deleted anything yet.
        assert_eq!(
            prune_resume_point(Some((7, last)), 8, at(12, 900)),
            Position::START
        );
        // A position behind the resume point (a history check is about to
        // stop the stream) is not trusted either.
        assert_eq!(
            prune_resume_point(Some((7, last)), 7, at(9, 400)),
            Position::START
        );
        assert_eq!(prune_resume_point(None, 7, last), Position::START);
    }

    #[test]
    fn a_full_prune_round_is_followed_at_once_unless_the_publisher_is_draining() {
        let capacity = 100 * 1000;
        // A drained backlog: a full round, little published since.
        assert!(prune_again_at_once(capacity, 5_000, capacity));
        // One of eight streams after the drain: it published an eighth of
        // the rows staged, while its position moved by the ids of all
        // eight streams' rows (here more than a round's): still at once.
        let staged_since = 2 * capacity;
        assert!(prune_again_at_once(capacity, staged_since / 8, capacity));
        // The publisher is draining: pruning waits its interval.
        assert!(!prune_again_at_once(capacity, capacity, capacity));
        assert!(!prune_again_at_once(capacity, u64::MAX, capacity));
        // A round that was not full has caught up: the interval.
        assert!(!prune_again_at_once(capacity - 1, 0, capacity));
    }
}
