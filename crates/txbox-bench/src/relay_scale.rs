//! `txbox-bench relay-scale`: the relay's drain rate as streams and relay
//! processes are added, and where the CPU went.
//!
//! For every stream count (`--streams 1,2,4,8`) and process count
//! (`--processes 1,2`, at most one process per stream), on a fresh
//! database:
//! 1. pre-fill the outbox with `--events` rows over 1,000 keys, key `k{j}`
//!    on stream `j % streams`;
//! 2. start that many relay processes (this binary re-run as
//!    `txbox-bench relay-process`, the `txbox-relay` command line), the
//!    streams dealt round-robin between them, one Kafka `transactional.id`
//!    per stream;
//! 3. time from the first batch recorded to the last row published
//!    (`relay_streams.published` summed), so process start and
//!    `init_transactions` are not counted;
//! 4. print events/s, the ratio to one stream in one process of the same
//!    round (the baseline, run first), Kafka transactions/s, PostgreSQL
//!    commits/s, and the cores used by the relays, PostgreSQL, the broker
//!    and the whole machine over the timed part.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use txbox_relay::Mode;

use crate::ceiling::BenchDb;
use crate::relay::prefill_streams;
use crate::usage::{Sample, Usage};

/// `txbox-bench relay-scale`'s options.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Stream counts to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    streams: Vec<u32>,
    /// Relay process counts to run for each stream count, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    processes: Vec<usize>,
    /// Rows to pre-fill and drain per run.
    #[arg(long, default_value_t = 500_000)]
    events: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    /// Relay batch size (rows per Kafka transaction in exactly-once mode).
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 8)]
    partitions: i32,
    /// The relay's mode.
    #[arg(long, value_enum, default_value_t = Mode::ExactlyOnce)]
    mode: Mode,
    /// Rounds; each runs every configuration, the baseline first.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
}

/// One configuration's result.
struct Run {
    rate: f64,
    commits: f64,
    usage: Usage,
}

pub(crate) async fn run(args: &Args, database_url: &str, bootstrap: &str) -> anyhow::Result<()> {
    if args.streams.contains(&0) || args.processes.contains(&0) {
        bail!("--streams and --processes take positive counts");
    }
    let mut configs: Vec<(u32, usize)> = vec![(1, 1)];
    for &s in &args.streams {
        for &p in &args.processes {
            if p <= s as usize && !configs.contains(&(s, p)) {
                configs.push((s, p));
            }
        }
    }
    println!(
        "txbox-bench relay-scale: {} events x {} B per run, relay {}, batch {}, {} partitions, broker {bootstrap}, {} cores",
        args.events,
        args.payload_bytes,
        args.mode,
        args.batch_size,
        args.partitions,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<22} {:>9} {:>6} {:>8} {:>10} {:>7} {:>7} {:>7} {:>8}",
        "streams x processes",
        "events/s",
        "ratio",
        "txns/s",
        "pg comm/s",
        "relays",
        "pg",
        "broker",
        "machine"
    );
    let mut all: Vec<((u32, usize), Vec<f64>)> = configs.iter().map(|c| (*c, vec![])).collect();
    for round in 1..=args.rounds.max(1) {
        let mut baseline = f64::NAN;
        for (i, &(streams, processes)) in configs.iter().enumerate() {
            let r = one(args, database_url, bootstrap, streams, processes).await?;
            if i == 0 {
                baseline = r.rate;
            }
            let ratio = r.rate / baseline;
            all[i].1.push(ratio);
            println!(
                "{:<22} {:>9.0} {:>6.2} {:>8.1} {:>10.0} {:>7.2} {:>7.2} {:>7.2} {:>8.2}",
                format!("{streams} x {processes} #{round}"),
                r.rate,
                ratio,
                r.rate / args.batch_size as f64,
                r.commits,
                r.usage.own,
                r.usage.postgres,
                r.usage.broker,
                r.usage.machine
            );
        }
    }
    if args.rounds > 1 {
        for ((s, p), ratios) in all {
            println!(
                "{:<22} median ratio {:.2}",
                format!("{s} x {p}"),
                crate::median(ratios)
            );
        }
    }
    Ok(())
}

/// One run: a fresh database, `streams` streams over `processes` relays.
async fn one(
    args: &Args,
    database_url: &str,
    bootstrap: &str,
    streams: u32,
    processes: usize,
) -> anyhow::Result<Run> {
    let db = BenchDb::create(database_url).await?;
    let result = drain(args, &db, bootstrap, streams, processes).await;
    let dropped = db.drop_db().await;
    result.and_then(|r| dropped.map(|()| r))
}

async fn drain(
    args: &Args,
    db: &BenchDb,
    bootstrap: &str,
    streams: u32,
    processes: usize,
) -> anyhow::Result<Run> {
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let topic = format!("bench-scale-{run}");
    txbox_testkit::Broker::at(bootstrap)
        .create_topic(&topic, args.partitions)
        .await;
    prefill_streams(&db.pool, &topic, args.events, args.payload_bytes, streams).await?;
    let exe = std::env::current_exe().context("cannot find this binary to start relays")?;
    let mut children = Vec::with_capacity(processes);
    for p in 0..processes {
        let mine: Vec<String> = (0..streams)
            .filter(|s| *s as usize % processes == p)
            .map(|s| s.to_string())
            .collect();
        let child = tokio::process::Command::new(&exe)
            .arg("relay-process")
            .args(["--database-url", &db.url])
            .args(["--brokers", bootstrap])
            .args(["--mode", &args.mode.to_string()])
            .args(["--streams", &mine.join(",")])
            .args(["--batch-size", &args.batch_size.to_string()])
            .args(["--poll-interval", "20ms"])
            .args(["--instance", &format!("bench-{run}-{p}")])
            .args(["--transactional-id-prefix", &format!("txbox-bench-{run}")])
            .args(["--position-topic", &format!("bench-positions-{run}")])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a relay process")?;
        children.push(child);
    }
    let pids: Vec<u32> = children
        .iter()
        .filter_map(tokio::process::Child::id)
        .collect();
    let expected = i64::try_from(args.events)?;
    let launched = Instant::now();
    let mut first: Option<(Sample, i64, i64)> = None;
    let last = loop {
        let published: i64 = sqlx::query_scalar(
            "SELECT COALESCE(sum(published), 0)::bigint FROM txbox.relay_streams",
        )
        .fetch_one(&db.pool)
        .await?;
        if published > 0 && first.is_none() {
            first = Some((Sample::take(&pids), published, commits(db).await?));
        }
        if published >= expected {
            break (Sample::take(&pids), commits(db).await?);
        }
        for c in &mut children {
            if let Some(status) = c.try_wait()? {
                bail!("a relay process exited early ({status}) at {published} of {expected}");
            }
        }
        if launched.elapsed() > Duration::from_secs(900) {
            bail!("the relays published {published} of {expected} in 15 minutes");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    for c in &children {
        if let Some(pid) = c.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    for c in &mut children {
        let _ = tokio::time::timeout(Duration::from_secs(30), c.wait()).await;
    }
    let Some((start, published_at_start, commits_at_start)) = first else {
        bail!("no batch was recorded");
    };
    let usage = start.until(&last.0);
    Ok(Run {
        rate: (expected - published_at_start) as f64 / usage.seconds,
        commits: (last.1 - commits_at_start) as f64 / usage.seconds,
        usage,
    })
}

/// Transactions committed in the benchmark's database so far (the
/// statistics collector's count, updated at most every second or so: a
/// rate over a run of many seconds).
async fn commits(db: &BenchDb) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&db.pool)
    .await?)
}
