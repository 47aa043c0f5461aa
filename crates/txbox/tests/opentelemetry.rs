//! With the `opentelemetry` feature and a `tracing-opentelemetry` layer, the
//! inbox's message span is a child of the consumed message's trace, and the
//! events the handler stages name that span as their parent: the exported
//! trace shows this service between the two hops. Real PostgreSQL and
//! Apache Kafka; spans exported in memory.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use txbox::inbox::{Handler, HandlerError, Inbox, InboxMessage, Tx};
use txbox::{Headers, Outbox, OutboxEvent, Schema};
use txbox_testkit::kafka::{produce, Record};
use txbox_testkit::{kafka, unique_name, TestDb};

const UPSTREAM: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

struct Forward(Outbox);

#[async_trait::async_trait]
impl Handler for Forward {
    async fn handle(&self, tx: &mut Tx, msg: &InboxMessage) -> Result<(), HandlerError> {
        let event = OutboxEvent::new("forwarded", msg.offset().to_string().into_bytes())
            .key(msg.offset().to_string());
        self.0.stage(tx, event).await?;
        Ok(())
    }
}

fn offset_of(span: &SpanData) -> Option<i64> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == "offset")
        .and_then(|kv| match kv.value {
            Value::I64(v) => Some(v),
            _ => None,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn staged_events_name_the_inbox_span_as_their_parent() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
        .with(tracing_subscriber::EnvFilter::new("info"))
        .init();

    let broker = kafka().await;
    let db = TestDb::new().await;
    let input = broker.topic("otel-in", 1).await;
    let group = unique_name("otel");
    produce(
        broker.bootstrap(),
        &input,
        vec![
            Record::new("0").header("traceparent", UPSTREAM),
            Record::new("1"),
        ],
    )
    .await;
    let stop = CancellationToken::new();
    let inbox = Inbox::builder(db.pool().clone())
        .brokers(broker.bootstrap())
        .group_id(&group)
        .handler(&input, Forward(Outbox::new(Schema::default())))
        .build()
        .unwrap();
    let s = stop.clone();
    let running = tokio::spawn(async move { inbox.run(async move { s.cancelled().await }).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let staged: i64 = sqlx::query_scalar("SELECT count(*) FROM txbox.outbox")
            .fetch_one(db.pool())
            .await
            .unwrap();
        if staged == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "both messages handled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    running.await.unwrap().unwrap();
    provider.force_flush().unwrap();

    let rows: Vec<(Vec<u8>, serde_json::Value)> =
        sqlx::query_as("SELECT key, headers FROM txbox.outbox ORDER BY id")
            .fetch_all(db.pool())
            .await
            .unwrap();
    let staged_parent = |offset: i64| {
        let (_, headers) = rows
            .iter()
            .find(|(k, _)| k == offset.to_string().as_bytes())
            .unwrap();
        let headers = Headers::from_json(headers).unwrap();
        String::from_utf8(headers.get("traceparent").unwrap().to_vec()).unwrap()
    };
    let spans = exporter.get_finished_spans().unwrap();
    let message = |offset: i64| {
        spans
            .iter()
            .find(|s| s.name == "txbox.inbox.message" && offset_of(s) == Some(offset))
            .unwrap_or_else(|| panic!("no message span for offset {offset} in {spans:#?}"))
    };

    // Continued from upstream: same trace, upstream span as remote parent.
    let continued = message(0);
    assert_eq!(
        continued.span_context.trace_id(),
        TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap()
    );
    assert_eq!(
        continued.parent_span_id,
        SpanId::from_hex("b7ad6b7169203331").unwrap()
    );
    assert!(continued.parent_span_is_remote);
    assert_eq!(
        staged_parent(0),
        format!(
            "00-0af7651916cd43dd8448eb211c80319c-{}-01",
            continued.span_context.span_id()
        ),
        "the staged event's parent is the inbox's span, not upstream's"
    );

    // No trace consumed: the inbox's span starts one, and the event joins it.
    let started = message(1);
    assert_ne!(
        started.span_context.trace_id(),
        continued.span_context.trace_id()
    );
    assert_eq!(
        staged_parent(1),
        format!(
            "00-{}-{}-01",
            started.span_context.trace_id(),
            started.span_context.span_id()
        )
    );
}
