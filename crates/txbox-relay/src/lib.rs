//! The txbox relay: publishes committed outbox rows to Kafka, in order per
//! key, without losing a late-committing row and without duplicates.
//!
//! Services stage events with [`txbox::Outbox`] inside their own
//! PostgreSQL transactions; this relay (the `txbox-relay` binary, or
//! [`run`] embedded in a process) moves them to Kafka.
//!
//! # What it guarantees
//!
//! - **Nothing committed is skipped, nothing rolled back is published.**
//!   Rows are read in `(txid, id)` order and only from transactions older
//!   than the snapshot's `xmin` (see [`Cursor`]), so a transaction that
//!   commits late is still read in its place.
//! - **Order per key.** Each key hashes to one relay stream
//!   ([`txbox::outbox::stream_for_key`]) and to one Kafka partition
//!   (`murmur2_random`, the Java client's hashing), and rows are published
//!   in `(txid, id)` order. Within one transaction that is staging order.
//!   Across transactions it is the order in which they got their
//!   transaction ids (at their first write), which is commit order whenever
//!   the later one first writes after the earlier one commits; two
//!   concurrent transactions writing the same key are ordered by first
//!   write, not by commit, even when a row lock applied them the other way.
//!   Writers staging with `txbox::outbox::KeyOrder::Commit` take ids that
//!   sort in commit order per key, so their rows are published in commit
//!   order; the relay needs no setting for it and prunes the per-key order
//!   heads those writers keep (see [`Pruner`]).
//! - **Exactly-once mode** (default): each batch is one Kafka transaction
//!   carrying the rows and the stream's new position (KIP-618 style). A
//!   `read_committed` consumer sees each row once, across crashes and
//!   takeovers. Needs a broker with transactions; the relay checks at
//!   start and refuses to run otherwise.
//! - **At-least-once mode**: an idempotent producer; the position is
//!   written to PostgreSQL after every row of a batch is acknowledged. A
//!   crash between the acknowledgements and that write re-publishes at
//!   most one batch, with the same `ce_id` (event id) headers, which a
//!   txbox inbox drops.
//! - **One owner per stream.** A lease with a fencing token in
//!   `relay_streams` ([`Leases`]); every relay write checks the token. In
//!   exactly-once mode Kafka fences an old owner too (one
//!   `transactional.id` per stream).
//!
//! # Where the guarantees stop
//!
//! - Consumers reading `read_uncommitted` see aborted batches in
//!   exactly-once mode; use `read_committed`.
//! - A long-running transaction anywhere in the PostgreSQL cluster holds
//!   publishing back (`txbox_relay_held_back_seconds`, and a warning after
//!   `hold_back_warn`).
//! - A row Kafka refuses for good (too large, unknown topic, not
//!   authorized) stops its stream, or with `on_reject = "dead-letter"`
//!   moves to `relay_dead_letters`: it is then *not* published.
//! - In at-least-once mode an instance that lost its lease without
//!   noticing (a "zombie", e.g. paused for longer than the TTL) can publish
//!   one more batch before its position write is refused: duplicates, with
//!   the same event ids.
//!
//! # Configuration
//!
//! Flag > environment variable > TOML file (`--config`) > default.
//!
//! | field | flag | environment | default |
//! |---|---|---|---|
//! | `database_url` | `--database-url` | `TXBOX_DATABASE_URL` | (required) |
//! | `schema` | `--schema` | `TXBOX_SCHEMA` | `txbox` |
//! | `brokers` | `--brokers` | `TXBOX_KAFKA_BOOTSTRAP` | (required) |
//! | `streams` | `--streams 0,1` | `TXBOX_STREAMS` | `[0]` |
//! | `mode` | `--mode` | `TXBOX_RELAY_MODE` | `exactly-once` |
//! | `batch_size` | `--batch-size` | `TXBOX_BATCH_SIZE` | `1000` |
//! | `poll_interval` | `--poll-interval` | `TXBOX_POLL_INTERVAL` | `200ms` |
//! | `notify_channel` | `--notify-channel` | `TXBOX_NOTIFY_CHANNEL` | `txbox_outbox` |
//! | `lease_ttl` | `--lease-ttl` | `TXBOX_LEASE_TTL` | `10s` |
//! | `instance` | `--instance` | `TXBOX_INSTANCE` | `host:pid:nonce` (unique per process start) |
//! | `transactional_id_prefix` | `--transactional-id-prefix` | `TXBOX_TRANSACTIONAL_ID_PREFIX` | `txbox-relay` |
//! | `position_topic` | `--position-topic` | `TXBOX_POSITION_TOPIC` | `txbox.relay.positions` |
//! | `on_reject` | `--on-reject` | `TXBOX_ON_REJECT` | `stop` |
//! | `prune_batch` | `--prune-batch` | `TXBOX_PRUNE_BATCH` | `1000` |
//! | `prune_interval` | `--prune-interval` | `TXBOX_PRUNE_INTERVAL` | `5s` |
//! | `hold_back_warn` | `--hold-back-warn` | `TXBOX_HOLD_BACK_WARN` | `30s` |
//! | `kafka` (table) | `--kafka-option k=v` (repeat) | `TXBOX_KAFKA_OPTIONS` (`k=v;k=v`) | none |
//!
//! The configuration file is `--config FILE` or `TXBOX_RELAY_CONFIG`.
//!
//! # Embedding
//!
//! ```no_run
//! use txbox_relay::CancellationToken;
//! use txbox_relay::{Mode, RelayConfig};
//!
//! # async fn demo() -> txbox_relay::Result<()> {
//! let mut config = RelayConfig::new("postgres://relay@db/app", "kafka:9092");
//! config.mode = Mode::AtLeastOnce;
//! config.streams = vec![0, 1];
//! let shutdown = CancellationToken::new();
//! let report = txbox_relay::run(config, shutdown.clone()).await?;
//! println!("published {} rows", report.published());
//! # Ok(()) }
//! ```
//!
//! # Metrics
//!
//! Through the [`metrics`] facade (install any recorder):
//! `txbox_relay_published_total`, `txbox_relay_batches_total`,
//! `txbox_relay_retries_total`, `txbox_relay_dead_letters_total`,
//! `txbox_relay_pruned_total`, `txbox_relay_history_changed_total`
//! (counters, label `stream`), `txbox_relay_aborts_total` (counter, labels
//! `stream` and `reason`: `fenced`, `fatal`, `timeout`, `abortable`,
//! `rejected`, `abandoned`, `other`), `txbox_relay_commit_seconds`
//! (histogram per stream: each `commit_transaction` call in exactly-once
//! mode), `txbox_relay_leader`, `txbox_relay_backlog_rows` and
//! `txbox_relay_oldest_unpublished_seconds` (gauges per stream) and
//! `txbox_relay_held_back_seconds` (gauge).
//!
//! The backlog gauges count the rows past the stream's stored position
//! ([`Backlogs`]), at most 100,000 of them, every 5 s, in every instance
//! running the stream (a standby too, so a backlog shows while its holder
//! is gone); the oldest row's age is that of the oldest row counted.
//!
//! # Tracing
//!
//! Each batch runs in a `tracing` span named `txbox.relay.batch` (level
//! INFO, target `txbox_relay::stream`) with the fields `stream`, `mode`,
//! `rows`, `first_id` and `last_id` (outbox ids), then `outcome` once
//! known: in exactly-once mode the Kafka transaction's end (`committed`;
//! `aborted`, to be retried; `rejected`, aborted over a row Kafka refuses),
//! in at-least-once mode `acknowledged`, `failed` (retried from the first
//! row not acknowledged) or `rejected`; in both `fatal`, `unsupported`, or
//! `abandoned` (the batch was dropped: lease lost, shutdown). A failed
//! batch also records `error`. The span covers publishing the batch and
//! writing its position; nothing is logged per row.
//!
//! # Features
//!
//! | Name | Description | Default |
//! |---|---|---|
//! | `failpoints` | Named crash points (`relay.after_produce`, `relay.before_kafka_commit`, `relay.after_kafka_commit`, `relay.after_db_position`, `relay.during_prune`) for fault-injection tests. Never in production. | no |

