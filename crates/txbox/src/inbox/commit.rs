//! One inbox transaction: dedupe, handler, fenced offset advance, commit.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use super::handler::{BatchHandler, Handler, HandlerError, Tx};
use super::sql::Statements;
use super::InboxMessage;

/// How a partition's messages are applied.
#[derive(Clone)]
pub(crate) enum Route {
    Each(Arc<dyn Handler>),
    Batch(Arc<dyn BatchHandler>),
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Route::Each(_) => "Route::Each",
            Route::Batch(_) => "Route::Batch",
        })
    }
}

/// A claimed partition and the position this consumer believes it is at.
#[derive(Debug, Clone)]
pub(crate) struct Position {
    pub topic: Arc<str>,
    pub partition: i32,
    pub epoch: i64,
    pub next_offset: i64,
}

/// What one transaction attempt did.
#[derive(Debug)]
pub(crate) enum Attempt {
    /// Committed; the partition is now at `next_offset`.
    Committed { applied: usize, duplicates: usize },
    /// Our epoch still holds but the stored offset differs from ours (our
    /// previous commit landed although its acknowledgement was lost).
    Resync { next_offset: i64 },
    /// Another consumer was assigned the partition after us.
    Fenced,
    /// The handler failed on the message at `index` (if known).
    HandlerFailed {
        index: Option<usize>,
        error: HandlerError,
    },
    /// The database failed; nothing was committed.
    Db(sqlx::Error),
    /// A statement that must write one row wrote `rows` (a trigger or rule
    /// discarded it); rolled back, nothing was committed. Retrying would do
    /// the same.
    Unwritten { what: &'static str, rows: u64 },
}

impl From<sqlx::Error> for Attempt {
    fn from(e: sqlx::Error) -> Self {
        Attempt::Db(e)
    }
}

/// How a transaction records its event ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dedupe {
    /// A plain insert, for batches expected to hold no id seen before (the
    /// steady state): one index insert per id. An id seen before fails it
    /// with a unique violation, and the batch is redone `Checked`.
    Optimistic,
    /// `INSERT ... ON CONFLICT DO NOTHING RETURNING`: ids seen before are
    /// skipped. Costs an extra index probe per id (speculative insertion).
    Checked,
}

/// What one transaction needs besides the messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx<'a> {
    pub pool: &'a PgPool,
    pub sql: &'a Statements,
    pub group: &'a str,
}

/// Applies `chunk` (one partition, ascending offsets, all at or above
/// `pos.next_offset`) in one transaction.
pub(crate) async fn apply(
    ctx: Ctx<'_>,
    route: &Route,
    pos: &Position,
    chunk: &[InboxMessage],
    dedupe: Dedupe,
) -> Attempt {
    match try_apply(ctx, route, pos, chunk, dedupe).await {
        Ok(a) | Err(a) => a,
    }
}

async fn try_apply(
    ctx: Ctx<'_>,
    route: &Route,
    pos: &Position,
    chunk: &[InboxMessage],
    dedupe: Dedupe,
) -> Result<Attempt, Attempt> {
    let Some(last) = chunk.last() else {
        return Ok(Attempt::Committed {
            applied: 0,
            duplicates: 0,
        });
    };
    let mut tx = ctx.pool.begin().await?;
    crate::crash_point!("inbox.before_business_write");

    let run = match record_ids(&mut tx, ctx, pos, chunk, dedupe).await {
        Ok(run) => run,
        // Only the plain insert of the ids ran: the batch holds an id seen
        // before (or twice). Nothing else happened; start over, checked.
        Err(e) if dedupe == Dedupe::Optimistic && is_unique_violation(&e) => {
            metrics::counter!("txbox_inbox_dedupe_conflicts_total").increment(1);
            tx.rollback().await?;
            tx = ctx.pool.begin().await?;
            record_ids(&mut tx, ctx, pos, chunk, Dedupe::Checked).await?
        }
        Err(e) => return Err(e.into()),
    };

    if !run.is_empty() {
        if let Err((index, error)) = run_handler(&mut tx, route, chunk, &run).await {
            return Err(Attempt::HandlerFailed { index, error });
        }
    }
    crate::crash_point!("inbox.after_business_write");

    fenced_advance(&mut tx, ctx, pos, last.offset + 1).await?;
    tx.commit().await?;
    crate::crash_point!("inbox.after_commit");
    Ok(Attempt::Committed {
        applied: run.len(),
        duplicates: chunk.len() - run.len(),
    })
}

