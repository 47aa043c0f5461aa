//! Which database history a relay position belongs to.
//!
//! A position `(txid, id)` orders rows only within one history of
//! transaction ids. Restore a dump into a new cluster, cut over with
//! logical replication, fail over to an asynchronous standby or recover to
//! a point in time, and rows staged afterwards can sort at or below the
//! stored position: a relay resuming after it would never read them, and
//! its pruner would delete them.
//!
//! So every position is recorded with the identity of its history,
//! `{installation}@{system_identifier}/{database oid}`: the installation id
//! the migration created (copied by a dump or a template, kept by a
//! physical standby), the cluster's `system_identifier` (new in every
//! cluster `initdb` or a restore creates, shared by physical standbys) and
//! the database's oid (new for a copy in the same cluster), followed by
//! `~{anchor}`, an id drawn each time the stream is anchored (so that
//! `txbox relay re-anchor` retires every position recorded before it, also
//! on Kafka). The relay checks, when it takes a stream and before every
//! prune, that
//!
//! - the stream's stored history is the database's current one, and
//! - the stored position's txid is below the current snapshot's `xmax`
//!   (a failover to a standby that had not replayed that far, or a
//!   point-in-time recovery, leaves the transaction counter behind it),
//!
//! and otherwise stops the stream with [`Error::HistoryChanged`], before
//! publishing or deleting anything. `txbox relay re-anchor` moves the
//! stream to the current history.

use std::fmt;

use sqlx::PgPool;

use crate::cursor::Position;
use crate::error::{Error, Result};

/// The identity of a database history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct History {
    /// The id of this installation of the txbox schema.
    pub installation: uuid::Uuid,
    /// The PostgreSQL cluster's `system_identifier`.
    pub system_identifier: i64,
    /// The database's oid.
    pub database: i64,
}

impl fmt::Display for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}@{}/{}",
            self.installation, self.system_identifier, self.database
        )
    }
}

impl History {
    /// A new anchor in this history: `{history}~{random id}`, the form
    /// positions are stored with.
    pub fn new_anchor(&self) -> String {
        format!("{self}~{}", uuid::Uuid::new_v4().simple())
    }

    /// The history part of a stored anchor (everything before `~`).
    pub fn of_anchor(anchor: &str) -> &str {
        anchor
            .split_once('~')
            .map_or(anchor, |(history, _)| history)
    }
}

/// Reads and checks histories in one schema.
#[derive(Clone, Debug)]
pub struct Histories {
    current_sql: String,
    stream_sql: String,
    stream_state_sql: String,
    backlog_sql: String,
    re_anchor_sql: String,
    rewrite_sql: String,
    new_installation_sql: String,
}

/// What [`Histories::re_anchor`] found, and did.
#[derive(Clone, Debug)]
pub struct ReAnchor {
    /// The stream.
    pub stream: i32,
    /// The history the stored position was recorded in (`None`: none
    /// recorded).
    pub stored_history: Option<String>,
    /// The stored position.
    pub stored_position: Position,
    /// The database's current history.
    pub current: History,
    /// The database's next transaction id.
    pub xmax: u64,
    /// Rows in the stream's outbox, all published again after it.
    pub backlog: i64,
    /// Of those, rows whose transaction id lies in this history's future
    /// (copied from a history that had run further): without a new id they
    /// would wait, unpublished, until this database's counter caught up.
    pub future: i64,
    /// Rows given the re-anchoring transaction's id (all of the backlog:
    /// they are then published in id order, which keeps each key's
    /// staging order).
    pub rewritten: i64,
    /// The anchor recorded (`None` in a dry run).
    pub anchor: Option<String>,
}

/// What [`Histories::check`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HistoryCheck {
    /// Same history, position below `xmax`: go on.
    Same,
    /// The stream has no history yet (fresh, or positions recorded before
    /// histories were): it is anchored in the current one.
    Unanchored,
}

