//! Moving a consumer group's stored positions by hand: replay from an
//! earlier offset, skip ahead, or start a recreated topic over.

use std::collections::BTreeMap;

use sqlx::PgPool;

use crate::error::{Error, Result};
use crate::schema::Schema;

/// Where [`PositionReset`] moves each selected partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResetTo {
    /// This offset. `0` means the start of the log: when retention has
    /// removed it, the consumer starts at the oldest message retained
    /// (`auto.offset.reset`).
    Offset(i64),
    /// The stored position plus this many (negative: replay that many
    /// messages), never below 0.
    Shift(i64),
    /// Each partition to its own offset, e.g. a log's start or end read
    /// from the broker (`txbox offsets reset --to-earliest / --to-latest`).
    /// The map's keys select the partitions.
    Each(BTreeMap<i32, i64>),
}

/// One partition's position before and after a reset (or, for
/// [`PositionReset::preview`], what the reset would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PositionChange {
    /// The partition.
    pub partition: i32,
    /// The stored next offset before the reset.
    pub from: i64,
    /// The stored next offset after it.
    pub to: i64,
    /// The consumer that had claimed the partition: it is fenced.
    pub fenced_owner: Option<String>,
}

/// Moves one consumer group's stored positions on one topic, and fences
/// whoever owns them.
///
/// The inbox's positions live in Postgres, so this is the counterpart of
/// `kafka-consumer-groups --reset-offsets` (which would change nothing
/// here). Every moved partition's epoch is raised by one in the same
/// statement (no consumer holds that epoch: consumers hold epochs from
/// claims, and a row's epoch is never below one a consumer holds for it):
/// a consumer still running on it cannot commit again (its transaction rolls
/// back as fenced) and holds the partition without processing it until it
/// restarts or the group rebalances. So, as with Kafka's tool, stop the
/// group's consumers first.
///
/// Replaying is safe: event ids already processed are skipped, and so are
/// messages without an id of their own at offsets the group consumed
/// before (the partition's `consumed_until` watermark stays where it was;
/// see [`Dedupe`](super::Dedupe)), so a replay changes nothing unless the
/// dedupe window of the ids has expired. After a topic was deleted and
/// recreated, say so with [`new_log`](Self::new_log). A position past
/// the end of the log is out of range for Kafka: the consumer then follows
/// `auto.offset.reset` (`earliest` by default, so the retained log is read
/// again through dedupe), as after a recreated topic. The `txbox offsets
/// reset` command wraps this.
///
/// [`preview`](Self::preview) runs the same statement and rolls it back: it
/// holds the rows' locks for that moment, as a commit would.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> txbox::Result<()> {
/// use txbox::inbox::{PositionReset, ResetTo};
/// use txbox::Schema;
///
/// // Read partition 0 of `payments` again from its first message.
/// let reset = PositionReset::new(Schema::default(), "ledger", "payments", ResetTo::Offset(0))
///     .partitions([0]);
/// for change in reset.preview(&pool).await? {
///     println!("partition {}: {} -> {}", change.partition, change.from, change.to);
/// }
/// reset.apply(&pool).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PositionReset {
    schema: Schema,
    group: String,
    topic: String,
    partitions: Option<Vec<i32>>,
    to: ResetTo,
    new_log: bool,
}

impl PositionReset {
    /// A reset of every stored partition of `topic` for `group`.
    pub fn new(
        schema: Schema,
        group: impl Into<String>,
        topic: impl Into<String>,
        to: ResetTo,
    ) -> Self {
        PositionReset {
            schema,
            group: group.into(),
            topic: topic.into(),
            partitions: None,
            to,
            new_log: false,
        }
    }

    /// Only these partitions (not empty). Each must have a stored position.
    #[must_use]
    pub fn partitions(mut self, partitions: impl IntoIterator<Item = i32>) -> Self {
        self.partitions = Some(partitions.into_iter().collect());
        self
    }

    /// The partitions' logs are new (the topic was deleted and created
    /// again): forget what was consumed on the old ones.
    ///
    /// Each partition's `consumed_until` watermark moves with its position.
    /// Without this, a reset keeps it, so that a replay of offsets already
    /// consumed applies nothing twice: a message whose event id is its
    /// position (no id header), or any message with
    /// [`Dedupe::OffsetsOnly`](super::Dedupe::OffsetsOnly), at an offset
    /// below the watermark is taken as a redelivery and skipped. On a new
    /// log those offsets hold new messages: this applies them. Messages
    /// with ids of their own are still deduplicated by their ids.
    #[must_use]
    pub fn new_log(mut self) -> Self {
        self.new_log = true;
        self
    }

    /// What [`apply`](Self::apply) would do, computed by the same statement
    /// in a transaction that is rolled back. Changes nothing.
    pub async fn preview(&self, pool: &PgPool) -> Result<Vec<PositionChange>> {
        let mut tx = pool.begin().await?;
        let changes = self.execute(&mut tx).await?;
        tx.rollback().await?;
        Ok(changes)
    }

