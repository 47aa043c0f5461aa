//! A payments service built on txbox.
//!
//! Consumes `payments.requested` (`{"account": "...", "amount": n}`), debits
//! the account exactly once per request, and stages a `PaymentSettled` event
//! for `payments.settled` in the same transaction; `txbox-relay` publishes it.
//! Requests for more than the balance are rejected as permanent errors and
//! dead-lettered.
//!
//! Run with (after `scripts/dev-up` and `txbox migrate`):
//!
//! ```text
//! cargo run -p payments-example -- --demo 100
//! ```
//!
//! `--demo N` creates the topics, produces N requests, waits until they are
//! applied, prints the balances and exits; without it the service runs until
//! Ctrl-C / SIGTERM. `--read-settled N` shows what a downstream
//! `read_committed` consumer sees of `payments.settled` (once the relay has
//! published): each settled payment once. Reads TXBOX_DATABASE_URL,
//! TXBOX_KAFKA_BOOTSTRAP and TXBOX_DEMO_TOPIC_PREFIX (prepended to both
//! topic names, so that demo runs do not share topics).

mod settled;

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use txbox::inbox::{Handler, HandlerError, Inbox, InboxMessage, Tx};
use txbox::{Outbox, OutboxEvent, Schema};

const REQUESTED: &str = "payments.requested";
const SETTLED: &str = "payments.settled";

#[derive(Debug, Parser)]
struct Opt {
    #[arg(long, env = "TXBOX_DATABASE_URL")]
    database_url: String,
    #[arg(long, env = "TXBOX_KAFKA_BOOTSTRAP")]
    brokers: String,
    #[arg(long, env = "TXBOX_SCHEMA", default_value = "txbox")]
    schema: String,
    /// Prepended to the topic names.
    #[arg(long, env = "TXBOX_DEMO_TOPIC_PREFIX", default_value = "")]
    topic_prefix: String,
    /// Produce this many requests, process them, print balances, exit.
    #[arg(long)]
    demo: Option<usize>,
    /// Read payments.settled as a read_committed consumer until this many
    /// distinct events were seen; fail on fewer or on duplicates.
    #[arg(long, value_name = "N")]
    read_settled: Option<usize>,
    /// Serve GET /metrics (Prometheus), /health and /ready (the database
    /// answers) on this address, e.g. 0.0.0.0:9188.
    #[arg(long, env = "PAYMENTS_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
}

impl Opt {
    fn requested(&self) -> String {
        format!("{}{REQUESTED}", self.topic_prefix)
    }
    fn settled(&self) -> String {
        format!("{}{SETTLED}", self.topic_prefix)
    }
}

#[derive(Debug, serde::Deserialize, serde::Serialize)]
struct PaymentRequested {
    account: String,
    amount: i64,
}

struct Payments {
    outbox: Outbox,
    settled: String,
}

#[async_trait::async_trait]
impl Handler for Payments {
    async fn handle(&self, tx: &mut Tx, msg: &InboxMessage) -> Result<(), HandlerError> {
        let req: PaymentRequested = msg.json()?;
        if req.amount <= 0 {
            return Err(HandlerError::permanent(format!(
                "amount must be positive, got {}",
                req.amount
            )));
        }
        let balance: Option<i64> = sqlx::query_scalar(
            "UPDATE payments_account SET balance = balance - $2 WHERE id = $1 AND balance >= $2 RETURNING balance",
        )
        .bind(&req.account)
        .bind(req.amount)
        .fetch_optional(&mut **tx)
        .await?;
        let Some(balance) = balance else {
            return Err(HandlerError::permanent(format!(
                "insufficient funds in {}",
                req.account
            )));
        };
        let settled = OutboxEvent::json(
            &self.settled,
            &serde_json::json!({"account": req.account, "amount": req.amount, "balance": balance, "request": msg.event_id()}),
        )
        .map_err(HandlerError::permanent)?
        // The same id however often this request is applied: a handler
        // can run again for it (a commit whose acknowledgement was lost, a
        // replay), and downstream the copies must be one event.
        .derived_from(msg.event_id(), "settled")
        .key(req.account.clone())
        .event_type("PaymentSettled")
        .source("/payments");
        self.outbox.stage(tx, settled).await?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();
    let opt = Opt::parse();
    if let Some(want) = opt.read_settled {
        let topic = opt.settled();
        println!("a read_committed consumer of {topic}:");
        let seen = settled::read(&opt.brokers, &topic, want, Duration::from_secs(30))?;
        println!(
            "{} records, {} distinct settled payments, {} duplicates",
            seen.records, seen.distinct, seen.duplicates
        );
        anyhow::ensure!(
            seen.distinct == want && seen.duplicates == 0,
            "expected {want} settled payments, each once"
        );
        return Ok(());
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&opt.database_url)
        .await
        .context("connecting to the database")?;
    // The service's own table (txbox's tables come from `txbox migrate`).
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS payments_account (id text PRIMARY KEY, balance bigint NOT NULL);
         INSERT INTO payments_account SELECT 'acct-' || g, 1000 FROM generate_series(0, 9) g ON CONFLICT DO NOTHING;",
    )
    .execute(&pool)
    .await?;
    create_topics(&opt.brokers, &[opt.requested(), opt.settled()]).await?;
    let served = tokio_util::sync::CancellationToken::new();
    let _stop_serving = served.clone().drop_guard();
    if let Some(addr) = opt.metrics_listen {
        // The inbox's metrics and the probes, in one line (feature `http`).
        txbox::http::Endpoint::new(addr)
            .prometheus()?
            .ready_when_database_answers(pool.clone())
            .spawn(served.clone())
            .await?;
    }

