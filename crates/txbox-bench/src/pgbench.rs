//! The issue's own ceiling: `pgbench` running the reference scripts
//! (`pg-ceiling/inbox1.sql`, `inbox100.sql`, copied from
//! `shared/bench/pg-ceiling`) on the benchmark database.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;

use crate::Shape;

const INBOX1: &str = include_str!("../pg-ceiling/inbox1.sql");
const INBOX100: &str = include_str!("../pg-ceiling/inbox100.sql");

/// The pgbench binary, if installed.
pub(crate) fn find() -> Option<PathBuf> {
    let on_path = Command::new("pgbench")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success());
    if on_path.is_some() {
        return Some(PathBuf::from("pgbench"));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin/pgbench")))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop()
}

/// Runs the reference script for `shape` with `shape.partitions` clients;
/// returns messages/s (tps x batch).
pub(crate) fn run(
    pgbench: &PathBuf,
    opts: &PgConnectOptions,
    db: &str,
    shape: Shape,
    dur: Duration,
) -> anyhow::Result<f64> {
    let script = std::env::temp_dir().join(format!(
        "txbox-pgbench-{}.sql",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&script, if shape.batch == 1 { INBOX1 } else { INBOX100 })?;
    let clients = shape.partitions.to_string();
    let threads = shape.partitions.min(2).to_string();
    let out = Command::new(pgbench)
        .args([
            "-n",
            "-h",
            opts.get_host(),
            "-p",
            &opts.get_port().to_string(),
            "-U",
            opts.get_username(),
        ])
        .args([
            "-c",
            &clients,
            "-j",
            &threads,
            "-T",
            &dur.as_secs().to_string(),
        ])
        .arg("-f")
        .arg(&script)
        .arg(db)
        // The reference scripts name their tables unqualified.
        .env("PGOPTIONS", "-c search_path=ceiling,public")
        .output()?;
    let _ = std::fs::remove_file(&script);
    let text = String::from_utf8_lossy(&out.stdout);
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "pgbench printed no tps: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    Ok(tps * shape.batch as f64)
}
