//! A private Apache Kafka broker that a test can kill and start again.
//!
//! Tests share one broker ([`crate::kafka`]), so no test may stop it. A
//! test that needs the broker itself to fail (`kill -9` of the JVM
//! mid-stream, then a restart with the same data on the same port) starts
//! its own with [`KafkaServer::start`].
//!
//! The broker is the single-node KRaft configuration of `dev/kafka`, run
//! by `scripts/kafka` (the same script `scripts/dev-up` uses) from a
//! temporary directory. A watchdog ends the broker and removes its
//! directory when the test process exits, even on a panic or SIGKILL.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::Broker;

/// A private Apache Kafka broker, stopped and removed when dropped.
#[derive(Debug)]
pub struct KafkaServer {
    dir: PathBuf,
    bootstrap: String,
}

impl KafkaServer {
    /// Starts a broker in a fresh temporary directory on a free loopback
    /// port, and returns once it serves clients.
    ///
    /// # Panics
    /// If the broker cannot be started: the panic carries the script's
    /// message (for example that Java or Maven is missing) and log tail.
    pub async fn start() -> KafkaServer {
        let dir =
            std::env::temp_dir().join(format!("txbox-kafka-{}", uuid::Uuid::new_v4().simple()));
        tokio::task::spawn_blocking(move || {
            let bootstrap =
                run_script(&["start", &dir.display().to_string(), "--watch", &watched()]);
            KafkaServer { dir, bootstrap }
        })
        .await
        .expect("KafkaServer::start panicked")
    }

    /// The broker's bootstrap address (the same across restarts).
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// A [`Broker`] handle for topics and clients.
    pub fn broker(&self) -> Broker {
        Broker::at(&self.bootstrap)
    }

    /// Kills the broker as a crash does (`SIGKILL` of the JVM: nothing is
    /// flushed or handed over) and returns once the process is gone.
    pub async fn kill(&self) {
        let dir = self.dir.display().to_string();
        tokio::task::spawn_blocking(move || run_script(&["stop", &dir, "--kill"]))
            .await
            .expect("KafkaServer::kill panicked");
    }

    /// Starts the broker again with the same data on the same port, and
    /// returns once it serves clients (after log recovery).
    pub async fn restart(&self) {
        let dir = self.dir.display().to_string();
        let bootstrap = tokio::task::spawn_blocking(move || {
            run_script(&["start", &dir, "--watch", &watched()])
        })
        .await
        .expect("KafkaServer::restart panicked");
        assert_eq!(bootstrap, self.bootstrap, "restarted on another address");
    }
}

impl Drop for KafkaServer {
    fn drop(&mut self) {
        let _ = script()
            .args(["stop", &self.dir.display().to_string(), "--kill"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The process whose end ends the broker: this test process.
fn watched() -> String {
    std::process::id().to_string()
}

fn script() -> Command {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/kafka");
    let mut cmd = Command::new("bash");
    cmd.arg(path).stdin(Stdio::null());
    cmd
}

/// Runs `scripts/kafka` with `args`; returns its standard output, trimmed.
fn run_script(args: &[&str]) -> String {
    let output = script()
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/kafka: {e}"));
    assert!(
        output.status.success(),
        "scripts/kafka {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}
