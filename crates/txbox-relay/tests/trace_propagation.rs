//! One trace follows an event across services: the W3C `traceparent` of a
//! message an inbox consumes reaches the headers of the events its handler
//! stages, as a `read_committed` consumer downstream of the relay receives
//! them; and the inbox's spans carry the message's identity and trace id.
//!
//! Without an OpenTelemetry layer the inbox is transparent: the staged
//! events carry the consumed `traceparent` unchanged. (With one, see
//! `crates/txbox/tests/opentelemetry.rs`.) Real PostgreSQL and Apache Kafka.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use txbox::inbox::{Handler, HandlerError, Inbox, InboxMessage, Tx};
use txbox::{Outbox, OutboxEvent, Schema};
use txbox_relay::{CancellationToken, Mode};
use txbox_testkit::kafka::{produce, Record};
use txbox_testkit::{kafka, unique_name, CapturedSpans, TestDb};

const TRACE_A: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const TRACE_B: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
const OWN: &str = "00-11111111111111111111111111111111-2222222222222222-01";

/// Stages one event per message to `out`, keyed by the message's offset;
/// the message at offset 1 sets its own `traceparent`.
struct Forward {
    outbox: Outbox,
    out: String,
}

#[async_trait::async_trait]
impl Handler for Forward {
    async fn handle(&self, tx: &mut Tx, msg: &InboxMessage) -> Result<(), HandlerError> {
        let mut event = OutboxEvent::new(&self.out, msg.offset().to_string().into_bytes())
            .key(msg.offset().to_string());
        if msg.offset() == 1 {
            event = event.header("traceparent", OWN);
        }
        self.outbox.stage(tx, event).await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_consumed_trace_reaches_the_events_downstream_receive() {
    let spans = CapturedSpans::install();
    let broker = kafka().await;
    let db = TestDb::new().await;
    let input = broker.topic("traced-in", 1).await;
    let out = broker.topic("traced-out", 1).await;
    let group = unique_name("traced");
    produce(
        broker.bootstrap(),
        &input,
        vec![
            Record::new("0")
                .header("traceparent", TRACE_A)
                .header("tracestate", "vendor=opaque"),
            Record::new("1").header("traceparent", TRACE_B),
            Record::new("2"),
            Record::new("3").header("traceparent", "not-a-traceparent"),
            Record::new("4").header("traceparent", &b"\xff\xfe"[..]),
            // A later version: its first four fields are read.
            Record::new("5").header(
                "traceparent",
                format!("{}-more", TRACE_B.replacen("00", "cc", 1)),
            ),
            // A tracestate no event could store (jsonb refuses NUL): dropped.
            Record::new("6")
                .header("traceparent", TRACE_A)
                .header("tracestate", &b"a=b\0"[..]),
        ],
    )
    .await;

    let stop = CancellationToken::new();
    let inbox = Inbox::builder(db.pool().clone())
        .brokers(broker.bootstrap())
        .group_id(&group)
        .handler(
            &input,
            Forward {
                outbox: Outbox::new(Schema::default()),
                out: out.clone(),
            },
        )
        .build()
        .unwrap();
    let s = stop.clone();
    let running = tokio::spawn(async move { inbox.run(async move { s.cancelled().await }).await });
    let relay = Relay::start(config(&db, broker.bootstrap(), Mode::ExactlyOnce));

    let seen = consume(broker.bootstrap(), &out, 7, true).await;
    stop.cancel();
    running.await.unwrap().unwrap();
    relay.stop().await;

    let header = |offset: i64, name: &str| {
        let c = seen
            .iter()
            .find(|c| c.key.as_deref() == Some(offset.to_string().as_bytes()))
            .unwrap_or_else(|| panic!("no event for offset {offset} in {seen:?}"));
        c.header(name)
            .map(|v| String::from_utf8(v.to_vec()).unwrap())
    };
    assert_eq!(seen.len(), 7, "one event per consumed message");
    assert_eq!(header(0, "traceparent").as_deref(), Some(TRACE_A));
    assert_eq!(header(0, "tracestate").as_deref(), Some("vendor=opaque"));
    assert_eq!(
        header(1, "traceparent").as_deref(),
        Some(OWN),
        "an event's own traceparent wins"
    );
    assert_eq!(
        header(2, "traceparent"),
        None,
        "no trace consumed, none invented"
    );
    assert_eq!(
        header(3, "traceparent"),
        None,
        "an invalid traceparent is not passed on"
    );
    assert_eq!(
        header(4, "traceparent"),
        None,
        "a non-UTF-8 traceparent is not passed on"
    );
    assert_eq!(header(5, "traceparent").as_deref(), Some(TRACE_B));
    assert_eq!(header(5, "tracestate"), None);
    assert_eq!(header(6, "traceparent").as_deref(), Some(TRACE_A));
    assert_eq!(
        header(6, "tracestate"),
        None,
        "an unstorable tracestate is dropped"
    );

    // One message span per message, with its identity and trace id.
    let messages = spans.named_with("txbox.inbox.message", "group", &group);
    let offsets: Vec<&str> = messages.iter().filter_map(|s| s.field("offset")).collect();
    assert_eq!(offsets, ["0", "1", "2", "3", "4", "5", "6"], "{messages:?}");
    for span in &messages {
        assert_eq!(span.field("topic"), Some(input.as_str()));
        assert_eq!(span.field("partition"), Some("0"));
        let offset = span.field("offset").unwrap();
        assert_eq!(
            span.field("event_id"),
            Some(format!("{input}/0/{offset}").as_str())
        );
    }
    let trace_ids: Vec<Option<&str>> = messages.iter().map(|s| s.field("trace_id")).collect();
    assert_eq!(
        trace_ids,
        [
            Some("0af7651916cd43dd8448eb211c80319c"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            None,
            None,
            None,
            Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            Some("0af7651916cd43dd8448eb211c80319c"),
        ]
    );
    // Batch spans cover the six messages and say how each ended.
    let batches = spans.named_with("txbox.inbox.batch", "group", &group);
    let committed: usize = batches
        .iter()
        .filter(|b| b.field("outcome") == Some("committed"))
        .map(|b| b.field("messages").unwrap().parse::<usize>().unwrap())
        .sum();
    assert_eq!(committed, 7, "{batches:?}");
    assert!(batches
        .iter()
        .all(|b| b.field("topic") == Some(input.as_str())));

    // Nothing waits to be retried or was lost on the way.
    assert_eq!(unpublished(db.pool()).await, 0);
}
