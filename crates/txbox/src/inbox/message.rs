//! A consumed Kafka message as a handler sees it.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;

use super::EventIdSource;
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
    /// The event id is the position (no id was found): the offset watermark
    /// dedupes it, it needs no `inbox_processed` row.
    pub(crate) id_is_position: bool,
    /// Why the inbox refuses the message before any handler runs (see
    /// [`identify`]): it is dead-lettered at once, or stops the partition.
    pub(crate) rejected: Option<String>,
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
    /// The memory this message holds while it waits for its worker, counted
    /// against `InboxBuilder::max_buffered_bytes`: its own size and what its
    /// key, payload, headers and event id own (the topic name is shared).
    pub(crate) fn buffered_size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.map_or(0, <[u8]>::len))
            .sum();
        std::mem::size_of::<Self>()
            + self.key.as_ref().map_or(0, Vec::len)
            + self.payload.as_ref().map_or(0, Vec::len)
            + headers
            + self.event_id.len()
            + self.rejected.as_ref().map_or(0, String::len)
    }

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
            id_is_position: true,
            rejected: None,
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
        self.id_is_position = false;
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
    /// The W3C trace context of the message's `traceparent` and
    /// `tracestate` headers, if it has a valid one (see [`crate::trace`]).
    pub fn trace_context(&self) -> Option<crate::trace::TraceContext> {
        crate::trace::TraceContext::from_headers(&self.headers)
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

/// A consumed message's headers and event id, and why it must be refused
/// before any handler runs, if it must.
#[derive(Debug)]
pub(crate) struct Identity {
    pub headers: Headers,
    pub event_id: String,
    /// No id was found: `event_id` is the position.
    pub id_is_position: bool,
    pub rejected: Option<String>,
}

/// Reads the headers (`read_headers`) and resolves the event id (`source`,
/// else `position`), without letting a panic escape into the consume loop:
///
/// - rdkafka's header iterator panics on a header name that is not UTF-8
///   (it unwraps `CStr::to_str`); the message then has no headers, its id is
///   its position, and it is refused;
/// - an extractor that panics: the id is the position, and it is refused;
/// - an id with a NUL byte (valid UTF-8, but PostgreSQL `text` cannot hold
///   it, so it cannot be deduplicated): refused.
///
/// A refused message is dead-lettered at once (or stops the partition).
/// Without unwinding (`panic = "abort"`) a panic still aborts the process.
pub(crate) fn identify(
    source: &EventIdSource,
    read_headers: impl FnOnce() -> Headers,
    payload: Option<&[u8]>,
    position: impl FnOnce() -> String,
) -> Identity {
    let (headers, mut rejected) = match catch_unwind(AssertUnwindSafe(read_headers)) {
        Ok(h) => (h, None),
        Err(_) => (
            Headers::new(),
            Some(
                "its headers cannot be read (a header name is not UTF-8); none are kept".to_owned(),
            ),
        ),
    };
    let resolved = if rejected.is_some() {
        None
    } else {
        match catch_unwind(AssertUnwindSafe(|| source.resolve(&headers, payload))) {
            Ok(id) => id,
            Err(panic) => {
                rejected = Some(format!(
                    "the event id extractor panicked: {}",
                    panic_message(panic.as_ref())
                ));
                None
            }
        }
    };
    let id_is_position = resolved.is_none();
    let event_id = resolved.unwrap_or_else(position);
    if rejected.is_none() && event_id.contains('\0') {
        rejected = Some(
            "its event id contains a NUL byte, which PostgreSQL text cannot store, so it \
             cannot be deduplicated"
                .to_owned(),
        );
    }
    Identity {
        headers,
        event_id,
        id_is_position,
        rejected,
    }
}

/// The text of a panic's payload (`panic!` with a message gives a `&str`
/// or a `String`).
pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffered_message_counts_what_it_owns() {
        let bare = InboxMessage::new("t", 0, 7);
        let own = bare.buffered_size() - bare.event_id.len();
        assert!(
            (100..=300).contains(&own),
            "about 200 bytes of its own: {own}"
        );
        let mut headers = Headers::new();
        headers.insert("ce_id", "abc");
        let full = InboxMessage {
            key: Some(vec![0; 10]),
            payload: Some(vec![0; 1000]),
            headers,
            ..bare.clone()
        };
        assert_eq!(
            full.buffered_size(),
            bare.buffered_size() + 10 + 1000 + 5 + 3
        );
    }

    #[test]
    fn panics_and_nul_ids_are_refused_with_the_position_as_id() {
        let pos = || "t/0/7".to_owned();
        let mut h = Headers::new();
        h.insert("ce_id", "a\0b");
        let nul = identify(&EventIdSource::default(), || h.clone(), None, pos);
        assert_eq!(nul.event_id, "a\0b");
        assert!(nul.rejected.is_some_and(|r| r.contains("NUL")));

        let unreadable = identify(&EventIdSource::default(), || panic!("bad name"), None, pos);
        assert_eq!(
            (unreadable.event_id.as_str(), unreadable.headers.len()),
            ("t/0/7", 0)
        );
        assert!(unreadable.rejected.is_some_and(|r| r.contains("headers")));

        let extractor = EventIdSource::extract(|_, _| panic!("no id here"));
        let panicked = identify(&extractor, Headers::new, None, pos);
        assert_eq!(panicked.event_id, "t/0/7");
        assert!(panicked.rejected.is_some_and(|r| r.contains("no id here")));

        let fine = identify(&EventIdSource::default(), Headers::new, None, pos);
        assert_eq!((fine.event_id.as_str(), fine.rejected), ("t/0/7", None));
    }
}