impl Histories {
    /// Histories of the txbox schema `schema`.
    pub fn new(schema: &txbox::Schema) -> Self {
        Histories {
            current_sql: format!(
                "SELECT i.id, c.system_identifier::bigint,
                        (SELECT oid::bigint FROM pg_database WHERE datname = current_database()),
                        pg_snapshot_xmax(pg_current_snapshot())::text::bigint
                   FROM {installation} i, pg_control_system() c",
                installation = schema.table("installation"),
            ),
            stream_sql: format!(
                "SELECT history, position_txid::text, position_id FROM {streams} WHERE stream = $1",
                streams = schema.table("relay_streams"),
            ),
            stream_state_sql: format!(
                "SELECT history, position_txid::text, position_id, fencing_token, owner,
                        coalesce(lease_expires_at > now(), false)
                   FROM {streams} WHERE stream = $1",
                streams = schema.table("relay_streams"),
            ),
            backlog_sql: format!(
                "SELECT count(*),
                        count(*) FILTER (WHERE txid >= pg_snapshot_xmax(pg_current_snapshot()))
                   FROM {outbox} WHERE stream = $1",
                outbox = schema.table("outbox"),
            ),
            rewrite_sql: format!(
                "UPDATE {outbox} SET txid = pg_current_xact_id() WHERE stream = $1",
                outbox = schema.table("outbox"),
            ),
            new_installation_sql: format!(
                "UPDATE {installation} SET id = $1",
                installation = schema.table("installation"),
            ),
            re_anchor_sql: format!(
                "UPDATE {streams}
                    SET history = $2, position_txid = '0', position_id = 0,
                        fencing_token = fencing_token + 1, owner = NULL, lease_expires_at = NULL,
                        updated_at = now()
                  WHERE stream = $1 AND fencing_token = $3",
                streams = schema.table("relay_streams"),
            ),
        }
    }

    /// Anchors `stream` in the database's current history, at the start,
    /// under a new anchor (positions recorded before it, in PostgreSQL or
    /// on Kafka, no longer count): every row still in its outbox is
    /// published again (rows published before a restore and not yet pruned
    /// twice, with their event ids; no row lost), and its holder, if any,
    /// is fenced. The stream's rows get the re-anchoring transaction's id,
    /// in the same transaction, so they are published now and in id order
    /// (rows copied from a history that had run further would otherwise
    /// wait for the counter to catch up, and follow newer rows).
    ///
    /// With `new_installation` the schema also gets a new installation id
    /// first: for a copy of a database (`CREATE DATABASE ... TEMPLATE`, a
    /// dump restored beside the original) that lives on as a service of its
    /// own, so that its relays neither fence the original's nor read its
    /// positions. Every other stream of the schema must then be re-anchored
    /// too. With `execute` false, only reports what it would do.
    ///
    /// # Errors
    /// [`Error::Operation`] when the stream has no row or a relay holds a
    /// current lease on it (stop the stream's relays first), or when it
    /// changed meanwhile; database errors.
    pub async fn re_anchor(
        &self,
        pool: &PgPool,
        stream: i32,
        new_installation: bool,
        execute: bool,
    ) -> Result<ReAnchor> {
        type Row = (Option<String>, String, i64, i64, Option<String>, bool);
        let row: Option<Row> = sqlx::query_as(&self.stream_state_sql)
            .bind(stream)
            .fetch_optional(pool)
            .await?;
        let Some((stored_history, txid, id, token, owner, leased)) = row else {
            return Err(Error::Operation(
                format!("relay stream {stream} has no position yet: nothing to re-anchor").into(),
            ));
        };
        let (mut current, xmax) = self.current(pool).await?;
        let (backlog, future): (i64, i64) = sqlx::query_as(&self.backlog_sql)
            .bind(stream)
            .fetch_one(pool)
            .await?;
        if new_installation {
            current.installation = uuid::Uuid::new_v4();
        }
        let mut plan = ReAnchor {
            stream,
            stored_history,
            stored_position: Position::from_db(&txid, id)?,
            current,
            xmax,
            backlog,
            future,
            rewritten: 0,
            anchor: None,
        };
        if leased {
            return Err(Error::Operation(
                format!(
                    "relay instance {} holds a current lease on stream {stream}: stop the stream's relays first",
                    owner.as_deref().unwrap_or("?")
                )
                .into(),
            ));
        }
        if !execute {
            return Ok(plan);
        }
        let anchor = plan.current.new_anchor();
        let mut tx = pool.begin().await?;
        if new_installation {
            sqlx::query(&self.new_installation_sql)
                .bind(plan.current.installation)
                .execute(&mut *tx)
                .await?;
        }
        let done = sqlx::query(&self.re_anchor_sql)
            .bind(stream)
            .bind(&anchor)
            .bind(token)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() != 1 {
            return Err(Error::Operation(
                format!("relay stream {stream} changed while re-anchoring (a relay took it): stop its relays and run again")
                    .into(),
            ));
        }
        let moved = sqlx::query(&self.rewrite_sql)
            .bind(stream)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        plan.rewritten = i64::try_from(moved.rows_affected()).unwrap_or(i64::MAX);
        plan.anchor = Some(anchor);
        Ok(plan)
    }

