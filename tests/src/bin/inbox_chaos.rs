//! A bank service process for crash tests: consumes deposits with a txbox
//! inbox until SIGTERM. Built with txbox's crash points; the test harness
//! sets `FAILPOINTS` and SIGKILLs it at one.
//!
//! Environment: TXBOX_DATABASE_URL, TXBOX_KAFKA_BOOTSTRAP, CHAOS_TOPIC,
//! CHAOS_GROUP, CHAOS_BATCH (default 10), CHAOS_SLOW_OFFSET (offset whose
//! handler sleeps CHAOS_SLOW_SECS, default 3, at its first attempt only),
//! CHAOS_SESSION_MS (classic protocol), CHAOS_GROUP_PROTOCOL (`classic`,
//! the default, or `consumer` for KIP-848 groups, whose session timeout the
//! broker sets), CHAOS_NAME
//! (the database sessions' `application_name`, recorded in the bank's
//! `effects.applied_by`), CHAOS_OUTBOX_TOPIC (the topic of the staged
//! events, default `balance-changed`), CHAOS_DEDUPE (`event-ids`, the
//! default, or `offsets-only`).

use std::time::Duration;

use anyhow::Context as _;
use txbox::inbox::{Dedupe, Inbox, RetryPolicy};
use txbox::{Outbox, Schema};
use txbox_tests::Bank;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _scenario = fail::FailScenario::setup();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,txbox=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let env = |k: &str| std::env::var(k).with_context(|| format!("{k} is not set"));
    let mut connect: sqlx::postgres::PgConnectOptions = env("TXBOX_DATABASE_URL")?.parse()?;
    if let Ok(name) = env("CHAOS_NAME") {
        connect = connect.application_name(&name);
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy_with(connect);
    let mut bank = Bank::new(Outbox::new(Schema::default()));
    if let Ok(topic) = env("CHAOS_OUTBOX_TOPIC") {
        bank = bank.publishing_to(topic);
    }
    if let Ok(offset) = env("CHAOS_SLOW_OFFSET") {
        let secs: u64 = std::env::var("CHAOS_SLOW_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3);
        bank = bank.slow_once_at(offset.parse()?, Duration::from_secs(secs));
    }
    let session_ms = std::env::var("CHAOS_SESSION_MS").unwrap_or_else(|_| "6000".into());
    let protocol = std::env::var("CHAOS_GROUP_PROTOCOL").unwrap_or_else(|_| "classic".into());
    let mut builder = Inbox::builder(pool)
        .brokers(&env("TXBOX_KAFKA_BOOTSTRAP")?)
        .group_id(env("CHAOS_GROUP")?)
        .handler(&env("CHAOS_TOPIC")?, bank)
        .batch_size(
            std::env::var("CHAOS_BATCH")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(10),
        )
        .retry(RetryPolicy::attempts(3).backoff(txbox::db::Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(200),
        )))
        .kafka_option("group.protocol", &protocol)
        .kafka_option("max.poll.interval.ms", &session_ms);
    if protocol == "classic" {
        // With the consumer protocol these are the broker's to set.
        builder = builder
            .kafka_option("session.timeout.ms", &session_ms)
            .kafka_option("heartbeat.interval.ms", "500");
    } else {
        // The inbox cannot read the broker's session timeout: keep its
        // transactions' idle bound below it by hand.
        let session: u64 = session_ms.parse().context("CHAOS_SESSION_MS")?;
        builder = builder.transaction_idle_timeout(Duration::from_millis(session * 2 / 3));
    }
    builder = builder.dedupe(match std::env::var("CHAOS_DEDUPE").as_deref() {
        Ok("offsets-only") => Dedupe::OffsetsOnly,
        Ok("event-ids") | Err(_) => Dedupe::EventIds,
        Ok(other) => anyhow::bail!("CHAOS_DEDUPE: {other:?} is not event-ids or offsets-only"),
    });
    let inbox = builder.build()?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    inbox
        .run(async move {
            term.recv().await;
        })
        .await?;
    Ok(())
}
