//! Writing events into the outbox table.

use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::{stream_for_key, KeyOrder, OutboxEvent};
use crate::error::{Error, Result};
use crate::schema::Schema;
use crate::trace::TraceContext;

/// Stages events into the outbox of one txbox schema.
///
/// Cheap to clone; build once and share. Staging takes the connection of the
/// caller's transaction (`&mut *tx`), so the events commit or roll back with
/// the business writes beside them.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> txbox::Result<()> {
/// use txbox::{Outbox, OutboxEvent, Schema};
///
/// let outbox = Outbox::new(Schema::default());
/// let mut tx = pool.begin().await?;
/// sqlx::query("UPDATE account SET balance = balance - 100 WHERE id = $1")
///     .bind("a-1")
///     .execute(&mut *tx)
///     .await?;
/// outbox
///     .stage(&mut tx, OutboxEvent::json("payments.settled", &serde_json::json!({"account": "a-1"}))?.key("a-1"))
///     .await?;
/// tx.commit().await?; // the event now exists, and only now
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Outbox {
    streams: u32,
    notify_channel: Option<String>,
    key_order: KeyOrder,
    /// The statements for keyless batches (and every batch in
    /// [`KeyOrder::FirstWrite`]).
    plain: Statements,
    /// The statements that claim the keys' order heads first
    /// ([`KeyOrder::Commit`]).
    claiming: Statements,
}

/// The insert, with and without NOTIFY.
#[derive(Debug, Clone)]
struct Statements {
    /// A plain insert, when no NOTIFY is sent.
    insert: String,
    /// The insert and one `pg_notify` per stream written, in one statement.
    insert_notify: String,
}

impl Statements {
    /// `$1..$6` are the rows' columns, `$7` the NOTIFY channel. With
    /// `claim`, the insert runs only after `outbox_key_order_claim` took
    /// the keys' heads: an uncorrelated subquery in `WHERE` is a one-time
    /// filter, evaluated once, before any row (and its id) is made.
    fn new(schema: &Schema, claim: bool) -> Self {
        let table = schema.table("outbox");
        let filter = if claim {
            format!(
                " WHERE (SELECT {}($1, $2, $3))",
                schema.table("outbox_key_order_claim")
            )
        } else {
            String::new()
        };
        let insert = format!(
            "INSERT INTO {table} (stream, topic, key, payload, headers, event_id)
             SELECT * FROM unnest($1::int4[], $2::text[], $3::bytea[], $4::bytea[], $5::jsonb[], $6::uuid[]){filter}"
        );
        Statements {
            insert_notify: format!(
                "WITH ins AS ({insert} RETURNING stream)
                 SELECT count(*) AS staged,
                        (SELECT count(pg_notify($7, s::text)) FROM (SELECT DISTINCT stream AS s FROM ins) d)
                          AS notified
                 FROM ins"
            ),
            insert,
        }
    }
}

impl Outbox {
    /// An outbox in `schema` with one relay stream, no NOTIFY and
    /// [`KeyOrder::FirstWrite`].
    pub fn new(schema: Schema) -> Self {
        Outbox {
            plain: Statements::new(&schema, false),
            claiming: Statements::new(&schema, true),
            streams: 1,
            notify_channel: None,
            key_order: KeyOrder::FirstWrite,
        }
    }

    /// Shards rows over `n` relay streams by key hash (default 1). Every
    /// writer and relay of a schema must agree on `n`; changing it moves
    /// keys between streams, so drain the outbox first.
    pub fn streams(mut self, n: u32) -> Result<Self> {
        if n == 0 || n > 4096 {
            return Err(Error::config("outbox streams must be between 1 and 4096"));
        }
        self.streams = n;
        Ok(self)
    }

    /// Sends `pg_notify(channel, stream)` in the staging transaction, a
    /// wake-up hint for the relay (delivered only on commit). Never needed
    /// for correctness: the relay also polls. The relay listens on
    /// [`DEFAULT_NOTIFY_CHANNEL`](super::DEFAULT_NOTIFY_CHANNEL) unless told
    /// otherwise.
    pub fn notify(mut self, channel: impl Into<String>) -> Self {
        self.notify_channel = Some(channel.into());
        self
    }

