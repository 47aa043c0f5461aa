//! One inbox transaction: handler, fenced offset advance with the event ids,
//! commit; or, once an id was seen before, dedupe first (ADR 0013).

use std::borrow::Cow;
use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use futures::FutureExt as _;
use sqlx::{PgPool, Row};
use tracing::Instrument as _;

use super::handler::{BatchHandler, Handler, HandlerError, Tx};
use super::message::panic_message;
use super::sql::Statements;
use super::{Dedupe, InboxMessage};
use crate::headers::Headers;
use crate::trace::TraceContext;

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
    /// The partition's `consumed_until`: offsets below it were consumed on
    /// this log ([`super::Dedupe`]). Above `next_offset` only after a replay
    /// moved the position back.
    pub consumed_until: i64,
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

impl Attempt {
    /// A short name of the outcome, for spans.
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            Attempt::Committed { .. } => "committed",
            Attempt::Resync { .. } => "resync",
            Attempt::Fenced => "fenced",
            Attempt::HandlerFailed { .. } => "handler_failed",
            Attempt::Db(_) => "database_error",
            Attempt::Unwritten { .. } => "unwritten",
        }
    }
}

impl From<sqlx::Error> for Attempt {
    fn from(e: sqlx::Error) -> Self {
        Attempt::Db(e)
    }
}

/// How a transaction records its event ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdInsert {
    /// For batches expected to hold no id seen before (the steady state):
    /// the handler runs on every message, then one statement advances the
    /// position and inserts the ids with a plain insert (one index insert
    /// per id). An id seen before fails it with a unique violation, and a
    /// handler failure may come from such an id: either way the batch is
    /// redone `Checked` in a new transaction.
    Optimistic,
    /// `INSERT ... ON CONFLICT DO NOTHING RETURNING` before the handler:
    /// ids seen before are skipped and their handler does not run. Costs an
    /// extra index probe per id (speculative insertion) and a statement.
    Checked,
}

/// What one transaction needs besides the messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx<'a> {
    pub pool: &'a PgPool,
    pub sql: &'a Statements,
    pub group: &'a str,
    /// What is recorded to drop duplicates.
    pub dedupe: Dedupe,
    /// The transactions' `idle_in_transaction_session_timeout`.
    pub idle_timeout: std::time::Duration,
}

/// Applies `chunk` (one partition, ascending offsets, all at or above
/// `pos.next_offset`) in one transaction.
pub(crate) async fn apply(
    ctx: Ctx<'_>,
    route: &Route,
    pos: &Position,
    chunk: &[InboxMessage],
    insert: IdInsert,
) -> Attempt {
    // When the last transaction began: an optimistic attempt redone
    // checked is two transactions, and only the last one's session can
    // have been ended for idling.
    let mut started = std::time::Instant::now();
    let attempt = match try_apply(ctx, route, pos, chunk, insert, &mut started).await {
        Ok(a) | Err(a) => a,
    };
    idle_timed_out(attempt, started.elapsed(), ctx.idle_timeout)
}

/// PostgreSQL ended the session because the transaction sat idle past
/// `idle_in_transaction_session_timeout`: the handler spent that long
/// outside the database (or the process stalled). Waiting the way one
/// waits out an outage would repeat it forever, so it is the handler's
/// failure, counted against the retry policy's attempts. The server says
/// so with SQLSTATE 25P03; when the connection error is all that arrives,
/// an attempt that lasted at least the timeout is taken to be that.
fn idle_timed_out(
    attempt: Attempt,
    elapsed: std::time::Duration,
    idle: std::time::Duration,
) -> Attempt {
    let killed = |e: &sqlx::Error| {
        sqlstate_is(e, |c| c == "25P03")
            || (elapsed >= idle && matches!(e, sqlx::Error::Io(_) | sqlx::Error::Protocol(_)))
    };
    let index = match &attempt {
        Attempt::Db(e) if killed(e) => None,
        Attempt::HandlerFailed {
            index,
            error: HandlerError::Database(e),
        } if killed(e) => *index,
        _ => return attempt,
    };
    Attempt::HandlerFailed {
        index,
        error: HandlerError::retryable(format!(
            "the transaction was idle in the database for longer than its \
             idle_in_transaction_session_timeout ({} ms), so PostgreSQL ended the session and \
             rolled it back: the handler waits too long outside the database (raise \
             InboxBuilder::transaction_idle_timeout, or do the slow work before or after the \
             transaction)",
            idle.as_millis()
        )),
    }
}

