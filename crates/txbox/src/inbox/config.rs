//! Inbox options and their defaults.

use std::time::Duration;

use crate::db::Backoff;

/// How often a failing message is tried, and how long to wait between tries.
///
/// Defaults: 5 attempts, backoff 100 ms doubling to 30 s, with jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all (the first try included) before giving up.
    pub max_attempts: u32,
    /// Wait between attempts.
    pub backoff: Backoff,
}

impl RetryPolicy {
    /// `max_attempts` tries with the default backoff.
    pub fn attempts(max_attempts: u32) -> Self {
        RetryPolicy {
            max_attempts: max_attempts.max(1),
            ..Self::default()
        }
    }

    /// With this backoff.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            backoff: Backoff::default(),
        }
    }
}

/// What happens to a message that failed permanently or ran out of attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FailureAction {
    /// Write it to `inbox_dead_letters` and advance the offset past it, in
    /// one transaction (the default). Later messages keep flowing. When the
    /// dead letter cannot be stored (no row written, or the database
    /// refuses its content), the partition stops instead, before the
    /// message.
    #[default]
    DeadLetter,
    /// Stop consuming that partition (others go on) and log the error; the
    /// message is retried from the same offset after the next restart or
    /// rebalance. For topics where skipping is never acceptable.
    StopPartition,
}

/// Where a consumer group starts on a partition it has never committed.
///
/// The position is resolved once, at the first assignment, and stored in
/// Postgres at once, so a crash before the first commit does not move it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StartFrom {
    /// The oldest message still retained (the default).
    #[default]
    Earliest,
    /// Only messages produced after the first assignment.
    Latest,
}

/// Tuning options with documented defaults.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub batch_size: usize,
    pub linger: Duration,
    pub retry: RetryPolicy,
    pub on_failure: FailureAction,
    pub start_from: StartFrom,
    pub dedupe_retention: Duration,
    pub prune_interval: Duration,
    pub prune_batch: i64,
    pub max_buffered: usize,
    pub mirror_offsets: Option<Duration>,
}

impl Options {
    /// Queue depth at which a partition paused for backpressure is resumed:
    /// half of `max_buffered`.
    pub(crate) fn resume_at(&self) -> usize {
        self.max_buffered / 2
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            batch_size: 100,
            linger: Duration::ZERO,
            retry: RetryPolicy::default(),
            on_failure: FailureAction::DeadLetter,
            start_from: StartFrom::Earliest,
            dedupe_retention: Duration::from_secs(14 * 24 * 3600),
            prune_interval: Duration::from_secs(60),
            prune_batch: 1000,
            max_buffered: 10_000,
            mirror_offsets: None,
        }
    }
}
