//! `txbox-bench backlog`: the relay draining a large backlog (a broker
//! outage's worth) while staging goes on, against the same relay draining
//! a small outbox, in one run, and the outbox's size over the run.
//!
//! 1. **reference**: a fresh database, `--reference` rows pre-filled,
//!    drained by the relay (exactly-once, defaults but a 20 ms poll, as
//!    `txbox-bench relay`): events/s from its first recorded batch; run
//!    before and again after the backlog, the ratio taken to their mean;
//! 2. **backlog**: a second fresh database, `--backlog` rows pre-filled;
//!    then `--rate` events/s are staged (transactions of 10, through
//!    `Outbox::stage_all`) while the relay drains: events/s from its first
//!    recorded batch until it has caught up with the staging (fewer than
//!    `--rate` rows behind), and its ratio to the reference;
//! 3. after catching up, the run goes on for `--after` seconds with the
//!    staging on, so pruning (the relay's defaults: every 5 s, up to 100
//!    statements of 1,000 rows) and autovacuum have their turn; every
//!    second it samples rows published, rows behind, the outbox's rows and
//!    its size (table, indexes and TOAST), printed every 10 s and written
//!    with `--csv`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use sqlx::PgPool;
use txbox_relay::{CancellationToken, Mode, RelayConfig};
use uuid::Uuid;

use crate::ceiling::BenchDb;
use crate::relay::prefill;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Rows of the backlog.
    #[arg(long, default_value_t = 5_000_000)]
    backlog: usize,
    /// Rows of the reference drain.
    #[arg(long, default_value_t = 500_000)]
    reference: usize,
    /// Events staged per second during the drain and after it.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds to go on after the relay caught up.
    #[arg(long, default_value_t = 300)]
    after: u64,
    /// Payload bytes per event.
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Write the samples (seconds since the relay's start, published,
    /// behind, outbox rows, outbox MB) to this CSV file.
    #[arg(long)]
    csv: Option<std::path::PathBuf>,
}

pub(crate) async fn run(args: &Args, database_url: &str, bootstrap: &str) -> anyhow::Result<()> {
    println!(
        "txbox-bench backlog: reference {} rows, backlog {} rows, staging {} events/s, {} B, {} partitions, broker {bootstrap}",
        args.reference, args.backlog, args.rate, args.payload_bytes, args.partitions
    );
    let before = fresh_reference(args, database_url, bootstrap).await?;
    println!(
        "reference before: {before:.0} events/s draining {} rows",
        args.reference
    );
    let db = BenchDb::create(database_url).await?;
    let result = backlog(args, &db, bootstrap, before).await;
    db.drop_db().await?;
    let drained = result?;
    // Again after, so a slow or fast spell of the machine weighs on both
    // sides of the ratio.
    let after = fresh_reference(args, database_url, bootstrap).await?;
    let mean = (before + after) / 2.0;
    println!(
        "reference after: {after:.0} events/s; backlog drain / mean reference ({mean:.0}) = {:.2}",
        drained / mean
    );
    Ok(())
}

/// The reference drain on a database of its own, dropped afterwards.
async fn fresh_reference(args: &Args, database_url: &str, bootstrap: &str) -> anyhow::Result<f64> {
    let db = BenchDb::create(database_url).await?;
    let result = reference(args, &db, bootstrap).await;
    db.drop_db().await?;
    result
}

fn relay_config(db: &BenchDb, bootstrap: &str) -> RelayConfig {
    let run = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let mut config = RelayConfig::new(&db.url, bootstrap);
    config.mode = Mode::ExactlyOnce;
    config.poll_interval = Duration::from_millis(20);
    config.instance = format!("bench-{run}");
    config.transactional_id_prefix = format!("txbox-bench-backlog-{run}");
    config.position_topic = format!("bench-positions-{run}");
    config
}

async fn published(pool: &PgPool) -> anyhow::Result<i64> {
    let p: Option<i64> =
        sqlx::query_scalar("SELECT published FROM txbox.relay_streams WHERE stream = 0")
            .fetch_optional(pool)
            .await?;
    Ok(p.unwrap_or(0))
}

async fn topic(bootstrap: &str, partitions: i32) -> String {
    let broker = txbox_testkit::Broker::at(bootstrap);
    broker.topic("bench-backlog", partitions).await
}

/// The relay draining a small outbox: events/s from its first batch.
async fn reference(args: &Args, db: &BenchDb, bootstrap: &str) -> anyhow::Result<f64> {
    let topic = topic(bootstrap, args.partitions).await;
    prefill(&db.pool, &topic, args.reference, args.payload_bytes).await?;
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(txbox_relay::run(
        relay_config(db, bootstrap),
        shutdown.clone(),
    ));
    let want = i64::try_from(args.reference)?;
    let mut first: Option<(Instant, i64)> = None;
    let rate = loop {
        let p = published(&db.pool).await?;
        if p > 0 && first.is_none() {
            first = Some((Instant::now(), p));
        }
        if p >= want {
            let (at, rows) = first.unwrap_or((Instant::now(), 0));
            break (p - rows) as f64 / at.elapsed().as_secs_f64();
        }
        if relay.is_finished() {
            bail!("relay stopped early: {:?}", relay.await);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    shutdown.cancel();
    relay.await??;
    Ok(rate)
}

/// One sample of the backlog run.
struct Sample {
    at: f64,
    published: i64,
    behind: i64,
    rows: i64,
    mb: f64,
}

async fn sample(pool: &PgPool, at: f64, staged: i64) -> anyhow::Result<Sample> {
    let published = published(pool).await?;
    let (rows, bytes): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM txbox.outbox), pg_total_relation_size('txbox.outbox')",
    )
    .fetch_one(pool)
    .await?;
    Ok(Sample {
        at,
        published,
        behind: staged - published,
        rows,
        mb: bytes as f64 / 1e6,
    })
}

