//! The inbox side of `txbox status`: stored positions against the log's
//! end, and dead letters per group.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use txbox::Schema;

use crate::brokers::Log;

/// How long to wait for the message at a stored position, to date it.
const DATE_WAIT: Duration = Duration::from_secs(2);

/// One consumer group's partition.
#[derive(Debug, Serialize)]
pub(crate) struct InboxPartition {
    pub(crate) group: String,
    pub(crate) topic: String,
    pub(crate) partition: i32,
    /// The stored next offset.
    pub(crate) next_offset: i64,
    pub(crate) owner: Option<String>,
    pub(crate) epoch: i64,
    pub(crate) updated_at: DateTime<Utc>,
    /// Messages applied, dropped as duplicates and dead-lettered on this
    /// partition, ever (committed with the effects, so they survive
    /// restarts).
    pub(crate) applied: i64,
    pub(crate) duplicates: i64,
    pub(crate) dead_lettered: i64,
    /// The brokers' high watermark (`None`: no brokers given, or unreadable).
    pub(crate) log_end: Option<i64>,
    /// Messages between the stored position and the log end.
    pub(crate) lag: Option<i64>,
    /// Age of the message at the stored position (0 without lag).
    pub(crate) lag_seconds: Option<f64>,
    /// Why the log end is unknown, when brokers were given.
    pub(crate) log_error: Option<String>,
}

/// Dead letters of one consumer group.
#[derive(Debug, Serialize)]
pub(crate) struct GroupDeadLetters {
    pub(crate) group: String,
    pub(crate) count: i64,
}

/// A stored position as read.
#[derive(sqlx::FromRow)]
struct OffsetRow {
    consumer_group: String,
    topic: String,
    partition: i32,
    next_offset: i64,
    owner: Option<String>,
    epoch: i64,
    updated_at: DateTime<Utc>,
    applied: i64,
    duplicates: i64,
    dead_lettered: i64,
}

/// Every stored position, with the log end and lag when `log` is given.
pub(crate) async fn partitions(
    pool: &PgPool,
    schema: &Schema,
    log: Option<Log>,
) -> anyhow::Result<Vec<InboxPartition>> {
    let rows: Vec<OffsetRow> = sqlx::query_as(&format!(
        "SELECT consumer_group, topic, partition, next_offset, owner, epoch, updated_at,
                applied, duplicates, dead_lettered
           FROM {} ORDER BY consumer_group, topic, partition",
        schema.table("inbox_offsets")
    ))
    .fetch_all(pool)
    .await?;
    let mut out: Vec<InboxPartition> = rows
        .into_iter()
        .map(|r| InboxPartition {
            group: r.consumer_group,
            topic: r.topic,
            partition: r.partition,
            next_offset: r.next_offset,
            owner: r.owner,
            epoch: r.epoch,
            updated_at: r.updated_at,
            applied: r.applied,
            duplicates: r.duplicates,
            dead_lettered: r.dead_lettered,
            log_end: None,
            lag: None,
            lag_seconds: None,
            log_error: None,
        })
        .collect();
    let Some(log) = log else {
        return Ok(out);
    };
    out = tokio::task::spawn_blocking(move || {
        measure(&log, &mut out);
        out
    })
    .await?;
    Ok(out)
}

/// Fills in log ends and lags; after the first broker error the remaining
/// partitions get the same error instead of waiting for it again.
fn measure(log: &Log, partitions: &mut [InboxPartition]) {
    let mut failed: Option<String> = None;
    let now = Utc::now().timestamp_millis();
    for p in partitions {
        if let Some(e) = &failed {
            p.log_error = Some(e.clone());
            continue;
        }
        match log.bounds(&p.topic, p.partition) {
            Ok((low, high)) => {
                let lag = high.saturating_sub(p.next_offset).max(0);
                p.log_end = Some(high);
                p.lag = Some(lag);
                p.lag_seconds = if lag == 0 {
                    Some(0.0)
                } else {
                    log.timestamp_at(&p.topic, p.partition, p.next_offset.max(low), DATE_WAIT)
                        .ok()
                        .flatten()
                        .map(|ts| (now.saturating_sub(ts)).max(0) as f64 / 1000.0)
                };
            }
            Err(e) => {
                let e = format!("{e:#}");
                p.log_error = Some(e.clone());
                failed = Some(e);
            }
        }
    }
}

/// Dead letters per consumer group.
pub(crate) async fn dead_letters(
    pool: &PgPool,
    schema: &Schema,
) -> anyhow::Result<Vec<GroupDeadLetters>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT consumer_group, count(*) FROM {} GROUP BY consumer_group ORDER BY consumer_group",
        schema.table("inbox_dead_letters")
    ))
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(group, count)| GroupDeadLetters { group, count })
        .collect())
}
