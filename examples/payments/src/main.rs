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
//! Ctrl-C / SIGTERM. Reads TXBOX_DATABASE_URL and TXBOX_KAFKA_BOOTSTRAP.

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
    /// Produce this many requests, process them, print balances, exit.
    #[arg(long)]
    demo: Option<usize>,
}

#[derive(Debug, serde::Deserialize, serde::Serialize)]
struct PaymentRequested {
    account: String,
    amount: i64,
}

struct Payments {
    outbox: Outbox,
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
            SETTLED,
            &serde_json::json!({"account": req.account, "amount": req.amount, "balance": balance, "request": msg.event_id()}),
        )
        .map_err(HandlerError::permanent)?
        .key(req.account.clone())
        .event_type("PaymentSettled")
        .source("/payments");
        self.outbox
            .stage(tx, settled)
            .await
            .map_err(HandlerError::retryable)?;
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
    create_topics(&opt.brokers).await?;

    let schema = Schema::new(opt.schema.clone())?;
    let inbox = Inbox::builder(pool.clone())
        .schema(schema.clone())
        .brokers(&opt.brokers)
        .group_id("payments")
        .handler(
            REQUESTED,
            Payments {
                outbox: Outbox::new(schema.clone()).notify(txbox::outbox::DEFAULT_NOTIFY_CHANNEL),
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
            let before: i64 = consumed(&pool, &schema).await?;
            produce(&opt.brokers, n).await?;
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let run = tokio::spawn(inbox.run(async move {
                let _ = stop_rx.await;
            }));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            while consumed(&pool, &schema).await? < before + n as i64 {
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
            println!("{staged} PaymentSettled events are in the outbox for txbox-relay to publish to {SETTLED}");
        }
    }
    Ok(())
}

async fn consumed(pool: &sqlx::PgPool, schema: &Schema) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT COALESCE(sum(next_offset), 0)::bigint FROM {} WHERE consumer_group = 'payments' AND topic = $1",
        schema.table("inbox_offsets")
    ))
    .bind(REQUESTED)
    .fetch_one(pool)
    .await?)
}

async fn create_topics(brokers: &str) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let topics = [
        NewTopic::new(REQUESTED, 3, TopicReplication::Fixed(1)),
        NewTopic::new(SETTLED, 3, TopicReplication::Fixed(1)),
    ];
    for r in admin.create_topics(&topics, &AdminOptions::new()).await? {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => anyhow::bail!("cannot create topic {t}: {e}"),
        }
    }
    Ok(())
}

async fn produce(brokers: &str, n: usize) -> anyhow::Result<()> {
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
                FutureRecord::to(REQUESTED)
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
