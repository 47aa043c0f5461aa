//! Helpers shared by the relay's integration tests.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::ops::Range;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::task::JoinHandle;
use txbox::{Outbox, OutboxEvent};
use txbox_relay::{CancellationToken, Mode, RelayConfig, RelayReport};
use txbox_testkit::kafka::{consume_all, ConsumeOptions, Consumed};
use txbox_testkit::{unique_name, TestDb};

/// A relay configuration for one test: fast polling, unique instance,
/// transactional ids and position topic (tests share brokers).
pub fn config(db: &TestDb, bootstrap: &str, mode: Mode) -> RelayConfig {
    let mut c = RelayConfig::new(db.url(), bootstrap);
    c.mode = mode;
    c.poll_interval = Duration::from_millis(50);
    c.lease_ttl = Duration::from_secs(3);
    c.instance = unique_name("relay");
    c.transactional_id_prefix = unique_name("txn");
    c.position_topic = unique_name("positions");
    c.prune_interval = Duration::from_millis(300);
    c
}

/// A relay running in this process.
pub struct Relay {
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<txbox_relay::Result<RelayReport>>,
}

impl Relay {
    pub fn start(config: RelayConfig) -> Relay {
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(txbox_relay::run(config, shutdown.clone()));
        Relay { shutdown, handle }
    }

    /// Graceful stop; the run must end cleanly.
    pub async fn stop(self) -> RelayReport {
        self.stop_result().await.expect("relay ended with an error")
    }

    pub async fn stop_result(self) -> txbox_relay::Result<RelayReport> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("relay stops within 30s")
            .expect("relay task did not panic")
    }

    /// Like a crash: the task is dropped mid-step; the lease is not released.
    pub async fn kill(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }
}

/// A test event: JSON payload `{"key", "writer", "seq"}`.
pub fn event(topic: &str, key: &str, writer: usize, seq: usize) -> OutboxEvent {
    OutboxEvent::json(
        topic,
        &serde_json::json!({ "key": key, "writer": writer, "seq": seq }),
    )
    .unwrap()
    .key(key)
}

/// Stages `events` in one committed transaction.
pub async fn stage(pool: &PgPool, events: Vec<OutboxEvent>) {
    let outbox =
        Outbox::new(txbox::Schema::default()).notify(txbox::outbox::DEFAULT_NOTIFY_CHANNEL);
    stage_in(pool, &outbox, events).await;
}

/// Stages `events` through `outbox` in one committed transaction.
pub async fn stage_in(pool: &PgPool, outbox: &Outbox, events: Vec<OutboxEvent>) {
    let mut tx = pool.begin().await.unwrap();
    outbox.stage_all(&mut tx, events).await.unwrap();
    tx.commit().await.unwrap();
}

/// Stages `n` events over `keys` keys in transactions of `per_tx`.
pub async fn stage_many(pool: &PgPool, topic: &str, n: usize, keys: usize, per_tx: usize) {
    let mut seq = 0;
    while seq < n {
        let events = (seq..(seq + per_tx).min(n))
            .map(|i| event(topic, &format!("k{}", i % keys), 0, i))
            .collect();
        stage(pool, events).await;
        seq += per_tx;
    }
}

