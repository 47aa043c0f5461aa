//! The relay's error type.

use std::borrow::Cow;

/// `Result` with the relay's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why the relay (or one of its streams) stopped.
///
/// Transient trouble (a broker or the database briefly away, a coordinator
/// moving, a serialization failure) never surfaces here: the relay backs off
/// and retries the same rows. What does surface needs a person.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is missing or invalid.
    #[error("invalid relay configuration: {0}")]
    Config(Cow<'static, str>),

    /// The configuration file could not be read or parsed.
    #[error("cannot load relay configuration from {path}: {reason}")]
    ConfigFile {
        /// The file.
        path: String,
        /// What went wrong (I/O or TOML error, with line and column).
        reason: String,
    },

    /// A database call failed in a way retrying will not fix.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),

    /// txbox refused: most often the schema is not migrated.
    #[error(transparent)]
    Txbox(#[from] Box<txbox::Error>),

    /// A Kafka client could not be created or configured.
    #[error("kafka error: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),

    /// Exactly-once mode needs Kafka transactions and the broker lacks them.
    #[error(
        "broker at {brokers} does not support Kafka transactions (InitProducerId/EndTxn): {detail}; \
         run with --mode at-least-once or use a broker with transactions"
    )]
    TransactionsUnsupported {
        /// The configured bootstrap servers.
        brokers: String,
        /// What the broker answered.
        detail: String,
    },

    /// Kafka permanently refused an outbox row and `on_reject = "stop"`.
    #[error(
        "stream {stream}: Kafka permanently rejected outbox row {outbox_id} for topic {topic:?}: {reason}; \
         the stream stopped (fix the cause, or run with --on-reject dead-letter)"
    )]
    Rejected {
        /// The relay stream.
        stream: i32,
        /// The outbox row's `id`.
        outbox_id: i64,
        /// The row's topic.
        topic: String,
        /// Kafka's error.
        reason: String,
    },

    /// The stream's stored position belongs to another database history
    /// than this database's (see [`History`](crate::History)): resuming after it
    /// could skip, then prune, rows staged since. Nothing was published or
    /// deleted.
    #[error(
        "stream {stream}: the stored position {position} cannot be trusted: {reason}. Rows staged since \
         could sort at or below it and be skipped, then pruned, so the stream stopped before publishing or \
         deleting anything. Check what happened to the database, then run \
         `txbox relay re-anchor --stream {stream}` (a dry run; add --execute) to publish every row still in \
         the outbox from this history on"
    )]
    HistoryChanged {
        /// The relay stream.
        stream: i32,
        /// The stored position.
        position: crate::cursor::Position,
        /// What differs.
        reason: String,
    },

    /// An operator's request cannot be carried out as things stand.
    #[error("{0}")]
    Operation(Cow<'static, str>),

    /// One or more streams stopped with an error (see the report).
    #[error("{failed} of {total} relay stream(s) stopped: {summary}")]
    StreamsFailed {
        /// How many streams failed.
        failed: usize,
        /// How many streams ran.
        total: usize,
        /// Each failed stream's error, one per line.
        summary: String,
    },
}

impl Error {
    pub(crate) fn config(msg: impl Into<Cow<'static, str>>) -> Self {
        Error::Config(msg.into())
    }
}

impl From<txbox::Error> for Error {
    fn from(e: txbox::Error) -> Self {
        Error::Txbox(Box::new(e))
    }
}
