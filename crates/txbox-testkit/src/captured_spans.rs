//! Spans a test process opened through `tracing`, with their fields, for
//! asserting what the relay (or any library in the process) traced.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;

/// One span as opened, with the fields recorded on it since.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CapturedSpan {
    /// The span's name.
    pub name: String,
    /// Its target (the module that opened it).
    pub target: String,
    /// Its fields with a value: strings as they are, other values in their
    /// `Debug` form (`Display` for those recorded with `%`).
    pub fields: BTreeMap<String, String>,
}

impl CapturedSpan {
    /// The value of field `name`, if it was recorded.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

/// The spans of the process, kept in memory in the order they opened.
///
/// Installed as part of the process's global `tracing` subscriber, beside
/// the log output [`init_tracing`](crate::init_tracing) gives: spans of
/// every level and target are captured, whatever `RUST_LOG` lets through
/// to the log. Every test of the process adds to it: filter by span name
/// and fields a test alone produces (its stream, its outbox ids).
#[derive(Debug, Default)]
pub struct CapturedSpans {
    spans: Mutex<Vec<CapturedSpan>>,
}

static CAPTURED: OnceLock<&'static CapturedSpans> = OnceLock::new();

/// The position of a span in [`CapturedSpans::spans`], kept in the span's
/// extensions so later `record` calls find it.
struct Slot(usize);

struct Capture(&'static CapturedSpans);

impl CapturedSpans {
    /// Installs the capture (and [`init_tracing`](crate::init_tracing)'s
    /// log output) as the process's global subscriber on first call and
    /// returns it; later calls return the same one. Call it instead of
    /// `init_tracing`, before the code under test runs.
    ///
    /// # Panics
    /// If another global subscriber was installed first (by
    /// `init_tracing`, say: keep the two apart in different test binaries).
    pub fn install() -> &'static CapturedSpans {
        CAPTURED.get_or_init(|| {
            let captured: &'static CapturedSpans = Box::leak(Box::default());
            tracing_subscriber::registry()
                .with(Capture(captured))
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_test_writer()
                        .with_filter(crate::test_log_filter()),
                )
                .try_init()
                .expect("no other global tracing subscriber is installed");
            captured
        })
    }

    /// Every span named `name` opened so far, in opening order.
    pub fn named(&self, name: &str) -> Vec<CapturedSpan> {
        self.spans()
            .iter()
            .filter(|s| s.name == name)
            .cloned()
            .collect()
    }

    /// The spans named `name` whose field `field` is `value`, in opening
    /// order.
    pub fn named_with(&self, name: &str, field: &str, value: &str) -> Vec<CapturedSpan> {
        self.spans()
            .iter()
            .filter(|s| s.name == name && s.field(field) == Some(value))
            .cloned()
            .collect()
    }

    fn spans(&self) -> MutexGuard<'_, Vec<CapturedSpan>> {
        self.spans.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<S> Layer<S> for Capture
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut span = CapturedSpan {
            name: attrs.metadata().name().to_owned(),
            target: attrs.metadata().target().to_owned(),
            fields: BTreeMap::new(),
        };
        attrs.record(&mut Fields(&mut span.fields));
        let slot = {
            let mut spans = self.0.spans();
            spans.push(span);
            spans.len() - 1
        };
        if let Some(s) = ctx.span(id) {
            s.extensions_mut().insert(Slot(slot));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(s) = ctx.span(id) else { return };
        let extensions = s.extensions();
        let Some(Slot(slot)) = extensions.get::<Slot>() else {
            return;
        };
        if let Some(span) = self.0.spans().get_mut(*slot) {
            values.record(&mut Fields(&mut span.fields));
        }
    }
}

/// Writes recorded values into a field map.
struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}
