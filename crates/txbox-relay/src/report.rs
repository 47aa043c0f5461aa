//! What a relay run did.

use crate::error::Error;

/// The outcome of [`run`](crate::run): one entry per stream.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct RelayReport {
    /// Each stream's outcome, in configuration order.
    pub streams: Vec<StreamReport>,
}

impl RelayReport {
    /// Rows published by all streams.
    pub fn published(&self) -> u64 {
        self.streams.iter().map(|s| s.published).sum()
    }

    /// Rows moved to `relay_dead_letters` by all streams.
    pub fn dead_lettered(&self) -> u64 {
        self.streams.iter().map(|s| s.dead_lettered).sum()
    }
}

/// What one stream did before it ended.
#[derive(Debug)]
#[non_exhaustive]
pub struct StreamReport {
    /// The stream id.
    pub stream: i32,
    /// Rows published (acknowledged, or committed in a Kafka transaction)
    /// and recorded as published.
    pub published: u64,
    /// Kafka transactions committed (or acknowledged batches).
    pub batches: u64,
    /// Rows moved to `relay_dead_letters`.
    pub dead_lettered: u64,
    /// Batches that failed and were retried (aborted transactions,
    /// unacknowledged records).
    pub retries: u64,
    /// How many times this instance acquired the stream's lease.
    pub leaderships: u32,
    /// Why the stream stopped, if not for shutdown.
    pub error: Option<Error>,
}

impl StreamReport {
    pub(crate) fn new(stream: i32) -> Self {
        StreamReport {
            stream,
            published: 0,
            batches: 0,
            dead_lettered: 0,
            retries: 0,
            leaderships: 0,
            error: None,
        }
    }
}
