//! What a service author implements.

use async_trait::async_trait;

use super::{DecodeError, InboxMessage};
use crate::error::BoxError;

/// The transaction a handler writes in. The inbox begins it, and commits it
/// together with the offset advance and the event id; the handler must not
/// commit or roll it back.
pub type Tx = sqlx::Transaction<'static, sqlx::Postgres>;

/// Applies one message inside the inbox's transaction.
///
/// Do business writes with `&mut **tx`, and stage derived events with
/// [`Outbox::stage`](crate::Outbox::stage) on the same transaction. Return
/// an error to roll everything back: [`HandlerError::retryable`] to try
/// again later, [`HandlerError::permanent`] to dead-letter at once.
///
/// Two mistakes are caught and treated as retryable failures (so the retry
/// policy's attempts end them in a dead letter or a stopped partition): a
/// panic (the transaction is rolled back, the partition goes on), and
/// returning `Ok` after ignoring a database error (PostgreSQL has aborted
/// the transaction; nothing of it can commit). A violation of a deferred
/// constraint, reported at COMMIT, counts as the handler's failure too.
///
/// # Examples
///
/// ```
/// use txbox::inbox::{Handler, HandlerError, InboxMessage, Tx};
/// use txbox::{Outbox, OutboxEvent};
///
/// #[derive(serde::Deserialize)]
/// struct Deposit { account: String, amount: i64 }
///
/// struct Deposits { outbox: Outbox }
///
/// #[async_trait::async_trait]
/// impl Handler for Deposits {
///     async fn handle(&self, tx: &mut Tx, msg: &InboxMessage) -> Result<(), HandlerError> {
///         let d: Deposit = msg.json()?; // undecodable: dead-lettered
///         if d.amount <= 0 {
///             return Err(HandlerError::permanent(format!("bad amount {}", d.amount)));
///         }
///         sqlx::query("UPDATE account SET balance = balance + $1 WHERE id = $2")
///             .bind(d.amount)
///             .bind(&d.account)
///             .execute(&mut **tx)
///             .await?; // 40001/40P01 and lost connections are retried for you
///         let event = OutboxEvent::json("balances", &serde_json::json!({"account": d.account}))
///             .map_err(HandlerError::permanent)?
///             .key(d.account.clone());
///         self.outbox.stage(tx, event).await?; // a key-order conflict is retried too
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Applies `message`. Called at most once per committed effect: if the
    /// transaction commits, the message is never handled again.
    async fn handle(&self, tx: &mut Tx, message: &InboxMessage) -> Result<(), HandlerError>;
}

/// Applies a batch of messages (one partition, in offset order) inside one
/// transaction, typically with set-based statements, for throughput.
///
/// On error the inbox rolls back and isolates the failing message: give its
/// index in [`BatchError::at`] if known, otherwise the batch is bisected.
#[async_trait]
pub trait BatchHandler: Send + Sync + 'static {
    /// Applies `messages` (never empty; already deduplicated).
    async fn handle_batch(&self, tx: &mut Tx, messages: &[InboxMessage]) -> Result<(), BatchError>;
}

