//! How far a stream is behind: the outbox rows past its stored position.
//!
//! One query serves both `txbox status` (exact, on demand) and the relay's
//! `txbox_relay_backlog_rows` and `txbox_relay_oldest_unpublished_seconds`
//! gauges (bounded, every [`REFRESH`]).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::error::Result;

/// How often the relay refreshes a stream's backlog gauges.
pub(crate) const REFRESH: Duration = Duration::from_secs(5);

/// The most rows the relay's gauges count per refresh: the cost of one
/// refresh is that of reading this many entries of the outbox's primary
/// key (and their rows, for `created_at`), however large the backlog.
pub(crate) const GAUGE_LIMIT: i64 = 100_000;

/// Measures the outbox rows of a stream past its stored position (the one
/// in `relay_streams`; the start for a stream without a row there).
///
/// # Examples
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> txbox_relay::Result<()> {
/// use txbox_relay::Backlogs;
///
/// let backlogs = Backlogs::new(&txbox::Schema::default());
/// let b = backlogs.measure(&pool, 0, Some(10_000)).await?;
/// println!("{} rows waiting, the oldest for {:?}", b.rows, b.oldest_age);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Backlogs {
    sql: String,
}

/// What [`Backlogs::measure`] found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Backlog {
    /// Rows past the position (at most the limit asked for).
    pub rows: i64,
    /// The earliest `created_at` (its transaction's start) among them.
    pub oldest_at: Option<DateTime<Utc>>,
    /// How long ago that was (`None`: no row).
    pub oldest_age: Option<Duration>,
}

impl Backlogs {
    /// The backlog query for the txbox schema `schema`.
    pub fn new(schema: &txbox::Schema) -> Self {
        Backlogs {
            // The position is a lateral input, so the rows are an index
            // range scan of the primary key, in publishing order, and stop
            // at the limit (`LIMIT NULL` is no limit).
            sql: format!(
                "SELECT count(*), min(b.created_at),
                        extract(epoch FROM now() - min(b.created_at))::float8
                   FROM (SELECT coalesce((SELECT position_txid FROM {streams} WHERE stream = $1), '0') AS txid,
                                coalesce((SELECT position_id FROM {streams} WHERE stream = $1), 0) AS id) p
                  CROSS JOIN LATERAL (
                        SELECT o.created_at FROM {outbox} o
                         WHERE o.stream = $1 AND (o.txid, o.id) > (p.txid, p.id)
                         ORDER BY o.txid, o.id
                         LIMIT $2) b",
                streams = schema.table("relay_streams"),
                outbox = schema.table("outbox"),
            ),
        }
    }

    /// The rows of `stream` past its stored position, counting at most
    /// `limit` of them (`None`: all) in publishing order; the oldest is
    /// the oldest of those counted.
    pub async fn measure(&self, pool: &PgPool, stream: i32, limit: Option<i64>) -> Result<Backlog> {
        let (rows, oldest_at, age): (i64, Option<DateTime<Utc>>, Option<f64>) =
            sqlx::query_as(&self.sql)
                .bind(stream)
                .bind(limit)
                .fetch_one(pool)
                .await?;
        Ok(Backlog {
            rows,
            oldest_at,
            oldest_age: age.map(|a| Duration::try_from_secs_f64(a.max(0.0)).unwrap_or_default()),
        })
    }
}

/// Sets `stream`'s backlog gauges now and every [`REFRESH`] until
/// `cancel`, counting at most [`GAUGE_LIMIT`] rows.
pub(crate) fn spawn_gauges(
    backlogs: Backlogs,
    pool: PgPool,
    stream: i32,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let label = stream.to_string();
        loop {
            let measured = tokio::select! {
                () = cancel.cancelled() => return,
                m = backlogs.measure(&pool, stream, Some(GAUGE_LIMIT)) => m,
            };
            match measured {
                Ok(m) => {
                    metrics::gauge!("txbox_relay_backlog_rows", "stream" => label.clone())
                        .set(m.rows as f64);
                    metrics::gauge!("txbox_relay_oldest_unpublished_seconds", "stream" => label.clone())
                        .set(m.oldest_age.map_or(0.0, |a| a.as_secs_f64()));
                }
                Err(e) => tracing::debug!(stream, error = %e, "backlog measurement failed"),
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(REFRESH) => {}
            }
        }
    })
}