#![warn(missing_docs, unreachable_pub)]
// Library code never unwraps: bad input is a typed error.
#![warn(clippy::unwrap_used)]
#![doc(test(attr(deny(warnings), allow(dead_code))))]

mod backlog;
pub mod cli;
mod config;
mod cursor;
mod dead_letter;
mod duration;
mod error;
mod health;
mod history;
mod lease;
pub mod logging;
mod notify;
mod prune;
mod prune_rounds;
mod publisher;
mod report;
mod stream;

use std::sync::Arc;
use std::time::Duration;

pub use backlog::{Backlog, Backlogs};
pub use config::{ConfigOverrides, Mode, OnReject, RelayConfig};
pub use cursor::{hold_back, Cursor, HeldBack, OutboxRow, Position};
pub use duration::parse_duration;
pub use error::{Error, Result};
pub use history::{Histories, History, HistoryCheck, ReAnchor};
pub use lease::{Holder, Lease, Leases};
pub use prune::Pruner;
pub use report::{RelayReport, StreamReport};
use sqlx::postgres::PgPoolOptions;

/// The shutdown signal [`run`] takes (re-exported from `tokio-util`).
#[doc(no_inline)]
pub use tokio_util::sync::CancellationToken;

/// Runs the relay until `shutdown` is cancelled or every stream stopped.
///
/// Each configured stream runs as its own task: acquire the stream's
/// lease, verify the schema, start the publisher and recover the position,
/// then publish batches until shutdown. Streams are independent; one that
/// stops with an error does not stop the others.
///
/// On shutdown each stream finishes (or aborts) the batch in flight and
/// releases its lease. Returns the report when every stream ended cleanly;
/// otherwise the stream's error (one failed stream) or
/// [`Error::StreamsFailed`] (several).
pub async fn run(config: RelayConfig, shutdown: CancellationToken) -> Result<RelayReport> {
    run_with(config, shutdown, None).await
}