    /// Publishes each key's events in the order of `order` across
    /// transactions (default [`KeyOrder::FirstWrite`]). Every writer of a
    /// key must use the same order; see [`KeyOrder`] for what
    /// [`KeyOrder::Commit`] costs and how staging can then fail.
    ///
    /// ```
    /// use txbox::outbox::KeyOrder;
    /// use txbox::{Outbox, Schema};
    ///
    /// let outbox = Outbox::new(Schema::default()).streams(4)?.key_order(KeyOrder::Commit);
    /// # Ok::<(), txbox::Error>(())
    /// ```
    pub fn key_order(mut self, order: KeyOrder) -> Self {
        self.key_order = order;
        self
    }

    /// The number of relay streams.
    pub fn stream_count(&self) -> u32 {
        self.streams
    }

    /// Stages one event; returns its id.
    ///
    /// With [`KeyOrder::Commit`] this fails with a serialization failure
    /// (SQLSTATE 40001, [`Error::is_transient`]) when a transaction that
    /// began writing after this one staged the same key and committed
    /// first; the transaction is then aborted: retry all of it. Returned
    /// from an inbox handler with `?`, it is retried for you without
    /// counting as an attempt.
    pub async fn stage(&self, conn: &mut PgConnection, event: OutboxEvent) -> Result<Uuid> {
        let id = event.event_id;
        self.stage_all(conn, [event]).await?;
        Ok(id)
    }

    /// Stages many events in one round trip; returns their ids in order.
    /// Within a key, staging order is publishing order. With
    /// [`KeyOrder::Commit`], the keys' order heads are taken in (topic,
    /// key) order, so two transactions staging the same keys in one call
    /// each do not deadlock; fails as [`Outbox::stage`] does.
    pub async fn stage_all(
        &self,
        conn: &mut PgConnection,
        events: impl IntoIterator<Item = OutboxEvent>,
    ) -> Result<Vec<Uuid>> {
        let events: Vec<OutboxEvent> = events.into_iter().collect();
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let n = events.len();
        let mut streams = Vec::with_capacity(n);
        let mut topics = Vec::with_capacity(n);
        let mut keys: Vec<Option<Vec<u8>>> = Vec::with_capacity(n);
        let mut payloads: Vec<Option<Vec<u8>>> = Vec::with_capacity(n);
        let mut headers = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        let trace = TraceContext::current();
        for e in events {
            e.validate()?;
            // Keyless events carry no order; spread them by event id.
            let stream = stream_for_key(
                e.key.as_deref().unwrap_or(e.event_id.as_bytes()),
                self.streams,
            );
            streams.push(stream);
            headers.push(e.stored_headers(trace.as_ref()).to_json());
            ids.push(e.event_id);
            topics.push(e.topic);
            keys.push(e.key);
            payloads.push(e.payload);
        }
        crate::crash_point!("outbox.before_stage");
        let sql = match self.key_order {
            KeyOrder::Commit if keys.iter().any(Option::is_some) => &self.claiming,
            _ => &self.plain,
        };
        let insert = |sql| {
            sqlx::query(sql)
                .bind(&streams)
                .bind(&topics)
                .bind(&keys)
                .bind(&payloads)
                .bind(&headers)
                .bind(&ids)
        };
        let staged: u64 = match &self.notify_channel {
            None => insert(&sql.insert).execute(conn).await?.rows_affected(),
            Some(channel) => {
                let row = insert(&sql.insert_notify)
                    .bind(channel)
                    .fetch_one(conn)
                    .await?;
                u64::try_from(row.try_get::<i64, _>("staged")?).unwrap_or(0)
            }
        };
        if usize::try_from(staged).ok() != Some(n) {
            return Err(Error::InvalidEvent(
                format!("staged {staged} of {n} events").into(),
            ));
        }
        Ok(ids)
    }
}
