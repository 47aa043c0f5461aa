//! `txbox-bench`: throughput of txbox against a baseline measured in the
//! same process, on the same database and broker.
//!
//! ```text
//! txbox-bench inbox [--messages N] [--seconds S]
//! ```
//!
//! For each scenario (per-message transactions on one partition; batches of
//! 100 on one partition; batches of 100 on four partitions) it runs:
//! 1. two ceilings from a sqlx loop with the same batch size and
//!    concurrency: *txbox SQL*, exactly the statements an inbox commit runs
//!    on txbox's tables (event-id insert, business update, outbox staging,
//!    fenced offset advance), so the ratio is the runtime's own overhead;
//!    and *pg-ceiling*, the reference SQL of `shared/bench/pg-ceiling`
//!    (smaller rows, fewer indexes), so the ratio includes the schema's cost;
//!    and, when `pgbench` is installed, that same reference SQL run by
//!    pgbench as `shared/bench/pg-ceiling` does (simple protocol: each
//!    statement parsed per execution, hence lower than the sqlx loop);
//! 2. the inbox: a topic pre-filled with N messages, consumed by a txbox
//!    inbox whose batch handler does the same business update and stages the
//!    same outbox rows;
//!
//! and prints messages/s for each, the ratios, and *consume-only*: a plain
//! consumer reading the same topic with no database work, the most any
//! consumer can get from the broker for that topic.
//!
//! Needs `TXBOX_TEST_DATABASE_URL` (or `--database-url`) and
//! `TXBOX_KAFKA_BOOTSTRAP` (a broker; `scripts/dev-up` starts Tansu).

mod ceiling;
mod inbox;
mod pgbench;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "txbox-bench")]
struct Opt {
    /// Server to create the benchmark database on.
    #[arg(
        long,
        env = "TXBOX_TEST_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Kafka bootstrap servers.
    #[arg(long, env = "TXBOX_KAFKA_BOOTSTRAP")]
    bootstrap: String,
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
    },
}

/// One scenario's shape.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub batch: usize,
    pub partitions: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let opt = Opt::parse();
    match opt.what {
        What::Inbox { messages, seconds } => {
            let db = ceiling::BenchDb::create(&opt.database_url).await?;
            println!(
                "txbox-bench inbox: database {}, broker {}",
                db.name, opt.bootstrap
            );
            let pgbench = pgbench::find();
            println!(
                "{:<26} {:>9} {:>10} {:>6} {:>11} {:>6} {:>9} {:>6} {:>12}",
                "scenario",
                "inbox",
                "txbox SQL",
                "ratio",
                "ref. (sqlx)",
                "ratio",
                "pgbench",
                "ratio",
                "consume-only"
            );
            let scenarios = [
                (
                    "1 msg/txn, 1 partition",
                    Shape {
                        batch: 1,
                        partitions: 1,
                    },
                    messages / 20,
                ),
                (
                    "100 msg/txn, 1 partition",
                    Shape {
                        batch: 100,
                        partitions: 1,
                    },
                    messages,
                ),
                (
                    "100 msg/txn, 4 partitions",
                    Shape {
                        batch: 100,
                        partitions: 4,
                    },
                    messages,
                ),
            ];
            for (name, shape, n) in scenarios {
                let dur = std::time::Duration::from_secs(seconds);
                let same = ceiling::run(&db, ceiling::Sql::Txbox, shape, dur).await?;
                let reference = ceiling::run(&db, ceiling::Sql::Reference, shape, dur).await?;
                let pg = match &pgbench {
                    Some(bin) => pgbench::run(bin, &db.options, &db.name, shape, dur)?,
                    None => f64::NAN,
                };
                let run = inbox::run(&db, &opt.bootstrap, shape, n.max(1000)).await?;
                let inbox = run.inbox;
                println!(
                    "{name:<26} {inbox:>9.0} {same:>10.0} {:>6.2} {reference:>11.0} {:>6.2} {pg:>9.0} {:>6.2} {:>12.0}",
                    inbox / same,
                    inbox / reference,
                    inbox / pg,
                    run.consume_only
                );
            }
            db.drop_db().await?;
        }
    }
    Ok(())
}
