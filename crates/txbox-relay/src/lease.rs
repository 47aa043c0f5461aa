//! Stream ownership: a lease in `relay_streams`, with a fencing token.
//!
//! One row per stream. Acquiring bumps `fencing_token` and sets `owner`
//! and `lease_expires_at`, but only when the stream is free (released) or
//! its lease lapsed. A current lease is never taken by name: a second
//! process started with the same instance name (a fixed `--instance`
//! across a rolling restart, pid 1 in two containers) waits out the lease
//! like any other. The holder itself keeps its lease by renewing it with
//! its fencing token. Every write the relay makes (renewal, position,
//! prune, dead letter) carries `AND fencing_token = $token`; zero rows
//! affected means another instance took the stream, and this one stops.
//!
//! Plain row updates, no session advisory locks: each statement stands
//! alone, so the relay works through PgBouncer in transaction pooling mode.
//!
//! The lease deadline is also tracked locally, from the moment the
//! acquiring or renewing statement was *sent* (so it ends no later than
//! the database's), and the stream renews before publishing a batch with
//! less than half the TTL left.

use std::time::Duration;

use sqlx::PgPool;
use tokio::time::Instant;

use crate::cursor::Position;
use crate::error::Result;

/// Acquires, renews and releases stream leases, and records positions.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> txbox_relay::Result<()> {
/// use std::time::Duration;
/// use txbox_relay::Leases;
///
/// let leases = Leases::new(pool, &txbox::Schema::default(), "relay-a", Duration::from_secs(10));
/// if let Some(mut lease) = leases.try_acquire(0).await? {
///     println!("stream 0 is ours with token {}, resuming after {}", lease.token(), lease.position());
///     assert!(leases.renew(&mut lease).await?);
///     leases.release(&lease).await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Leases {
    pool: PgPool,
    instance: String,
    ttl: Duration,
    upsert_sql: String,
    acquire_sql: String,
    renew_sql: String,
    release_sql: String,
    anchor_sql: String,
    position_sql: String,
    holder_sql: String,
}

/// A stream this instance owns, until [`Lease::remaining`] runs out or a
/// write finds the token changed.
#[derive(Clone, Debug)]
pub struct Lease {
    stream: i32,
    token: i64,
    position: Position,
    history: Option<String>,
    deadline: Instant,
}

impl Lease {
    /// The stream.
    pub fn stream(&self) -> i32 {
        self.stream
    }

    /// The fencing token every write checks.
    pub fn token(&self) -> i64 {
        self.token
    }

    /// The position stored in `relay_streams` when the lease was taken, or
    /// the last one this lease recorded.
    pub fn position(&self) -> Position {
        self.position
    }

    /// The database history the position belongs to (see
    /// [`History`](crate::History)); `None` until the stream is anchored.
    pub fn history(&self) -> Option<&str> {
        self.history.as_deref()
    }

    /// Time left before the lease may lapse (zero when it may have).
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

/// Who holds a stream, for logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The owning instance, if any.
    pub owner: Option<String>,
    /// Its fencing token.
    pub token: i64,
    /// Time left on its lease (zero: lapsed or released).
    pub remaining: Duration,
}

impl Leases {
    /// Leases on `schema`'s `relay_streams`, held as `instance` for `ttl`.
    pub fn new(
        pool: PgPool,
        schema: &txbox::Schema,
        instance: impl Into<String>,
        ttl: Duration,
    ) -> Self {
        let t = schema.table("relay_streams");
        Leases {
            pool,
            instance: instance.into(),
            ttl,
            upsert_sql: format!(
                "INSERT INTO {t} (stream) VALUES ($1) ON CONFLICT (stream) DO NOTHING"
            ),
            acquire_sql: format!(
                "UPDATE {t}
                    SET owner = $2,
                        fencing_token = fencing_token + 1,
                        lease_expires_at = now() + $3::float8 * interval '1 millisecond',
                        updated_at = now()
                  WHERE stream = $1
                    AND (owner IS NULL OR lease_expires_at IS NULL OR lease_expires_at < now())
                  RETURNING fencing_token, position_txid::text, position_id, history"
            ),
            renew_sql: format!(
                "UPDATE {t}
                    SET lease_expires_at = now() + $4::float8 * interval '1 millisecond'
                  WHERE stream = $1 AND owner = $2 AND fencing_token = $3"
            ),
            release_sql: format!(
                "UPDATE {t}
                    SET owner = NULL, lease_expires_at = NULL, updated_at = now()
                  WHERE stream = $1 AND owner = $2 AND fencing_token = $3"
            ),
            anchor_sql: format!(
                "UPDATE {t} SET history = $4, updated_at = now()
                  WHERE stream = $1 AND owner = $2 AND fencing_token = $3 AND history IS NULL"
            ),
            position_sql: format!(
                "UPDATE {t}
                    SET position_txid = $4::text::xid8,
                        position_id = $5,
                        published = published + $6,
                        lease_expires_at = now() + $7::float8 * interval '1 millisecond',
                        updated_at = now()
                  WHERE stream = $1 AND owner = $2 AND fencing_token = $3"
            ),
            holder_sql: format!(
                "SELECT owner, fencing_token,
                        greatest(extract(epoch FROM (lease_expires_at - now())), 0)::float8
                   FROM {t} WHERE stream = $1"
            ),
        }
    }

