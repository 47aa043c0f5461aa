//! Kafka record headers, and how txbox stores them in `jsonb`.
//!
//! A header is a name and an optional byte value; names may repeat and order
//! matters. Stored as a JSON array of objects: `{"key": k, "value": "text"}`
//! for UTF-8 values, `{"key": k, "value_base64": "..."}` for other bytes, and
//! `{"key": k}` for a null value. Nothing is lost either way.

use base64::Engine as _;
use rdkafka::message::{Header, OwnedHeaders};
use serde::{Deserialize, Serialize};

/// An ordered list of Kafka headers.
///
/// # Examples
///
/// ```
/// use txbox::Headers;
///
/// let mut h = Headers::new();
/// h.insert("ce_type", "PaymentSettled");
/// assert_eq!(h.get("ce_type"), Some(&b"PaymentSettled"[..]));
/// let json = h.to_json();
/// assert_eq!(Headers::from_json(&json).unwrap(), h);
/// assert_eq!(Headers::from_json_str(&json.to_string()).unwrap(), h);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, Option<Vec<u8>>)>);

#[derive(Serialize, Deserialize)]
struct StoredHeader {
    key: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    value_base64: Option<String>,
}

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Headers(Vec::new())
    }

    /// Appends a header.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) {
        self.0.push((key.into(), Some(value.into())));
    }

    /// Replaces every header named `key` with one of this value.
    pub fn set(&mut self, key: &str, value: impl Into<Vec<u8>>) {
        self.remove(key);
        self.insert(key, value);
    }

    /// Removes every header named `key`.
    pub fn remove(&mut self, key: &str) {
        self.0.retain(|(k, _)| k != key);
    }

    /// The last value of a header, if present and not null.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.as_deref())
    }

    /// Iterates over (name, value) in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_deref()))
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The stored `jsonb` form.
    pub fn to_json(&self) -> serde_json::Value {
        let stored: Vec<StoredHeader> = self
            .0
            .iter()
            .map(|(key, value)| match value {
                None => StoredHeader {
                    key: key.clone(),
                    value: None,
                    value_base64: None,
                },
                // jsonb cannot hold U+0000: a value with a NUL byte is
                // stored as base64 like any other non-text bytes.
                Some(bytes) => match std::str::from_utf8(bytes)
                    .ok()
                    .filter(|t| !t.contains('\0'))
                {
                    Some(text) => StoredHeader {
                        key: key.clone(),
                        value: Some(text.to_owned()),
                        value_base64: None,
                    },
                    None => StoredHeader {
                        key: key.clone(),
                        value: None,
                        value_base64: Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
                    },
                },
            })
            .collect();
        serde_json::to_value(stored).unwrap_or(serde_json::Value::Array(Vec::new()))
    }

    /// Parses the stored `jsonb` form.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, serde_json::Error> {
        Self::from_stored(Vec::<StoredHeader>::deserialize(value)?)
    }

    /// Parses the stored form from its JSON text (`headers::text`), without
    /// building an intermediate JSON value: the relay's per-row path.
    pub fn from_json_str(text: &str) -> Result<Self, serde_json::Error> {
        if text == "[]" {
            return Ok(Headers::new());
        }
        Self::from_stored(serde_json::from_str(text)?)
    }

    fn from_stored(stored: Vec<StoredHeader>) -> Result<Self, serde_json::Error> {
        let mut out = Vec::with_capacity(stored.len());
        for h in stored {
            let value = match (h.value, h.value_base64) {
                (Some(text), _) => Some(text.into_bytes()),
                (None, Some(b64)) => Some(
                    base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map_err(serde::de::Error::custom)?,
                ),
                (None, None) => None,
            };
            out.push((h.key, value));
        }
        Ok(Headers(out))
    }

    /// Copies headers from a Kafka message.
    pub fn from_kafka<H: rdkafka::message::Headers>(headers: Option<&H>) -> Self {
        let mut out = Vec::new();
        if let Some(h) = headers {
            for header in h.iter() {
                out.push((header.key.to_owned(), header.value.map(<[u8]>::to_vec)));
            }
        }
        Headers(out)
    }

    /// Converts into headers for a Kafka record.
    pub fn to_kafka(&self) -> OwnedHeaders {
        let mut out = OwnedHeaders::new_with_capacity(self.0.len());
        for (key, value) in &self.0 {
            out = out.insert(Header {
                key,
                value: value.as_deref(),
            });
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_value_with_a_nul_byte_is_stored_as_base64_and_read_back() {
        let mut h = Headers::new();
        h.insert("tracestate", "a=b\0c");
        let json = h.to_json();
        assert!(!json.to_string().contains("\\u0000"), "{json}");
        assert_eq!(Headers::from_json(&json).unwrap(), h);
    }
}
