//! The crate's error type.

use std::borrow::Cow;

/// A boxed error from user code (handlers, extractors).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in txbox outside a handler.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A database call failed and was not (or no longer) retryable.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),

    /// A Kafka client call failed.
    #[error("kafka error: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),

    /// Applying or checking migrations failed.
    #[error(transparent)]
    Migrate(#[from] Box<MigrateError>),

    /// A configuration value is missing or invalid.
    #[error("invalid configuration: {0}")]
    Config(Cow<'static, str>),

    /// The txbox schema is missing or older than this library needs.
    #[error(
        "txbox schema {schema:?} is not ready: {reason}; run `txbox migrate --schema {schema}`"
    )]
    SchemaNotReady {
        /// The schema that was checked.
        schema: String,
        /// What is missing.
        reason: String,
    },

    /// An outbox event could not be staged as given.
    #[error("invalid outbox event: {0}")]
    InvalidEvent(Cow<'static, str>),

    /// A position reset selected partitions the group has never consumed.
    #[error(
        "no stored inbox position for group {group:?} on topic {topic:?}{}",
        if partitions.is_empty() { String::new() } else { format!(", partitions {partitions:?}") }
    )]
    NoPosition {
        /// The consumer group.
        group: String,
        /// The topic.
        topic: String,
        /// The selected partitions with no stored position (empty: the
        /// topic has none at all).
        partitions: Vec<i32>,
    },
}

impl Error {
    /// True when retrying the same operation may succeed: a transient
    /// database error (see [`db::is_transient`](crate::db::is_transient)) or
    /// a retriable Kafka error.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Database(e) => crate::db::is_transient(e),
            Error::Kafka(e) => e.rdkafka_error_code().is_some_and(|c| {
                use rdkafka::types::RDKafkaErrorCode as C;
                matches!(
                    c,
                    C::BrokerTransportFailure
                        | C::AllBrokersDown
                        | C::RequestTimedOut
                        | C::NetworkException
                        | C::NotCoordinator
                        | C::CoordinatorNotAvailable
                        | C::CoordinatorLoadInProgress
                        | C::LeaderNotAvailable
                        | C::NotLeaderForPartition
                        | C::OperationTimedOut
                )
            }),
            _ => false,
        }
    }

    pub(crate) fn config(msg: impl Into<Cow<'static, str>>) -> Self {
        Error::Config(msg.into())
    }
}

impl From<MigrateError> for Error {
    fn from(e: MigrateError) -> Self {
        Error::Migrate(Box::new(e))
    }
}

/// Why `txbox migrate` refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// An applied migration's SQL differs from the one this binary carries.
    #[error("migration {version} ({name}) was applied with a different checksum; applied migrations must never be edited")]
    Modified {
        /// The migration's version.
        version: i64,
        /// The migration's name.
        name: String,
    },
    /// The database has a migration this binary does not know.
    #[error("the database has migration {version} which this txbox does not know; upgrade txbox")]
    Unknown {
        /// The unknown version.
        version: i64,
    },
    /// A migration's SQL failed.
    #[error("migration {version} ({name}) failed: {source}")]
    Failed {
        /// The migration's version.
        version: i64,
        /// The migration's name.
        name: String,
        /// The database error.
        #[source]
        source: sqlx::Error,
    },
}
