//! The errors of the shared code.

/// What went wrong in the shared code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A database statement or connection failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A txbox call failed (schema, inbox, endpoint).
    #[error(transparent)]
    Txbox(#[from] txbox::Error),
    /// A Kafka client or admin call failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The options or the environment do not allow the step.
    #[error("{0}")]
    Config(String),
}

/// A result of the shared code.
pub type Result<T, E = Error> = std::result::Result<T, E>;
