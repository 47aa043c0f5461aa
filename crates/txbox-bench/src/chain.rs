//! `txbox-bench chain`: the whole chain of two services, end to end:
//! inbox A (a payments service: one account update and one derived event
//! staged per message), the relay (its own process) publishing A's outbox
//! to a topic with Kafka transactions, and inbox B (a ledger service: one
//! ledger row per event) reading that topic `read_committed`.
//!
//! Steps, in one run on a fresh database (dropped at the end), with the
//! relay started once and running throughout:
//! 1. baseline: inbox A alone drains `--events` messages (its events go
//!    to a topic nobody reads), messages/s from its first commit to its
//!    last; then the relay publishes those events before the next step;
//! 2. the chain's maximum sustained rate: `--events` messages through A,
//!    the relay and B, messages/s from B's first commit to B's last, and
//!    the ratio to step 1 (all three stages share the machine's cores);
//! 3. latency at `--rate` messages/s for `--seconds`, after `--warmup`
//!    seconds at that rate that are not counted: each input message
//!    carries its produce time (wall clock, microseconds); B's transaction
//!    sends it with `pg_notify`, delivered when that transaction commits,
//!    and the benchmark's listener takes the difference: input produced to
//!    ledger committed (p50, p99, max, and how many of the sent arrived).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;
use txbox::inbox::{BatchError, BatchHandler, Inbox, InboxMessage, Tx};
use txbox::{Outbox, OutboxEvent, Schema};

use crate::ceiling::BenchDb;

/// The channel B's transactions notify with the produce times they commit.
const CHANNEL: &str = "txbox_bench_chain";

/// `txbox-bench chain`'s options.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Messages for the baseline and for the maximum-rate run.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Partitions of the input and the intermediate topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Messages per inbox transaction (both inboxes).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Relay batch size (rows per Kafka transaction).
    #[arg(long, default_value_t = 1000)]
    relay_batch_size: usize,
    /// Messages per second in the latency run.
    #[arg(long, default_value_t = 1000)]
    rate: usize,
    /// Length of the latency run, seconds.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Seconds at the same rate before the latency run, not counted: the
    /// input producer's start (its producer id, the topic's metadata) and
    /// the first transactions on the new topics.
    #[arg(long, default_value_t = 5)]
    warmup: u64,
}

/// Inbox A: `account:produced_us` in, one account update and one event
/// with the same payload staged per message.
struct Payments {
    outbox: Outbox,
    topic: String,
}

#[async_trait]
impl BatchHandler for Payments {
    async fn handle_batch(&self, tx: &mut Tx, messages: &[InboxMessage]) -> Result<(), BatchError> {
        let mut accounts = Vec::with_capacity(messages.len());
        let mut events = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let (account, _) = parse(m).map_err(|e| BatchError::at(i, e))?;
            accounts.push(account);
            events.push(
                OutboxEvent::new(self.topic.clone(), m.payload().unwrap_or_default().to_vec())
                    .key(account.to_string()),
            );
        }
        sqlx::query("UPDATE account SET balance = balance + 1 WHERE id = ANY($1)")
            .bind(&accounts)
            .execute(&mut **tx)
            .await
            .map_err(txbox::Error::from)?;
        self.outbox.stage_all(tx, events).await?;
        Ok(())
    }
}

/// Inbox B: one ledger row per event; while `notify` is set, the produce
/// times of the batch are sent to [`CHANNEL`] on commit.
struct Ledger {
    notify: Arc<AtomicBool>,
}

