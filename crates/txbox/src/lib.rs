//! Exactly-once effects for services built on Kafka and PostgreSQL.
//!
//! txbox makes two promises, each inside a stated boundary:
//!
//! - **Inbox**: each Kafka message consumed by an [`Inbox`](inbox::Inbox)
//!   changes the database once. The offset advance, the event-id dedupe
//!   record, your handler's writes and the events it stages commit in one
//!   PostgreSQL transaction. Offsets live in Postgres; a consumer that lost
//!   its partition is fenced and cannot commit.
//! - **Outbox**: an event staged with [`Outbox::stage`] exists exactly when
//!   the transaction that staged it commits. The `txbox-relay` binary
//!   publishes committed events to Kafka in order per key, once for a
//!   `read_committed` consumer (exactly-once mode) or at least once with the
//!   same event id (at-least-once mode, for brokers without transactions).
//!
//! The effects inside PostgreSQL are exactly-once. Effects outside it (an
//! email sent from a handler, an HTTP call) are at-least-once: a handler can
//! run again after a rollback or crash. Put such effects behind the outbox.
//!
//! # Getting started
//!
//! 1. Apply the schema, explicitly: `txbox migrate --database-url ...`.
//!    Services only [verify](Migrator::verify) it at start.
//! 2. Implement [`inbox::Handler`] and run an [`inbox::Inbox`].
//! 3. Stage derived events with [`Outbox`], and run `txbox-relay` beside
//!    the service.
//!
//! ```no_run
//! use txbox::inbox::{Handler, HandlerError, Inbox, InboxMessage, Tx};
//! use txbox::{Outbox, OutboxEvent, Schema};
//!
//! struct Deposits { outbox: Outbox }
//!
//! #[async_trait::async_trait]
//! impl Handler for Deposits {
//!     async fn handle(&self, tx: &mut Tx, msg: &InboxMessage) -> Result<(), HandlerError> {
//!         let deposit: serde_json::Value = msg.json()?;
//!         sqlx::query("UPDATE account SET balance = balance + ($1::jsonb->>'amount')::bigint WHERE id = $1::jsonb->>'account'")
//!             .bind(&deposit)
//!             .execute(&mut **tx)
//!             .await?;
//!         let event = OutboxEvent::json("balances", &deposit).map_err(HandlerError::permanent)?;
//!         self.outbox.stage(tx, event).await?;
//!         Ok(())
//!     }
//! }
//!
//! # async fn demo() -> txbox::Result<()> {
//! let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/app").await?;
//! let outbox = Outbox::new(Schema::default());
//! Inbox::builder(pool)
//!     .brokers("127.0.0.1:9092")
//!     .group_id("balances")
//!     .handler("deposits", Deposits { outbox })
//!     .build()?
//!     .run(async { let _ = tokio::signal::ctrl_c().await; })
//!     .await
//! # }
//! ```
//!
//! # Features
//!
//! | Name | Description | Default |
//! |---|---|---|
//! | `failpoints` | Named crash points for fault-injection tests. Never in production. | no |
//! | `opentelemetry` | The inbox's message spans join the consumed message's trace as OpenTelemetry children, and staged events name them as parents (see [`trace`]). |  no |
//! | `http` | [`http::Endpoint`]: Prometheus metrics, `/health` and `/ready` on one address. | no |

#![warn(missing_docs, unreachable_pub)]
// Library code never unwraps: bad input is a typed error.
#![warn(clippy::unwrap_used)]
#![doc(test(attr(deny(warnings), allow(dead_code, unused_variables))))]

#[cfg(test)]
mod config_reference;
#[doc(hidden)]
pub mod crash;
pub mod db;
mod error;
mod headers;
#[cfg(feature = "http")]
pub mod http;
pub mod inbox;
pub mod instance;
pub mod kafka;
pub mod outbox;
pub mod schema;
pub mod trace;

pub use error::{BoxError, Error, MigrateError, Result};
pub use headers::Headers;
pub use outbox::{Outbox, OutboxEvent};
pub use schema::{Migrator, Schema};

#[doc(no_inline)]
pub use rdkafka;
#[doc(no_inline)]
pub use sqlx;
