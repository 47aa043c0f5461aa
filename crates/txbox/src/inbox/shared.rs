//! The state every part of a running inbox shares: the pool, the SQL, the
//! group, the handlers by topic and the options. Its own module, so the
//! workers, the claims, the pruner and the replayer depend on it and not on
//! the runtime that starts them.

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::PgPool;

use super::commit::Route;
use super::config::Options;
use super::sql::Statements;

/// What every partition worker shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub pool: PgPool,
    pub sql: Statements,
    pub group: String,
    pub owner: String,
    pub routes: HashMap<Arc<str>, Route>,
    pub opts: Options,
    /// Signalled by a worker whose queue fell to the resume threshold, so a
    /// paused partition is resumed at once rather than on the next tick.
    pub drained: tokio::sync::Notify,
}
