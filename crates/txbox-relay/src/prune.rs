//! Deleting published rows behind a stream's position, a little at a time.
//!
//! Rows at or before the position recorded in `relay_streams` are published
//! and no longer needed. They are deleted by `ctid` in batches of
//! `prune_batch`, each a short statement of its own, with a pause between
//! batches: never one long `DELETE` that holds locks, bloats a snapshot or
//! competes with writers for minutes. Each batch checks the fencing token,
//! so an instance that lost the stream stops pruning, and that the stored
//! position still belongs to this database's history (see
//! [`History`](crate::History)), so nothing is pruned after a restore or a
//! failover moved the transaction ids back.
//!
//! The same pruner deletes the stream's per-key order heads
//! (`outbox_key_order`, written by writers in `KeyOrder::Commit` mode) whose
//! transaction id is below the snapshot's `xmin`. Such a head constrains
//! nothing: a transaction that can still stage has a higher id, so its
//! check passes with or without the head. Heads a running transaction holds
//! are skipped (`SKIP LOCKED`), not waited for. This needs no history
//! check: a head is compared with live transaction ids only.

use std::time::Duration;

use sqlx::PgPool;

use crate::cursor::Position;
use crate::error::Result;

/// Deletes one stream's published outbox rows.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> txbox_relay::Result<()> {
/// use txbox_relay::{Position, Pruner};
///
/// let pruner = Pruner::new(&txbox::Schema::default(), 0, 1000);
/// let deleted = pruner.prune_once(&pool, 7, Position { txid: 812, id: 40_000 }).await?;
/// println!("deleted {deleted} rows");
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Pruner {
    stream: i32,
    batch: i64,
    sql: String,
    key_order_sql: String,
}

/// Pause between two prune batches of one round.
const PAUSE: Duration = Duration::from_millis(20);

