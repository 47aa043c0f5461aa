//! The steady load: payment requests produced at a fixed rate by an
//! idempotent producer that rides out the broker's restart.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use payments_example::events::PaymentRequested;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio::task::JoinHandle;

/// Accounts of the demo tables (`acct-0` .. `acct-9`).
const ACCOUNTS: u64 = 10;
/// Sends per pacing tick.
const TICK: Duration = Duration::from_millis(10);

/// What the load did.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Requests the broker acknowledged.
    pub(crate) produced: u64,
    /// Requests that failed to be produced (each one a loss of input).
    pub(crate) failed: u64,
}

/// The producing task.
#[derive(Debug)]
pub(crate) struct Load {
    acknowledged: Arc<AtomicU64>,
    task: JoinHandle<anyhow::Result<Outcome>>,
}

impl Load {
    /// Starts producing `events` requests to `topic` at `rate` per second.
    pub(crate) fn start(
        brokers: &str,
        topic: &str,
        events: u64,
        rate: u64,
    ) -> anyhow::Result<Self> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            // Long enough to wait out the broker's restart.
            .set("message.timeout.ms", "180000")
            .create()?;
        let acknowledged = Arc::new(AtomicU64::new(0));
        let counter = acknowledged.clone();
        let topic = topic.to_owned();
        let task = tokio::spawn(async move {
            let per_tick = (rate as f64 * TICK.as_secs_f64()).max(1.0);
            let mut owed = 0.0;
            let mut ticks = tokio::time::interval(TICK);
            let mut in_flight: VecDeque<DeliveryFuture> = VecDeque::new();
            let mut failed = 0u64;
            let mut sent = 0u64;
            while sent < events {
                ticks.tick().await;
                owed += per_tick;
                while owed >= 1.0 && sent < events {
                    owed -= 1.0;
                    in_flight.push_back(send(&producer, &topic, sent).await?);
                    sent += 1;
                }
                // Count what the broker acknowledged since the last tick.
                while let Some(front) = in_flight.front_mut() {
                    let Some(result) = front.now_or_never() else {
                        break;
                    };
                    in_flight.pop_front();
                    count(result, &counter, &mut failed);
                }
            }
            while let Some(d) = in_flight.pop_front() {
                count(d.await, &counter, &mut failed);
            }
            Ok(Outcome {
                produced: counter.load(Ordering::Relaxed),
                failed,
            })
        });
        Ok(Load { acknowledged, task })
    }

    /// Requests acknowledged so far.
    pub(crate) fn produced(&self) -> u64 {
        self.acknowledged.load(Ordering::Relaxed)
    }

    /// True once every request was sent and settled.
    pub(crate) fn done(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits for the load to end.
    pub(crate) async fn finish(self) -> anyhow::Result<Outcome> {
        self.task.await?
    }
}

async fn send(producer: &FutureProducer, topic: &str, i: u64) -> anyhow::Result<DeliveryFuture> {
    let request = PaymentRequested {
        account: format!("acct-{}", i % ACCOUNTS),
        amount: (i % 5 + 1) as i64,
    };
    let payload = serde_json::to_vec(&request)?;
    let id = uuid::Uuid::new_v4().to_string();
    let headers = OwnedHeaders::new().insert(Header {
        key: "ce_id",
        value: Some(&id),
    });
    let mut record = FutureRecord::to(topic)
        .key(&request.account)
        .payload(&payload)
        .headers(headers);
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            // The local queue is full (the broker is away): wait, retry.
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                back,
            )) => {
                record = back;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => return Err(anyhow::Error::new(e).context("queueing a payment request")),
        }
    }
}

fn count(
    delivery: <DeliveryFuture as std::future::Future>::Output,
    acknowledged: &AtomicU64,
    failed: &mut u64,
) {
    match delivery {
        Ok(Ok(_)) => {
            acknowledged.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Err((e, _))) => {
            *failed += 1;
            eprintln!("txbox-chaos: a payment request was not produced: {e}");
        }
        Err(_) => *failed += 1,
    }
}