/// [`run`], serving `endpoint` (metrics, `/health`, `/ready`) meanwhile.
///
/// `/ready` answers 200 while every stream runs (publishing, or waiting
/// for its lease as a standby), PostgreSQL answers and the brokers answer
/// a metadata request; otherwise 503, naming what failed (a stream stopped
/// with an error stays failed until the relay is restarted). The endpoint
/// is bound before any stream starts: a busy address fails the call.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(config: txbox_relay::RelayConfig) -> anyhow::Result<()> {
/// use txbox::http::Endpoint;
///
/// let endpoint = Endpoint::new("0.0.0.0:9187".parse()?).prometheus()?;
/// let shutdown = txbox_relay::CancellationToken::new();
/// txbox_relay::run_serving(config, shutdown, endpoint).await?;
/// # Ok(()) }
/// ```
pub async fn run_serving(
    config: RelayConfig,
    shutdown: CancellationToken,
    endpoint: txbox::http::Endpoint,
) -> Result<RelayReport> {
    run_with(config, shutdown, Some(endpoint)).await
}

async fn run_with(
    config: RelayConfig,
    shutdown: CancellationToken,
    endpoint: Option<txbox::http::Endpoint>,
) -> Result<RelayReport> {
    config.validate()?;
    let schema = config.txbox_schema()?;
    let streams = config.streams.clone();
    // Per stream: the batch loop, its prefetch, the pruner and the backlog
    // gauges; then the listener, the hold-back monitor and `/ready`.
    let connections = u32::try_from(streams.len() * 4 + 3).unwrap_or(u32::MAX);
    let pool = PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy(&config.database_url)
        .map_err(|e| Error::config(format!("database_url: {e}")))?;
    tracing::info!(
        streams = ?streams,
        mode = %config.mode,
        schema = %schema,
        instance = %config.instance,
        "relay starting"
    );
    let health = Arc::new(health::StreamHealth::default());
    let helpers = shutdown.child_token();
    if let Some(endpoint) = endpoint {
        let mut kafka = rdkafka::ClientConfig::new();
        kafka.set("bootstrap.servers", &config.brokers);
        for (k, v) in &config.kafka {
            kafka.set(k, v);
        }
        health::checks(endpoint, pool.clone(), kafka, health.clone())?
            .spawn(helpers.clone())
            .await?;
    }
    let config = Arc::new(config);
    let wakeups = notify::Wakeups::new(&streams);
    wakeups.spawn_listener(pool.clone(), config.notify_channel.clone(), helpers.clone());
    cursor::spawn_hold_back_monitor(pool.clone(), config.hold_back_warn, helpers.clone());

    // Dropping this future (e.g. an aborted task) stops every stream and
    // helper task with it.
    let _helpers_guard = helpers.clone().drop_guard();
    let mut tasks = tokio::task::JoinSet::new();
    for &stream in &streams {
        let task = stream::StreamTask {
            config: config.clone(),
            schema: schema.clone(),
            pool: pool.clone(),
            stream,
            wake: wakeups.of(stream),
            cancel: shutdown.child_token(),
            health: health.clone(),
        };
        tasks.spawn(task.run());
    }
    let mut report = RelayReport::default();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(r) => report.streams.push(r),
            Err(e) => {
                let mut r = StreamReport::new(-1);
                r.error = Some(Error::config(format!("stream task panicked: {e}")));
                report.streams.push(r);
            }
        }
    }
    report
        .streams
        .sort_by_key(|s| streams.iter().position(|x| *x == s.stream));
    helpers.cancel();
    pool.close().await;
    let total = report.streams.len();
    let mut failed: Vec<(i32, Error)> = report
        .streams
        .iter_mut()
        .filter_map(|s| s.error.take().map(|e| (s.stream, e)))
        .collect();
    match failed.len() {
        0 => Ok(report),
        1 => Err(failed.remove(0).1),
        n => Err(Error::StreamsFailed {
            failed: n,
            total,
            summary: failed
                .iter()
                .map(|(s, e)| format!("stream {s}: {e}"))
                .collect::<Vec<_>>()
                .join("\n"),
        }),
    }
}
