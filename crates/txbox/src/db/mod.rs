//! Database helpers shared by the inbox, the outbox and the relay.

mod backoff;
mod transient;

pub use backoff::Backoff;
pub use transient::is_transient;
