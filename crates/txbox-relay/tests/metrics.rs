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

/// `GET /metrics` over plain HTTP/1.0; the response body, if any.
async fn scrape(addr: &str) -> Option<String> {
    let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: relay\r\n\r\n")
        .await
        .ok()?;
    let mut response = String::new();
    conn.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.")
        .then(|| head.contains(" 200 "))
        .filter(|ok| *ok)
        .map(|_| body.to_owned())
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
        &binary_args(&db, broker.bootstrap(), &["--metrics-listen", &addr]),
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
    relay.terminate();
    let code = relay.wait_within(Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{}", relay.stderr());
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
        relay.stderr_contains(&format!("cannot serve metrics on {addr}")),
        "{}",
        relay.stderr()
    );
}
