//! The inbox: builder and consume loop.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::assignment::InboxContext;
use super::commit::Route;
use super::config::{FailureAction, Options, RetryPolicy, StartFrom, Waits};
use super::handler::{BatchHandler, Handler};
use super::message::{identify, position_id, Identity};
use super::shared::Shared;
use super::sql::Statements;
use super::{Dedupe, EventIdSource, InboxMessage};
use crate::error::{Error, Result};
use crate::headers::Headers;
use crate::schema::{Migrator, Schema};

/// A Kafka consumer whose positions, dedupe and effects commit together in
/// PostgreSQL. Build with [`Inbox::builder`], then [`run`](Inbox::run).
///
/// # Examples
///
/// ```no_run
/// use txbox::inbox::{Handler, HandlerError, Inbox, InboxMessage, Tx};
///
/// struct Audit;
///
/// #[async_trait::async_trait]
/// impl Handler for Audit {
///     async fn handle(&self, tx: &mut Tx, msg: &InboxMessage) -> Result<(), HandlerError> {
///         sqlx::query("INSERT INTO audit (event_id, body) VALUES ($1, $2)")
///             .bind(msg.event_id())
///             .bind(msg.text()?)
///             .execute(&mut **tx)
///             .await?;
///         Ok(())
///     }
/// }
///
/// # async fn demo(pool: sqlx::PgPool) -> txbox::Result<()> {
/// let inbox = Inbox::builder(pool)
///     .brokers("127.0.0.1:9092")
///     .group_id("audit")
///     .handler("orders", Audit)
///     .build()?;
/// inbox.run(async { let _ = tokio::signal::ctrl_c().await; }).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Inbox {
    shared: Arc<Shared>,
    schema: Schema,
    kafka: ClientConfig,
    event_ids: EventIdSource,
}

/// Configures an [`Inbox`]. Every option has a default except the brokers,
/// the group id and at least one handler.
#[derive(Debug)]
#[must_use]
pub struct InboxBuilder {
    pool: PgPool,
    schema: Schema,
    kafka: ClientConfig,
    group: Option<String>,
    owner: Option<String>,
    routes: HashMap<Arc<str>, Route>,
    opts: Options,
    /// Set by [`InboxBuilder::transaction_idle_timeout`]; otherwise derived
    /// from the session timeout at build.
    idle_timeout: Option<Duration>,
    event_ids: EventIdSource,
}

impl Inbox {
    /// Starts configuring an inbox that writes through `pool`.
    ///
    /// The pool should allow at least one connection per partition this
    /// consumer may own, plus one.
    pub fn builder(pool: PgPool) -> InboxBuilder {
        InboxBuilder {
            pool,
            schema: Schema::default(),
            kafka: ClientConfig::new(),
            group: None,
            owner: None,
            routes: HashMap::new(),
            opts: Options::default(),
            idle_timeout: None,
            event_ids: EventIdSource::default(),
        }
    }

    /// Consumes until `shutdown` completes, then finishes in-flight
    /// transactions (or lets them roll back) and leaves the group.
    ///
    /// Fails at once, with a typed error, if the schema is not migrated, the
    /// brokers cannot be reached within 10 s, or a subscribed topic does not
    /// exist. Afterwards, broker and database outages are waited out:
    /// nothing advances while the database is down.
    ///
    /// Requires Tokio's multi-threaded runtime: partition claims run on the
    /// polling thread during rebalances (`block_in_place`).
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        if tokio::runtime::Handle::current().runtime_flavor()
            != tokio::runtime::RuntimeFlavor::MultiThread
        {
            return Err(Error::config(
                "the inbox needs a multi-threaded tokio runtime",
            ));
        }
        Migrator::new(self.schema.clone())
            .verify(&self.shared.pool)
            .await?;
        let stop = CancellationToken::new();
        let ctx = InboxContext {
            shared: self.shared.clone(),
            slots: Mutex::new(HashMap::new()),
            workers: Mutex::new(Vec::new()),
            shutdown: stop.clone(),
            handle: tokio::runtime::Handle::current(),
        };
        let consumer: StreamConsumer<InboxContext> = self.kafka.create_with_context(ctx)?;
        let topics: Vec<&str> = self.shared.routes.keys().map(|t| &**t).collect();
        check_topics(&consumer, &topics)?;
        consumer.subscribe(&topics)?;
        tracing::info!(group = %self.shared.group, ?topics, owner = %self.shared.owner, "inbox started");

