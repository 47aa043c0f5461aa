//! `txbox-bench`: throughput of txbox against a baseline measured in the
//! same process, on the same database and broker.
//!
//! ```text
//! txbox-bench inbox [--messages N] [--seconds S] [--rounds R] [--shape BATCHxPARTITIONS]...
//!                   [--key-order first-write|commit]
//! txbox-bench relay [--mode exactly-once|at-least-once] [--events N] [--batch-size B] ...
//! txbox-bench dedupe [--prefill N]... [--messages N] [--rounds R] [--shape BATCHxPARTITIONS]
//! txbox-bench backlog [--backlog N] [--reference N] [--rate R] [--after S] [--csv FILE]
//! txbox-bench relay-scale [--streams 1,2,4,8] [--processes 1,2] [--events N]
//! txbox-bench chain [--events N] [--rate R] [--seconds S]
//! ```
//!
//! `relay-scale`: the relay's drain rate as streams and relay processes
//! are added, with the CPU each side used (see the `relay_scale` module).
//!
//! `chain`: inbox A, the relay and inbox B end to end: the maximum rate
//! and the latency from input produced to ledger committed (see the
//! `chain` module).
//!
//! `backlog`: the relay draining a large backlog while staging goes on,
//! against a small drain, and the outbox's size over the run (see the
//! `backlog` module).
//!
//! `dedupe`: the inbox as its dedupe state grows, with each dedupe mode,
//! against the hand-written consumer (see the `dedupe` module).
//!
//! `relay`: the relay draining a pre-filled outbox against plain Kafka
//! producers, and its latency at a steady rate (see the `relay` module).
//!
//! `inbox`:
//!
//! For each scenario (per-message transactions on one partition; batches of
//! 100 on one partition; batches of 100 on four partitions) it runs:
//! 1. two ceilings from a sqlx loop with the same batch size and
//!    concurrency: *txbox SQL*, exactly the statements an inbox commit runs
//!    on txbox's tables (its `BEGIN` with the `SET LOCAL`s, business
//!    update, outbox staging, fenced offset advance with the event-id
//!    insert; the inbox's own two from `txbox::inbox::SteadyStateSql`), so
//!    the ratio is the runtime's own overhead;
//!    and *pg-ceiling*, the reference SQL of `shared/bench/pg-ceiling`
//!    (smaller rows, fewer indexes), so the ratio includes the schema's cost;
//!    and, when `pgbench` is installed, that same reference SQL run by
//!    pgbench as `shared/bench/pg-ceiling` does (simple protocol: each
//!    statement parsed per execution, hence lower than the sqlx loop);
//! 2. the hand-written consumer a team would write from the common advice
//!    (the `baseline` module: Kafka-committed offsets, a processed-events
//!    table with `ON CONFLICT DO NOTHING`), on a topic pre-filled with N
//!    messages, doing the same business update and staging the same outbox
//!    rows, at the same batch size, one task per partition;
//! 3. the inbox on the same topic: a txbox inbox whose batch handler does
//!    the same work;
//!
//! and prints messages/s for each, the ratios, and *consume-only*: a plain
//! consumer reading the same topic with no database work, the most any
//! consumer can get from the broker for that topic.
//!
//! Each shape runs `--rounds` times, baselines and inbox back to back in
//! every round, so a noisy neighbour slows both sides of a ratio alike; the
//! hand-written consumer and the inbox take turns going first (ABBA: the
//! second meets the tables the first grew, and the autovacuum it set off),
//! each right after a `CHECKPOINT`; every round starts with the dedupe
//! tables and outboxes emptied (their growth is `dedupe`'s subject); the
//! median line gives the medians of the rounds' figures and ratios (use a
//! multiple of 4 rounds for a balanced order).
//!
//! Needs `TXBOX_TEST_DATABASE_URL` (or `--database-url`) and
//! `TXBOX_KAFKA_BOOTSTRAP` (or `--bootstrap`; Apache Kafka, `scripts/dev-up`
//! starts one), given before or after the subcommand. Figures go to
//! stdout, logs (`RUST_LOG`, default `warn`) to stderr.