#[async_trait]
impl BatchHandler for Ledger {
    async fn handle_batch(&self, tx: &mut Tx, messages: &[InboxMessage]) -> Result<(), BatchError> {
        let mut accounts = Vec::with_capacity(messages.len());
        let mut produced = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let (account, at) = parse(m).map_err(|e| BatchError::at(i, e))?;
            accounts.push(account);
            produced.push(at);
        }
        sqlx::query(
            "INSERT INTO ledger (account, produced_us) SELECT * FROM unnest($1::int[], $2::bigint[])",
        )
        .bind(&accounts)
        .bind(&produced)
        .execute(&mut **tx)
        .await
        .map_err(txbox::Error::from)?;
        if self.notify.load(Ordering::Relaxed) {
            // 100 times of at most 17 bytes: well under NOTIFY's 8,000.
            let times: Vec<String> = produced.iter().map(i64::to_string).collect();
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(times.join(","))
                .execute(&mut **tx)
                .await
                .map_err(txbox::Error::from)?;
        }
        Ok(())
    }
}

/// `account:produced_us`.
fn parse(m: &InboxMessage) -> Result<(i32, i64), txbox::inbox::DecodeError> {
    let text = m.text()?;
    let bad = || m.decode_error("expected account:produced_us", None);
    let (a, t) = text.split_once(':').ok_or_else(bad)?;
    Ok((a.parse().map_err(|_| bad())?, t.parse().map_err(|_| bad())?))
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

pub(crate) async fn run(args: &Args, database_url: &str, bootstrap: &str) -> anyhow::Result<()> {
    let db = BenchDb::create(database_url).await?;
    let result = bench(args, &db, bootstrap).await;
    let dropped = db.drop_db().await;
    result.and(dropped)
}

async fn bench(args: &Args, db: &BenchDb, bootstrap: &str) -> anyhow::Result<()> {
    db.add_ceiling().await?;
    sqlx::raw_sql(
        "CREATE TABLE ledger (id bigserial PRIMARY KEY, account int NOT NULL, produced_us bigint NOT NULL)",
    )
    .execute(&db.pool)
    .await?;
    let broker = txbox_testkit::Broker::at(bootstrap);
    let solo_in = broker.topic("bench-chain-solo-in", args.partitions).await;
    let solo_out = broker.topic("bench-chain-solo-out", args.partitions).await;
    let input = broker.topic("bench-chain-in", args.partitions).await;
    let mid = broker.topic("bench-chain-mid", args.partitions).await;
    let latency_in = broker
        .topic("bench-chain-latency-in", args.partitions)
        .await;
    let latency_mid = broker
        .topic("bench-chain-latency-mid", args.partitions)
        .await;
    println!(
        "txbox-bench chain: {} events, {} partitions, inbox batch {}, relay batch {} (exactly-once), broker {bootstrap}",
        args.events, args.partitions, args.batch, args.relay_batch_size
    );
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let mut relay = tokio::process::Command::new(
        std::env::current_exe().context("cannot find this binary to start the relay")?,
    )
    .arg("relay-process")
    .args(["--database-url", &db.url])
    .args(["--brokers", bootstrap])
    .args(["--mode", "exactly-once"])
    .args(["--batch-size", &args.relay_batch_size.to_string()])
    .args(["--instance", &format!("bench-{run}")])
    .args(["--transactional-id-prefix", &format!("txbox-bench-{run}")])
    .args(["--position-topic", &format!("bench-positions-{run}")])
    .env("RUST_LOG", "warn")
    .stdin(std::process::Stdio::null())
    .kill_on_drop(true)
    .spawn()
    .context("cannot start the relay process")?;
    let stop = CancellationToken::new();
    let result = phases(
        args,
        db,
        bootstrap,
        &stop,
        &mut relay,
        [&solo_in, &solo_out, &input, &mid, &latency_in, &latency_mid],
    )
    .await;
    stop.cancel();
    if let Some(pid) = relay.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), relay.wait()).await;
    result
}

