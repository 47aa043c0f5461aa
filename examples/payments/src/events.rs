//! The topics of the chain and the events on them.

use serde::{Deserialize, Serialize};

/// Payment requests, consumed by the payments service (before the topic
/// prefix, see [`cli::Common::topic`](crate::cli::Common::topic)).
pub const REQUESTED: &str = "payments.requested";

/// Settled payments: staged by the payments service, published by
/// `txbox-relay`, consumed by the ledger service.
pub const SETTLED: &str = "payments.settled";

/// Partitions of both topics when a service creates them.
pub const PARTITIONS: i32 = 3;

/// A request to debit `amount` from `account`, keyed by the account. Its
/// event id (the `ce_id` header) is the payment's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRequested {
    /// The account to debit.
    pub account: String,
    /// How much, above zero.
    pub amount: i64,
}

/// A payment the payments service settled (event type `PaymentSettled`),
/// keyed by the account. Its event id is derived from the request's, so
/// every copy of one settlement is one event downstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentSettled {
    /// The account debited.
    pub account: String,
    /// The amount debited.
    pub amount: i64,
    /// The account's balance after this payment: strictly falling, per
    /// account, in settlement order.
    pub balance: i64,
    /// The payment's id: the request's event id.
    pub request: String,
}
