//! The `txbox-relay` binary's Prometheus endpoint (`--metrics-listen`),
//! scraped over HTTP while it publishes to Apache Kafka from a real
//! PostgreSQL (and, for a fenced producer, to librdkafka's mock cluster).
//! Each relay is a process of its own: its metrics are its alone.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use txbox::OutboxEvent;
use txbox_relay::Backlogs;
use txbox_testkit::process::Child;
use txbox_testkit::{kafka, unique_name, MockKafka, TestDb};

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

/// Scrapes until the sample `name{labels}` has a value `want` accepts;
/// returns that exposition text.
async fn wait_for_sample(
    addr: &str,
    name_and_labels: &str,
    want: impl Fn(f64) -> bool,
    relay: &Child,
) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = scrape(addr).await.unwrap_or_default();
        if sample(&text, name_and_labels).is_some_and(&want) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name_and_labels} never took the expected value: {text:?}\n{}",
            relay.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The relay binary in exactly-once mode against `bootstrap`, with the
/// position topic `positions` (default: one of its own) and transactional
/// ids of its own, then `extra`; and the address it serves metrics on.
fn exactly_once_relay(
    db: &TestDb,
    bootstrap: &str,
    positions: Option<&str>,
    extra: &[&str],
) -> (Child, String) {
    let addr = format!("127.0.0.1:{}", txbox_testkit::free_port());
    let txn = unique_name("txn");
    let own = unique_name("positions");
    let mut more = vec![
        "--metrics-listen",
        &addr,
        "--position-topic",
        positions.unwrap_or(&own),
        "--transactional-id-prefix",
        &txn,
    ];
    more.extend_from_slice(extra);
    let relay = Child::spawn(
        relay_bin(),
        &binary_args_in("exactly-once", db, bootstrap, &more),
        &[("RUST_LOG", "info")],
    );
    (relay, addr)
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
    let text = wait_for_sample(
        &addr,
        "txbox_relay_published_total{stream=\"0\"}",
        |v| v == 30.0,
        &relay,
    )
    .await;
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

/// Rows staged while another instance holds the stream (this relay is its
/// standby and publishes nothing) show in the backlog gauges, with the age
/// of the oldest; once this relay takes the stream and publishes them,
/// both gauges fall to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_gauges_show_what_waits_and_fall_to_zero_once_published() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let broker = kafka().await;
    let topic = broker.topic("backlog", 2).await;
    sqlx::query(
        "INSERT INTO txbox.relay_streams (stream, owner, fencing_token, lease_expires_at)
         VALUES (0, 'elsewhere', 1, now() + interval '1 hour')",
    )
    .execute(db.pool())
    .await
    .unwrap();
    stage_many(db.pool(), &topic, 40, 4, 10).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let addr = format!("127.0.0.1:{}", txbox_testkit::free_port());
    let mut relay = Child::spawn(
        relay_bin(),
        &binary_args(&db, broker.bootstrap(), &["--metrics-listen", &addr]),
        &[("RUST_LOG", "info")],
    );
    let rows = "txbox_relay_backlog_rows{stream=\"0\"}";
    let oldest = "txbox_relay_oldest_unpublished_seconds{stream=\"0\"}";
    let text = wait_for_sample(&addr, rows, |v| v == 40.0, &relay).await;
    let age = sample(&text, oldest).unwrap();
    assert!(
        (1.5..60.0).contains(&age),
        "oldest row's age {age}:\n{text}"
    );
    assert_eq!(
        relay_row(db.pool()).await.3,
        0,
        "the standby published nothing"
    );

    // The query behind the gauges counts up to its limit, in publishing order.
    let backlogs = Backlogs::new(&txbox::Schema::default());
    let all = backlogs.measure(db.pool(), 0, None).await.unwrap();
    let first = backlogs.measure(db.pool(), 0, Some(25)).await.unwrap();
    assert_eq!((all.rows, first.rows), (40, 25));
    assert_eq!(
        all.oldest_at, first.oldest_at,
        "the oldest row is among the first"
    );

    sqlx::query("UPDATE txbox.relay_streams SET owner = NULL, lease_expires_at = NULL")
        .execute(db.pool())
        .await
        .unwrap();
    drained(db.pool(), Duration::from_secs(60)).await;
    wait_for_sample(&addr, rows, |v| v == 0.0, &relay).await;
    wait_for_sample(&addr, oldest, |v| v == 0.0, &relay).await;
    relay.stop().await;
}