async fn try_apply(
    ctx: Ctx<'_>,
    route: &Route,
    pos: &Position,
    chunk: &[InboxMessage],
    insert: IdInsert,
    started: &mut std::time::Instant,
) -> Result<Attempt, Attempt> {
    if chunk.is_empty() {
        return Ok(Attempt::Committed {
            applied: 0,
            duplicates: 0,
        });
    }
    // A message refused as read (an id Postgres cannot store, unreadable
    // headers) fails as permanent before anything runs: the messages before
    // it are applied, it is dead-lettered (or stops the partition).
    if let Some((index, reason)) = chunk
        .iter()
        .enumerate()
        .find_map(|(i, m)| m.rejected.as_deref().map(|r| (i, r)))
    {
        return Err(Attempt::HandlerFailed {
            index: Some(index),
            error: HandlerError::permanent(format!("refused before any handler ran: {reason}")),
        });
    }
    let mut tx = begin(ctx).await?;
    crate::crash_point!("inbox.before_business_write");

    let run = match insert {
        // The steady state: every id is taken to be new, the handler runs
        // on every message, and the ids are inserted by the statement that
        // advances the position, after the handler (ADR 0013).
        IdInsert::Optimistic if records_distinct_ids(ctx.dedupe, chunk) => {
            let run = unrecorded_run(ctx.dedupe, pos, chunk);
            match handle_and_advance(&mut tx, ctx, route, pos, chunk, &run, Record::Ids).await {
                Ok(()) => return commit(tx, chunk, &run).await,
                // An id was seen before: nothing of this attempt commits.
                Err(Attempt::Db(e)) if is_unique_violation(&e) => {
                    metrics::counter!("txbox_inbox_dedupe_conflicts_total").increment(1);
                }
                // The handler failed, maybe on a message it should not
                // have seen (an id seen before, which its own
                // constraints refuse): its failure counts only once the
                // duplicates are out.
                Err(Attempt::HandlerFailed { error, .. }) => {
                    tracing::debug!(error = %error.chain(),
                        "handler failed on a batch whose ids were not checked; redoing it checked");
                }
                Err(other) => return Err(other),
            }
            // Start over, checked: the handler runs on the new messages
            // only. A connection that cannot even roll back (the
            // session was ended) is a database failure, waited out and
            // not counted: the handler's failure may have come from a
            // copy.
            tx.rollback().await?;
            *started = std::time::Instant::now();
            tx = begin(ctx).await?;
            record_ids(&mut tx, ctx, pos, chunk).await?
        }
        _ => record_ids(&mut tx, ctx, pos, chunk).await?,
    };
    handle_and_advance(&mut tx, ctx, route, pos, chunk, &run, Record::Done).await?;
    commit(tx, chunk, &run).await
}

/// Whether the event ids still have to be inserted by the advance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Record {
    /// With the advance, as ids expected to be new.
    Ids,
    /// Already recorded ([`record_ids`]).
    Done,
}

/// Runs the handler on the messages at `run` (indexes into `chunk`), then
/// advances the position past the chunk, fenced, inserting the ids with it
/// if `record` says so.
async fn handle_and_advance(
    tx: &mut Tx,
    ctx: Ctx<'_>,
    route: &Route,
    pos: &Position,
    chunk: &[InboxMessage],
    run: &[usize],
    record: Record,
) -> Result<(), Attempt> {
    let Some(last) = chunk.last() else {
        return Ok(());
    };
    if !run.is_empty() {
        if let Err((index, error)) = run_handler(tx, ctx.group, route, chunk, run).await {
            return Err(Attempt::HandlerFailed { index, error });
        }
    }
    crate::crash_point!("inbox.after_business_write");

    let counts = Counts {
        applied: run.len(),
        duplicates: chunk.len() - run.len(),
        dead_lettered: 0,
    };
    let ids = match record {
        Record::Ids => chunk.iter().filter(|m| ctx.dedupe.records(m)).collect(),
        Record::Done => Vec::new(),
    };
    match fenced_advance(tx, ctx, pos, last.offset + 1, counts, &ids).await {
        // The handler returned Ok with the transaction aborted: it dropped
        // a database error. Nothing of it can commit; retrying is up to the
        // policy's attempts (the error may have been transient).
        Err(Attempt::Db(e)) if sqlstate_is(&e, |c| c == "25P02") => Err(Attempt::HandlerFailed {
            index: culprit(run),
            error: HandlerError::retryable(format!(
                "the handler returned Ok but left its transaction aborted (it ignored a \
                 database error); its writes were rolled back: {e}"
            )),
        }),
        other => other,
    }
}

