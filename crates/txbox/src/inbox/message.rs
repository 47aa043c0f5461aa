//! A consumed Kafka message as a handler sees it.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;

use crate::error::BoxError;
use crate::headers::Headers;

/// One Kafka message, owned, with the event id txbox resolved for it.
///
/// # Examples
///
/// Handlers decode payloads with [`InboxMessage::json`]; a payload that does
/// not decode is a [`DecodeError`], which a handler returns with `?` and the
/// inbox dead-letters (it is permanent: retrying cannot fix it).
///
/// ```
/// use txbox::inbox::InboxMessage;
///
/// #[derive(serde::Deserialize)]
/// struct Deposit { account: String, amount: i64 }
///
/// let msg = InboxMessage::new("deposits", 0, 42)
///     .with_payload(r#"{"account":"a-1","amount":5}"#)
///     .with_header("ce_id", "evt-1");
/// let d: Deposit = msg.json()?;
/// assert_eq!((d.account.as_str(), d.amount), ("a-1", 5));
/// assert_eq!(msg.event_id(), "deposits/0/42"); // resolved by the inbox, not by `with_header`
/// assert!(InboxMessage::new("deposits", 0, 43).with_payload("{oops").json::<Deposit>().is_err());
/// # Ok::<(), txbox::inbox::DecodeError>(())
/// ```
#[derive(Debug, Clone)]
pub struct InboxMessage {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) payload: Option<Vec<u8>>,
    pub(crate) headers: Headers,
    pub(crate) timestamp: Option<DateTime<Utc>>,
    pub(crate) event_id: String,
}

/// A payload that could not be decoded. Permanent: it is dead-lettered.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode {topic}/{partition}@{offset}: {reason}")]
pub struct DecodeError {
    topic: String,
    partition: i32,
    offset: i64,
    reason: String,
    #[source]
    source: Option<BoxError>,
}

impl InboxMessage {
    /// A message at a position, with no key, payload or headers; its event id
    /// is the position (`topic/partition/offset`). For tests of handlers.
    pub fn new(topic: &str, partition: i32, offset: i64) -> Self {
        InboxMessage {
            topic: Arc::from(topic),
            partition,
            offset,
            key: None,
            payload: None,
            headers: Headers::new(),
            timestamp: None,
            event_id: position_id(topic, partition, offset),
        }
    }

    /// With this payload.
    pub fn with_payload(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.payload = Some(payload.into());
        self
    }

    /// With this key.
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// With one more header.
    pub fn with_header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// With this event id.
    pub fn with_event_id(mut self, id: impl Into<String>) -> Self {
        self.event_id = id.into();
        self
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// The partition.
    pub fn partition(&self) -> i32 {
        self.partition
    }
    /// The offset.
    pub fn offset(&self) -> i64 {
        self.offset
    }
    /// The key, if any.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }
    /// The payload; `None` for a tombstone.
    pub fn payload(&self) -> Option<&[u8]> {
        self.payload.as_deref()
    }
    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }
    /// The record timestamp, when the broker gave one.
    pub fn timestamp(&self) -> Option<DateTime<Utc>> {
        self.timestamp
    }
    /// The id used for dedupe (see [`EventIdSource`](super::EventIdSource)).
    pub fn event_id(&self) -> &str {
        &self.event_id
    }

    /// Decodes the payload as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        let payload = self
            .payload
            .as_deref()
            .ok_or_else(|| self.decode_error("payload is null (tombstone)", None))?;
        serde_json::from_slice(payload)
            .map_err(|e| self.decode_error(&format!("invalid JSON: {e}"), Some(Box::new(e))))
    }

    /// The payload as UTF-8 text.
    pub fn text(&self) -> Result<&str, DecodeError> {
        let payload = self
            .payload
            .as_deref()
            .ok_or_else(|| self.decode_error("payload is null (tombstone)", None))?;
        std::str::from_utf8(payload)
            .map_err(|e| self.decode_error(&format!("not UTF-8: {e}"), Some(Box::new(e))))
    }

    /// A decode error about this message, for custom decoders.
    pub fn decode_error(&self, reason: &str, source: Option<BoxError>) -> DecodeError {
        DecodeError {
            topic: self.topic.to_string(),
            partition: self.partition,
            offset: self.offset,
            reason: reason.to_owned(),
            source,
        }
    }
}

pub(crate) fn position_id(topic: &str, partition: i32, offset: i64) -> String {
    format!("{topic}/{partition}/{offset}")
}