async fn phases(
    args: &Args,
    db: &BenchDb,
    bootstrap: &str,
    stop: &CancellationToken,
    relay: &mut tokio::process::Child,
    [solo_in, solo_out, input, mid, latency_in, latency_mid]: [&String; 6],
) -> anyhow::Result<()> {
    let n = args.events;
    let mut tasks = tokio::task::JoinSet::new();
    let notify = Arc::new(AtomicBool::new(false));
    let outbox = Outbox::new(Schema::default()).notify(txbox::outbox::DEFAULT_NOTIFY_CHANNEL);
    let payments = |topic: &str| Payments {
        outbox: outbox.clone(),
        topic: topic.to_owned(),
    };

    // 1. Inbox A alone.
    fill(bootstrap, solo_in, n, None).await?;
    let solo = start(db, bootstrap, "solo", args.batch, |b| {
        b.batch_handler(solo_in, payments(solo_out))
    })?;
    tasks.spawn(run_inbox(solo, stop.clone()));
    let alone = rate_of(db, "solo", solo_in, n, &mut tasks).await?;
    println!("inbox A alone: {n} messages at {alone:.0} messages/s");
    let published = wait_published(db, n as i64, relay).await?;
    println!("relay: {n} events of step 1 published in {published:.1}s");

    // 2. The chain's maximum rate.
    fill(bootstrap, input, n, None).await?;
    let a = start(db, bootstrap, "payments", args.batch, |b| {
        b.batch_handler(input, payments(mid))
            .batch_handler(latency_in, payments(latency_mid))
    })?;
    let b = start(db, bootstrap, "ledger", args.batch, |b| {
        b.batch_handler(
            mid,
            Ledger {
                notify: notify.clone(),
            },
        )
        .batch_handler(
            latency_mid,
            Ledger {
                notify: notify.clone(),
            },
        )
    })?;
    tasks.spawn(run_inbox(a, stop.clone()));
    tasks.spawn(run_inbox(b, stop.clone()));
    let chain = rate_of(db, "ledger", mid, n, &mut tasks).await?;
    let ledger: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger")
        .fetch_one(&db.pool)
        .await?;
    if ledger != n as i64 {
        bail!("the ledger holds {ledger} rows for {n} messages");
    }
    println!(
        "chain A -> relay -> B: {n} messages at {chain:.0} messages/s, {:.2} of inbox A alone",
        chain / alone
    );

    // 3. Latency at a steady rate.
    notify.store(true, Ordering::Relaxed);
    let mut listener = sqlx::postgres::PgListener::connect(&db.url).await?;
    listener.listen(CHANNEL).await?;
    // Let the inboxes' assignments of the latency topics settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let warm = args.rate * args.warmup as usize;
    let sent = args.rate * args.seconds as usize;
    let counted_from = now_us() + i64::try_from(args.warmup * 1_000_000)?;
    let producer = tokio::spawn(fill(
        bootstrap.to_owned(),
        latency_in.clone(),
        warm + sent,
        Some(args.rate),
    ));
    let mut latencies: Vec<Duration> = Vec::with_capacity(sent);
    let mut warmup: Vec<Duration> = Vec::with_capacity(warm);
    let deadline = Instant::now() + Duration::from_secs(args.warmup + args.seconds + 30);
    while latencies.len() + warmup.len() < warm + sent && Instant::now() < deadline {
        let Ok(note) = tokio::time::timeout(Duration::from_secs(1), listener.recv()).await else {
            if let Some(done) = tasks.try_join_next() {
                done??;
                bail!("an inbox stopped during the latency run");
            }
            continue;
        };
        let note = note?;
        let now = now_us();
        for t in note
            .payload()
            .split(',')
            .filter_map(|t| t.parse::<i64>().ok())
        {
            let latency = Duration::from_micros(u64::try_from(now - t).unwrap_or(0));
            if t < counted_from {
                warmup.push(latency);
            } else {
                latencies.push(latency);
            }
        }
    }
    producer.await??;
    latencies.sort();
    if latencies.is_empty() {
        bail!("latency: no message reached the ledger");
    }
    let pct = |p: f64| {
        latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1]
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "latency input produced -> ledger committed at {} messages/s for {}s after {}s of warm-up: \
         {} of {} arrived; of the {} produced after the warm-up: p50 {:.1} ms, p99 {:.1} ms, \
         max {:.1} ms (warm-up max {:.1} ms)",
        args.rate,
        args.seconds,
        args.warmup,
        latencies.len() + warmup.len(),
        warm + sent,
        latencies.len(),
        ms(pct(0.50)),
        ms(pct(0.99)),
        ms(latencies[latencies.len() - 1]),
        ms(warmup.iter().max().copied().unwrap_or_default()),
    );
    stop.cancel();
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// An inbox of `group` with the routes `routes` adds.
fn start(
    db: &BenchDb,
    bootstrap: &str,
    group: &str,
    batch: usize,
    routes: impl FnOnce(txbox::inbox::InboxBuilder) -> txbox::inbox::InboxBuilder,
) -> anyhow::Result<Inbox> {
    let builder = Inbox::builder(db.pool.clone())
        .brokers(bootstrap)
        .group_id(group)
        .batch_size(batch);
    Ok(routes(builder).build()?)
}