/// Which message is at fault when the transaction fails: known only when
/// one ran.
fn culprit(run: &[usize]) -> Option<usize> {
    (run.len() == 1).then(|| run[0])
}

/// Commits a transaction that ran the handler on the messages of `chunk`
/// at `run`.
async fn commit(tx: Tx, chunk: &[InboxMessage], run: &[usize]) -> Result<Attempt, Attempt> {
    crate::crash_point!("inbox.before_commit");
    if let Err(e) = tx.commit().await {
        // A deferred constraint the handler's writes violate fails only
        // here: the handler's failure, counted as an attempt, not an outage
        // to wait out.
        if sqlstate_is(&e, |c| c.starts_with("23")) {
            return Err(Attempt::HandlerFailed {
                index: culprit(run),
                error: HandlerError::Database(e),
            });
        }
        return Err(e.into());
    }
    crate::crash_point!("inbox.after_commit");
    Ok(Attempt::Committed {
        applied: run.len(),
        duplicates: chunk.len() - run.len(),
    })
}

/// Opens an inbox transaction with its lock and idle bounds set.
async fn begin(ctx: Ctx<'_>) -> Result<Tx, sqlx::Error> {
    ctx.pool.begin_with(ctx.sql.begin.clone()).await
}

/// Whether `chunk` has ids to record and no two of them are the same (the
/// plain insert would fail on the second: such a chunk goes checked at
/// once).
fn records_distinct_ids(dedupe: Dedupe, chunk: &[InboxMessage]) -> bool {
    let mut seen = HashSet::with_capacity(chunk.len());
    chunk
        .iter()
        .filter(|m| dedupe.records(m))
        .all(|m| seen.insert(m.event_id.as_str()))
        && !seen.is_empty()
}

/// The messages whose handler runs when every recorded id is new: all of
/// them but those only the watermark dedupes and it covers.
fn unrecorded_run(dedupe: Dedupe, pos: &Position, chunk: &[InboxMessage]) -> Vec<usize> {
    (0..chunk.len())
        .filter(|&i| !dedupe.covered(&chunk[i], pos))
        .collect()
}

/// Records the chunk's event ids as processed, skipping those seen before
/// (`ON CONFLICT DO NOTHING`); returns the indexes of the messages whose
/// handler runs, ascending.
///
/// Only the ids [`Dedupe::records`] are inserted. A message whose id is
/// not recorded runs unless the watermark covers it ([`Dedupe::covered`]):
/// a redelivery of an offset this log already consumed, met only after a
/// replay moved the position back.
async fn record_ids(
    tx: &mut Tx,
    ctx: Ctx<'_>,
    pos: &Position,
    chunk: &[InboxMessage],
) -> Result<Vec<usize>, sqlx::Error> {
    let recorded: Vec<&InboxMessage> = chunk.iter().filter(|m| ctx.dedupe.records(m)).collect();
    let mut fresh = HashSet::new();
    if !recorded.is_empty() {
        let ids: Vec<&str> = recorded.iter().map(|m| m.event_id.as_str()).collect();
        let offsets: Vec<i64> = recorded.iter().map(|m| m.offset).collect();
        for row in sqlx::query(&ctx.sql.insert_processed)
            .bind(ctx.group)
            .bind(&ids)
            .bind(&*pos.topic)
            .bind(pos.partition)
            .bind(&offsets)
            .fetch_all(&mut **tx)
            .await?
        {
            fresh.insert(row.try_get::<String, _>(0)?);
        }
    }
    // The first occurrence of each fresh recorded id runs, the rest are
    // duplicates; unrecorded ids run unless the watermark covers them.
    Ok((0..chunk.len())
        .filter(|&i| {
            let m = &chunk[i];
            if ctx.dedupe.records(m) {
                fresh.remove(m.event_id.as_str())
            } else {
                !ctx.dedupe.covered(m, pos)
            }
        })
        .collect())
}

/// True when `e` is a database error whose SQLSTATE satisfies `test`.
pub(crate) fn sqlstate_is(e: &sqlx::Error, test: impl Fn(&str) -> bool) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| test(&c))
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