/// Why a handler did not apply a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerError {
    /// Might work later (a dependency is down, a lock timed out).
    /// Retried with backoff up to the retry policy's attempts.
    #[error("retryable: {0}")]
    Retryable(#[source] BoxError),
    /// Will never work (invalid content). Dead-lettered at once.
    #[error("permanent: {0}")]
    Permanent(#[source] BoxError),
    /// The payload could not be decoded. Dead-lettered at once.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A database error in the handler's writes. Transient ones (40001,
    /// 40P01, lost connection) are retried without counting as attempts;
    /// others count as retryable attempts. `?` on a txbox call (such as
    /// [`Outbox::stage`](crate::Outbox::stage)) gives this variant for its
    /// database errors.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl HandlerError {
    /// A retryable error.
    pub fn retryable(err: impl Into<BoxError>) -> Self {
        HandlerError::Retryable(err.into())
    }

    /// A permanent error.
    pub fn permanent(err: impl Into<BoxError>) -> Self {
        HandlerError::Permanent(err.into())
    }

    pub(crate) fn is_permanent(&self) -> bool {
        matches!(self, HandlerError::Permanent(_) | HandlerError::Decode(_))
    }

    /// A transient database error of the handler's transaction: retried
    /// without counting as an attempt. Also a transient
    /// [`Error::Database`](crate::Error::Database) wrapped as retryable
    /// (`.map_err(HandlerError::retryable)` on a txbox call, which runs on
    /// the handler's transaction), such as a key-order conflict of
    /// [`Outbox::stage`](crate::Outbox::stage).
    pub(crate) fn is_transient_db(&self) -> bool {
        match self {
            HandlerError::Database(e) => crate::db::is_transient(e),
            HandlerError::Retryable(e) => matches!(
                e.downcast_ref::<crate::Error>(),
                Some(crate::Error::Database(e)) if crate::db::is_transient(e)
            ),
            _ => false,
        }
    }

    /// The error and its sources, joined with ": ".
    pub(crate) fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            let text = s.to_string();
            if !out.contains(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            source = s.source();
        }
        out
    }
}

/// A txbox error inside a handler (from [`Outbox::stage`](crate::Outbox::stage),
/// say), so `?` works on it: a database error is a
/// [`HandlerError::Database`] (transient ones, such as a
/// [`KeyOrder::Commit`](crate::outbox::KeyOrder::Commit) conflict, are
/// retried without counting as attempts), an invalid event is permanent,
/// anything else retryable.
///
/// ```
/// use txbox::inbox::HandlerError;
///
/// let err = HandlerError::from(txbox::Error::InvalidEvent("no topic".into()));
/// assert!(matches!(err, HandlerError::Permanent(_)));
/// let err = HandlerError::from(txbox::Error::Database(sqlx::Error::PoolTimedOut));
/// assert!(matches!(err, HandlerError::Database(_)));
/// ```
impl From<crate::Error> for HandlerError {
    fn from(e: crate::Error) -> Self {
        match e {
            crate::Error::Database(e) => HandlerError::Database(e),
            e @ crate::Error::InvalidEvent(_) => HandlerError::Permanent(Box::new(e)),
            e => HandlerError::Retryable(Box::new(e)),
        }
    }
}

/// A batch handler's error, optionally naming the message that failed.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct BatchError {
    /// Index (in the slice given to the handler) of the failing message.
    pub index: Option<usize>,
    /// What went wrong.
    #[source]
    pub error: HandlerError,
}

impl BatchError {
    /// The message at `index` failed with `error`.
    pub fn at(index: usize, error: impl Into<HandlerError>) -> Self {
        BatchError {
            index: Some(index),
            error: error.into(),
        }
    }
}

impl<E: Into<HandlerError>> From<E> for BatchError {
    fn from(e: E) -> Self {
        BatchError {
            index: None,
            error: e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::HandlerError;
    use crate::Error;

    /// A transient database error of a txbox call is retried without
    /// counting as an attempt however the handler returns it: with `?` or
    /// wrapped as retryable (the form the docs showed before `?` worked).
    #[test]
    fn transient_database_errors_of_txbox_calls_are_not_attempts() {
        let transient = || Error::Database(sqlx::Error::PoolTimedOut);
        assert!(HandlerError::from(transient()).is_transient_db());
        assert!(HandlerError::retryable(transient()).is_transient_db());
        assert!(!HandlerError::from(Error::Database(sqlx::Error::RowNotFound)).is_transient_db());
        assert!(
            !HandlerError::retryable(Error::Database(sqlx::Error::RowNotFound)).is_transient_db()
        );
        assert!(!HandlerError::retryable("a dependency is down").is_transient_db());
        assert!(HandlerError::from(Error::InvalidEvent("bad".into())).is_permanent());
        assert!(!HandlerError::from(Error::config("x")).is_permanent());
    }
}
