//! Fixtures for testing txbox and services built on it.
//!
//! - [`TestDb`]: a fresh PostgreSQL database per test, migrated, dropped after.
//! - [`PgServer`]: a private PostgreSQL server a test can stop and restart.
//! - [`kafka()`]: the real Apache Kafka broker tests share (the one at
//!   `KAFKA_BOOTSTRAP`, or a private one per test process); topics per test.
//! - [`KafkaServer`]: a private Apache Kafka broker a test can kill and
//!   restart.
//! - [`MockKafka`]: librdkafka's in-process mock cluster, for injected
//!   broker errors only (it shows aborted records and does not fence).
//! - [`kafka`](mod@kafka): produce and consume helpers that report what a consumer saw.
//! - [`process`]: child processes killed with SIGKILL at named crash points.
//! - [`proxy`]: a TCP proxy that can cut a service off, to simulate outages.
//! - [`xid`]: transactions given an id by a first write, for order tests.
//! - [`PgProxy`]: a PostgreSQL-protocol proxy that lets one `COMMIT` reach
//!   the server and loses its reply.
//! - [`RefusingPg`]: a PostgreSQL stand-in that refuses every password
//!   (the shared test server trusts all connections).
//! - [`reference`](mod@reference): the README's configuration tables, and
//!   the public methods of a type as parsed from its crate's sources.
//! - [`CapturedMetrics`]: the process's `metrics` recorder, for asserting
//!   counters and histograms.
//! - [`CapturedSpans`]: the `tracing` spans the process opened, with their
//!   fields.
//!
//! Environment: `TXBOX_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), `KAFKA_BOOTSTRAP` (a
//! running Apache Kafka; otherwise one is started with `scripts/kafka`).

mod broker;
mod captured_metrics;
mod captured_spans;
mod db;
pub mod kafka;
mod kafka_server;
mod mock;
mod pg_auth;
mod pg_proxy;
pub mod process;
pub mod proxy;
pub mod reference;
mod server;
pub mod xid;

pub use broker::{kafka, Broker};
pub use captured_metrics::CapturedMetrics;
pub use captured_spans::{CapturedSpan, CapturedSpans};
pub use db::{admin_url, TestDb};
pub use kafka_server::KafkaServer;
pub use mock::MockKafka;
pub use pg_auth::RefusingPg;
pub use pg_proxy::{CommitCut, CommitReply, PgProxy};
pub use server::PgServer;

/// A name unique to this process and call, for topics, groups and schemas.
pub fn unique_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &id[..12])
}

/// A port on 127.0.0.1 that nothing listened on a moment ago (bound, then
/// released).
///
/// # Panics
/// If no port can be bound.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Installs a compact test log subscriber once (`RUST_LOG` filters).
pub fn init_tracing() {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(test_log_filter())
            .with_test_writer()
            .try_init();
    });
}

/// What the test log shows: `RUST_LOG`, by default warnings and txbox's
/// own information.
fn test_log_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "warn,txbox=info,txbox_relay=info".into())
}