    /// Moves the positions and bumps their epochs, in one transaction.
    ///
    /// Fails with [`Error::Config`] for a negative target offset, and with
    /// [`Error::NoPosition`] when a selected partition (or, with no
    /// selection, the topic) has no stored position for the group; nothing
    /// is changed then.
    pub async fn apply(&self, pool: &PgPool) -> Result<Vec<PositionChange>> {
        let mut tx = pool.begin().await?;
        let changes = self.execute(&mut tx).await?;
        tx.commit().await?;
        Ok(changes)
    }

    async fn execute(&self, conn: &mut sqlx::PgConnection) -> Result<Vec<PositionChange>> {
        if let Some(o) = match &self.to {
            ResetTo::Offset(o) => Some(*o),
            ResetTo::Shift(_) => None,
            ResetTo::Each(each) => each.values().copied().min(),
        }
        .filter(|o| *o < 0)
        {
            return Err(Error::config(format!(
                "reset offset must be 0 or more, not {o}"
            )));
        }
        let partitions: Option<Vec<i32>> = match (&self.to, &self.partitions) {
            (ResetTo::Each(_), Some(_)) => {
                return Err(Error::config(
                    "reset: with per-partition offsets, the offsets select the partitions",
                ))
            }
            (ResetTo::Each(each), None) => Some(each.keys().copied().collect()),
            (_, selected) => selected.clone(),
        };
        if partitions.as_ref().is_some_and(Vec::is_empty) {
            return Err(Error::config("reset: the partition list is empty"));
        }
        let (mode, value, each) = match &self.to {
            ResetTo::Offset(o) => ("offset", *o, BTreeMap::new()),
            ResetTo::Shift(n) => ("shift", *n, BTreeMap::new()),
            ResetTo::Each(each) => ("each", 0, each.clone()),
        };
        let (each_partitions, each_offsets): (Vec<i32>, Vec<i64>) = each.into_iter().unzip();
        let offsets = self.schema.table("inbox_offsets");
        let rows: Vec<(i32, i64, i64, Option<String>)> = sqlx::query_as(&format!(
            "WITH target AS (
                 SELECT consumer_group, topic, partition, next_offset, owner FROM {offsets}
                 WHERE consumer_group = $1 AND topic = $2
                   AND ($3::int4[] IS NULL OR partition = ANY($3))
                 FOR UPDATE
             )
             UPDATE {offsets} AS o
             SET next_offset = CASE $4::text
                 WHEN 'offset' THEN $5
                 WHEN 'shift' THEN
                     GREATEST(0, LEAST(9223372036854775807, t.next_offset::numeric + $5))::int8
                 ELSE (SELECT w.next_offset FROM unnest($6::int4[], $7::int8[]) AS w(partition, next_offset)
                       WHERE w.partition = t.partition) END,
                 epoch = o.epoch + 1, owner = NULL, updated_at = now(),
                 consumed_until = GREATEST(o.consumed_until, t.next_offset)
             FROM target t
             WHERE o.consumer_group = t.consumer_group AND o.topic = t.topic
               AND o.partition = t.partition
             RETURNING o.partition, t.next_offset, o.next_offset, t.owner"
        ))
        .bind(&self.group)
        .bind(&self.topic)
        .bind(partitions.as_deref())
        .bind(mode)
        .bind(value)
        .bind(&each_partitions)
        .bind(&each_offsets)
        .fetch_all(&mut *conn)
        .await?;
        if self.new_log {
            // The watermark starts at the new position: nothing of the new
            // log is consumed yet.
            sqlx::query(&format!(
                "UPDATE {offsets} SET consumed_until = next_offset
                 WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3)"
            ))
            .bind(&self.group)
            .bind(&self.topic)
            .bind(rows.iter().map(|r| r.0).collect::<Vec<i32>>())
            .execute(&mut *conn)
            .await?;
        }
        let missing: Vec<i32> = match &partitions {
            Some(wanted) => {
                let mut missing: Vec<i32> = wanted
                    .iter()
                    .copied()
                    .filter(|p| !rows.iter().any(|r| r.0 == *p))
                    .collect();
                missing.sort_unstable();
                missing.dedup();
                missing
            }
            None => Vec::new(),
        };
        if rows.is_empty() || !missing.is_empty() {
            return Err(Error::NoPosition {
                group: self.group.clone(),
                topic: self.topic.clone(),
                partitions: missing,
            });
        }
        let mut changes: Vec<PositionChange> = rows
            .into_iter()
            .map(|(partition, from, to, fenced_owner)| PositionChange {
                partition,
                from,
                to,
                fenced_owner,
            })
            .collect();
        changes.sort_by_key(|c| c.partition);
        Ok(changes)
    }
}