    /// The lease TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// This instance's name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)
    }

    /// Takes `stream` if it is free or its lease lapsed; `None` while any
    /// instance, even one of the same name, holds a current lease. Each
    /// success bumps the fencing token, which fences every earlier
    /// holder's writes.
    pub async fn try_acquire(&self, stream: i32) -> Result<Option<Lease>> {
        sqlx::query(&self.upsert_sql)
            .bind(stream)
            .execute(&self.pool)
            .await?;
        let sent = Instant::now();
        let row: Option<(i64, String, i64, Option<String>)> = sqlx::query_as(&self.acquire_sql)
            .bind(stream)
            .bind(&self.instance)
            .bind(self.ttl_ms())
            .fetch_optional(&self.pool)
            .await?;
        let Some((token, txid, id, history)) = row else {
            return Ok(None);
        };
        Ok(Some(Lease {
            stream,
            token,
            position: Position::from_db(&txid, id)?,
            history,
            deadline: sent + self.ttl,
        }))
    }

    /// Extends the lease by the TTL. `false`: the lease is lost (another
    /// instance took the stream); stop writing.
    pub async fn renew(&self, lease: &mut Lease) -> Result<bool> {
        let sent = Instant::now();
        let done = sqlx::query(&self.renew_sql)
            .bind(lease.stream)
            .bind(&self.instance)
            .bind(lease.token)
            .bind(self.ttl_ms())
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 1 {
            lease.deadline = sent + self.ttl;
            Ok(true)
        } else {
            lease.deadline = sent;
            Ok(false)
        }
    }

    /// Gives the stream up (on shutdown), so another instance can take it
    /// at once instead of after the TTL.
    pub async fn release(&self, lease: &Lease) -> Result<()> {
        sqlx::query(&self.release_sql)
            .bind(lease.stream)
            .bind(&self.instance)
            .bind(lease.token)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Anchors a stream that has no history yet in `anchor` (see
    /// [`History::new_anchor`](crate::History::new_anchor)), before
    /// anything is published, so every position recorded from now on,
    /// in PostgreSQL and on Kafka, carries it. `false`: the lease is lost
    /// or the stream was anchored meanwhile; nothing was written.
    pub async fn anchor(&self, lease: &mut Lease, anchor: String) -> Result<bool> {
        let done = sqlx::query(&self.anchor_sql)
            .bind(lease.stream)
            .bind(&self.instance)
            .bind(lease.token)
            .bind(&anchor)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 1 {
            lease.history = Some(anchor);
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// Records that everything up to `position` is published (`published`
    /// rows in this step) and extends the lease. `false`: the lease is
    /// lost and nothing was written.
    pub async fn record_position(
        &self,
        lease: &mut Lease,
        position: Position,
        published: u64,
    ) -> Result<bool> {
        let sent = Instant::now();
        let done = sqlx::query(&self.position_sql)
            .bind(lease.stream)
            .bind(&self.instance)
            .bind(lease.token)
            .bind(position.txid.to_string())
            .bind(position.id)
            .bind(i64::try_from(published).unwrap_or(i64::MAX))
            .bind(self.ttl_ms())
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 1 {
            lease.deadline = sent + self.ttl;
            lease.position = position;
            Ok(true)
        } else {
            lease.deadline = sent;
            Ok(false)
        }
    }

    /// Who holds `stream` now (`None`: no row yet).
    pub async fn holder(&self, stream: i32) -> Result<Option<Holder>> {
        let row: Option<(Option<String>, i64, Option<f64>)> = sqlx::query_as(&self.holder_sql)
            .bind(stream)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|(owner, token, secs)| Holder {
            owner,
            token,
            remaining: Duration::try_from_secs_f64(secs.unwrap_or(0.0).max(0.0))
                .unwrap_or_default(),
        }))
    }
}
