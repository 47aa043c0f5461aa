//! Replaying dead letters on request: a running inbox takes the dead
//! letters of its group whose replay an operator requested (`txbox
//! dead-letters replay`, [`DeadLetters::request_replay`]) and puts each one
//! back through its topic's handler, in a transaction of its own.
//!
//! The message keeps its event id and its position (topic, partition,
//! offset); the partition's stored offset does not move (it is past the
//! message already). In one transaction: the event id, recorded as
//! processed when the message was dead-lettered, is forgotten; the handler
//! runs; the id is recorded again; the dead letter goes to
//! `dead_letter_audit` and is deleted. Only a commit removes the dead
//! letter. A failure rolls all of it back, clears the request and keeps the
//! error on the row (`replay_error`, `replay_attempts`), for the operator
//! to look at and request again; a transient database failure leaves the
//! request for the next round.
//!
//! [`DeadLetters::request_replay`]: super::DeadLetters::request_replay

use std::sync::Arc;
use std::time::Duration;

use sqlx::Row as _;
use tokio_util::sync::CancellationToken;

use super::commit::{record_processed, run_handler};
use super::message::position_id;
use super::shared::Shared;
use super::InboxMessage;
use crate::headers::Headers;

/// How often a consumer looks for requested replays.
const INTERVAL: Duration = Duration::from_secs(1);

pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let topics: Vec<String> = shared.routes.keys().map(|t| t.to_string()).collect();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
        // One after another while there are requests.
        while !stop.is_cancelled() {
            match replay_one(&shared, &topics).await {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "replaying a dead letter failed on the database; will retry");
                    break;
                }
            }
        }
    }
}

/// Replays the next requested dead letter, if any. Returns whether there
/// was one.
async fn replay_one(shared: &Shared, topics: &[String]) -> Result<bool, sqlx::Error> {
    let sql = &shared.sql;
    let mut tx = shared.pool.begin_with(sql.begin.clone()).await?;
    let Some(row) = sqlx::query(&sql.replay_take)
        .bind(&shared.group)
        .bind(topics)
        .fetch_optional(&mut *tx)
        .await?
    else {
        tx.commit().await?;
        return Ok(false);
    };
    let id: i64 = row.try_get("id")?;
    let topic: String = row.try_get("topic")?;
    let stored: serde_json::Value = row.try_get("headers")?;
    let headers = match Headers::from_json(&stored) {
        Ok(h) => h,
        Err(e) => {
            tx.rollback().await?;
            failed(shared, id, &format!("cannot read the stored headers: {e}")).await?;
            return Ok(true);
        }
    };
    let mut msg = InboxMessage {
        topic: shared
            .routes
            .get_key_value(topic.as_str())
            .map_or_else(|| Arc::from(topic.as_str()), |(k, _)| k.clone()),
        partition: row.try_get("partition")?,
        offset: row.try_get("offset")?,
        key: row.try_get("key")?,
        payload: row.try_get("payload")?,
        headers,
        timestamp: None,
        event_id: row.try_get("event_id")?,
        id_is_position: false,
        rejected: None,
    };
    msg.id_is_position = msg.event_id == position_id(&msg.topic, msg.partition, msg.offset);
    let Some(route) = shared.routes.get(&*msg.topic) else {
        tx.commit().await?;
        return Ok(false);
    };
    if shared.opts.dedupe.records(&msg) {
        sqlx::query(&sql.replay_forget)
            .bind(&shared.group)
            .bind(&msg.event_id)
            .execute(&mut *tx)
            .await?;
    }
    let chunk = [msg];
    let failure = match run_handler(&mut tx, &shared.group, route, &chunk, &[0]).await {
        Ok(()) => None,
        Err((_, error)) => Some(error),
    };
    if let Some(error) = failure {
        tx.rollback().await?;
        match error {
            // The database, not the message: the request stays.
            super::HandlerError::Database(e) if crate::db::is_transient(&e) => return Err(e),
            error => failed(shared, id, &error.chain()).await?,
        }
        return Ok(true);
    }
    if shared.opts.dedupe.records(&chunk[0]) {
        record_processed(&mut tx, sql, &shared.group, &chunk[0]).await?;
    }
    let deleted = sqlx::query(&sql.replay_done)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if deleted != 1 {
        tx.rollback().await?;
        return Ok(true);
    }
    tx.commit().await?;
    metrics::counter!("txbox_inbox_replays_total", "outcome" => "applied").increment(1);
    tracing::info!(dead_letter = id, event_id = %chunk[0].event_id, topic = %chunk[0].topic,
        partition = chunk[0].partition, offset = chunk[0].offset, "dead letter replayed");
    Ok(true)
}

/// Clears the request of dead letter `id`, keeping why its replay failed.
async fn failed(shared: &Shared, id: i64, error: &str) -> Result<(), sqlx::Error> {
    sqlx::query(&shared.sql.replay_failed)
        .bind(id)
        .bind(error.replace('\0', "\u{FFFD}"))
        .execute(&shared.pool)
        .await?;
    metrics::counter!("txbox_inbox_replays_total", "outcome" => "failed").increment(1);
    tracing::warn!(
        dead_letter = id,
        error,
        "replayed dead letter failed again; kept, request cleared"
    );
    Ok(())
}