/// The backlog run; returns its drain rate, events/s.
async fn backlog(
    args: &Args,
    db: &BenchDb,
    bootstrap: &str,
    reference: f64,
) -> anyhow::Result<f64> {
    let topic = topic(bootstrap, args.partitions).await;
    let t = Instant::now();
    prefill(&db.pool, &topic, args.backlog, args.payload_bytes).await?;
    println!(
        "backlog: {} rows pre-filled in {:.0} s",
        args.backlog,
        t.elapsed().as_secs_f64()
    );
    let staged = Arc::new(AtomicU64::new(args.backlog as u64));
    let stop = CancellationToken::new();
    let stager = tokio::spawn(stage(
        db.pool.clone(),
        topic.clone(),
        args.rate,
        args.payload_bytes,
        staged.clone(),
        stop.clone(),
    ));
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let relay = tokio::spawn(txbox_relay::run(
        relay_config(db, bootstrap),
        shutdown.clone(),
    ));
    let mut samples: Vec<Sample> = Vec::new();
    let mut first: Option<(f64, i64)> = None;
    let mut caught_up: Option<(f64, i64)> = None;
    let mut drained = f64::NAN;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    println!(
        "{:>7} {:>10} {:>9} {:>11} {:>10}",
        "t (s)", "published", "behind", "outbox rows", "outbox MB"
    );
    loop {
        tick.tick().await;
        let at = started.elapsed().as_secs_f64();
        let s = sample(&db.pool, at, staged.load(Ordering::Relaxed) as i64).await?;
        if s.published > 0 && first.is_none() {
            first = Some((at, s.published));
        }
        if caught_up.is_none() && first.is_some() && s.behind < args.rate as i64 {
            caught_up = Some((at, s.published));
            if let Some((t0, p0)) = first {
                let rate = (s.published - p0) as f64 / (at - t0);
                drained = rate;
                println!(
                    "caught up after {at:.0} s: drained at {rate:.0} events/s from the first batch, {:.2} of the reference before",
                    rate / reference
                );
            }
        }
        if samples.len() % 10 == 0 {
            println!(
                "{:>7.0} {:>10} {:>9} {:>11} {:>10.0}",
                s.at, s.published, s.behind, s.rows, s.mb
            );
        }
        samples.push(s);
        if let Some((t, _)) = caught_up {
            if at - t >= args.after as f64 {
                break;
            }
        }
        if relay.is_finished() {
            bail!("relay stopped early: {:?}", relay.await);
        }
        if stager.is_finished() {
            stager.await??;
            bail!("the stager stopped");
        }
        if at > 3600.0 {
            bail!("not caught up within an hour");
        }
    }
    stop.cancel();
    stager.await??;
    shutdown.cancel();
    relay.await??;
    let last = samples.last().map_or(0, |s| s.rows);
    let peak = samples.iter().map(|s| s.mb).fold(0.0, f64::max);
    let end_mb = samples.last().map_or(0.0, |s| s.mb);
    let tail: Vec<&Sample> = samples.iter().rev().take(60).collect();
    let grew = tail.first().map_or(0.0, |s| s.mb) - tail.last().map_or(0.0, |s| s.mb);
    println!(
        "end: {last} outbox rows, {end_mb:.0} MB (peak {peak:.0} MB); over the last minute the size changed by {grew:+.1} MB"
    );
    if let Some(path) = &args.csv {
        let mut out = String::from("seconds,published,behind,outbox_rows,outbox_mb\n");
        for s in &samples {
            out.push_str(&format!(
                "{:.1},{},{},{},{:.1}\n",
                s.at, s.published, s.behind, s.rows, s.mb
            ));
        }
        std::fs::write(path, out)?;
        println!("samples written to {}", path.display());
    }
    Ok(drained)
}

/// Stages `rate` events/s in transactions of 10 until `stop`, counting them
/// into `staged` once committed.
async fn stage(
    pool: PgPool,
    topic: String,
    rate: u64,
    bytes: usize,
    staged: Arc<AtomicU64>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    const PER_TX: u64 = 10;
    let outbox = txbox::Outbox::new(txbox::Schema::default());
    let mut tick =
        tokio::time::interval(Duration::from_secs_f64(PER_TX as f64 / rate.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut n = 0u64;
    while !stop.is_cancelled() {
        tick.tick().await;
        let events: Vec<_> = (0..PER_TX)
            .map(|i| {
                let mut payload = format!("{n}:{i}:").into_bytes();
                payload.resize(bytes, b'x');
                txbox::OutboxEvent::new(topic.clone(), payload).key(format!("k{}", (n + i) % 1000))
            })
            .collect();
        let mut tx = pool.begin().await?;
        outbox.stage_all(&mut tx, events).await?;
        tx.commit().await?;
        staged.fetch_add(PER_TX, Ordering::Relaxed);
        n += PER_TX;
    }
    Ok(())
}
