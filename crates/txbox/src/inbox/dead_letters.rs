//! Operating on the inbox's dead letters: list, replay (through the
//! handler of a running inbox) and discard, with an audit trail.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::error::{Error, Result};
use crate::headers::Headers;
use crate::schema::Schema;

/// Which dead letters an operation applies to. Every field narrows the
/// selection; [`DeadLetterFilter::default`] selects all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterFilter {
    /// Only these ids.
    pub ids: Option<Vec<i64>>,
    /// Only this consumer group.
    pub group: Option<String>,
    /// Only this topic.
    pub topic: Option<String>,
    /// Only this partition.
    pub partition: Option<i32>,
    /// Only those last failed at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only those last failed before this time.
    pub until: Option<DateTime<Utc>>,
    /// Only those whose error contains this text (case-insensitive).
    pub error_contains: Option<String>,
}

/// One dead letter, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Its id (`txbox dead-letters show ID`).
    pub id: i64,
    /// The consumer group that could not apply it.
    pub group: String,
    /// Where the message was.
    pub topic: String,
    /// Where the message was.
    pub partition: i32,
    /// Where the message was.
    pub offset: i64,
    /// The message's event id.
    pub event_id: String,
    /// The message's key, byte for byte.
    pub key: Option<Vec<u8>>,
    /// The message's payload, byte for byte.
    pub payload: Option<Vec<u8>>,
    /// The message's headers, byte for byte.
    pub headers: Headers,
    /// The last error, with its sources.
    pub error: String,
    /// Attempts made before it was dead-lettered.
    pub attempts: i32,
    /// When the first attempt failed.
    pub first_failed_at: DateTime<Utc>,
    /// When the last attempt failed.
    pub last_failed_at: DateTime<Utc>,
    /// When a replay was requested and not yet taken, if so.
    pub replay_requested_at: Option<DateTime<Utc>>,
    /// Replays that failed.
    pub replay_attempts: i32,
    /// Why the last replay failed.
    pub replay_error: Option<String>,
}

type Row = (
    i64,
    String,
    String,
    i32,
    i64,
    String,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    serde_json::Value,
    String,
    i32,
    DateTime<Utc>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    i32,
    Option<String>,
);

/// The inbox dead letters of one txbox schema.
///
/// Replay and discard are dry runs unless `execute` is true: they return
/// what they select (and would change) either way. Each replayed or
/// discarded dead letter leaves a row in `dead_letter_audit` with the dead
/// letter as it was, the actor and (for discards) the reason.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> txbox::Result<()> {
/// use txbox::inbox::{DeadLetterFilter, DeadLetters};
///
/// let dead = DeadLetters::new(txbox::Schema::default());
/// let filter = DeadLetterFilter {
///     group: Some("ledger".into()),
///     error_contains: Some("timeout".into()),
///     ..DeadLetterFilter::default()
/// };
/// for d in dead.list(&pool, &filter, 50).await? {
///     println!("{} {}/{}@{} {}", d.id, d.topic, d.partition, d.offset, d.error);
/// }
/// // The ledger's running inbox replays them through its handler.
/// let requested = dead.request_replay(&pool, &filter, "ops@example", true).await?;
/// println!("replay requested for {} dead letters", requested.len());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct DeadLetters {
    table: String,
    audit: String,
}

/// The filter's placeholders, `$1` to `$7`, in [`DeadLetters::bind`] order.
const WHERE: &str = "($1::int8[] IS NULL OR d.id = ANY($1))
      AND ($2::text IS NULL OR d.consumer_group = $2)
      AND ($3::text IS NULL OR d.topic = $3)
      AND ($4::int4 IS NULL OR d.partition = $4)
      AND ($5::timestamptz IS NULL OR d.last_failed_at >= $5)
      AND ($6::timestamptz IS NULL OR d.last_failed_at < $6)
      AND ($7::text IS NULL OR strpos(lower(d.error), lower($7)) > 0)";

impl DeadLetters {
    /// The dead letters in `schema`.
    pub fn new(schema: Schema) -> Self {
        DeadLetters {
            table: schema.table("inbox_dead_letters"),
            audit: schema.table("dead_letter_audit"),
        }
    }