pub(crate) async fn run_handler(
    tx: &mut Tx,
    group: &str,
    route: &Route,
    chunk: &[InboxMessage],
    run: &[usize],
) -> Result<(), (Option<usize>, HandlerError)> {
    // A panic is caught here, so the worker lives on: the transaction
    // (left wherever the handler was) is dropped, which rolls it back.
    match route {
        Route::Each(h) => {
            for &i in run {
                let msg = &chunk[i];
                match in_message_scope(group, msg, AssertUnwindSafe(h.handle(tx, msg))).await {
                    Ok(result) => result.map_err(|e| (Some(i), e))?,
                    Err(panic) => return Err((Some(i), panicked(msg, panic.as_ref()))),
                }
            }
            Ok(())
        }
        Route::Batch(h) => {
            let msgs: Cow<'_, [InboxMessage]> = if run.len() == chunk.len() {
                Cow::Borrowed(chunk)
            } else {
                Cow::Owned(run.iter().map(|&i| chunk[i].clone()).collect())
            };
            let handled = AssertUnwindSafe(h.handle_batch(tx, &msgs));
            // A batch of one is that message's handling; a larger batch
            // has no single trace: the handler picks per message
            // (`TraceContext::scope`).
            let outcome = match &*msgs {
                [one] => in_message_scope(group, one, handled).await,
                _ => handled.catch_unwind().await,
            };
            match outcome {
                Ok(result) => {
                    result.map_err(|e| (e.index.and_then(|j| run.get(j).copied()), e.error))
                }
                // Which message made it panic is not known (unless there was
                // one): the batch is bisected.
                Err(panic) => {
                    let culprit = (run.len() == 1).then(|| run[0]);
                    Err((culprit, panicked(&msgs[0], panic.as_ref())))
                }
            }
        }
    }
}

/// Runs a handler's future for `msg` inside its `txbox.inbox.message` span,
/// with the message's trace as the current [`TraceContext`], catching a
/// panic.
async fn in_message_scope<F: std::future::Future + std::panic::UnwindSafe>(
    group: &str,
    msg: &InboxMessage,
    handled: F,
) -> std::thread::Result<F::Output> {
    let cx = msg.trace_context();
    let span = tracing::info_span!("txbox.inbox.message", group, topic = %msg.topic,
        partition = msg.partition, offset = msg.offset, event_id = %msg.event_id,
        trace_id = tracing::field::Empty);
    if let Some(cx) = &cx {
        // Before anything enters the span: its parent is fixed then.
        #[cfg(feature = "opentelemetry")]
        crate::trace::set_parent(&span, cx);
        span.record("trace_id", cx.trace_id());
    }
    TraceContext::scope(cx, handled.catch_unwind())
        .instrument(span)
        .await
}

/// A handler panicked (on a batch starting at `first`): counted, logged,
/// and a retryable failure (a panic on an unwrapped transient error may not
/// repeat), so the retry policy's attempts decide its end.
fn panicked(first: &InboxMessage, panic: &(dyn std::any::Any + Send)) -> HandlerError {
    let message = panic_message(panic);
    metrics::counter!("txbox_inbox_handler_panics_total").increment(1);
    tracing::error!(topic = %first.topic, partition = first.partition, offset = first.offset,
        panic = message, "handler panicked; its transaction is rolled back");
    HandlerError::retryable(format!("the handler panicked: {message}"))
}

/// What a transaction did with the messages it moves the position past,
/// added to the partition's running totals in the same row.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    applied: usize,
    duplicates: usize,
    dead_lettered: usize,
}