impl Pruner {
    /// A pruner for `stream` of the outbox in `schema`, deleting up to
    /// `batch` rows per statement.
    pub fn new(schema: &txbox::Schema, stream: i32, batch: i64) -> Self {
        Pruner {
            stream,
            batch: batch.max(1),
            // In key order from just after `$6, $7`, so a round's later
            // batches (and later rounds) start where the last one ended:
            // a scan from the stream's start would walk the index entries of
            // every row deleted since the last vacuum, which on a drained
            // backlog of millions makes each batch slower than the last.
            sql: format!(
                "WITH deleted AS (
                 DELETE FROM {outbox}
                  WHERE ctid = ANY(ARRAY(
                        SELECT ctid FROM {outbox}
                         WHERE stream = $1 AND (txid, id) <= ($2::text::xid8, $3)
                           AND (txid, id) > ($6::text::xid8, $7)
                         ORDER BY txid, id
                         LIMIT $4))
                    AND EXISTS (
                        SELECT 1 FROM {streams} s
                         WHERE s.stream = $1 AND s.fencing_token = $5
                           AND s.position_txid < pg_snapshot_xmax(pg_current_snapshot())
                           AND (s.history IS NULL OR split_part(s.history, '~', 1) =
                                (SELECT id::text FROM {installation}) || '@' ||
                                (SELECT system_identifier::text FROM pg_control_system()) || '/' ||
                                (SELECT oid::text FROM pg_database WHERE datname = current_database())))
                 RETURNING txid, id)
                 SELECT count(*)::int8,
                        (array_agg(txid::text ORDER BY txid DESC, id DESC))[1],
                        (array_agg(id ORDER BY txid DESC, id DESC))[1]
                   FROM deleted",
                outbox = schema.table("outbox"),
                streams = schema.table("relay_streams"),
                installation = schema.table("installation"),
            ),
            key_order_sql: format!(
                "DELETE FROM {heads}
                  WHERE ctid = ANY(ARRAY(
                        SELECT ctid FROM {heads}
                         WHERE stream = $1 AND txid < pg_snapshot_xmin(pg_current_snapshot())
                         LIMIT $2
                         FOR UPDATE SKIP LOCKED))
                    AND txid < pg_snapshot_xmin(pg_current_snapshot())
                    AND EXISTS (
                        SELECT 1 FROM {streams} s
                         WHERE s.stream = $1 AND s.fencing_token = $3)",
                heads = schema.table("outbox_key_order"),
                streams = schema.table("relay_streams"),
            ),
        }
    }

    /// Rows per prune statement.
    pub fn batch_size(&self) -> i64 {
        self.batch
    }

    /// Deletes up to one batch of rows at or before `upto`, if `token` is
    /// still the stream's fencing token. Returns how many were deleted.
    pub async fn prune_once(&self, pool: &PgPool, token: i64, upto: Position) -> Result<u64> {
        Ok(self
            .prune_once_after(pool, token, Position::START, upto)
            .await?
            .0)
    }

    /// Deletes up to one batch of the rows after `after` and at or before
    /// `upto`, in key order, if `token` is still the stream's fencing
    /// token. Returns how many were deleted and the last one's position
    /// (`after` when none was).
    pub async fn prune_once_after(
        &self,
        pool: &PgPool,
        token: i64,
        after: Position,
        upto: Position,
    ) -> Result<(u64, Position)> {
        let (deleted, txid, id): (i64, Option<String>, Option<i64>) = sqlx::query_as(&self.sql)
            .bind(self.stream)
            .bind(upto.txid.to_string())
            .bind(upto.id)
            .bind(self.batch)
            .bind(token)
            .bind(after.txid.to_string())
            .bind(after.id)
            .fetch_one(pool)
            .await?;
        let last = match (txid, id) {
            (Some(txid), Some(id)) => Position::from_db(&txid, id)?,
            _ => after,
        };
        Ok((deleted.unsigned_abs(), last))
    }

    /// Deletes up to one batch of the stream's key order heads that are
    /// below the snapshot's `xmin` (and not locked by a running
    /// transaction), if `token` is still the stream's fencing token.
    /// Returns how many were deleted.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool) -> txbox_relay::Result<()> {
    /// let pruner = txbox_relay::Pruner::new(&txbox::Schema::default(), 0, 1000);
    /// let deleted = pruner.prune_key_order_once(&pool, 7).await?;
    /// println!("deleted {deleted} order heads");
    /// # Ok(()) }
    /// ```
    pub async fn prune_key_order_once(&self, pool: &PgPool, token: i64) -> Result<u64> {
        let done = sqlx::query(&self.key_order_sql)
            .bind(self.stream)
            .bind(self.batch)
            .bind(token)
            .execute(pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Deletes batches of key order heads as [`Pruner::prune`] does rows.
    pub async fn prune_key_order(
        &self,
        pool: &PgPool,
        token: i64,
        max_batches: usize,
    ) -> Result<u64> {
        let mut total = 0;
        for i in 0..max_batches {
            if i > 0 {
                tokio::time::sleep(PAUSE).await;
            }
            let n = self.prune_key_order_once(pool, token).await?;
            total += n;
            if n < self.batch.unsigned_abs() {
                break;
            }
        }
        Ok(total)
    }

    /// Deletes batches until fewer than a full batch remain (or `max_batches`
    /// ran), pausing briefly between them. Returns the rows deleted.
    pub async fn prune(
        &self,
        pool: &PgPool,
        token: i64,
        upto: Position,
        max_batches: usize,
    ) -> Result<u64> {
        Ok(self
            .prune_after(pool, token, Position::START, upto, max_batches)
            .await?
            .0)
    }

    /// [`Pruner::prune`] of the rows after `after` only: each batch starts
    /// where the previous one ended. Returns the rows deleted and the last
    /// one's position, to pass as `after` to the next round (valid while
    /// `token` holds: nothing at or before a published position is staged
    /// later).
    pub async fn prune_after(
        &self,
        pool: &PgPool,
        token: i64,
        mut after: Position,
        upto: Position,
        max_batches: usize,
    ) -> Result<(u64, Position)> {
        let mut total = 0;
        for i in 0..max_batches {
            if i > 0 {
                // Some rows of this round are deleted, others not yet.
                txbox::crash_point!("relay.during_prune");
                tokio::time::sleep(PAUSE).await;
            }
            let (n, last) = self.prune_once_after(pool, token, after, upto).await?;
            total += n;
            after = last;
            if n < self.batch.unsigned_abs() {
                break;
            }
        }
        Ok((total, after))
    }
}
