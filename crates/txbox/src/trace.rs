//! W3C Trace Context: one trace follows an event from the message an inbox
//! consumes to the events its handler stages.
//!
//! The inbox reads the [`traceparent`](TRACEPARENT) (and
//! [`tracestate`](TRACESTATE)) header of every message it consumes and, while
//! the handler runs, makes it the [current](TraceContext::current) context.
//! [`Outbox::stage`](crate::Outbox::stage) writes the current context into
//! the headers of every event it stages (unless the event sets `traceparent`
//! itself), and the relay publishes the headers as stored, so the consumer
//! downstream receives the same trace.
//!
//! Which span the staged events name as their parent depends on whether the
//! service exports traces:
//!
//! - By default txbox is transparent: the staged events carry the consumed
//!   message's `traceparent` unchanged, so the next service's spans hang off
//!   the same upstream span and no span that nobody exports is referred to.
//! - With the `opentelemetry` feature, and a
//!   [`tracing-opentelemetry`](https://docs.rs/tracing-opentelemetry) layer
//!   installed, the inbox's `txbox.inbox.message` span becomes a child of the
//!   consumed context, and the staged events name that span as their parent:
//!   the trace shows this service's handling between the two hops.
//!
//! A handler's spans carry `trace_id`, so log lines can be joined to traces
//! either way. The context is task-local: events staged from a task the
//! handler spawns see none, unless the task runs inside
//! [`TraceContext::scope`].
//!
//! # Examples
//!
//! ```
//! use txbox::trace::TraceContext;
//! use txbox::Headers;
//!
//! let cx: TraceContext = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?;
//! assert_eq!(cx.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
//! assert!(cx.sampled());
//!
//! let mut headers = Headers::new();
//! cx.write_to(&mut headers);
//! assert_eq!(TraceContext::from_headers(&headers), Some(cx));
//! # Ok::<(), txbox::trace::InvalidTraceparent>(())
//! ```

use std::fmt;
use std::future::Future;
use std::str::FromStr;

use crate::headers::Headers;

/// The header that carries the trace and parent span ids.
pub const TRACEPARENT: &str = "traceparent";
/// The header that carries vendor-specific trace state; passed on as is.
pub const TRACESTATE: &str = "tracestate";

/// The longest `tracestate` passed on (the W3C recommendation). A longer one
/// is dropped rather than cut, since cutting may split an entry.
const MAX_TRACESTATE: usize = 512;

tokio::task_local! {
    static CURRENT: Option<TraceContext>;
}

/// A position in a distributed trace: a trace id, the span that is the
/// parent of whatever comes next, and the sampling flag.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
    state: Option<String>,
}

/// A `traceparent` value that does not follow W3C Trace Context level 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid traceparent {value:?}: {reason}")]
pub struct InvalidTraceparent {
    value: String,
    reason: &'static str,
}

impl TraceContext {
    /// A context from its parts; `None` when an id is all zeros (invalid in
    /// W3C Trace Context).
    pub fn new(trace_id: [u8; 16], parent_id: [u8; 8], sampled: bool) -> Option<Self> {
        (trace_id != [0; 16] && parent_id != [0; 8]).then_some(TraceContext {
            trace_id,
            parent_id,
            flags: u8::from(sampled),
            state: None,
        })
    }

    /// With this `tracestate`: dropped when longer than 512 characters or
    /// not printable ASCII (the W3C grammar allows nothing else), so no
    /// upstream header can make an event unstorable.
    pub fn with_state(mut self, state: impl Into<String>) -> Self {
        let state = state.into();
        let valid = !state.is_empty()
            && state.len() <= MAX_TRACESTATE
            && state.bytes().all(|b| (0x20..=0x7e).contains(&b));
        self.state = valid.then_some(state);
        self
    }

