//! What PostgreSQL did during a run, from its cumulative statistics: WAL
//! written, full-page images among it, blocks of chosen indexes read from
//! outside shared buffers (the OS page cache or the disk), and checkpoints
//! (after each, the first change to a page writes it whole).
//!
//! The counters are cluster-wide (`pg_stat_wal`) or per index
//! (`pg_statio_user_indexes`): a difference between two snapshots belongs
//! to the run between them only when nothing else writes, autovacuum
//! aside.
//!
//! Beside them, the CPU time the run took on this machine ([`crate::usage`]):
//! the benchmark's own process, PostgreSQL's and the broker's, per message.
//! It counts only when the server and the broker run here, and includes the
//! run's start (joining the group), which its messages/s leave out.

use std::time::Duration;

use sqlx::PgPool;

use crate::usage::{self, Usage};

/// How long after a run its statistics are all in the shared counters: a
/// busy backend hands its counts over at most once a second, an idle one
/// within 10 s (PostgreSQL's `PGSTAT_IDLE_INTERVAL`).
pub(crate) const SETTLE: Duration = Duration::from_millis(11_000);

/// Writes out every dirty buffer and starts the WAL's next checkpoint
/// cycle, so that what a run writes next pays its full-page images from a
/// known start (needs a superuser or `pg_checkpoint`).
pub(crate) async fn checkpoint(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql("CHECKPOINT").execute(pool).await?;
    Ok(())
}

/// One reading of the counters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Snapshot {
    wal_bytes: f64,
    wal_fpi: f64,
    index_blocks_read: f64,
    checkpoints: i64,
}

/// A run's share of the counters and of the CPU: per message, and the
/// checkpoints.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RunIo {
    /// WAL bytes.
    pub wal_bytes: f64,
    /// Full-page images: an 8 kB page written whole to the WAL, the first
    /// time it changes after a checkpoint.
    pub fpi: f64,
    /// Index blocks read from outside shared buffers.
    pub blocks_read: f64,
    /// Checkpoints (timed or requested) the checkpointer counted during
    /// the run, not per message. It reports them when a checkpoint ends,
    /// so one that began late in a run may be counted in the next.
    pub checkpoints: i64,
    /// CPU microseconds of the benchmark's own process (the consumer).
    pub cpu_own_us: f64,
    /// CPU microseconds of PostgreSQL's processes.
    pub cpu_postgres_us: f64,
    /// CPU microseconds of the broker (a JVM).
    pub cpu_broker_us: f64,
}

impl Snapshot {
    /// Reads the counters; `indexes` are the (schema-qualified where not
    /// on the search path) names of the indexes whose block reads count.
    pub(crate) async fn take(pool: &PgPool, indexes: &[&str]) -> anyhow::Result<Snapshot> {
        let (wal_bytes, wal_fpi): (f64, f64) =
            sqlx::query_as("SELECT wal_bytes::float8, wal_fpi::float8 FROM pg_stat_wal")
                .fetch_one(pool)
                .await?;
        let index_blocks_read: f64 = sqlx::query_scalar(
            "SELECT coalesce(sum(idx_blks_read), 0)::float8 FROM pg_statio_user_indexes
             WHERE indexrelid = ANY($1::text[]::regclass[])",
        )
        .bind(indexes)
        .fetch_one(pool)
        .await?;
        let checkpoints: i64 =
            sqlx::query_scalar("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter")
                .fetch_one(pool)
                .await?;
        Ok(Snapshot {
            wal_bytes,
            wal_fpi,
            index_blocks_read,
            checkpoints,
        })
    }

    /// What happened since `before`, divided over `messages` (the
    /// checkpoints are not divided).
    pub(crate) fn per_message(&self, before: &Snapshot, messages: usize, cpu: Usage) -> RunIo {
        let n = messages.max(1) as f64;
        let cpu = cpu.per_message(messages);
        RunIo {
            wal_bytes: (self.wal_bytes - before.wal_bytes) / n,
            fpi: (self.wal_fpi - before.wal_fpi) / n,
            blocks_read: (self.index_blocks_read - before.index_blocks_read) / n,
            checkpoints: self.checkpoints - before.checkpoints,
            cpu_own_us: cpu.own,
            cpu_postgres_us: cpu.postgres,
            cpu_broker_us: cpu.broker,
        }
    }
}

/// Runs `run`, waits for its statistics to settle, and returns its result
/// with its share of the counters, and the CPU it took, per message.
/// `before` must itself be a settled snapshot; the one returned is, for the
/// next run.
pub(crate) async fn measured<T>(
    pool: &PgPool,
    indexes: &[&str],
    messages: usize,
    before: Snapshot,
    run: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, RunIo, Snapshot)> {
    let (out, cpu) = usage::during(run).await?;
    tokio::time::sleep(SETTLE).await;
    let after = Snapshot::take(pool, indexes).await?;
    Ok((out, after.per_message(&before, messages, cpu), after))
}
