//! The `txbox-relay` binary's log output: plain text without colour codes
//! when stderr is not a terminal, one JSON object per line with
//! `--log-format json`, and never the database password.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use txbox_testkit::process::Child;
use txbox_testkit::TestDb;

const PASSWORD: &str = "pw-never-logged-7f3a";

/// Runs the relay against `db` (its URL given with a password, which the
/// test server does not check) and brokers that do not answer, until it has
/// logged its start and a retry; returns its stderr.
async fn logs(db: &TestDb, format: &str) -> String {
    let url = db.url().replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{PASSWORD}@"),
        1,
    );
    assert_ne!(url, db.url(), "the URL carries a password");
    let dead = format!("127.0.0.1:{}", txbox_testkit::free_port());
    let mut relay = Child::spawn(
        Path::new(env!("CARGO_BIN_EXE_txbox-relay")),
        &[
            "--database-url",
            &url,
            "--brokers",
            &dead,
            "--log-format",
            format,
        ],
        &[("RUST_LOG", "info")],
    );
    assert!(
        relay
            .wait_for_stderr("relay starting", Duration::from_secs(30))
            .await,
        "{}",
        relay.stderr()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    relay.terminate();
    relay.wait_within(Duration::from_secs(30)).await;
    relay.stderr()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_to_a_pipe_have_no_colour_codes_and_no_password() {
    let db = TestDb::new().await;
    let text = logs(&db, "text").await;
    assert!(text.contains("configuration"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "ANSI escape in piped logs:\n{text}"
    );
    assert!(!text.contains(PASSWORD), "the password was logged:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let db = TestDb::new().await;
    let text = logs(&db, "json").await;
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 2, "{text}");
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "relay starting" && l["level"] == "INFO"),
        "{text}"
    );
    assert!(!text.contains(PASSWORD), "the password was logged:\n{text}");
}