        let pruner = tokio::spawn(super::prune::run(self.shared.clone(), stop.clone()));
        let replayer = tokio::spawn(super::replay::run(self.shared.clone(), stop.clone()));
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut last_mirror = tokio::time::Instant::now();
        let mut last_error: Option<(String, tokio::time::Instant)> = None;
        let mut suppressed = 0u64;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = self.shared.drained.notified() => resume_drained(&consumer),
                _ = tick.tick() => {
                    resume_drained(&consumer);
                    if let Some(every) = self.shared.opts.mirror_offsets {
                        if last_mirror.elapsed() >= every {
                            last_mirror = tokio::time::Instant::now();
                            mirror_offsets(&consumer);
                        }
                    }
                }
                msg = consumer.recv() => match msg {
                    Ok(m) => {
                        let owned = self.to_owned(&m);
                        if let Some((topic, partition)) = consumer.context().dispatch(owned) {
                            set_paused(&consumer, &topic, partition, true);
                        }
                    }
                    Err(e) => {
                        // Repeated errors (a missing topic, a broker down)
                        // are logged once every 10 s, counted meanwhile.
                        let text = e.to_string();
                        if last_error.as_ref().is_none_or(|(t, at)| *t != text || at.elapsed() >= Duration::from_secs(10)) {
                            tracing::warn!(error = %text, repeats = suppressed, "kafka consumer error");
                            last_error = Some((text, tokio::time::Instant::now()));
                            suppressed = 0;
                        } else {
                            suppressed += 1;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        tracing::info!("inbox shutting down");
        stop.cancel();
        let ctx = consumer.context();
        ctx.release_all();
        let workers: Vec<_> = std::mem::take(
            &mut *ctx
                .workers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for w in workers {
            let _ = w.await;
        }
        let _ = pruner.await;
        let _ = replayer.await;
        consumer.unsubscribe();
        // Dropping the consumer closes it: librdkafka leaves the group and
        // the drop polls until it has, blocking this thread; the runtime's
        // other tasks move to another meanwhile.
        tokio::task::block_in_place(move || drop(consumer));
        Ok(())
    }

    fn to_owned(&self, m: &BorrowedMessage<'_>) -> InboxMessage {
        let topic = m.topic();
        let payload = m.payload().map(<[u8]>::to_vec);
        let Identity {
            headers,
            event_id,
            id_is_position,
            rejected,
        } = identify(
            &self.event_ids,
            || Headers::from_kafka(m.headers()),
            payload.as_deref(),
            || position_id(topic, m.partition(), m.offset()),
        );
        InboxMessage {
            topic: self
                .shared
                .routes
                .get_key_value(topic)
                .map_or_else(|| Arc::from(topic), |(k, _)| k.clone()),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload,
            headers,
            timestamp: m
                .timestamp()
                .to_millis()
                .and_then(|ms| Utc.timestamp_millis_opt(ms).single()),
            event_id,
            id_is_position,
            rejected,
        }
    }
}

/// Fails at start, with a clear error, when the brokers cannot be reached or
/// a subscribed topic does not exist (txbox never creates topics).
fn check_topics(consumer: &StreamConsumer<InboxContext>, topics: &[&str]) -> Result<()> {
    let metadata =
        tokio::task::block_in_place(|| consumer.fetch_metadata(None, Duration::from_secs(10)))?;
    let missing: Vec<&str> = topics
        .iter()
        .copied()
        .filter(|t| {
            !metadata
                .topics()
                .iter()
                .any(|m| m.name() == *t && m.error().is_none())
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::config(format!(
            "inbox: topics {missing:?} do not exist on the brokers; create them first"
        )))
    }
}

/// Commits the positions Postgres holds to Kafka, asynchronously, for lag
/// tools. Informational only: the inbox never reads them back.
fn mirror_offsets(consumer: &StreamConsumer<InboxContext>) {
    let positions = consumer.context().unmirrored();
    if positions.is_empty() {
        return;
    }
    tracing::debug!(?positions, "mirroring positions to Kafka");
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), next) in positions {
        if let Err(e) = tpl.add_partition_offset(&topic, partition, Offset::Offset(next)) {
            tracing::debug!(error = %e, "cannot mirror offset");
        }
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
        tracing::debug!(error = %e, "mirroring offsets to Kafka failed (informational only)");
    }
}

/// Resumes the partitions paused for backpressure whose queue has drained.
///
/// librdkafka (2.12) clears the pause on its main thread without waking the
/// thread that fetches from the partition's leader. When that thread has
/// no other fetch in flight (one partition per broker, say), it notices
/// only at its next periodic wake-up, up to a second later, while the
/// worker's queue runs dry: on Apache Kafka, one partition at 100 messages
/// per transaction ran at about half its speed, paused and resumed every
/// 5,000 messages. [`wake_fetcher`] wakes it.
fn resume_drained(consumer: &StreamConsumer<InboxContext>) {
    let drained = consumer.context().drained();
    for (topic, partition) in &drained {
        set_paused(consumer, topic, *partition, false);
    }
    for (topic, partition) in &drained {
        wake_fetcher(consumer, topic, *partition);
    }
}

/// How long [`wake_fetcher`] waits for its answer, which is not used.
const WAKE_TIMEOUT: Duration = Duration::from_millis(10);

/// librdkafka options the inbox sets unless the user did
/// ([`InboxBuilder::kafka_option`]).
const KAFKA_DEFAULTS: &[(&str, &str)] = &[
    // Only used when a stored position is out of range (retention deleted
    // it, or the topic was recreated): continue from the oldest message
    // retained; the workers follow the move.
    ("auto.offset.reset", "earliest"),
    ("fetch.wait.max.ms", FETCH_WAIT_MAX_MS),
];

/// The inbox's default `fetch.wait.max.ms` (librdkafka's is 500): how long
/// the broker holds a fetch at the end of the log before answering empty.
/// librdkafka keeps one fetch in flight per broker, so a partition resumed
/// after a backpressure pause is fetched again only once that long poll
/// ends; at 500 ms a hot partition near the end of its log ran dry on
/// every resume (one partition, batches of 100: medians of three rounds
/// 0.81 of the hand-written consumer at 500 ms, 1.03 at 100 ms). The
/// price: an idle consumer sends up to ten fetch requests a second to
/// each broker leading one of its partitions, instead of two.
const FETCH_WAIT_MAX_MS: &str = "100";

/// Sends a watermark query to the partition's leader: queueing the request
/// wakes the thread that serves that broker, which then sees the partition
/// fetchable again (and the response wakes it once more, should the resume
/// not have been applied yet). Nothing else changes: the fetch position is
/// librdkafka's own, the offset after the last message delivered.
fn wake_fetcher(consumer: &StreamConsumer<InboxContext>, topic: &str, partition: i32) {
    let asked =
        tokio::task::block_in_place(|| consumer.fetch_watermarks(topic, partition, WAKE_TIMEOUT));
    if let Err(e) = asked {
        tracing::debug!(topic, partition, error = %e, "watermark query after resume failed (only a wake-up)");
    }
}

fn set_paused(consumer: &StreamConsumer<InboxContext>, topic: &str, partition: i32, pause: bool) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let r = if pause {
        consumer.pause(&tpl)
    } else {
        consumer.resume(&tpl)
    };
    if let Err(e) = r {
        tracing::warn!(topic, partition, pause, error = %e, "pause/resume failed");
    }
}

