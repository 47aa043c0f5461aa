//! Gap-safe reading of the outbox: `(txid, id)` order, below the snapshot's
//! `xmin`.
//!
//! # Why `(txid, id)` and `xmin`
//!
//! Outbox ids come from a sequence, and sequence values are handed out at
//! insert time, not at commit time. A relay that reads "ids after the last
//! one I published" skips a row whose transaction took id 7 but committed
//! after the transaction holding id 8 was read: that row is lost for good.
//!
//! Instead every row carries `txid` (the writing transaction's `xid8`), and
//! the relay reads in `(txid, id)` order, but only rows whose transaction
//! is older than `pg_snapshot_xmin(pg_current_snapshot())`, the oldest
//! transaction still running anywhere in the cluster. Every transaction
//! below `xmin` has finished (committed or rolled back), so no row can
//! later appear behind the position: nothing is skipped, and rolled-back
//! rows never exist.
//!
//! # The cost
//!
//! One long transaction (any transaction with an xid, in any database of
//! the cluster) holds `xmin` back, so rows committed after it started wait
//! until it ends. [`hold_back`] names that transaction; the relay logs it
//! when it is older than `hold_back_warn` and exports its age as the
//! `txbox_relay_held_back_seconds` gauge. Keep transactions short, or run
//! the relay's database on its own cluster.

use std::fmt;
use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{Error, Result};

/// Where a stream stands: the last published `(txid, id)`.
///
/// Positions order by transaction id first, then row id, the order in
/// which the relay publishes.
///
/// # Examples
///
/// ```
/// use txbox_relay::Position;
///
/// let a = Position { txid: 750, id: 9 };
/// let b = Position { txid: 751, id: 3 };
/// assert!(a < b); // a later transaction comes after, whatever its row ids
/// assert!(Position::START < a);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// The transaction id (`xid8`) of the last published row.
    pub txid: u64,
    /// The outbox `id` of the last published row.
    pub id: i64,
}

impl Position {
    /// Before every row.
    pub const START: Position = Position { txid: 0, id: 0 };

    /// Parses the `txid::text` form PostgreSQL returns.
    pub(crate) fn from_db(txid: &str, id: i64) -> Result<Self> {
        let txid = txid.parse().map_err(|_| {
            Error::config(format!("unexpected xid8 value {txid:?} from PostgreSQL"))
        })?;
        Ok(Position { txid, id })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({}, {})", self.txid, self.id)
    }
}

/// One committed outbox row, as read by the relay.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxRow {
    /// `outbox.id`.
    pub id: i64,
    /// The writing transaction's id.
    pub txid: u64,
    /// Destination topic.
    pub topic: String,
    /// Record key.
    pub key: Option<Vec<u8>>,
    /// Record value (`None`: tombstone).
    pub payload: Option<Vec<u8>>,
    /// Headers in txbox's stored form, as JSON text (see
    /// `txbox::Headers::from_json_str`).
    pub headers: String,
    /// The event id (also the `ce_id` header).
    pub event_id: Uuid,
}

impl OutboxRow {
    /// This row's position.
    pub fn position(&self) -> Position {
        Position {
            txid: self.txid,
            id: self.id,
        }
    }
}

type RawRow = (
    i64,
    String,
    String,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    String,
    Uuid,
);

/// Reads committed rows of one stream after a position.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> txbox_relay::Result<()> {
/// use txbox_relay::{Cursor, Position};
///
/// let cursor = Cursor::new(&txbox::Schema::default(), 0);
/// let rows = cursor.read(&pool, Position::START, 1000).await?;
/// for row in &rows {
///     println!("{} -> {}", row.position(), row.topic);
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Cursor {
    stream: i32,
    sql: String,
}

impl Cursor {
    /// A cursor over `stream` of the outbox in `schema`.
    pub fn new(schema: &txbox::Schema, stream: i32) -> Self {
        Cursor {
            stream,
            sql: format!(
                // Qualified names: an unqualified ORDER BY txid would sort
                // by the output column txid::text ("100" < "99").
                "SELECT o.id, o.txid::text AS txid_text, o.topic, o.key, o.payload, o.headers::text AS headers_text, o.event_id
                   FROM {outbox} o
                  WHERE o.stream = $1
                    AND (o.txid, o.id) > ($2::text::xid8, $3)
                    AND o.txid < pg_snapshot_xmin(pg_current_snapshot())
                  ORDER BY o.txid, o.id
                  LIMIT $4",
                outbox = schema.table("outbox")
            ),
        }
    }