    /// Parses a `traceparent` value and an optional `tracestate`.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Result<Self, InvalidTraceparent> {
        let cx: TraceContext = traceparent.parse()?;
        Ok(match tracestate {
            Some(state) => cx.with_state(state.trim()),
            None => cx,
        })
    }

    /// The context a message's headers carry: `None` without a
    /// `traceparent` header, or with one that is not valid UTF-8 or W3C
    /// Trace Context (a bad header is never an error: the message is
    /// handled without a trace).
    /// Several `traceparent` headers make the trace ambiguous: none is
    /// taken. Several `tracestate` headers are joined, in order, as W3C
    /// joins repeated HTTP headers.
    pub fn from_headers(headers: &Headers) -> Option<Self> {
        let mut parents = headers.iter().filter(|(k, _)| *k == TRACEPARENT);
        let parent = std::str::from_utf8(parents.next()?.1?).ok()?;
        if parents.next().is_some() {
            return None;
        }
        let states: Option<Vec<&str>> = headers
            .iter()
            .filter(|(k, _)| *k == TRACESTATE)
            .map(|(_, v)| v.and_then(|v| std::str::from_utf8(v).ok()))
            .collect();
        let state = states.filter(|s| !s.is_empty()).map(|s| s.join(","));
        Self::parse(parent, state.as_deref()).ok()
    }

    /// Writes `traceparent` (and `tracestate`, if any) into `headers`,
    /// replacing what was there.
    pub fn write_to(&self, headers: &mut Headers) {
        headers.set(TRACEPARENT, self.traceparent());
        match &self.state {
            Some(state) => headers.set(TRACESTATE, state.as_bytes()),
            None => headers.remove(TRACESTATE),
        }
    }

    /// The `traceparent` value (version `00`).
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.parent_id),
            self.flags
        )
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// The parent span id, 16 lowercase hex digits.
    pub fn parent_id(&self) -> String {
        hex::encode(self.parent_id)
    }

    /// The trace id's bytes.
    pub fn trace_id_bytes(&self) -> [u8; 16] {
        self.trace_id
    }

    /// The parent span id's bytes.
    pub fn parent_id_bytes(&self) -> [u8; 8] {
        self.parent_id
    }

    /// The `sampled` flag.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The `tracestate`, if any.
    pub fn state(&self) -> Option<&str> {
        self.state.as_deref()
    }

    /// The context events staged now would carry: inside an inbox handler
    /// (or [`TraceContext::scope`]), the handled message's; with the
    /// `opentelemetry` feature, the current `tracing` span's when it has a
    /// valid OpenTelemetry context. `None` otherwise.
    pub fn current() -> Option<Self> {
        let scoped = CURRENT.try_with(Clone::clone).ok().flatten();
        // The current span wins only when it belongs to the scoped trace
        // (the message span, or one a handler opened inside it), or when
        // no trace is scoped: a span of another trace (a batch span, a
        // handler's root span with the message span filtered out) must
        // not replace the message's context.
        #[cfg(feature = "opentelemetry")]
        if let Some(span) = otel::current_span() {
            if scoped
                .as_ref()
                .is_none_or(|cx| cx.trace_id == span.trace_id)
            {
                return Some(span);
            }
        }
        scoped
    }

    /// Runs `fut` with `cx` as the [current](TraceContext::current)
    /// context: for work a handler spawns, or a batch handler that stages
    /// events for one message at a time.
    ///
    /// ```
    /// # async fn demo(msgs: &[txbox::inbox::InboxMessage]) {
    /// use txbox::trace::TraceContext;
    ///
    /// for msg in msgs {
    ///     TraceContext::scope(msg.trace_context(), async {
    ///         // events staged here carry `msg`'s trace
    ///     })
    ///     .await;
    /// }
    /// # }
    /// ```
    pub async fn scope<F: Future>(cx: Option<TraceContext>, fut: F) -> F::Output {
        CURRENT.scope(cx, fut).await
    }
}

impl FromStr for TraceContext {
    type Err = InvalidTraceparent;

    /// Parses a `traceparent` header value. Versions above `00` are read
    /// as level 1 prescribes: their first four fields, when what follows is
    /// a `-`.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let fail = |reason| InvalidTraceparent {
            value: value.chars().take(80).collect(),
            reason,
        };
        let v = value.trim().as_bytes();
        if v.len() < 55 {
            return Err(fail("shorter than 55 characters"));
        }
        let version = lower_hex::<1>(&v[0..2]).ok_or_else(|| fail("version is not hex"))?[0];
        if version == 0xff {
            return Err(fail("version ff is forbidden"));
        }
        if version == 0 && v.len() != 55 {
            return Err(fail("version 00 is exactly 55 characters"));
        }
        if v.len() > 55 && v[55] != b'-' {
            return Err(fail("unknown trailing data"));
        }
        if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return Err(fail("fields are not separated by '-'"));
        }
        let trace_id =
            lower_hex::<16>(&v[3..35]).ok_or_else(|| fail("trace-id is not lowercase hex"))?;
        let parent_id =
            lower_hex::<8>(&v[36..52]).ok_or_else(|| fail("parent-id is not lowercase hex"))?;
        let flags = lower_hex::<1>(&v[53..55]).ok_or_else(|| fail("trace-flags is not hex"))?[0];
        let mut cx = TraceContext::new(trace_id, parent_id, false)
            .ok_or_else(|| fail("an id is all zeros"))?;
        // Only the sampled flag is defined; others are not passed on.
        cx.flags = flags & 1;
        Ok(cx)
    }
}

