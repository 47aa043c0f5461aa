//! Child processes that tests kill at named crash points.
//!
//! A binary built with txbox's `failpoints` feature, started with
//! `FAILPOINTS=<point>=return` (or `N*off->return` to fire on the N+1th
//! pass), prints `TXBOX_CRASH_POINT <point>` when it reaches the point and
//! then stops making progress; [`Child::kill_at`] waits for that line and
//! sends SIGKILL, so the process dies exactly there, with no cleanup.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child as TokioChild, Command};
use tokio::sync::Notify;

/// A running child process whose stderr is captured.
#[derive(Debug)]
pub struct Child {
    child: TokioChild,
    lines: Arc<Mutex<Vec<String>>>,
    new_line: Arc<Notify>,
}

impl Child {
    /// Starts `program` with `args` and extra environment `envs`.
    ///
    /// # Panics
    /// If it cannot be started.
    pub fn spawn(program: &Path, args: &[&str], envs: &[(&str, &str)]) -> Child {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let new_line = Arc::new(Notify::new());
        if let Some(stderr) = child.stderr.take() {
            let lines = lines.clone();
            let notify = new_line.clone();
            let echo = std::env::var_os("TXBOX_TEST_ECHO_CHILD").is_some();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    if echo {
                        eprintln!("[child] {line}");
                    }
                    lines
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(line);
                    notify.notify_waiters();
                }
                notify.notify_waiters();
            });
        }
        Child {
            child,
            lines,
            new_line,
        }
    }

    /// Waits until a stderr line contains `pattern`. Returns false on timeout.
    pub async fn wait_for_stderr(&self, pattern: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.new_line.notified();
            if self.stderr_contains(pattern) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.stderr_contains(pattern);
            }
        }
    }

    /// True if any stderr line so far contains `pattern`.
    pub fn stderr_contains(&self, pattern: &str) -> bool {
        self.lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .any(|l| l.contains(pattern))
    }

    /// All stderr so far.
    pub fn stderr(&self) -> String {
        self.lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .join("\n")
    }

    /// Waits for crash point `point` and SIGKILLs the process there.
    ///
    /// # Panics
    /// If the point is not reached within `timeout` (with the child's stderr).
    pub async fn kill_at(&mut self, point: &str, timeout: Duration) {
        let line = format!("TXBOX_CRASH_POINT {point}");
        if !self.wait_for_stderr(&line, timeout).await {
            let _ = self.child.start_kill();
            panic!(
                "crash point {point} not reached in {timeout:?}; stderr:\n{}",
                self.stderr()
            );
        }
        self.kill().await;
    }

    /// Waits until the process has stopped itself at crash point `point`,
    /// whose action is `return(freeze)` (it announces
    /// `TXBOX_CRASH_POINT <point> (frozen)`); [`Child::thaw`] resumes it.
    ///
    /// # Panics
    /// If the point is not reached within `timeout` (with the child's stderr).
    pub async fn wait_frozen_at(&self, point: &str, timeout: Duration) {
        let line = format!("TXBOX_CRASH_POINT {point} (frozen)");
        assert!(
            self.wait_for_stderr(&line, timeout).await,
            "crash point {point} not reached in {timeout:?}; stderr:\n{}",
            self.stderr()
        );
    }

    /// SIGKILL now, and reap.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// SIGTERM (graceful stop request).
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// SIGTERM, then waits up to 30 s for a clean exit.
    ///
    /// # Panics
    /// If it is still running then, or exits with anything but code 0
    /// (with its stderr).
    pub async fn stop(&mut self) {
        self.terminate();
        let code = self.wait_within(Duration::from_secs(30)).await;
        assert_eq!(
            code,
            Some(0),
            "a clean exit on SIGTERM; stderr:\n{}",
            self.stderr()
        );
    }

    /// SIGSTOP: freezes the process (a stand-in for a long GC pause or a
    /// descheduled VM): no heartbeats, no progress, connections stay open.
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    /// SIGCONT: resumes a frozen process.
    pub fn thaw(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args([&format!("-{name}"), &pid.to_string()])
                .status();
        }
    }

    /// True once the process has exited (on its own or killed).
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits for exit; returns the exit code (None if killed by a signal).
    pub async fn wait(&mut self) -> Option<i32> {
        self.child.wait().await.ok().and_then(|s| s.code())
    }

    /// [`wait`](Self::wait), for at most `timeout`.
    ///
    /// # Panics
    /// If it is still running then (with its stderr).
    pub async fn wait_within(&mut self, timeout: Duration) -> Option<i32> {
        match tokio::time::timeout(timeout, self.wait()).await {
            Ok(code) => code,
            Err(_) => panic!(
                "still running after {timeout:?}; stderr:\n{}",
                self.stderr()
            ),
        }
    }
}

/// What [`run_for`] saw of a process.
#[derive(Debug)]
pub struct Run {
    /// The exit code, if it exited by itself within the time given.
    pub exit: Option<i32>,
    /// Its stdout, then its stderr.
    pub output: String,
    /// How long it ran.
    pub elapsed: Duration,
}

/// Runs `program` with `args`, without the caller's `TXBOX_*` variables but
/// with `envs`, for at most `within` (then SIGTERM, and SIGKILL 10 s
/// later), capturing stdout and stderr.
///
/// # Panics
/// If it cannot be started.
pub async fn run_for(
    program: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
    within: Duration,
) -> Run {
    use tokio::io::AsyncReadExt;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, _) in std::env::vars() {
        if k.starts_with("TXBOX_") && k != "TXBOX_KAFKA_LIBS" {
            cmd.env_remove(k);
        }
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let start = std::time::Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    let read = |pipe: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>| {
        tokio::spawn(async move {
            let mut text = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut text).await;
            }
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let out = read(child.stdout.take().map(|p| Box::new(p) as _));
    let err = read(child.stderr.take().map(|p| Box::new(p) as _));
    let exit = match tokio::time::timeout(within, child.wait()).await {
        Ok(status) => status.ok().and_then(|s| s.code()),
        Err(_) => {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
            None
        }
    };
    let elapsed = start.elapsed();
    let output = format!(
        "{}{}",
        out.await.unwrap_or_default(),
        err.await.unwrap_or_default()
    );
    Run {
        exit,
        output,
        elapsed,
    }
}

impl Run {
    /// # Panics
    /// If `secret` appears in the output (`what` names the run).
    pub fn assert_hides(&self, what: &str, secret: &str) {
        assert!(
            !self.output.contains(secret),
            "{what}: the secret was shown:\n{}",
            self.output
        );
    }

    /// # Panics
    /// Unless it exited by itself with a non-zero code and its output
    /// contains `says` (`what` names the run).
    pub fn assert_refused(&self, what: &str, says: &str) {
        assert!(
            self.exit.is_some_and(|c| c != 0) && self.output.contains(says),
            "{what}: a non-zero exit saying {says:?}, got {:?} after {:?}:\n{}",
            self.exit,
            self.elapsed,
            self.output
        );
    }
}
