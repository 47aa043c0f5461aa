//! `txbox-chaos`: the payments chain of `examples/payments` run as real
//! processes on a private PostgreSQL server and a private Apache Kafka
//! broker, under a steady load, while a seeded controller kills, freezes
//! and restarts them; then every effect is checked from the databases.
//!
//! ```text
//! cargo build -p txbox-relay -p payments-example -p txbox-chaos
//! target/debug/txbox-chaos --events 20000 --seed 7 [--relay-mode at-least-once]
//! ```
//!
//! The chain: two `payments-example` instances in one consumer group
//! (inbox A: `payments.requested` → balances, settlements, outbox), one
//! `txbox-relay` (outbox → `payments.settled`), one `ledger-example`
//! (inbox B: `payments.settled` → `ledger_entries`, schema `ledger`).
//!
//! Faults, at seeded random moments once the first `--warmup` of the
//! events is in: SIGKILL and restart of any of the four processes, one
//! SIGSTOP of a payments instance past its session timeout (then SIGCONT),
//! one `kill -9` and restart of the broker and one crash (`pg_ctl stop -m
//! immediate`) and restart of PostgreSQL. The seed is printed first; the
//! same seed gives the same fault schedule (the moments are relative to
//! the run's progress, so timings still vary).
//!
//! The verdict, from the databases alone: every payment request settled
//! exactly once in A, exactly one ledger entry per payment in B, no entry
//! without its dedupe record, per account the ledger applied settlements
//! in their order, nothing left unpublished in the outbox, no dead letter
//! anywhere. Its last line gives the counts and PASS or FAIL with the
//! seed; the exit code is 0 on PASS, 1 on FAIL. The processes' logs are
//! kept under `--logs`.

mod chain;
mod faults;
mod load;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use rand::{Rng as _, SeedableRng as _};

#[derive(Debug, Parser)]
#[command(name = "txbox-chaos", about = "Seeded chaos run of the payments chain")]
struct Opt {
    /// Payment requests to produce.
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    /// Seed of the fault schedule [default: drawn at random, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// Payment requests produced per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// The relay's mode: exactly-once or at-least-once (the ledger's inbox
    /// must then absorb the relay's duplicates).
    #[arg(long, default_value = "exactly-once")]
    relay_mode: String,
    /// Share of the events produced before the first fault, the run's
    /// baseline rate.
    #[arg(long, default_value_t = 0.2)]
    warmup: f64,
    /// How long the chain may take to settle everything after the last
    /// event was produced.
    #[arg(long, default_value = "180", value_parser = parse_secs)]
    settle_timeout: Duration,
    /// Mean pause between faults, in seconds (each pause is drawn from
    /// half to one and a half times it).
    #[arg(long, default_value = "2", value_parser = parse_secs)]
    fault_every: Duration,
    /// Where the processes' logs go (a folder per seed).
    #[arg(long, default_value = "target/chaos")]
    logs: PathBuf,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    s.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|e| format!("{s:?} is not a number of seconds: {e}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opt = Opt::parse();
    anyhow::ensure!(opt.events > 0, "--events must be at least 1");
    anyhow::ensure!(opt.rate > 0, "--rate must be at least 1");
    anyhow::ensure!(
        !opt.fault_every.is_zero(),
        "--fault-every must be at least 1 s"
    );
    anyhow::ensure!(
        (0.0..1.0).contains(&opt.warmup),
        "--warmup is a share of the events, from 0 up to 1"
    );
    anyhow::ensure!(
        matches!(opt.relay_mode.as_str(), "exactly-once" | "at-least-once"),
        "--relay-mode is exactly-once or at-least-once"
    );
    let seed = opt.seed.unwrap_or_else(|| rand::thread_rng().gen());
    println!(
        "txbox-chaos seed={seed} events={} rate={}/s relay={}",
        opt.events, opt.rate, opt.relay_mode
    );
    let logs = opt.logs.join(format!("seed-{seed}"));
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;

    let mut chain = chain::Chain::start(seed, &opt.relay_mode, &logs).await?;
    let started = Instant::now();
    let load = load::Load::start(&chain.brokers(), &chain.requested(), opt.events, opt.rate)?;
    // Baseline: the first share of the events, with no fault, until the
    // ledger has nearly caught up with it.
    let warm = (opt.events as f64 * opt.warmup) as u64;
    while load.produced() < warm && !load.done() {
        chain.supervise().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut baseline = chain.progress(started).await;
    let caught_up = Instant::now() + Duration::from_secs(30);
    while (baseline.ledger as f64) < warm as f64 * 0.9 && Instant::now() < caught_up {
        tokio::time::sleep(Duration::from_millis(200)).await;
        baseline = chain.progress(started).await;
    }
    println!(
        "[{:>4.0}s] warm-up done: {baseline}",
        started.elapsed().as_secs_f64()
    );

    // Faults while the load runs, and until each one-off fault happened.
    let mut schedule =
        faults::Schedule::new(rand::rngs::StdRng::seed_from_u64(seed), opt.fault_every);
    let mut load_end: Option<chain::Progress> = None;
    while !load.done() || !schedule.finished() {
        let fault = schedule.next(load.produced() as f64 / opt.events as f64);
        tokio::time::sleep(fault.after).await;
        chain.supervise().await;
        if load.done() && load_end.is_none() {
            load_end = Some(chain.progress(started).await);
        }
        println!(
            "[{:>4.0}s] {} ({} of {} produced)",
            started.elapsed().as_secs_f64(),
            fault.kind,
            load.produced(),
            opt.events
        );
        chain.inject(&fault.kind).await?;
    }
    let load = load.finish().await?;
    let load_end = match load_end {
        Some(p) => p,
        None => chain.progress(started).await,
    };
    println!(
        "[{:>4.0}s] all {} produced, faults over; settling",
        started.elapsed().as_secs_f64(),
        load.produced
    );
    let settled = chain.settle(opt.events, opt.settle_timeout, started).await;
    let total = started.elapsed();
    chain.stop().await;
    let verdict = chain.verdict(opt.events).await?;

    let rate = |from: &chain::Progress, to: &chain::Progress| {
        (to.ledger - from.ledger) as f64 / (to.at - from.at).as_secs_f64().max(0.001)
    };
    let start = chain::Progress::zero();
    let clean_rate = rate(&start, &baseline);
    let fault_rate = rate(&baseline, &load_end);
    println!(
        "rate (ledger entries/s, offered {}/s): {clean_rate:.0} without faults, {fault_rate:.0} \
         while faults were injected ({:.2} of it); {:.0} over the whole run of {:.0} s",
        opt.rate,
        fault_rate / clean_rate.max(0.001),
        opt.events as f64 / total.as_secs_f64(),
        total.as_secs_f64()
    );
    let mut problems = verdict.problems;
    if !settled {
        problems.push(format!(
            "the chain did not settle within {:?} after the last event",
            opt.settle_timeout
        ));
    }
    if load.failed > 0 {
        problems.push(format!(
            "{} payment requests were not produced",
            load.failed
        ));
    }
    for p in &problems {
        println!("VIOLATION: {p}");
    }
    let pass = problems.is_empty();
    println!(
        "txbox-chaos: produced {}, settled {} (payments), ledger {}, duplicates dropped \
         payments={} ledger={}, {}, logs {}: {} seed={seed}",
        load.produced,
        verdict.report.settlements,
        verdict.report.ledger_entries,
        verdict.duplicates_payments,
        verdict.duplicates_ledger,
        chain.fault_counts(),
        logs.display(),
        if pass { "PASS" } else { "FAIL" },
    );
    std::process::exit(if pass { 0 } else { 1 });
}