impl InboxBuilder {
    /// Kafka bootstrap servers (`bootstrap.servers`).
    pub fn brokers(self, brokers: &str) -> Self {
        self.kafka_option("bootstrap.servers", brokers)
    }

    /// Any librdkafka consumer option (security, SASL, TLS, timeouts...).
    /// `enable.auto.commit`, `enable.auto.offset.store` and `group.id` are
    /// managed by the inbox and overridden.
    ///
    /// `auto.offset.reset` (default here `earliest`) applies only when a
    /// stored position is out of the log's range: retention removed it, or
    /// the topic was deleted and recreated. The inbox follows where Kafka
    /// moves the partition, backwards too (a recreated topic's log is
    /// applied, not skipped as consumed); `error` stalls the partition with
    /// a consumer error instead, for an operator to decide (`txbox offsets
    /// reset`).
    ///
    /// `fetch.wait.max.ms` defaults here to 100 (librdkafka: 500): a
    /// partition resumed after a backpressure pause (see
    /// [`max_buffered`](Self::max_buffered)) waits at most that long for a
    /// fetch held at the end of the log.
    pub fn kafka_option(mut self, key: &str, value: &str) -> Self {
        self.kafka.set(key, value);
        self
    }

    /// The consumer group: Kafka's group for assignment, and txbox's key for
    /// offsets and dedupe.
    pub fn group_id(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// The txbox schema (default `txbox`).
    pub fn schema(mut self, schema: Schema) -> Self {
        self.schema = schema;
        self
    }

    /// Handles `topic` one message at a time (within batched transactions).
    pub fn handler(mut self, topic: &str, handler: impl Handler) -> Self {
        self.routes
            .insert(Arc::from(topic), Route::Each(Arc::new(handler)));
        self
    }

    /// Handles `topic` with a batch handler.
    pub fn batch_handler(mut self, topic: &str, handler: impl BatchHandler) -> Self {
        self.routes
            .insert(Arc::from(topic), Route::Batch(Arc::new(handler)));
        self
    }

    /// Messages per transaction, at most (default 100). Only messages
    /// already fetched are batched unless [`linger`](Self::linger) is set;
    /// 1 gives one transaction per message.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.opts.batch_size = n.max(1);
        self
    }