    /// Checks the position stored in `relay_streams` for `stream` against
    /// the database's current history (`Ok` when there is no row yet).
    ///
    /// # Errors
    /// [`Error::HistoryChanged`], or a database error.
    pub async fn verify_stream(&self, pool: &PgPool, stream: i32) -> Result<HistoryCheck> {
        let row: Option<(Option<String>, String, i64)> = sqlx::query_as(&self.stream_sql)
            .bind(stream)
            .fetch_optional(pool)
            .await?;
        let Some((stored, txid, id)) = row else {
            return Ok(HistoryCheck::Unanchored);
        };
        let (current, xmax) = self.current(pool).await?;
        Self::check(
            stream,
            stored.as_deref(),
            Position::from_db(&txid, id)?,
            &current,
            xmax,
        )
    }

    /// The database's current history, and its next transaction id
    /// (the current snapshot's `xmax`).
    pub async fn current(&self, pool: &PgPool) -> Result<(History, u64)> {
        let (installation, system_identifier, database, xmax): (uuid::Uuid, i64, i64, i64) =
            sqlx::query_as(&self.current_sql).fetch_one(pool).await?;
        Ok((
            History {
                installation,
                system_identifier,
                database,
            },
            u64::try_from(xmax).unwrap_or(0),
        ))
    }

    /// Checks that `position`, recorded in `stored` (`None`: never
    /// anchored), belongs to the database's current history `current`
    /// whose next transaction id is `xmax`.
    ///
    /// # Errors
    /// [`Error::HistoryChanged`] naming both histories and what to run.
    pub fn check(
        stream: i32,
        stored: Option<&str>,
        position: Position,
        current: &History,
        xmax: u64,
    ) -> Result<HistoryCheck> {
        let current_text = current.to_string();
        if let Some(stored) = stored {
            if History::of_anchor(stored) != current_text {
                return Err(Error::HistoryChanged {
                    stream,
                    position,
                    reason: format!(
                        "it was recorded in database history {stored}, and this database is {current_text} \
                         (restored from a dump, a new cluster, or a logical-replication cutover?)"
                    ),
                });
            }
        }
        if position.txid >= xmax && position != Position::START {
            return Err(Error::HistoryChanged {
                stream,
                position,
                reason: format!(
                    "its transaction id is not below the database's next one ({xmax}): the transaction \
                     counter moved back (a failover to a standby that was behind, or a point-in-time recovery?)"
                ),
            });
        }
        Ok(if stored.is_some() {
            HistoryCheck::Same
        } else {
            HistoryCheck::Unanchored
        })
    }
}