    /// Up to `limit` rows after `after`, in `(txid, id)` order, from
    /// transactions that have all ended.
    pub async fn read(
        &self,
        pool: &PgPool,
        after: Position,
        limit: usize,
    ) -> Result<Vec<OutboxRow>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let raw: Vec<RawRow> = sqlx::query_as(&self.sql)
            .bind(self.stream)
            .bind(after.txid.to_string())
            .bind(after.id)
            .bind(limit)
            .fetch_all(pool)
            .await?;
        raw.into_iter()
            .map(|(id, txid, topic, key, payload, headers, event_id)| {
                let txid = Position::from_db(&txid, id)?.txid;
                Ok(OutboxRow {
                    id,
                    txid,
                    topic,
                    key,
                    payload,
                    headers,
                    event_id,
                })
            })
            .collect()
    }
}

/// The oldest running transaction that holds the relay back.
#[derive(Clone, Debug, PartialEq)]
pub struct HeldBack {
    /// Backend process id (`pg_stat_activity.pid`; `pg_cancel_backend` it).
    pub pid: i32,
    /// How long the transaction has run.
    pub age: Duration,
    /// How many transaction ids were assigned since its own (`age(backend_xid)`).
    pub xid_age: i32,
    /// The database it runs in.
    pub database: Option<String>,
    /// When its current (or last) query started, as PostgreSQL prints it.
    pub query_start: Option<String>,
    /// The start of that query's text.
    pub query: Option<String>,
}

/// Finds the oldest running transaction that has a transaction id, other
/// than this session's. It sets the snapshot's `xmin`, so rows of every
/// transaction that started after it wait until it ends.
///
/// Returns `None` when no other transaction with an xid is running.
/// Prepared (two-phase) transactions hold `xmin` back too but have no
/// backend; they are not reported here (see `pg_prepared_xacts`).
pub async fn hold_back(pool: &PgPool) -> Result<Option<HeldBack>> {
    type Raw = (
        i32,
        f64,
        i32,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let row: Option<Raw> = sqlx::query_as(
        "SELECT pid,
                extract(epoch FROM (now() - xact_start))::float8,
                age(backend_xid),
                datname::text,
                query_start::text,
                left(query, 200)
           FROM pg_stat_activity
          WHERE backend_xid IS NOT NULL
            AND pid <> pg_backend_pid()
          ORDER BY age(backend_xid) DESC
          LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(
        |(pid, secs, xid_age, database, query_start, query)| HeldBack {
            pid,
            age: Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or_default(),
            xid_age,
            database,
            query_start,
            query,
        },
    ))
}

/// Checks [`hold_back`] periodically until `cancel`: sets the
/// `txbox_relay_held_back_seconds` gauge, and warns (once per offending
/// backend and then every `warn_after`) when the oldest transaction is at
/// least `warn_after` old.
pub(crate) fn spawn_hold_back_monitor(
    pool: PgPool,
    warn_after: Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    tokio::spawn(async move {
        let every = (warn_after / 4).clamp(Duration::from_secs(1), Duration::from_secs(10));
        let mut last_warn: Option<(i32, tokio::time::Instant)> = None;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            match hold_back(&pool).await {
                Ok(Some(h)) => {
                    metrics::gauge!("txbox_relay_held_back_seconds").set(h.age.as_secs_f64());
                    let due = match last_warn {
                        Some((pid, at)) => pid != h.pid || at.elapsed() >= warn_after,
                        None => true,
                    };
                    if h.age >= warn_after && due {
                        tracing::warn!(
                            pid = h.pid,
                            age_s = h.age.as_secs(),
                            xid_age = h.xid_age,
                            database = h.database.as_deref().unwrap_or("?"),
                            query_start = h.query_start.as_deref().unwrap_or("?"),
                            query = h.query.as_deref().unwrap_or(""),
                            "a long-running transaction holds the relay back: rows committed after it started \
                             are not published until it ends"
                        );
                        last_warn = Some((h.pid, tokio::time::Instant::now()));
                    }
                }
                Ok(None) => metrics::gauge!("txbox_relay_held_back_seconds").set(0.0),
                Err(e) => tracing::debug!(error = %e, "hold-back check failed"),
            }
        }
    });
}
