//! The `txbox-relay` binary's Prometheus endpoint (`--metrics-listen`),
//! scraped over HTTP while it publishes to Apache Kafka from a real PostgreSQL.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use txbox_testkit::process::Child;
use txbox_testkit::{kafka, TestDb};

fn relay_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_txbox-relay"))
}

/// `GET path` over plain HTTP/1.0: the status code and body, if it answers.
async fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: relay\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    conn.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// `GET /metrics`: the body of a 200 answer, if any.
async fn scrape(addr: &str) -> Option<String> {
    get(addr, "/metrics")
        .await
        .filter(|(status, _)| *status == 200)
        .map(|(_, body)| body)
}

/// Polls `GET path` until its status is `want`; returns the body.
async fn wait_status(addr: &str, path: &str, want: u16, relay: &Child) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let answer = get(addr, path).await;
        if let Some((status, body)) = &answer {
            if *status == want {
                return body.clone();
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "GET {path} never answered {want} (last: {answer:?}):\n{}",
            relay.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of the sample `name{labels}` in an exposition text.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_what_it_published_to_prometheus() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let broker = kafka().await;
    let topic = broker.topic("metrics", 1).await;
    stage_many(db.pool(), &topic, 30, 3, 10).await;
    let addr = format!("127.0.0.1:{}", txbox_testkit::free_port());
    let mut relay = Child::spawn(
        relay_bin(),
        &binary_args(
            &db,
            broker.bootstrap(),
            &["--metrics-listen", &addr, "--prune-interval", "50ms"],
        ),
        &[],
    );
    drained(db.pool(), Duration::from_secs(60)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = scrape(&addr).await.unwrap_or_default();
        if sample(&text, "txbox_relay_published_total{stream=\"0\"}") == Some(30.0) {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the endpoint does not report the 30 rows published: {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        text.contains("# TYPE txbox_relay_published_total counter"),
        "{text}"
    );
    assert_eq!(
        sample(&text, "txbox_relay_leader{stream=\"0\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        get(&addr, "/health").await,
        Some((200, "ok\n".into())),
        "liveness"
    );
    assert_eq!(
        wait_status(&addr, "/ready", 200, &relay).await,
        "ready\n",
        "holding its lease, with PostgreSQL and Kafka answering"
    );
    assert_eq!(get(&addr, "/nothing").await.map(|a| a.0), Some(404));
    relay.stop().await;
    assert!(
        !relay.stderr_contains("prune failed"),
        "the pruner stops before the pool closes:\n{}",
        relay.stderr()
    );
}

/// With brokers that do not answer, the relay keeps trying (its stream is
/// not stopped) and stays alive, but is not ready, and `/ready` says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_is_not_ready_while_kafka_does_not_answer() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let addr = format!("127.0.0.1:{}", txbox_testkit::free_port());
    let dead = format!("127.0.0.1:{}", txbox_testkit::free_port());
    let mut relay = Child::spawn(
        relay_bin(),
        &binary_args(&db, &dead, &["--metrics-listen", &addr]),
        &[],
    );
    let body = wait_status(&addr, "/ready", 503, &relay).await;
    assert!(
        body.starts_with("not ready\n") && body.contains("kafka: "),
        "{body}"
    );
    assert!(!body.contains("postgres: "), "PostgreSQL answers: {body}");
    assert_eq!(get(&addr, "/health").await.map(|a| a.0), Some(200));
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_metrics_address_is_an_error_at_start() {
    let db = TestDb::new().await;
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let mut relay = Child::spawn(
        relay_bin(),
        &[
            "--database-url",
            db.url(),
            "--brokers",
            "127.0.0.1:1",
            "--metrics-listen",
            &addr,
        ],
        &[],
    );
    let code = relay.wait_within(Duration::from_secs(30)).await;
    assert_eq!(code, Some(1));
    assert!(
        relay.stderr_contains(&format!("cannot listen on {addr}")),
        "{}",
        relay.stderr()
    );
}