async fn run_inbox(inbox: Inbox, stop: CancellationToken) -> anyhow::Result<()> {
    inbox.run(async move { stop.cancelled().await }).await?;
    Ok(())
}

/// Messages/s `group` applies on `topic` from its first commit until it
/// applied `n`.
async fn rate_of(
    db: &BenchDb,
    group: &str,
    topic: &str,
    n: usize,
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<f64> {
    let launched = Instant::now();
    let mut first: Option<(Instant, i64)> = None;
    loop {
        let applied: i64 = sqlx::query_scalar(
            "SELECT COALESCE(sum(applied), 0)::bigint FROM txbox.inbox_offsets
             WHERE consumer_group = $1 AND topic = $2",
        )
        .bind(group)
        .bind(topic)
        .fetch_one(&db.pool)
        .await?;
        if applied > 0 && first.is_none() {
            first = Some((Instant::now(), applied));
        }
        if applied as usize >= n {
            let (at, base) = first.unwrap_or((launched, 0));
            return Ok((applied - base) as f64 / at.elapsed().as_secs_f64());
        }
        if launched.elapsed() > Duration::from_secs(900) {
            bail!("{group} applied {applied} of {n} in 15 minutes");
        }
        if let Some(done) = tasks.try_join_next() {
            done??;
            bail!("an inbox stopped at {applied} of {n}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the relay published `n` rows; returns the seconds it took.
async fn wait_published(
    db: &BenchDb,
    n: i64,
    relay: &mut tokio::process::Child,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    loop {
        let published: i64 = sqlx::query_scalar(
            "SELECT COALESCE(sum(published), 0)::bigint FROM txbox.relay_streams",
        )
        .fetch_one(&db.pool)
        .await?;
        if published >= n {
            return Ok(t.elapsed().as_secs_f64());
        }
        if let Some(status) = relay.try_wait()? {
            bail!("the relay exited ({status}) at {published} of {n}");
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("the relay published {published} of {n} in 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Produces `n` messages `account:produced_us` to `topic`, round-robin
/// over its partitions, as fast as the producer takes them or at `rate`
/// per second.
async fn fill(
    bootstrap: impl AsRef<str>,
    topic: impl AsRef<str>,
    n: usize,
    rate: Option<usize>,
) -> anyhow::Result<()> {
    let topic = topic.as_ref();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap.as_ref())
        .set("enable.idempotence", "true")
        .set("linger.ms", if rate.is_some() { "1" } else { "20" })
        .create()?;
    let mut pending = crate::inbox::Pending::new();
    let started = Instant::now();
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..n {
        if let Some(rate) = rate {
            // Paced in steps of 1 ms: `i` messages are due `i / rate` s in.
            let due = started + Duration::from_secs_f64(i as f64 / rate.max(1) as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let payload = format!("{}:{}", rng % 100_000 + 1, now_us());
        let record = FutureRecord::<(), _>::to(topic).payload(&payload);
        pending.send(&producer, record).await?;
    }
    pending.settle().await
}