    let schema = Schema::new(opt.schema.clone())?;
    let inbox = Inbox::builder(pool.clone())
        .schema(schema.clone())
        .brokers(&opt.brokers)
        .group_id("payments")
        .handler(
            &opt.requested(),
            Payments {
                outbox: Outbox::new(schema.clone()).notify(txbox::outbox::DEFAULT_NOTIFY_CHANNEL),
                settled: opt.settled(),
            },
        )
        .build()?;

    match opt.demo {
        None => {
            inbox
                .run(async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await?
        }
        Some(n) => {
            let requested = opt.requested();
            let before: i64 = consumed(&pool, &schema, &requested).await?;
            produce(&opt.brokers, &requested, n).await?;
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let run = tokio::spawn(inbox.run(async move {
                let _ = stop_rx.await;
            }));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            while consumed(&pool, &schema, &requested).await? < before + n as i64 {
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "demo requests not consumed in 120 s"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let _ = stop_tx.send(());
            run.await??;
            let rows: Vec<(String, i64)> =
                sqlx::query_as("SELECT id, balance FROM payments_account ORDER BY id")
                    .fetch_all(&pool)
                    .await?;
            println!("processed {n} payment requests exactly once; balances:");
            for (id, balance) in rows {
                println!("  {id}: {balance}");
            }
            let staged: i64 =
                sqlx::query_scalar(&format!("SELECT count(*) FROM {}", schema.table("outbox")))
                    .fetch_one(&pool)
                    .await?;
            println!(
                "{staged} PaymentSettled events are in the outbox for txbox-relay to publish to {}",
                opt.settled()
            );
        }
    }
    Ok(())
}

async fn consumed(pool: &sqlx::PgPool, schema: &Schema, topic: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT COALESCE(sum(next_offset), 0)::bigint FROM {} WHERE consumer_group = 'payments' AND topic = $1",
        schema.table("inbox_offsets")
    ))
    .bind(topic)
    .fetch_one(pool)
    .await?)
}

async fn create_topics(brokers: &str, names: &[String]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| NewTopic::new(n, 3, TopicReplication::Fixed(1)))
        .collect();
    for r in admin.create_topics(&topics, &AdminOptions::new()).await? {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => anyhow::bail!("cannot create topic {t}: {e}"),
        }
    }
    Ok(())
}

async fn produce(brokers: &str, topic: &str, n: usize) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .create()?;
    for i in 0..n {
        let req = PaymentRequested {
            account: format!("acct-{}", i % 10),
            amount: (i % 5 + 1) as i64,
        };
        let payload = serde_json::to_vec(&req)?;
        let id = uuid::Uuid::new_v4().to_string();
        let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: "ce_id",
            value: Some(&id),
        });
        producer
            .send(
                FutureRecord::to(topic)
                    .key(&req.account)
                    .payload(&payload)
                    .headers(headers),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    Ok(())
}
