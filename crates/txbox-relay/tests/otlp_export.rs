//! `txbox-relay --otlp-endpoint` (feature `otlp`) exports its spans over
//! OTLP/HTTP: a collector stand-in receives `POST /v1/traces` bodies
//! (protobuf) naming the service and the relay's batch spans, flushed at
//! shutdown. Real PostgreSQL and Apache Kafka.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;
use txbox_testkit::process::Child;
use txbox_testkit::{kafka, unique_name, TestDb};

/// One request the collector received: request line, content type, body.
#[derive(Debug, Clone)]
struct Export {
    request_line: String,
    content_type: String,
    body: Vec<u8>,
}

/// An HTTP/1.1 server answering every request `200 OK`, keeping them.
async fn collector() -> (String, Arc<Mutex<Vec<Export>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let keep = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let keep = keep.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                loop {
                    let mut request_line = String::new();
                    if stream.read_line(&mut request_line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let (mut length, mut content_type) = (0usize, String::new());
                    loop {
                        let mut line = String::new();
                        stream.read_line(&mut line).await.unwrap();
                        let line = line.trim_end();
                        if line.is_empty() {
                            break;
                        }
                        let (name, value) = line.split_once(':').unwrap_or((line, ""));
                        match name.to_ascii_lowercase().as_str() {
                            "content-length" => length = value.trim().parse().unwrap(),
                            "content-type" => content_type = value.trim().to_owned(),
                            _ => {}
                        }
                    }
                    let mut body = vec![0; length];
                    stream.read_exact(&mut body).await.unwrap();
                    keep.lock().unwrap().push(Export {
                        request_line: request_line.trim_end().to_owned(),
                        content_type,
                        body,
                    });
                    stream
                        .get_mut()
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await
                        .unwrap();
                }
            });
        }
    });
    (url, seen)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_exports_its_batch_spans_to_an_otlp_collector() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let db = TestDb::new().await;
    let topic = broker.topic("otlp", 1).await;
    stage_many(db.pool(), &topic, 30, 3, 10).await;
    let (endpoint, exports) = collector().await;
    let instance = unique_name("otlp-relay");
    let args = binary_args(
        &db,
        broker.bootstrap(),
        &["--otlp-endpoint", &endpoint, "--instance", &instance],
    );
    let mut relay = Child::spawn(
        Path::new(env!("CARGO_BIN_EXE_txbox-relay")),
        &args,
        &[("RUST_LOG", "info")],
    );
    drained(db.pool(), Duration::from_secs(30)).await;
    relay.stop().await;

    let exports = exports.lock().unwrap().clone();
    assert!(
        !exports.is_empty(),
        "nothing exported; relay log:\n{}",
        relay.stderr()
    );
    for e in &exports {
        assert_eq!(e.request_line, "POST /v1/traces HTTP/1.1");
        assert_eq!(e.content_type, "application/x-protobuf");
    }
    let body: Vec<u8> = exports.iter().flat_map(|e| e.body.clone()).collect();
    assert!(contains(&body, b"txbox-relay"), "service.name is exported");
    assert!(
        contains(&body, b"txbox.relay.batch"),
        "batch spans are exported"
    );
    assert!(contains(&body, b"acknowledged"), "with their outcome");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_is_not_an_http_url_is_refused_at_start() {
    let db = TestDb::new().await;
    let args = binary_args(
        &db,
        "127.0.0.1:1",
        &["--otlp-endpoint", "grpc://collector:4317"],
    );
    let mut relay = Child::spawn(Path::new(env!("CARGO_BIN_EXE_txbox-relay")), &args, &[]);
    let code = relay.wait_within(Duration::from_secs(30)).await;
    assert_ne!(code, Some(0), "{}", relay.stderr());
    assert!(
        relay.stderr().contains("must be an http:// URL"),
        "{}",
        relay.stderr()
    );
}