/// Records the chunk's event ids as processed; returns the indexes of the
/// messages whose handler runs (every one, when `Optimistic` succeeds).
async fn record_ids(
    tx: &mut Tx,
    ctx: Ctx<'_>,
    pos: &Position,
    chunk: &[InboxMessage],
    dedupe: Dedupe,
) -> Result<Vec<usize>, sqlx::Error> {
    let ids: Vec<&str> = chunk.iter().map(|m| m.event_id.as_str()).collect();
    let offsets: Vec<i64> = chunk.iter().map(|m| m.offset).collect();
    let insert = |sql| {
        sqlx::query(sql)
            .bind(ctx.group)
            .bind(&ids)
            .bind(&*pos.topic)
            .bind(pos.partition)
            .bind(&offsets)
    };
    match dedupe {
        Dedupe::Optimistic => {
            insert(&ctx.sql.insert_new_processed)
                .execute(&mut **tx)
                .await?;
            Ok((0..chunk.len()).collect())
        }
        Dedupe::Checked => {
            let mut fresh = HashSet::new();
            for row in insert(&ctx.sql.insert_processed)
                .fetch_all(&mut **tx)
                .await?
            {
                fresh.insert(row.try_get::<String, _>(0)?);
            }
            // First occurrence of each fresh id runs; the rest are duplicates.
            Ok((0..chunk.len())
                .filter(|&i| fresh.remove(chunk[i].event_id.as_str()))
                .collect())
        }
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

async fn run_handler(
    tx: &mut Tx,
    route: &Route,
    chunk: &[InboxMessage],
    run: &[usize],
) -> Result<(), (Option<usize>, HandlerError)> {
    match route {
        Route::Each(h) => {
            for &i in run {
                h.handle(tx, &chunk[i]).await.map_err(|e| (Some(i), e))?;
            }
            Ok(())
        }
        Route::Batch(h) => {
            let msgs: Cow<'_, [InboxMessage]> = if run.len() == chunk.len() {
                Cow::Borrowed(chunk)
            } else {
                Cow::Owned(run.iter().map(|&i| chunk[i].clone()).collect())
            };
            h.handle_batch(tx, &msgs)
                .await
                .map_err(|e| (e.index.and_then(|j| run.get(j).copied()), e.error))
        }
    }
}

/// Advances the partition to `next` if this consumer's epoch and expected
/// offset still hold (the fence). Otherwise says why, as the attempt's
/// outcome: fenced, or our offset is stale.
async fn fenced_advance(
    tx: &mut Tx,
    ctx: Ctx<'_>,
    pos: &Position,
    next: i64,
) -> Result<(), Attempt> {
    let advanced = sqlx::query(&ctx.sql.advance)
        .bind(next)
        .bind(ctx.group)
        .bind(&*pos.topic)
        .bind(pos.partition)
        .bind(pos.epoch)
        .bind(pos.next_offset)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    if advanced == 0 {
        return Err(reconcile(tx, ctx, pos).await?);
    }
    Ok(())
}

/// The fenced update matched no row: fenced, or our offset is stale.
async fn reconcile(tx: &mut Tx, ctx: Ctx<'_>, pos: &Position) -> Result<Attempt, sqlx::Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(&ctx.sql.select_offset)
        .bind(ctx.group)
        .bind(&*pos.topic)
        .bind(pos.partition)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(match row {
        Some((epoch, next_offset)) if epoch == pos.epoch => Attempt::Resync { next_offset },
        _ => Attempt::Fenced,
    })
}

/// Moves the partition's stored position to `to` (fenced, in its own
/// transaction): used when Kafka rewinds the partition to a recreated log.
pub(crate) async fn reposition(ctx: Ctx<'_>, pos: &Position, to: i64) -> Attempt {
    let attempt = async {
        let mut tx = ctx.pool.begin().await?;
        fenced_advance(&mut tx, ctx, pos, to).await?;
        tx.commit().await?;
        Ok(Attempt::Committed {
            applied: 0,
            duplicates: 0,
        })
    };
    match attempt.await {
        Ok(a) | Err(a) => a,
    }
}

/// A message the handler could not apply, and its history.
#[derive(Debug)]
pub(crate) struct Failure<'a> {
    pub message: &'a InboxMessage,
    pub error: String,
    pub attempts: u32,
    pub first_failed_at: DateTime<Utc>,
}

/// Dead-letters one message and advances past it, in one transaction. Its
/// event id is recorded as processed, so a replay is not dead-lettered twice.
/// The dead letter must be one new row: when the insert writes none, the
/// transaction rolls back and the position stays before the message.
pub(crate) async fn dead_letter(ctx: Ctx<'_>, pos: &Position, failure: &Failure<'_>) -> Attempt {
    match try_dead_letter(ctx, pos, failure).await {
        Ok(a) | Err(a) => a,
    }
}

async fn try_dead_letter(
    ctx: Ctx<'_>,
    pos: &Position,
    f: &Failure<'_>,
) -> Result<Attempt, Attempt> {
    let m = f.message;
    let mut tx = ctx.pool.begin().await?;
    sqlx::query(&ctx.sql.insert_processed)
        .bind(ctx.group)
        .bind([m.event_id.as_str()].as_slice())
        .bind(&*pos.topic)
        .bind(pos.partition)
        .bind([m.offset].as_slice())
        .execute(&mut *tx)
        .await?;
    let rows = sqlx::query(&ctx.sql.dead_letter)
        .bind(ctx.group)
        .bind(&*m.topic)
        .bind(m.partition)
        .bind(m.offset)
        .bind(&m.event_id)
        .bind(m.key.as_deref())
        .bind(m.payload.as_deref())
        .bind(m.headers.to_json())
        .bind(&f.error)
        .bind(i32::try_from(f.attempts).unwrap_or(i32::MAX))
        .bind(f.first_failed_at)
        .bind(Utc::now())
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if rows != 1 {
        // Advancing now would skip the message with nothing stored.
        return Err(Attempt::Unwritten {
            what: "dead letter",
            rows,
        });
    }
    fenced_advance(&mut tx, ctx, pos, m.offset + 1).await?;
    tx.commit().await?;
    Ok(Attempt::Committed {
        applied: 0,
        duplicates: 0,
    })
}