    fn bind<'q>(
        q: sqlx::query::QueryAs<'q, sqlx::Postgres, Row, sqlx::postgres::PgArguments>,
        f: &'q DeadLetterFilter,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, Row, sqlx::postgres::PgArguments> {
        q.bind(f.ids.as_deref())
            .bind(f.group.as_deref())
            .bind(f.topic.as_deref())
            .bind(f.partition)
            .bind(f.since)
            .bind(f.until)
            .bind(f.error_contains.as_deref())
    }

    /// The selected dead letters, newest first, at most `limit`.
    pub async fn list(
        &self,
        pool: &PgPool,
        filter: &DeadLetterFilter,
        limit: i64,
    ) -> Result<Vec<DeadLetter>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM {} d WHERE {WHERE} ORDER BY d.id DESC LIMIT $8",
            self.table
        );
        let rows = Self::bind(sqlx::query_as(&sql), filter)
            .bind(limit.max(0))
            .fetch_all(pool)
            .await?;
        rows.into_iter().map(decode).collect()
    }

    /// Asks the running inboxes of each selected dead letter's group to
    /// replay it through their handler (see the module docs of the
    /// inbox's replay). With `execute` false, changes nothing. Returns the
    /// selected ids.
    pub async fn request_replay(
        &self,
        pool: &PgPool,
        filter: &DeadLetterFilter,
        actor: &str,
        execute: bool,
    ) -> Result<Vec<i64>> {
        let mut tx = pool.begin().await?;
        let sql = format!(
            "UPDATE {} AS d SET replay_requested_at = now(), replay_requested_by = $8
             WHERE {WHERE} RETURNING {COLUMNS}",
            self.table
        );
        let rows = Self::bind(sqlx::query_as(&sql), filter)
            .bind(actor)
            .fetch_all(&mut *tx)
            .await?;
        finish(tx, execute).await?;
        Ok(sorted_ids(&rows))
    }

    /// Deletes the selected dead letters, keeping each in
    /// `dead_letter_audit` with `actor` and `reason` (required: a discard
    /// says why). With `execute` false, changes nothing. Returns the
    /// selected ids.
    pub async fn discard(
        &self,
        pool: &PgPool,
        filter: &DeadLetterFilter,
        actor: &str,
        reason: &str,
        execute: bool,
    ) -> Result<Vec<i64>> {
        if reason.trim().is_empty() {
            return Err(Error::config("discarding dead letters needs a reason"));
        }
        let mut tx = pool.begin().await?;
        let sql = format!(
            "WITH gone AS (DELETE FROM {table} AS d WHERE {WHERE} RETURNING d.*),
                  audit AS (
                      INSERT INTO {audit} (kind, dead_letter_id, action, actor, reason, dead_letter)
                      SELECT 'inbox', g.id, 'discarded', $8, $9, to_jsonb(g) FROM gone g
                      RETURNING dead_letter_id)
             SELECT {COLUMNS} FROM gone d",
            table = self.table,
            audit = self.audit,
        );
        let rows = Self::bind(sqlx::query_as(&sql), filter)
            .bind(actor)
            .bind(reason)
            .fetch_all(&mut *tx)
            .await?;
        finish(tx, execute).await?;
        Ok(sorted_ids(&rows))
    }
}

const COLUMNS: &str = "d.id, d.consumer_group, d.topic, d.partition, d.\"offset\", d.event_id,
    d.key, d.payload, d.headers, d.error, d.attempts, d.first_failed_at, d.last_failed_at,
    d.replay_requested_at, d.replay_attempts, d.replay_error";

async fn finish(tx: sqlx::Transaction<'_, sqlx::Postgres>, execute: bool) -> Result<()> {
    if execute {
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    Ok(())
}

fn sorted_ids(rows: &[Row]) -> Vec<i64> {
    let mut ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
    ids.sort_unstable();
    ids
}

fn decode(r: Row) -> Result<DeadLetter> {
    Ok(DeadLetter {
        id: r.0,
        group: r.1,
        topic: r.2,
        partition: r.3,
        offset: r.4,
        event_id: r.5,
        key: r.6,
        payload: r.7,
        headers: Headers::from_json(&r.8).map_err(|e| {
            Error::config(format!(
                "dead letter {}: stored headers unreadable: {e}",
                r.0
            ))
        })?,
        error: r.9,
        attempts: r.10,
        first_failed_at: r.11,
        last_failed_at: r.12,
        replay_requested_at: r.13,
        replay_attempts: r.14,
        replay_error: r.15,
    })
}