mod backlog;
mod baseline;
mod ceiling;
mod chain;
mod dedupe;
mod inbox;
mod pg_io;
mod pgbench;
mod relay;
mod relay_scale;
mod usage;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "txbox-bench")]
struct Opt {
    /// Server to create the benchmark database on.
    #[arg(
        long,
        global = true,
        env = "TXBOX_TEST_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Kafka bootstrap servers (required).
    #[arg(long, global = true, env = "TXBOX_KAFKA_BOOTSTRAP")]
    bootstrap: Option<String>,
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// The inbox against its SQL's ceiling.
    Inbox {
        /// Messages per batch scenario (per-message runs use a tenth).
        #[arg(long, default_value_t = 200_000)]
        messages: usize,
        /// Seconds per ceiling run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Rounds per shape. Each round runs every baseline and the inbox,
        /// the hand-written consumer and the inbox taking turns going first
        /// (ABBA: a multiple of 4 balances the order); with more than one,
        /// a median line follows (ratios are the medians of the rounds' own
        /// ratios).
        #[arg(long, default_value_t = 4)]
        rounds: usize,
        /// Run only these shapes, as `BATCHxPARTITIONS` (repeatable, e.g.
        /// `--shape 100x1`, or `--shape 100x16`). Default: 1x1, 100x1 and
        /// 100x4.
        #[arg(long = "shape", value_parser = parse_shape)]
        shapes: Vec<Shape>,
        /// The outbox's key order for the txbox SQL ceiling and the inbox
        /// (`commit` adds the per-key order heads to every staging).
        #[arg(long, value_enum, default_value_t = Order::FirstWrite)]
        key_order: Order,
        /// Inboxes in the group, each with its own consumer and pool (in
        /// this process, so on the same cores).
        #[arg(long, default_value_t = 1)]
        instances: usize,
        /// A librdkafka property for the inbox's consumers only, as
        /// `KEY=VALUE` (repeatable; `InboxBuilder::kafka_option`), e.g.
        /// `--inbox-option fetch.wait.max.ms=500` for librdkafka's default.
        #[arg(long = "inbox-option", value_name = "KEY=VALUE", value_parser = txbox::kafka::parse_option)]
        inbox_options: Vec<(String, String)>,
        /// Messages buffered per partition before the inbox pauses its
        /// fetch (`InboxBuilder::max_buffered`; default the inbox's).
        #[arg(long)]
        max_buffered: Option<usize>,
    },
    /// The relay against plain transactional and idempotent producers,
    /// and its latency at a steady rate.
    Relay(relay::Args),
    /// The inbox as its dedupe state grows, each dedupe mode, against the
    /// hand-written consumer.
    Dedupe(dedupe::Args),
    /// The relay draining a large backlog while staging goes on, and the
    /// outbox's size over the run.
    Backlog(backlog::Args),
    /// The relay's drain rate with more streams and relay processes.
    RelayScale(relay_scale::Args),
    /// Inbox A, the relay and inbox B end to end: maximum rate and latency.
    Chain(chain::Args),
}

/// The hidden subcommand the benchmarks start relay processes with:
/// `txbox-bench relay-process ARGS` runs `txbox-relay ARGS`.
const RELAY_PROCESS: &str = "relay-process";

/// `txbox::outbox::KeyOrder`, as a command-line value.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Order {
    FirstWrite,
    Commit,
}

impl From<Order> for txbox::outbox::KeyOrder {
    fn from(o: Order) -> Self {
        match o {
            Order::FirstWrite => txbox::outbox::KeyOrder::FirstWrite,
            Order::Commit => txbox::outbox::KeyOrder::Commit,
        }
    }
}

/// One scenario's shape.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub batch: usize,
    pub partitions: usize,
}

/// What one round of one shape measured, in messages/s.
#[derive(Debug, Clone, Copy)]
struct Round {
    inbox: f64,
    hand_written: f64,
    same: f64,
    reference: f64,
    pgbench: f64,
    consume_only: f64,
}

impl Round {
    /// One round's line, `note` after the figures (which consumer ran
    /// first).
    fn print(&self, label: &str, note: &str) {
        println!(
            "{label:<33} {:>9.0} {:>12.0} {:>6.2} {:>10.0} {:>6.2} {:>11.0} {:>6.2} {:>9.0} {:>6.2} {:>12.0}  {note}",
            self.inbox,
            self.hand_written,
            self.inbox / self.hand_written,
            self.same,
            self.inbox / self.same,
            self.reference,
            self.inbox / self.reference,
            self.pgbench,
            self.inbox / self.pgbench,
            self.consume_only
        );
    }

    fn print_median(label: &str, rounds: &[Round]) {
        let m = |f: &dyn Fn(&Round) -> f64| median(rounds.iter().map(f).collect());
        println!(
            "{label:<33} {:>9.0} {:>12.0} {:>6.2} {:>10.0} {:>6.2} {:>11.0} {:>6.2} {:>9.0} {:>6.2} {:>12.0}",
            m(&|r| r.inbox),
            m(&|r| r.hand_written),
            m(&|r| r.inbox / r.hand_written),
            m(&|r| r.same),
            m(&|r| r.inbox / r.same),
            m(&|r| r.reference),
            m(&|r| r.inbox / r.reference),
            m(&|r| r.pgbench),
            m(&|r| r.inbox / r.pgbench),
            m(&|r| r.consume_only)
        );
    }
}

/// The median (NaN-safe: NaNs sort last).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

