//! The library's builders under hostile configuration: values an inbox
//! cannot work with are refused by `build`, with the field named; an
//! unreachable or password-refusing database ends `run` with an error
//! (bounded by the pool's acquire timeout) that shows no password; brokers
//! that do not answer end it at start with a Kafka error (bounded by the
//! 10 s metadata wait), before anything is written. Schema names:
//! tests/migrations.rs.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use txbox::inbox::{Handler, HandlerError, Inbox, InboxBuilder, InboxMessage, Tx};
use txbox_testkit::{free_port, RefusingPg, TestDb};

const PASSWORD: &str = "pw-library-hostile-0b7e";

struct Ignore;

#[async_trait]
impl Handler for Ignore {
    async fn handle(&self, _: &mut Tx, _: &InboxMessage) -> Result<(), HandlerError> {
        Ok(())
    }
}

fn builder(pool: PgPool, brokers: &str) -> InboxBuilder {
    Inbox::builder(pool)
        .brokers(brokers)
        .group_id("g")
        .handler("t", Ignore)
}

fn lazy(url: &str) -> PgPool {
    PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy(url)
        .unwrap()
}

#[tokio::test]
async fn unusable_inbox_settings_are_refused_by_build() {
    let pool = lazy("postgres://nobody@127.0.0.1:1/x");
    let cases: Vec<(InboxBuilder, &str)> = vec![
        (builder(pool.clone(), "k:9092").group_id(""), "group_id"),
        (builder(pool.clone(), ""), "brokers"),
        (
            Inbox::builder(pool.clone()).brokers("k:9092").group_id("g"),
            "handler",
        ),
        (
            builder(pool.clone(), "k:9092").lock_timeout(Duration::ZERO),
            "lock_timeout",
        ),
        (
            builder(pool.clone(), "k:9092").transaction_idle_timeout(Duration::ZERO),
            "transaction_idle_timeout",
        ),
        (
            builder(pool.clone(), "k:9092").kafka_option("session.timeout.ms", "-1"),
            "session.timeout.ms",
        ),
    ];
    for (b, says) in cases {
        let e = b.build().err().map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains(says)),
            "refused naming {says}: {e:?}"
        );
    }
    // A batch of 0 is taken as 1 (documented), not a stall.
    assert!(builder(pool, "k:9092").batch_size(0).build().is_ok());
}

/// Runs `inbox` until it ends or `within` passes (then asks it to stop);
/// returns its result, how long it ran, and whether it ended by itself.
async fn run(inbox: Inbox, within: Duration) -> (txbox::Result<()>, Duration, bool) {
    let start = Instant::now();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(inbox.run(async move {
        let _ = rx.await;
    }));
    let by_itself = tokio::time::sleep(within);
    tokio::pin!(by_itself);
    let mut task = task;
    let ended = tokio::select! {
        r = &mut task => return (r.unwrap(), start.elapsed(), true),
        () = &mut by_itself => false,
    };
    let _ = tx.send(());
    let r = tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("the inbox stops within 15 s of being asked")
        .unwrap();
    (r, start.elapsed(), ended)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_cannot_be_used_ends_run_with_an_error_and_no_password() {
    let refusing = RefusingPg::start().await;
    for (url, says) in [
        (
            format!("postgres://app:{PASSWORD}@127.0.0.1:{}/x", free_port()),
            "timed out",
        ),
        (
            format!("postgres://app:{PASSWORD}@127.0.0.1:{}/x", refusing.port()),
            "password authentication failed",
        ),
        (
            format!(
                "postgres://127.0.0.1:{}/x?user=app&password={PASSWORD}",
                refusing.port()
            ),
            "password authentication failed",
        ),
    ] {
        let inbox = builder(lazy(&url), "127.0.0.1:1").build().unwrap();
        let (result, took, by_itself) = run(inbox, Duration::from_secs(20)).await;
        assert!(by_itself, "{url}: ended by itself, after {took:?}");
        let e = format!(
            "{:?} / {}",
            result,
            result
                .as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default()
        );
        assert!(result.is_err() && e.contains(says), "{url}: {e}");
        assert!(!e.contains(PASSWORD), "the password in {e}");
    }
    assert!(refusing.passwords().iter().all(|p| p == PASSWORD));
    assert_eq!(
        refusing.passwords().len(),
        2,
        "the password really was sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_brokers_end_run_at_start_before_any_write() {
    let db = TestDb::new().await;
    let dead = format!("127.0.0.1:{}", free_port());
    let inbox = builder(db.pool().clone(), &dead).build().unwrap();
    let (result, took, by_itself) = run(inbox, Duration::from_secs(30)).await;
    assert!(by_itself, "ended by itself, after {took:?}");
    let e = result.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("kafka error"), "a Kafka error: {e}");
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM txbox.inbox_offsets")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(written, 0, "nothing written without brokers");
}
