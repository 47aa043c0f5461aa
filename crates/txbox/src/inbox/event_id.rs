//! Where a message's event id comes from.

use std::fmt;
use std::sync::Arc;

use crate::headers::Headers;

/// Longest event id accepted; longer ones are treated as absent.
const MAX_EVENT_ID_LEN: usize = 512;

type Extractor = dyn Fn(&Headers, Option<&[u8]>) -> Option<String> + Send + Sync;

/// How the inbox finds the id it deduplicates on.
///
/// The default reads the CloudEvents `ce_id` header, then `txbox-event-id`.
/// When no id is found (or it is empty, not UTF-8, or longer than 512 bytes),
/// the id falls back to the message's position, `topic/partition/offset`:
/// that still makes redeliveries of the same record idempotent, but a
/// republish of the same event under a new offset is then a new event.
///
/// # Examples
///
/// ```
/// use txbox::inbox::EventIdSource;
///
/// // A header of your own first, then CloudEvents.
/// let by_header = EventIdSource::headers(["x-request-id", "ce_id"]);
///
/// // Or a field of the JSON payload.
/// let by_payload = EventIdSource::extract(|_headers, payload| {
///     let v: serde_json::Value = serde_json::from_slice(payload?).ok()?;
///     v.get("id")?.as_str().map(str::to_owned)
/// });
/// # let _ = (by_header, by_payload);
/// ```
#[derive(Clone)]
pub enum EventIdSource {
    /// The first of these headers present with a usable value.
    Headers(Vec<String>),
    /// A function of the headers and payload.
    Extract(Arc<Extractor>),
}

impl EventIdSource {
    /// The first present header of `names`.
    pub fn headers<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        EventIdSource::Headers(names.into_iter().map(Into::into).collect())
    }

    /// A function of the headers and payload.
    pub fn extract<F>(f: F) -> Self
    where
        F: Fn(&Headers, Option<&[u8]>) -> Option<String> + Send + Sync + 'static,
    {
        EventIdSource::Extract(Arc::new(f))
    }

    /// The id for a message, or `None` to fall back to its position.
    pub(crate) fn resolve(&self, headers: &Headers, payload: Option<&[u8]>) -> Option<String> {
        let id = match self {
            EventIdSource::Headers(names) => names.iter().find_map(|n| {
                headers
                    .get(n)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .map(str::to_owned)
            }),
            EventIdSource::Extract(f) => f(headers, payload),
        }?;
        (!id.is_empty() && id.len() <= MAX_EVENT_ID_LEN).then_some(id)
    }
}

impl Default for EventIdSource {
    fn default() -> Self {
        EventIdSource::headers(["ce_id", "txbox-event-id"])
    }
}

impl fmt::Debug for EventIdSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventIdSource::Headers(h) => f.debug_tuple("Headers").field(h).finish(),
            EventIdSource::Extract(_) => f.write_str("Extract(..)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_in_order_and_bad_values_skipped() {
        let mut h = Headers::new();
        h.insert("txbox-event-id", "b");
        h.insert("ce_id", vec![0xff, 0xfe]);
        assert_eq!(
            EventIdSource::default().resolve(&h, None).as_deref(),
            Some("b")
        );
        h.insert("ce_id", "a");
        assert_eq!(
            EventIdSource::default().resolve(&h, None).as_deref(),
            Some("a")
        );
        let mut long = Headers::new();
        long.insert("ce_id", "x".repeat(600));
        assert_eq!(EventIdSource::default().resolve(&long, None), None);
        assert_eq!(
            EventIdSource::default().resolve(&Headers::new(), None),
            None
        );
    }
}
