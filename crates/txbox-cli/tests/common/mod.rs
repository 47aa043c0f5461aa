//! Helpers shared by the CLI's tests.

#![allow(dead_code)]

use std::process::{Command, Output};
use std::time::Duration;

use txbox::rdkafka::config::ClientConfig;
use txbox::rdkafka::consumer::{BaseConsumer, Consumer};
use txbox_testkit::TestDb;

/// Runs the `txbox` binary on `db` with `args`, without the caller's
/// TXBOX_SCHEMA or TXBOX_KAFKA_BOOTSTRAP.
pub fn txbox(db: &TestDb, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_txbox"))
        .args(["--database-url", db.url()])
        .args(args)
        .env_remove("TXBOX_SCHEMA")
        .env_remove("TXBOX_KAFKA_BOOTSTRAP")
        .output()
        .expect("run txbox")
}

/// Waits until the broker reports `ends` as the partitions' log ends.
pub async fn wait_log_ends(bootstrap: &str, topic: &str, ends: &[i64]) {
    let (bootstrap, topic, ends) = (bootstrap.to_owned(), topic.to_owned(), ends.to_vec());
    tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .expect("client");
        for _ in 0..300 {
            let now: Vec<i64> = (0..ends.len())
                .map(|p| {
                    client
                        .fetch_watermarks(&topic, p as i32, Duration::from_secs(5))
                        .map_or(-1, |w| w.1)
                })
                .collect();
            if now == ends {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("log ends never reached {ends:?}");
    })
    .await
    .expect("watermark wait");
}