/// Advances the partition to `next` if this consumer's epoch and expected
/// offset still hold (the fence), adding `counts` to its totals, and then
/// inserts the event ids of `record` (expected to be new) in the same
/// statement. Otherwise says why, as the attempt's outcome: fenced, or our
/// offset is stale.
async fn fenced_advance(
    tx: &mut Tx,
    ctx: Ctx<'_>,
    pos: &Position,
    next: i64,
    counts: Counts,
    record: &[&InboxMessage],
) -> Result<(), Attempt> {
    let total = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    let query = |sql| {
        sqlx::query(sql)
            .bind(next)
            .bind(ctx.group)
            .bind(&*pos.topic)
            .bind(pos.partition)
            .bind(pos.epoch)
            .bind(pos.next_offset)
            .bind(total(counts.applied))
            .bind(total(counts.duplicates))
            .bind(total(counts.dead_lettered))
    };
    let advanced = if record.is_empty() {
        query(&ctx.sql.advance)
            .execute(&mut **tx)
            .await?
            .rows_affected()
    } else {
        let ids: Vec<&str> = record.iter().map(|m| m.event_id.as_str()).collect();
        let offsets: Vec<i64> = record.iter().map(|m| m.offset).collect();
        let row = query(&ctx.sql.advance_recording)
            .bind(&ids)
            .bind(&offsets)
            .fetch_one(&mut **tx)
            .await?;
        let (advanced, inserted): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        if advanced > 0 && inserted != total(ids.len()) {
            // A trigger discarded id rows: their duplicates would not be
            // dropped. (A rule on the table fails the statement instead:
            // PostgreSQL refuses rules in a data-modifying WITH.)
            return Err(Attempt::Unwritten {
                what: "event ids",
                rows: u64::try_from(inserted).unwrap_or(0),
            });
        }
        u64::try_from(advanced).unwrap_or(0)
    };
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
/// The watermark stays ([`super::Dedupe`]).
pub(crate) async fn reposition(ctx: Ctx<'_>, pos: &Position, to: i64) -> Attempt {
    let attempt = async {
        let mut tx = begin(ctx).await?;
        fenced_advance(&mut tx, ctx, pos, to, Counts::default(), &[]).await?;
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
    let mut tx = begin(ctx).await?;
    // An id with a NUL cannot be stored (nor deduplicated): a replay of the
    // message is dead-lettered again.
    if ctx.dedupe.records(m) && !m.event_id.contains('\0') {
        record_processed(&mut tx, ctx.sql, ctx.group, m).await?;
    }
    let rows = sqlx::query(&ctx.sql.dead_letter)
        .bind(ctx.group)
        .bind(&*m.topic)
        .bind(m.partition)
        .bind(m.offset)
        .bind(text(&m.event_id))
        .bind(m.key.as_deref())
        .bind(m.payload.as_deref())
        .bind(storable_headers(&m.headers))
        .bind(text(&f.error))
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
    let counts = Counts {
        dead_lettered: 1,
        ..Counts::default()
    };
    fenced_advance(&mut tx, ctx, pos, m.offset + 1, counts, &[]).await?;
    tx.commit().await?;
    Ok(Attempt::Committed {
        applied: 0,
        duplicates: 0,
    })
}

/// Records one message's event id as processed for `group` (an id seen
/// before is left as it is): dead-lettered or replayed, the message is not
/// applied again when it is delivered again.
pub(crate) async fn record_processed(
    conn: &mut sqlx::PgConnection,
    sql: &Statements,
    group: &str,
    m: &InboxMessage,
) -> Result<(), sqlx::Error> {
    sqlx::query(&sql.insert_processed)
        .bind(group)
        .bind([m.event_id.as_str()].as_slice())
        .bind(&*m.topic)
        .bind(m.partition)
        .bind([m.offset].as_slice())
        .execute(conn)
        .await?;
    Ok(())
}

/// `s` as PostgreSQL `text` can hold it: each NUL replaced by U+FFFD.
fn text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

/// The headers in their stored `jsonb` form ([`Headers::to_json`]'s, read
/// back by [`Headers::from_json`]), except that a value with a NUL byte is
/// stored as `value_base64` even when it is UTF-8: `jsonb` refuses the
/// `\u0000` escape. Values are kept byte for byte. A NUL in a name (which
/// librdkafka cannot deliver: it hands names over as C strings) becomes
/// U+FFFD.
pub(crate) fn storable_headers(headers: &Headers) -> serde_json::Value {
    let stored = headers
        .iter()
        .map(|(key, value)| {
            let mut h = serde_json::Map::new();
            h.insert("key".into(), text(key).into_owned().into());
            if let Some(bytes) = value {
                match std::str::from_utf8(bytes) {
                    Ok(s) if !s.contains('\0') => h.insert("value".into(), s.into()),
                    _ => h.insert(
                        "value_base64".into(),
                        base64::engine::general_purpose::STANDARD
                            .encode(bytes)
                            .into(),
                    ),
                };
            }
            serde_json::Value::Object(h)
        })
        .collect();
    serde_json::Value::Array(stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_headers_hold_no_nul_and_read_back_byte_for_byte() {
        let mut h = Headers::new();
        h.insert("text", "plain");
        h.insert("nul", "a\0b");
        h.insert("binary", vec![0xff, 0x00, 0xfe]);
        h.insert("empty", Vec::new());
        h.insert("text", "again");
        let stored = storable_headers(&h);
        assert!(!stored.to_string().contains("\\u0000"), "{stored}");
        assert_eq!(Headers::from_json(&stored).expect("stored form"), h);

        let mut no_nul = Headers::new();
        no_nul.insert("text", "plain");
        no_nul.insert("binary", vec![0xff, 0x00, 0xfe]);
        assert_eq!(
            storable_headers(&no_nul),
            no_nul.to_json(),
            "Headers::to_json's form wherever that form is storable"
        );
    }
}
