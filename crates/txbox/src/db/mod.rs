//! Database helpers shared by the inbox, the outbox and the relay.

mod backoff;
mod redact;
mod transient;

pub use backoff::Backoff;
pub use redact::redact_url;
pub use transient::is_transient;
