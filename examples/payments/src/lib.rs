//! The code the two services of the payments example share.
//!
//! ```text
//! payments.requested ─▶ payments-example ─▶ outbox ─▶ txbox-relay ─▶ payments.settled ─▶ ledger-example
//!                       (inbox, group payments,       (exactly-once)                     (inbox, group ledger,
//!                        schema txbox)                                                    schema ledger)
//!                       payments_account                                                 ledger_entries
//!                       payments_settlements
//! ```
//!
//! - [`events`]: the topics and the events on them.
//! - [`cli`]: the options both binaries take, under the same flags and
//!   environment variables.
//! - [`service`]: connecting, creating the business tables and topics,
//!   the operations endpoint, stopping on SIGTERM or Ctrl-C.
//! - [`tables`]: the business tables (`payments_account`,
//!   `payments_settlements`, `ledger_entries`).
//! - [`check`]: what the databases say about the chain: settlements and
//!   ledger entries per payment, event ids applied, order per account.
//!
//! See `examples/payments/README.md`.

#![warn(missing_docs)]

pub mod check;
pub mod cli;
mod error;
pub mod events;
pub mod service;
pub mod tables;

pub use error::{Error, Result};

/// The payments service's consumer group (its positions and event ids in
/// `inbox_offsets` and `inbox_processed`).
pub const PAYMENTS_GROUP: &str = "payments";

/// The ledger service's default consumer group.
pub const LEDGER_GROUP: &str = "ledger";

/// The ledger service's default txbox schema: its inbox tables live apart
/// from the payments service's (`txbox`).
pub const LEDGER_SCHEMA: &str = "ledger";