/// `N` bytes from `2N` lowercase hex digits.
fn lower_hex<const N: usize>(digits: &[u8]) -> Option<[u8; N]> {
    if digits.len() != 2 * N
        || !digits
            .iter()
            .all(|d| matches!(d, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(digits, &mut out).ok()?;
    Some(out)
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent())
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceContext")
            .field("traceparent", &self.traceparent())
            .field("tracestate", &self.state)
            .finish()
    }
}

#[cfg(feature = "opentelemetry")]
mod otel;
#[cfg(feature = "otlp")]
pub mod otlp;
#[cfg(feature = "opentelemetry")]
pub(crate) use otel::set_parent;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn round_trips_a_valid_traceparent() {
        let cx: TraceContext = VALID.parse().unwrap();
        assert_eq!(cx.traceparent(), VALID);
        assert_eq!(cx.parent_id(), "00f067aa0ba902b7");
        assert_eq!(cx.to_string(), VALID);
    }

    #[test]
    fn refuses_what_level_1_refuses() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01é",
        ] {
            assert!(bad.parse::<TraceContext>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn reads_the_first_fields_of_a_later_version() {
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-what-comes";
        let cx: TraceContext = later.parse().unwrap();
        // Written back as version 00, with only the flag level 1 defines.
        assert_eq!(cx.traceparent(), VALID);
        assert!("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"
            .parse::<TraceContext>()
            .is_err());
    }

    #[test]
    fn headers_without_a_valid_traceparent_carry_no_context() {
        let mut h = Headers::new();
        assert_eq!(TraceContext::from_headers(&h), None);
        h.insert(TRACEPARENT, &b"\xff\xfe"[..]);
        assert_eq!(TraceContext::from_headers(&h), None);
        h.set(TRACEPARENT, "garbage");
        assert_eq!(TraceContext::from_headers(&h), None);
        h.set(TRACEPARENT, VALID);
        h.set(TRACESTATE, "congo=t61rcWkgMzE");
        let cx = TraceContext::from_headers(&h).unwrap();
        assert_eq!(cx.state(), Some("congo=t61rcWkgMzE"));
    }

    #[test]
    fn an_oversized_tracestate_is_dropped_not_cut() {
        let cx = TraceContext::parse(VALID, Some(&"a=b,".repeat(200))).unwrap();
        assert_eq!(cx.state(), None);
        let mut h = Headers::new();
        h.insert(TRACESTATE, "stale");
        cx.write_to(&mut h);
        assert_eq!(h.get(TRACESTATE), None);
    }

    #[test]
    fn a_tracestate_outside_printable_ascii_is_dropped() {
        for bad in ["a=b\0", "a=\u{e9}", "a=\nb"] {
            let cx = TraceContext::parse(VALID, Some(bad)).unwrap();
            assert_eq!(cx.state(), None, "{bad:?} kept");
        }
    }

    #[test]
    fn two_traceparents_are_ambiguous_and_tracestates_are_joined() {
        let mut h = Headers::new();
        h.insert(TRACEPARENT, VALID);
        h.insert(TRACESTATE, "a=1");
        h.insert(TRACESTATE, "b=2");
        let cx = TraceContext::from_headers(&h).unwrap();
        assert_eq!(cx.state(), Some("a=1,b=2"));
        h.insert(TRACEPARENT, VALID);
        assert_eq!(TraceContext::from_headers(&h), None);
    }

    #[tokio::test]
    async fn scope_sets_the_current_context() {
        let cx: TraceContext = VALID.parse().unwrap();
        assert_eq!(TraceContext::current(), None);
        let seen = TraceContext::scope(Some(cx.clone()), async { TraceContext::current() }).await;
        assert_eq!(seen, Some(cx));
        assert_eq!(TraceContext::current(), None);
    }
}