/// Exactly-once: every `commit_transaction` call is timed, the probe
/// transaction a leadership starts with and one per batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commit_histogram_times_every_kafka_commit() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let broker = kafka().await;
    let topic = broker.topic("commit-seconds", 2).await;
    stage_many(db.pool(), &topic, 30, 3, 10).await;
    let (mut relay, addr) =
        exactly_once_relay(&db, broker.bootstrap(), None, &["--batch-size", "10"]);
    drained(db.pool(), Duration::from_secs(60)).await;
    let batches = "txbox_relay_batches_total{stream=\"0\"}";
    let text = wait_for_sample(&addr, batches, |v| v >= 3.0, &relay).await;
    let batches = sample(&text, batches).unwrap();
    let commits = sample(&text, "txbox_relay_commit_seconds_count{stream=\"0\"}");
    let seconds = sample(&text, "txbox_relay_commit_seconds_sum{stream=\"0\"}");
    assert_eq!(commits, Some(batches + 1.0), "{text}");
    assert!(seconds.is_some_and(|s| s > 0.0 && s < 60.0), "{text}");
    relay.stop().await;
}

/// Exactly-once on Apache Kafka: a batch holding a row too large for its
/// topic is aborted, then its rows go one per transaction until the row
/// is refused alone (aborted too) and dead-lettered: two aborts, reason
/// `rejected`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_aborted_for_a_refused_row_are_counted() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let broker = kafka().await;
    let topic = broker
        .topic_with_configs("aborts", 1, &[("max.message.bytes", "4096")])
        .await;
    let mut events: Vec<OutboxEvent> = (0..5).map(|i| event(&topic, "small", 0, i)).collect();
    events.push(OutboxEvent::new(topic.clone(), vec![b'x'; 8000]).key("big"));
    stage(db.pool(), events).await;
    let (mut relay, addr) = exactly_once_relay(
        &db,
        broker.bootstrap(),
        None,
        &["--on-reject", "dead-letter"],
    );
    drained(db.pool(), Duration::from_secs(60)).await;
    let rejected = "txbox_relay_aborts_total{stream=\"0\",reason=\"rejected\"}";
    let text = wait_for_sample(&addr, rejected, |v| v >= 2.0, &relay).await;
    assert_eq!(sample(&text, rejected), Some(2.0), "{text}");
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM txbox.relay_dead_letters")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(dead, 1);
    relay.stop().await;
}

/// Exactly-once, the mock cluster answering one EndTxn with
/// PRODUCER_FENCED: that transaction never commits and is counted once,
/// with reason `fenced`; the relay starts a new producer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_transaction_is_counted() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let mock = MockKafka::new(3);
    let topic = unique_name("aborts-fenced");
    let positions = unique_name("positions");
    mock.create_topic(&topic, 3);
    // The mock has no CreateTopics; the relay finds the topic in metadata.
    mock.create_topic(&positions, 1);
    stage_many(db.pool(), &topic, 10, 2, 10).await;
    let (mut relay, addr) = exactly_once_relay(&db, &mock.bootstrap(), Some(&positions), &[]);
    drained(db.pool(), Duration::from_secs(60)).await;
    mock.cluster().request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
    );
    stage_many(db.pool(), &topic, 10, 2, 10).await;
    let fenced = "txbox_relay_aborts_total{stream=\"0\",reason=\"fenced\"}";
    let text = wait_for_sample(&addr, fenced, |v| v == 1.0, &relay).await;
    assert!(
        !text.contains("txbox_relay_aborts_total{stream=\"0\",reason=\"abandoned\"}"),
        "the fenced transaction is counted once: {text}"
    );
    // A new producer takes over. (Whether it publishes the rest cannot be
    // told here: the mock shows the fenced transaction's position record,
    // so the relay resumes after it.)
    assert!(
        relay
            .wait_for_stderr(
                "acquired stream lease stream=0 token=2",
                Duration::from_secs(30)
            )
            .await,
        "{}",
        relay.stderr()
    );
    relay.stop().await;
}
