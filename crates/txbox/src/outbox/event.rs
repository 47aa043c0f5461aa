//! One event to stage.

use serde::Serialize;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::headers::Headers;
use crate::trace::{TraceContext, TRACEPARENT, TRACESTATE};

/// An event to publish to Kafka once its transaction commits.
///
/// # Examples
///
/// ```
/// use txbox::OutboxEvent;
///
/// #[derive(serde::Serialize)]
/// struct PaymentSettled { account: String, amount: i64 }
///
/// let event = OutboxEvent::json("payments.settled", &PaymentSettled { account: "a-1".into(), amount: 100 })?
///     .key("a-1")
///     .event_type("PaymentSettled")
///     .source("/payments")
///     .header("trace-id", "abc");
/// assert_eq!(event.topic(), "payments.settled");
/// # Ok::<(), txbox::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    pub(crate) topic: String,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) payload: Option<Vec<u8>>,
    pub(crate) headers: Headers,
    pub(crate) event_id: Uuid,
    pub(crate) event_type: Option<String>,
    pub(crate) source: Option<String>,
    pub(crate) content_type: Option<&'static str>,
}

impl OutboxEvent {
    /// An event for `topic` with raw bytes as payload and a fresh id (UUIDv7).
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        OutboxEvent {
            topic: topic.into(),
            key: None,
            payload: Some(payload.into()),
            headers: Headers::new(),
            event_id: Uuid::now_v7(),
            event_type: None,
            source: None,
            content_type: None,
        }
    }

    /// An event whose payload is `value` as JSON.
    pub fn json<T: Serialize + ?Sized>(topic: impl Into<String>, value: &T) -> Result<Self> {
        let payload = serde_json::to_vec(value).map_err(|e| {
            Error::InvalidEvent(format!("payload does not serialize to JSON: {e}").into())
        })?;
        let mut event = Self::new(topic, payload);
        event.content_type = Some("application/json");
        Ok(event)
    }

    /// A tombstone (null payload), for compacted topics.
    pub fn tombstone(topic: impl Into<String>, key: impl Into<Vec<u8>>) -> Self {
        let mut event = Self::new(topic, Vec::new());
        event.payload = None;
        event.key(key)
    }

    /// The Kafka record key; events of one key keep their order.
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Sets the event id (default: a new UUIDv7). Use a deterministic id to
    /// make re-staging the same fact idempotent downstream.
    pub fn event_id(mut self, id: Uuid) -> Self {
        self.event_id = id;
        self
    }

    /// Gives the event an id derived from the event it was derived from:
    /// the same `source_event_id` and `discriminator` always give the same
    /// id ([`derived_event_id`](crate::outbox::derived_event_id)).
    ///
    /// Use it for events a handler stages from a consumed message. A
    /// handler can run again for the same message (its first transaction's
    /// commit was lost, a crash after commit before the offset mirror, a
    /// replay after a position reset): a fresh random id per run would make
    /// the second copy a new event to every consumer, while a derived id
    /// makes it the same event, which a txbox inbox downstream drops. The
    /// `discriminator` tells apart the several events one message may give
    /// rise to (`"settled"`, `"receipt"`, `"line-3"`); keep it stable
    /// across releases. Events not derived from one message (a user's
    /// request, a scheduled job) keep the default time-ordered id.
    ///
    /// # Examples
    ///
    /// ```
    /// use txbox::OutboxEvent;
    ///
    /// let first = OutboxEvent::new("payments.settled", "{}").derived_from("req-42", "settled");
    /// let again = OutboxEvent::new("payments.settled", "{}").derived_from("req-42", "settled");
    /// let other = OutboxEvent::new("payments.receipts", "{}").derived_from("req-42", "receipt");
    /// assert_eq!(first.id(), again.id());
    /// assert_ne!(first.id(), other.id());
    /// ```
    pub fn derived_from(self, source_event_id: &str, discriminator: &str) -> Self {
        self.event_id(crate::outbox::derived_event_id(
            source_event_id,
            discriminator,
        ))
    }

    /// CloudEvents `type` (sent as the `ce_type` header).
    pub fn event_type(mut self, ty: impl Into<String>) -> Self {
        self.event_type = Some(ty.into());
        self
    }

    /// CloudEvents `source` (sent as the `ce_source` header).
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The event id.
    pub fn id(&self) -> Uuid {
        self.event_id
    }

    /// The headers stored with the row: the caller's, plus CloudEvents
    /// `ce_type`, `ce_source` and `content-type` where known. The relay adds
    /// `ce_id` (the event id column) and `ce_specversion` when publishing.
    /// The headers as stored: the event's own, its CloudEvents
    /// attributes, and `trace` unless the event sets `traceparent` itself.
    pub(crate) fn stored_headers(&self, trace: Option<&TraceContext>) -> Headers {
        let mut h = self.headers.clone();
        if let Some(cx) = trace {
            // An event's own trace headers win, each on its own.
            if h.get(TRACEPARENT).is_none() {
                h.set(TRACEPARENT, cx.traceparent());
                if let (None, Some(state)) = (h.get(TRACESTATE), cx.state()) {
                    h.set(TRACESTATE, state.as_bytes());
                }
            }
        }
        if let Some(t) = &self.event_type {
            h.set("ce_type", t.as_bytes());
        }
        if let Some(s) = &self.source {
            h.set("ce_source", s.as_bytes());
        }
        if let Some(ct) = self.content_type {
            if h.get("content-type").is_none() {
                h.insert("content-type", ct);
            }
        }
        h
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.topic.is_empty() || self.topic.len() > 249 {
            return Err(Error::InvalidEvent(
                format!("topic {:?} must be 1 to 249 characters", self.topic).into(),
            ));
        }
        if !self
            .topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        {
            return Err(Error::InvalidEvent(
                format!("topic {:?} may only contain [a-zA-Z0-9._-]", self.topic).into(),
            ));
        }
        Ok(())
    }
}
