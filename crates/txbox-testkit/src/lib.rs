//! Fixtures for testing txbox and services built on it.
//!
//! - [`TestDb`]: a fresh PostgreSQL database per test, migrated, dropped after.
//! - [`PgServer`]: a private PostgreSQL server a test can stop and restart.
//! - [`tansu`]: a real Kafka-protocol broker over TCP (Tansu), one per test
//!   process or the one named by `TXBOX_TEST_KAFKA`; topics per test.
//! - [`MockKafka`]: librdkafka's in-process mock cluster, for injected errors.
//! - [`kafka`]: produce and consume helpers that report what a consumer saw.
//! - [`process`]: child processes killed with SIGKILL at named crash points.
//! - [`proxy`]: a TCP proxy that can cut a service off, to simulate outages.
//!
//! Environment: `TXBOX_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), `TXBOX_TEST_KAFKA` (a
//! running Tansu; otherwise one is started), `KAFKA_BOOTSTRAP` (a real
//! Apache Kafka, for the suite that needs transactions).

mod broker;
mod db;
pub mod kafka;
mod mock;
pub mod process;
pub mod proxy;
mod server;

pub use broker::{tansu, Broker};
pub use db::TestDb;
pub use mock::MockKafka;
pub use server::PgServer;

/// A name unique to this process and call, for topics, groups and schemas.
pub fn unique_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &id[..12])
}

/// Why a test needs [`real_kafka`]; also the text of its `#[ignore]`, so
/// that without a broker it is reported as skipped, never as passed.
pub const NEEDS_KAFKA: &str =
    "needs a real Apache Kafka: set KAFKA_BOOTSTRAP (docker compose up kafka)";

/// The bootstrap servers of a real Apache Kafka, from `KAFKA_BOOTSTRAP`
/// (set for example by `docker compose up kafka`). Tests that need what only
/// Kafka does (transactions, read_committed, fencing, topic deletion) call
/// it; they are `#[ignore]`d, and `scripts/test` runs them when it is set.
///
/// # Panics
/// With [`NEEDS_KAFKA`] when `KAFKA_BOOTSTRAP` is unset or empty.
pub fn real_kafka() -> String {
    std::env::var("KAFKA_BOOTSTRAP")
        .ok()
        .filter(|s| !s.is_empty())
        .expect(NEEDS_KAFKA)
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
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn,txbox=info,txbox_relay=info".into()),
            )
            .with_test_writer()
            .try_init();
    });
}
