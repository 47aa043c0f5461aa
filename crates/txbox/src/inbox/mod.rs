//! Consuming Kafka messages with exactly-once effects in PostgreSQL.
//!
//! For each batch of one partition, one database transaction holds:
//!
//! 1. the event ids, inserted into `inbox_processed` (ids seen before are
//!    skipped without running the handler; a message whose id is its
//!    position needs no row, see [`Dedupe`]);
//! 2. the handler's business writes and staged outbox events;
//! 3. the offset advance in `inbox_offsets`, conditional on this consumer's
//!    epoch and on the offset it expects (the fence);
//!
//! and commits or rolls back as one. Offsets are never committed to Kafka:
//! on assignment the consumer reads `next_offset` from Postgres and assigns
//! there. See the crate docs and `ADR/0001` for the guarantees and their
//! boundaries.
//!
//! A message that cannot be applied as given ends as one dead letter in
//! `inbox_dead_letters` (payload, key and headers byte for byte), or stops
//! its partition with [`FailureAction::StopPartition`]: never an endless
//! retry or a skip with nothing stored. That covers handler errors, panics
//! and transactions a handler left aborted, and messages refused before any
//! handler runs (an event id with a NUL byte, which PostgreSQL cannot
//! store; headers that cannot be read).
//!
//! When a stored position is out of the log's range (a topic deleted and
//! recreated, retention, a truncated log), Kafka moves the partition by
//! `auto.offset.reset` and the inbox follows it, backwards too, so a new
//! log is applied rather than skipped as consumed. To move positions on
//! purpose (replay, skip), use [`PositionReset`] or `txbox offsets reset`.

mod assignment;
mod buffered;
mod commit;
mod config;
mod dead_letters;
mod dedupe;
mod event_id;
mod handler;
mod message;
mod partition;
mod positions;
mod prune;
mod replay;
mod runtime;
mod shared;
mod sql;
mod steady_state;

pub use config::{FailureAction, RetryPolicy, StartFrom};
pub use dead_letters::{DeadLetter, DeadLetterFilter, DeadLetters};
pub use dedupe::Dedupe;
pub use event_id::EventIdSource;
pub use handler::{BatchError, BatchHandler, Handler, HandlerError, Tx};
pub use message::{DecodeError, InboxMessage};
pub use positions::{PositionChange, PositionReset, ResetTo};
pub use runtime::{Inbox, InboxBuilder};
#[doc(hidden)]
pub use steady_state::SteadyStateSql;
