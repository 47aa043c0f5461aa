//! Inbox options and their defaults.

use std::time::Duration;

use super::buffered::Bounds;
use super::Dedupe;
use crate::db::Backoff;
use crate::error::{Error, Result};

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
    pub dedupe: Dedupe,
    pub dedupe_retention: Duration,
    pub prune_interval: Duration,
    pub prune_batch: i64,
    pub max_buffered: usize,
    pub max_buffered_bytes: usize,
    pub mirror_offsets: Option<Duration>,
    pub waits: Waits,
}

/// How long an inbox transaction waits on others, and lets others wait on
/// it: the bounds that keep a zombie from stalling its successor.
///
/// Both are set with `SET LOCAL` at the start of every inbox transaction
/// (the `BEGIN` and the settings go in one round trip), so they apply to
/// the inbox's statements and the handler's alike, and to nothing else on
/// the pool's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Waits {
    /// `lock_timeout`: a statement waiting longer for a lock fails with
    /// 55P03 and the transaction is retried (not counted as an attempt).
    pub lock: Duration,
    /// `idle_in_transaction_session_timeout`: PostgreSQL ends the session
    /// of a transaction left idle this long, which releases its locks.
    pub idle: Duration,
}

impl Waits {
    /// The statement that opens every inbox transaction.
    pub(crate) fn begin(&self) -> String {
        format!(
            "BEGIN; SET LOCAL lock_timeout = '{}ms'; SET LOCAL idle_in_transaction_session_timeout = '{}ms'",
            self.lock.as_millis(),
            self.idle.as_millis()
        )
    }
}

impl Waits {
    /// The bounds an inbox runs with: `idle` as given, or by default 30 s
    /// or two thirds of an explicit `session.timeout.ms` if lower. Refuses
    /// zero (no bound at all, in PostgreSQL), values PostgreSQL cannot
    /// hold, and an idle bound that would not end a zombie's transaction
    /// before the group's session timeout hands its partitions on.
    pub(crate) fn resolve(
        lock: Duration,
        idle: Option<Duration>,
        session_timeout_ms: Option<&str>,
    ) -> Result<Waits> {
        const MAX: Duration = Duration::from_millis(i32::MAX as u64);
        let session = match session_timeout_ms {
            None => None,
            Some(text) => Some(Duration::from_millis(text.trim().parse().map_err(
                |_| {
                    Error::config(format!(
                        "inbox: session.timeout.ms must be a number of milliseconds, not {text:?}"
                    ))
                },
            )?)),
        };
        let default_idle = Waits::default().idle;
        let idle =
            idle.unwrap_or_else(|| session.map_or(default_idle, |s| default_idle.min(s * 2 / 3)));
        for (name, d) in [("lock_timeout", lock), ("transaction_idle_timeout", idle)] {
            if d < Duration::from_millis(1) || d > MAX {
                return Err(Error::config(format!(
                    "inbox: {name} must be between 1 ms and {} ms, not {} ms",
                    MAX.as_millis(),
                    d.as_millis()
                )));
            }
        }
        if let Some(session) = session.filter(|s| idle >= *s) {
            return Err(Error::config(format!(
                "inbox: transaction_idle_timeout ({} ms) must be below session.timeout.ms ({} ms), \
                 so a consumer that lost its partitions has its transactions ended before they \
                 are given to another",
                idle.as_millis(),
                session.as_millis()
            )));
        }
        Ok(Waits { lock, idle })
    }
}

impl Default for Waits {
    fn default() -> Self {
        Waits {
            lock: Duration::from_secs(10),
            idle: Duration::from_secs(30),
        }
    }
}

impl Options {
    /// When a partition is paused for backpressure, and resumed.
    pub(crate) fn buffer_bounds(&self) -> Bounds {
        Bounds {
            messages: self.max_buffered,
            bytes: self.max_buffered_bytes,
        }
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
            dedupe: Dedupe::default(),
            dedupe_retention: Duration::from_secs(14 * 24 * 3600),
            prune_interval: Duration::from_secs(60),
            prune_batch: 1000,
            max_buffered: 50_000,
            max_buffered_bytes: 16 << 20,
            mirror_offsets: None,
            waits: Waits::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn the_idle_bound_stays_below_the_session_timeout() {
        let w = |idle, session| Waits::resolve(S(10), idle, session);
        assert_eq!(w(None, None).expect("valid").idle, S(30));
        assert_eq!(w(None, Some("45000")).expect("valid").idle, S(30));
        assert_eq!(w(None, Some("6000")).expect("valid").idle, S(4));
        assert_eq!(w(Some(S(5)), Some("6000")).expect("valid").idle, S(5));
        let refused = w(Some(S(6)), Some("6000"))
            .expect_err("refused")
            .to_string();
        assert!(refused.contains("below session.timeout.ms"), "{refused}");
        assert!(w(None, Some("six")).is_err());
    }

    #[test]
    fn zero_and_huge_bounds_are_refused() {
        for (lock, idle) in [
            (Duration::ZERO, S(1)),
            (S(1), Duration::ZERO),
            (S(1), S(u64::MAX / 4)),
        ] {
            let e = Waits::resolve(lock, Some(idle), None)
                .expect_err("refused")
                .to_string();
            assert!(e.contains("must be between 1 ms"), "{e}");
        }
    }

    #[test]
    fn every_transaction_opens_with_both_bounds() {
        let begin = Waits {
            lock: Duration::from_millis(1500),
            idle: S(20),
        }
        .begin();
        assert_eq!(
            begin,
            "BEGIN; SET LOCAL lock_timeout = '1500ms'; \
             SET LOCAL idle_in_transaction_session_timeout = '20000ms'"
        );
    }
}
