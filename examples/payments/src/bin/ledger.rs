//! The ledger service, downstream in the example's chain.
//!
//! Consumes `payments.settled` (published by `txbox-relay` from the
//! payments service's outbox) with an inbox of its own (group `ledger`,
//! txbox schema `ledger`), and appends one row per settled payment to
//! `ledger_entries`: a plain `INSERT`, with no unique constraint on the
//! payment id, so a payment applied twice would show as two rows. The
//! inbox's dedupe by event id (`ce_id`) keeps it to one; per account the
//! rows come in settlement order (one key, one partition, applied in
//! offset order).
//!
//! ```text
//! ledger-example               # the service, until SIGTERM / Ctrl-C
//! ledger-example --check N     # the chain's tables after N requests: PASS, or what is wrong (exit 1)
//! ```
//!
//! Reads TXBOX_DATABASE_URL, TXBOX_KAFKA_BOOTSTRAP, LEDGER_SCHEMA (default
//! `ledger`, migrated first with `txbox migrate --schema ledger`),
//! LEDGER_GROUP, TXBOX_DEMO_TOPIC_PREFIX, LEDGER_METRICS_LISTEN and
//! TXBOX_LOG_FORMAT. See `examples/payments/README.md`.

use anyhow::Context as _;
use clap::Parser;
use payments_example::check::{Chain, Report};
use payments_example::events::{PaymentSettled, SETTLED};
use payments_example::{cli, service, tables, LEDGER_GROUP, LEDGER_SCHEMA};
use txbox::inbox::{Handler, HandlerError, Inbox, InboxMessage, Tx};
use txbox::Schema;

#[derive(Debug, Parser)]
#[command(
    name = "ledger-example",
    about = "The ledger service of the txbox example chain"
)]
struct Opt {
    #[command(flatten)]
    common: cli::Common,
    /// Schema of the service's txbox tables (its inbox). Not TXBOX_SCHEMA,
    /// which names the payments service's.
    #[arg(long, env = "LEDGER_SCHEMA", default_value = LEDGER_SCHEMA)]
    schema: String,
    /// The inbox's consumer group.
    #[arg(long, env = "LEDGER_GROUP", default_value = LEDGER_GROUP)]
    group: String,
    /// Serve GET /metrics (Prometheus), /health and /ready (the database
    /// answers) on this address, e.g. 0.0.0.0:9189.
    #[arg(long, env = "LEDGER_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Instead of serving: read both services' tables, print what they
    /// say, and fail unless each of N payment requests settled once and
    /// has exactly one ledger entry, in order, with nothing dead-lettered.
    #[arg(long, value_name = "N")]
    check: Option<u64>,
    /// With --check: the payments service's database [default: --database-url].
    #[arg(long, value_name = "URL", hide_env_values = true)]
    payments_database_url: Option<String>,
    /// With --check: the payments service's txbox schema.
    #[arg(long, env = "TXBOX_SCHEMA", default_value = "txbox")]
    payments_schema: String,
}

/// Appends one ledger row per settled payment it is given.
struct Ledger {
    applied_by: &'static str,
}

#[async_trait::async_trait]
impl Handler for Ledger {
    async fn handle(&self, tx: &mut Tx, msg: &InboxMessage) -> Result<(), HandlerError> {
        let settled: PaymentSettled = msg.json()?;
        sqlx::query(
            r#"INSERT INTO ledger_entries
                 (payment_id, account, amount, balance, event_id, topic, partition, "offset", applied_by)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"#,
        )
        .bind(&settled.request)
        .bind(&settled.account)
        .bind(settled.amount)
        .bind(settled.balance)
        .bind(msg.event_id())
        .bind(msg.topic())
        .bind(msg.partition())
        .bind(msg.offset())
        .bind(self.applied_by)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opt = Opt::parse();
    let _telemetry = opt.common.init_logging("ledger")?;
    let pool = service::connect(&opt.common.database_url)
        .await
        .context("connecting to the database")?;
    let schema = Schema::new(opt.schema.clone())?;
    if let Some(n) = opt.check {
        return check(&opt, &pool, &schema, n).await;
    }
    let brokers = opt.common.brokers()?;
    let settled = opt.common.topic(SETTLED);
    service::create_tables(&pool, tables::LEDGER).await?;
    // The ledger may start before the payments service: the inbox needs
    // its topic to exist.
    service::create_topics(brokers, std::slice::from_ref(&settled)).await?;
    let served = tokio_util::sync::CancellationToken::new();
    let _stop_serving = served.clone().drop_guard();
    if let Some(addr) = opt.metrics_listen {
        service::serve_endpoint(addr, &pool, served.clone()).await?;
    }
    opt.common
        .with_kafka_options(Inbox::builder(pool.clone()))
        .schema(schema)
        .brokers(brokers)
        .group_id(opt.group.clone())
        // The relay writes payments.settled in Kafka transactions: read
        // only what they committed (librdkafka's default, said here).
        .kafka_option("isolation.level", "read_committed")
        .handler(
            &settled,
            Ledger {
                applied_by: txbox::instance::name(),
            },
        )
        .build()?
        .run(service::shutdown_signal())
        .await?;
    Ok(())
}

async fn check(opt: &Opt, ledger: &sqlx::PgPool, schema: &Schema, n: u64) -> anyhow::Result<()> {
    let payments = match &opt.payments_database_url {
        Some(url) => service::connect(url)
            .await
            .context("connecting to the payments database")?,
        None => ledger.clone(),
    };
    let report = Report::read(Chain {
        payments: &payments,
        payments_schema: &Schema::new(opt.payments_schema.clone())?,
        ledger,
        ledger_schema: schema,
        ledger_group: &opt.group,
    })
    .await?;
    println!("{report}");
    let problems = report.problems(n);
    for problem in &problems {
        println!("  wrong: {problem}");
    }
    anyhow::ensure!(problems.is_empty(), "FAIL: {} problems", problems.len());
    println!("PASS: each of {n} payments settled once and has exactly one ledger entry, in order");
    Ok(())
}