/// Outbox rows of stream 0 not yet recorded as published.
pub async fn unpublished(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM txbox.outbox o
           LEFT JOIN txbox.relay_streams r ON r.stream = o.stream
          WHERE o.stream = 0
            AND (r.stream IS NULL OR (o.txid, o.id) > (r.position_txid, r.position_id))",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Waits until `cond` holds, polling; panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every staged row of stream 0 is recorded as published.
pub async fn drained(pool: &PgPool, timeout: Duration) {
    eventually("all rows published", timeout, || async {
        unpublished(pool).await == 0
    })
    .await;
}

pub async fn consume(
    bootstrap: &str,
    topic: &str,
    expect: usize,
    read_committed: bool,
) -> Vec<Consumed> {
    consume_all(
        bootstrap,
        topic,
        ConsumeOptions {
            read_committed,
            expect,
            timeout: Duration::from_secs(30),
        },
    )
    .await
}

pub fn ce_id(c: &Consumed) -> String {
    String::from_utf8(c.header("ce_id").expect("ce_id header").to_vec()).unwrap()
}

pub fn payload_json(c: &Consumed) -> serde_json::Value {
    serde_json::from_slice(c.payload.as_deref().expect("payload")).expect("JSON payload")
}

/// Losses and duplicates of what a consumer saw against the staged ids.
#[derive(Debug)]
pub struct Tally {
    pub distinct: usize,
    pub duplicates: usize,
    pub missing: usize,
    pub unexpected: usize,
}

/// Counts by event id; asserts every copy of an event is identical (key,
/// payload, headers): a duplicate is a redelivery, never a different event.
pub fn tally(seen: &[Consumed], staged: &[String]) -> Tally {
    let mut by_id: HashMap<String, Vec<&Consumed>> = HashMap::new();
    for c in seen {
        by_id.entry(ce_id(c)).or_default().push(c);
    }
    for (id, copies) in &by_id {
        for c in copies {
            assert_eq!(c.key, copies[0].key, "copies of {id} differ in key");
            assert_eq!(
                c.payload, copies[0].payload,
                "copies of {id} differ in payload"
            );
            assert_eq!(
                c.headers, copies[0].headers,
                "copies of {id} differ in headers"
            );
        }
    }
    let staged_set: std::collections::HashSet<&String> = staged.iter().collect();
    Tally {
        distinct: by_id.len(),
        duplicates: seen.len() - by_id.len(),
        missing: staged.iter().filter(|id| !by_id.contains_key(*id)).count(),
        unexpected: by_id.keys().filter(|id| !staged_set.contains(id)).count(),
    }
}

/// Every staged event id of stream 0, in publishing order.
pub async fn staged_ids(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT event_id::text FROM txbox.outbox WHERE stream = 0 ORDER BY txid, id")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Per key, the event ids in the order a consumer saw them (per-partition
/// offset order; one key lives in one partition).
pub fn by_key(seen: &[Consumed]) -> BTreeMap<Vec<u8>, Vec<String>> {
    let mut sorted: Vec<&Consumed> = seen.iter().collect();
    sorted.sort_by_key(|c| (c.partition, c.offset));
    let mut out: BTreeMap<Vec<u8>, Vec<String>> = BTreeMap::new();
    for c in sorted {
        out.entry(c.key.clone().unwrap_or_default())
            .or_default()
            .push(ce_id(c));
    }
    out
}

/// The relay's position row.
pub async fn relay_row(pool: &PgPool) -> (Option<String>, i64, i64, i64) {
    sqlx::query_as(
        "SELECT owner, fencing_token, position_id, published FROM txbox.relay_streams WHERE stream = 0",
    )
    .fetch_optional(pool)
    .await
    .unwrap()
    .unwrap_or((None, 0, 0, 0))
}

/// Command-line arguments for the `txbox-relay` binary: at-least-once mode
/// against `bootstrap`, polling every 50 ms, then `extra`.
pub fn binary_args<'a>(db: &'a TestDb, bootstrap: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    binary_args_in("at-least-once", db, bootstrap, extra)
}

/// [`binary_args`] in `mode` (`exactly-once` or `at-least-once`).
pub fn binary_args_in<'a>(
    mode: &'a str,
    db: &'a TestDb,
    bootstrap: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "--database-url",
        db.url(),
        "--brokers",
        bootstrap,
        "--mode",
        mode,
        "--poll-interval",
        "50ms",
    ];
    args.extend_from_slice(extra);
    args
}

/// How one key's event ids, as a consumer saw them, follow their staging
/// order `staged`: cut into runs of consecutive staged ids, returned as
/// ranges of `staged`. The order at-least-once publishing promises is a
/// first run from the start, each later run a re-send that starts before
/// the previous run ended (a retry resumes at the first row not recorded,
/// never after a gap), and the last run reaching the end. Anything else
/// (a skipped row, a row out of order, an id not staged) is an error
/// naming it.
pub fn resend_runs(seen: &[String], staged: &[String]) -> Result<Vec<Range<usize>>, String> {
    let index: HashMap<&str, usize> = staged
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let mut runs: Vec<Range<usize>> = Vec::new();
    for id in seen {
        let i = *index
            .get(id.as_str())
            .ok_or_else(|| format!("{id} was not staged"))?;
        match runs.last_mut() {
            Some(run) if run.end == i => run.end += 1,
            Some(run) if i >= run.end => {
                return Err(format!(
                    "{id} (staged #{i}) follows #{}: rows skipped",
                    run.end - 1
                ))
            }
            _ => runs.push(i..i + 1),
        }
    }
    match (runs.first(), runs.last()) {
        (None, None) if staged.is_empty() => {}
        (Some(first), Some(last)) if first.start == 0 && last.end == staged.len() => {}
        _ => {
            return Err(format!(
                "runs {runs:?} do not start at #0 and end at #{}",
                staged.len()
            ))
        }
    }
    Ok(runs)
}