    /// How long a partition waits for a batch to fill (default 0).
    pub fn linger(mut self, d: Duration) -> Self {
        self.opts.linger = d;
        self
    }

    /// Retry policy for failing messages (default 5 attempts).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.opts.retry = policy;
        self
    }

    /// What to do with a message that cannot be applied (default:
    /// dead-letter).
    pub fn on_failure(mut self, action: FailureAction) -> Self {
        self.opts.on_failure = action;
        self
    }

    /// Where to start on a partition the group never committed (default:
    /// earliest).
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.opts.start_from = start;
        self
    }

    /// Where event ids come from (default: `ce_id`, then `txbox-event-id`).
    pub fn event_id(mut self, source: EventIdSource) -> Self {
        self.event_ids = source;
        self
    }

    /// What the inbox records to drop duplicates (default
    /// [`Dedupe::EventIds`]). [`Dedupe::OffsetsOnly`] keeps no event ids,
    /// only each partition's position: read its safety conditions first.
    pub fn dedupe(mut self, dedupe: Dedupe) -> Self {
        self.opts.dedupe = dedupe;
        self
    }

    /// How long processed event ids are kept for dedupe (default 14 days).
    /// Must exceed the longest time a duplicate can arrive: the topics'
    /// retention, and any replay you may do.
    pub fn dedupe_retention(mut self, d: Duration) -> Self {
        self.opts.dedupe_retention = d;
        self
    }

    /// How often expired event ids are pruned (default every 60 s). Each
    /// pass deletes in batches of 1,000, each its own short transaction.
    pub fn prune_interval(mut self, d: Duration) -> Self {
        self.opts.prune_interval = d;
        self
    }

    /// Also commits the positions stored in Postgres to Kafka every
    /// `every`, asynchronously, so standard lag tools (`kafka-consumer-groups`,
    /// Burrow, exporters) see the group's progress (default: off).
    ///
    /// Informational only: the inbox never reads offsets from Kafka (it
    /// assigns at the offsets in Postgres), and the mirror may lag behind
    /// Postgres by up to `every`, or by more while Kafka is unreachable.
    pub fn mirror_offsets_to_kafka(mut self, every: Duration) -> Self {
        self.opts.mirror_offsets = Some(every);
        self
    }

    /// Messages buffered per partition before it is paused (default 50,000;
    /// see also [`max_buffered_bytes`](Self::max_buffered_bytes), whichever
    /// is reached first).
    ///
    /// A partition whose worker falls this far behind is paused in
    /// librdkafka and resumed once the worker has drained it to half of
    /// both bounds. Each pause makes librdkafka drop what it had prefetched
    /// for the partition and fetch it again on resume, so larger bounds
    /// mean fewer refetches for more memory. Measured with batches of 100
    /// on four partitions far behind their logs (`BENCHMARKS.md`): 10,000
    /// ran at 0.93 of a hand-written consumer, 50,000 at 0.99, a bound
    /// never reached at 1.05.
    ///
    /// ```no_run
    /// # async fn f(pool: sqlx::PgPool, handler: impl txbox::inbox::Handler + 'static) -> txbox::Result<()> {
    /// let inbox = txbox::inbox::Inbox::builder(pool)
    ///     .brokers("localhost:9092")
    ///     .group_id("payments")
    ///     .handler("payments.requested", handler)
    ///     .max_buffered(100_000)
    ///     .max_buffered_bytes(64 << 20)
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn max_buffered(mut self, n: usize) -> Self {
        self.opts.max_buffered = n.max(2);
        self
    }

    /// Bytes buffered per partition before it is paused (default 16 MiB):
    /// the memory bound of what waits for the partition's worker (the batch
    /// it is applying comes on top), where
    /// [`max_buffered`](Self::max_buffered) counts messages. A message counts its key, payload, header names and
    /// values, event id, and about 200 bytes of its own. A message larger
    /// than the bound is still delivered: the partition is paused after it
    /// and resumed once it is taken.
    pub fn max_buffered_bytes(mut self, n: usize) -> Self {
        self.opts.max_buffered_bytes = n.max(2);
        self
    }

    /// How long a statement of an inbox transaction (the inbox's or the
    /// handler's) waits for a lock before it fails with 55P03 and the
    /// transaction is retried, without using up an attempt (default 10 s;
    /// PostgreSQL's `lock_timeout`, set per transaction).
    ///
    /// Bounds how long a consumer waits on rows another transaction holds:
    /// a business row under contention, or the event ids and offsets row
    /// of a consumer that lost the partition but has not yet been ended
    /// (see [`transaction_idle_timeout`](Self::transaction_idle_timeout)).
    /// Claims at assignment use it too, and are retried the same way.
    pub fn lock_timeout(mut self, d: Duration) -> Self {
        self.opts.waits.lock = d;
        self
    }

    /// How long an inbox transaction may sit idle, waiting on the handler
    /// between statements, before PostgreSQL ends its session and rolls it
    /// back (`idle_in_transaction_session_timeout`, set per transaction).
    /// Default: 30 s, or two thirds of an explicit `session.timeout.ms`
    /// when that is lower.
    ///
    /// This is what frees a successor from a zombie: a consumer frozen or
    /// cut off inside its transaction holds the rows its handler wrote (and
    /// the event-id rows, once ids are checked first) and, between
    /// its fenced advance and COMMIT, the partition's offsets row, and the
    /// successor's writes of the same rows wait for it. Kept below the
    /// group's session timeout (librdkafka's `session.timeout.ms`, 45 s by
    /// default, or the broker's `group.consumer.session.timeout.ms` with
    /// the consumer protocol), the zombie's transaction has ended before
    /// its partition is given to anyone else. [`build`](Self::build)
    /// refuses a value at or above an explicit `session.timeout.ms`.
    ///
    /// A handler that waits this long outside the database (a slow HTTP
    /// call inside the transaction) fails with an error that says so, and
    /// the retry policy decides what follows.
    pub fn transaction_idle_timeout(mut self, d: Duration) -> Self {
        self.idle_timeout = Some(d);
        self
    }

    /// A name for this consumer, recorded as the owner of claimed
    /// partitions (default: [`crate::instance::name`], `host:pid:nonce`,
    /// unique per process start and shared with a relay in the same
    /// process).
    pub fn instance(mut self, name: impl Into<String>) -> Self {
        self.owner = Some(name.into());
        self
    }

    /// Checks the configuration and builds the inbox.
    pub fn build(mut self) -> Result<Inbox> {
        let group = self
            .group
            .filter(|g| !g.is_empty())
            .ok_or_else(|| Error::config("inbox: group_id is required"))?;
        if self
            .kafka
            .get("bootstrap.servers")
            .is_none_or(str::is_empty)
        {
            return Err(Error::config(
                "inbox: brokers (bootstrap.servers) are required",
            ));
        }
        if self.routes.is_empty() {
            return Err(Error::config("inbox: at least one handler is required"));
        }
        self.opts.waits = Waits::resolve(
            self.opts.waits.lock,
            self.idle_timeout,
            self.kafka.get("session.timeout.ms"),
        )?;
        self.kafka
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        for (key, value) in KAFKA_DEFAULTS {
            if self.kafka.get(key).is_none() {
                self.kafka.set(*key, *value);
            }
        }
        let owner = self
            .owner
            .unwrap_or_else(|| crate::instance::name().to_owned());
        Ok(Inbox {
            shared: Arc::new(Shared {
                sql: Statements::new(&self.schema, self.opts.waits),
                pool: self.pool,
                group,
                owner,
                routes: self.routes,
                opts: self.opts,
                drained: tokio::sync::Notify::new(),
            }),
            schema: self.schema,
            kafka: self.kafka,
            event_ids: self.event_ids,
        })
    }
}

#[cfg(test)]
impl Inbox {
    /// Everything `build` resolved, as comparable text (maps sorted), for
    /// the configuration reference test. Destructures without `..`, so a
    /// field added to the inbox fails to compile here until it is shown.
    pub(crate) fn settings(&self) -> String {
        let Inbox {
            shared,
            schema,
            kafka,
            event_ids,
        } = self;
        let Shared {
            pool: _,
            sql,
            group,
            owner,
            routes,
            opts,
            drained: _,
        } = &**shared;
        let kafka = kafka.config_map();
        let routes: std::collections::BTreeMap<_, _> = routes.iter().collect();
        format!(
            "schema: {schema:?}\ngroup: {group}\nowner: {owner}\nroutes: {routes:?}\n\
             kafka: {kafka:#?}\nevent ids: {event_ids:?}\noptions: {opts:#?}\nsql: {sql:#?}"
        )
    }
}