pub(crate) fn parse_shape(s: &str) -> Result<Shape, String> {
    let (b, p) = s
        .split_once('x')
        .ok_or_else(|| format!("expected BATCHxPARTITIONS, got {s:?}"))?;
    let num = |v: &str| {
        v.parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{v:?} is not a positive number"))
    };
    Ok(Shape {
        batch: num(b)?,
        partitions: num(p)?,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut argv = std::env::args_os();
    if argv.nth(1).is_some_and(|a| a == RELAY_PROCESS) {
        return txbox_relay::cli::main_with_args(
            std::iter::once(std::ffi::OsString::from("txbox-relay")).chain(argv),
        )
        .await;
    }
    // sqlx warns of every statement over 1 s; the benchmarks' set-up
    // (prefilling millions of ids, building indexes) is made of such
    // statements on purpose, so only errors of sqlx's are shown by default.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,sqlx::query=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let opt = Opt::parse();
    let Some(bootstrap) = opt.bootstrap.as_deref() else {
        anyhow::bail!("--bootstrap or TXBOX_KAFKA_BOOTSTRAP is required");
    };
    match opt.what {
        What::Inbox {
            messages,
            seconds,
            rounds: rounds_wanted,
            shapes,
            key_order,
            instances,
            inbox_options,
            max_buffered,
        } => {
            let tuning = inbox::Tuning {
                kafka: inbox_options,
                max_buffered,
            };
            let order = txbox::outbox::KeyOrder::from(key_order);
            let db = ceiling::BenchDb::create(&opt.database_url).await?;
            db.add_ceiling().await?;
            println!(
                "txbox-bench inbox: database {}, broker {bootstrap}, key order {key_order:?}, \
                 {instances} inbox instance(s)",
                db.name
            );
            let pgbench = pgbench::find();
            println!(
                "{:<33} {:>9} {:>12} {:>6} {:>10} {:>6} {:>11} {:>6} {:>9} {:>6} {:>12}",
                "scenario",
                "inbox",
                "hand-written",
                "ratio",
                "txbox SQL",
                "ratio",
                "ref. (sqlx)",
                "ratio",
                "pgbench",
                "ratio",
                "consume-only"
            );
            let mut scenarios = vec![
                (
                    "1 msg/txn, 1 partition".to_owned(),
                    Shape {
                        batch: 1,
                        partitions: 1,
                    },
                    messages / 20,
                ),
                (
                    "100 msg/txn, 1 partition".to_owned(),
                    Shape {
                        batch: 100,
                        partitions: 1,
                    },
                    messages,
                ),
                (
                    "100 msg/txn, 4 partitions".to_owned(),
                    Shape {
                        batch: 100,
                        partitions: 4,
                    },
                    messages,
                ),
            ];
            for s in &shapes {
                if !scenarios
                    .iter()
                    .any(|(_, c, _)| c.batch == s.batch && c.partitions == s.partitions)
                {
                    let name = format!("{} msg/txn, {} partitions", s.batch, s.partitions);
                    let n = if s.batch == 1 {
                        messages / 20
                    } else {
                        messages
                    };
                    scenarios.push((name, *s, n));
                }
            }
            let chosen = |s: &Shape| {
                shapes.is_empty()
                    || shapes
                        .iter()
                        .any(|c| c.batch == s.batch && c.partitions == s.partitions)
            };
            for (name, shape, n) in scenarios.into_iter().filter(|(_, s, _)| chosen(s)) {
                let dur = std::time::Duration::from_secs(seconds);
                let mut rounds = Vec::with_capacity(rounds_wanted);
                for round in 1..=rounds_wanted {
                    let first = inbox::First::in_round(round - 1);
                    db.reset_round().await?;
                    let same = ceiling::run(&db, ceiling::Sql::Txbox, shape, dur, order).await?;
                    let reference =
                        ceiling::run(&db, ceiling::Sql::Reference, shape, dur, order).await?;
                    let pg = match &pgbench {
                        Some(bin) => pgbench::run(bin, &db.options, &db.name, shape, dur)?,
                        None => f64::NAN,
                    };
                    let run = inbox::run(
                        &db,
                        bootstrap,
                        shape,
                        n.max(1000),
                        order,
                        instances,
                        &tuning,
                        first,
                    )
                    .await?;
                    let row = Round {
                        inbox: run.inbox,
                        hand_written: run.hand_written,
                        same,
                        reference,
                        pgbench: pg,
                        consume_only: run.consume_only,
                    };
                    row.print(&format!("{name} #{round}"), first.label());
                    // CPU time per message over each consumer's whole
                    // run (joining and leaving the group included).
                    let per_message = |u: &usage::Usage| {
                        let c = u.per_message(n.max(1000));
                        format!(
                            "machine {:.1}, PostgreSQL {:.1}, broker {:.1}, this process {:.1}",
                            c.machine, c.postgres, c.broker, c.own
                        )
                    };
                    println!(
                        "{:<33} CPU µs/msg: inbox {}; hand-written {}",
                        "",
                        per_message(&run.inbox_cpu),
                        per_message(&run.hand_cpu)
                    );
                    rounds.push(row);
                }
                if rounds.len() > 1 {
                    Round::print_median(&format!("{name} median"), &rounds);
                }
            }
            db.drop_db().await?;
        }
        What::Relay(args) => relay::run(&args, &opt.database_url, bootstrap).await?,
        What::Dedupe(args) => dedupe::run(&args, &opt.database_url, bootstrap).await?,
        What::Backlog(args) => backlog::run(&args, &opt.database_url, bootstrap).await?,
        What::RelayScale(args) => relay_scale::run(&args, &opt.database_url, bootstrap).await?,
        What::Chain(args) => chain::run(&args, &opt.database_url, bootstrap).await?,
    }
    Ok(())
}
