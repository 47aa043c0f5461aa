//! The payments service, upstream in the example's chain.
//!
//! Consumes `payments.requested` (`{"account": "...", "amount": n}`, keyed
//! by the account; the `ce_id` header is the payment id), debits the
//! account, records the settlement in `payments_settlements` and stages a
//! `PaymentSettled` event for `payments.settled`, all in the inbox's
//! transaction; `txbox-relay` publishes the event and `ledger-example`
//! consumes it. Requests for more than the balance are rejected as
//! permanent errors and dead-lettered.
//!
//! Modes (see `examples/payments/README.md`):
//!
//! ```text
//! payments-example                   # the service, until SIGTERM / Ctrl-C
//! payments-example --produce N       # send N payment requests, then exit
//! payments-example --demo N          # send N, apply them here, print balances, exit
//! payments-example --read-settled N  # what a read_committed consumer sees of payments.settled
//! ```
//!
//! Reads TXBOX_DATABASE_URL, TXBOX_KAFKA_BOOTSTRAP, TXBOX_SCHEMA (default
//! `txbox`, migrated first with `txbox migrate`), TXBOX_DEMO_TOPIC_PREFIX
//! (prepended to both topic names, so that runs do not share topics),
//! PAYMENTS_METRICS_LISTEN and TXBOX_LOG_FORMAT.

mod settled;

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use payments_example::events::{PaymentRequested, PaymentSettled, REQUESTED, SETTLED};
use payments_example::{cli, service, tables, PAYMENTS_GROUP};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use txbox::inbox::{Handler, HandlerError, Inbox, InboxMessage, Tx};
use txbox::{Outbox, OutboxEvent, Schema};

#[derive(Debug, Parser)]
#[command(
    name = "payments-example",
    about = "The payments service of the txbox example chain"
)]
struct Opt {
    #[command(flatten)]
    common: cli::Common,
    /// Schema of the service's txbox tables (inbox and outbox).
    #[arg(long, env = "TXBOX_SCHEMA", default_value = "txbox")]
    schema: String,
    /// Send this many payment requests to payments.requested, then exit.
    #[arg(long, value_name = "N", conflicts_with_all = ["demo", "read_settled"])]
    produce: Option<usize>,
    /// Produce this many requests, process them, print balances, exit.
    #[arg(long, value_name = "N", conflicts_with = "read_settled")]
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
        sqlx::query(
            "INSERT INTO payments_settlements (payment_id, account, amount, balance) VALUES ($1, $2, $3, $4)",
        )
        .bind(msg.event_id())
        .bind(&req.account)
        .bind(req.amount)
        .bind(balance)
        .execute(&mut **tx)
        .await?;
        let settled = PaymentSettled {
            account: req.account,
            amount: req.amount,
            balance,
            request: msg.event_id().to_owned(),
        };
        let event = OutboxEvent::json(&self.settled, &settled)
            .map_err(HandlerError::permanent)?
            // The same id however often this request is applied: a handler
            // can run again for it (a commit whose acknowledgement was lost, a
            // replay), and downstream the copies must be one event.
            .derived_from(msg.event_id(), "settled")
            .key(settled.account.clone())
            .event_type("PaymentSettled")
            .source("/payments");
        self.outbox.stage(tx, event).await?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opt = Opt::parse();
    let _telemetry = opt.common.init_logging("payments")?;
    let brokers = opt.common.brokers()?;
    let requested = opt.common.topic(REQUESTED);
    let settled = opt.common.topic(SETTLED);
    if let Some(want) = opt.read_settled {
        println!("a read_committed consumer of {settled}:");
        let seen = settled::read(brokers, &settled, want, Duration::from_secs(30))?;
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
    service::create_topics(brokers, &[requested.clone(), settled.clone()]).await?;
    if let Some(n) = opt.produce {
        produce(brokers, &requested, n).await?;
        println!("produced {n} payment requests to {requested}");
        return Ok(());
    }
    let pool = service::connect(&opt.common.database_url)
        .await
        .context("connecting to the database")?;
    service::create_tables(&pool, tables::PAYMENTS).await?;
    let served = tokio_util::sync::CancellationToken::new();
    let _stop_serving = served.clone().drop_guard();
    if let Some(addr) = opt.metrics_listen {
        service::serve_endpoint(addr, &pool, served.clone()).await?;
    }

    let schema = Schema::new(opt.schema.clone())?;
    let inbox = opt
        .common
        .with_kafka_options(Inbox::builder(pool.clone()))
        .schema(schema.clone())
        .brokers(brokers)
        .group_id(PAYMENTS_GROUP)
        .handler(
            &requested,
            Payments {
                outbox: Outbox::new(schema.clone()).notify(txbox::outbox::DEFAULT_NOTIFY_CHANNEL),
                settled: settled.clone(),
            },
        )
        .build()?;

    let Some(n) = opt.demo else {
        inbox.run(service::shutdown_signal()).await?;
        return Ok(());
    };
    let before: i64 = consumed(&pool, &schema, &requested).await?;
    produce(brokers, &requested, n).await?;
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
        "{staged} PaymentSettled events are in the outbox for txbox-relay to publish to {settled}"
    );
    Ok(())
}

async fn consumed(pool: &sqlx::PgPool, schema: &Schema, topic: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT COALESCE(sum(next_offset), 0)::bigint FROM {} WHERE consumer_group = $1 AND topic = $2",
        schema.table("inbox_offsets")
    ))
    .bind(PAYMENTS_GROUP)
    .bind(topic)
    .fetch_one(pool)
    .await?)
}

/// Sends `n` requests, keyed by account, each with a new `ce_id` (the
/// payment id), up to 1,000 awaiting their acknowledgement at a time.
async fn produce(brokers: &str, topic: &str, n: usize) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .create()?;
    let mut in_flight = VecDeque::new();
    for i in 0..n {
        let req = PaymentRequested {
            account: format!("acct-{}", i % 10),
            amount: (i % 5 + 1) as i64,
        };
        let payload = serde_json::to_vec(&req)?;
        let id = uuid::Uuid::new_v4().to_string();
        let headers = OwnedHeaders::new().insert(Header {
            key: "ce_id",
            value: Some(&id),
        });
        let record = FutureRecord::to(topic)
            .key(&req.account)
            .payload(&payload)
            .headers(headers);
        let delivery = producer
            .send_result(record)
            .map_err(|(e, _)| anyhow::Error::new(e).context("queueing a payment request"))?;
        in_flight.push_back(delivery);
        while in_flight.len() >= 1000 {
            if let Some(oldest) = in_flight.pop_front() {
                acknowledged(oldest).await?;
            }
        }
    }
    for delivery in in_flight {
        acknowledged(delivery).await?;
    }
    Ok(())
}

async fn acknowledged(delivery: rdkafka::producer::DeliveryFuture) -> anyhow::Result<()> {
    delivery
        .await
        .context("the producer went away")?
        .map_err(|(e, _)| e)
        .context("sending a payment request")?;
    Ok(())
}
