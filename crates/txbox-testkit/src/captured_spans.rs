//! Spans a test process opened through `tracing`, with their fields, for
//! asserting what the inbox or the relay traced.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, OnceLock, PoisonError};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer;

/// One span as opened, with the fields recorded on it (values in their
/// `Display` form for strings and numbers, `Debug` otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedSpan {
    /// The span's name, e.g. `txbox.inbox.message`.
    pub name: &'static str,
    /// Its fields, by name; a field declared `Empty` and never recorded is
    /// absent.
    pub fields: BTreeMap<String, String>,
}

impl CapturedSpan {
    /// The field `name`, if recorded.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

/// The process's span capture: every span at `info` or above, in the order
/// opened.
///
/// It is global (the process's `tracing` subscriber, which also writes log
/// lines to the test output as [`init_tracing`](crate::init_tracing)
/// does), so a test should pick its spans out by a field only it uses,
/// such as its consumer group.
#[derive(Debug, Default)]
pub struct CapturedSpans {
    spans: Mutex<Vec<CapturedSpan>>,
}

static CAPTURED: OnceLock<&'static CapturedSpans> = OnceLock::new();

/// Where a span's record sits in [`CapturedSpans::spans`].
struct Slot(usize);

impl CapturedSpans {
    /// Installs the capture as the process's global subscriber on first
    /// call and returns it. Install it before the code under test runs.
    ///
    /// # Panics
    /// If another global subscriber was installed first.
    pub fn install() -> &'static CapturedSpans {
        CAPTURED.get_or_init(|| {
            let captured: &'static CapturedSpans = Box::leak(Box::default());
            let lines = tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "warn,txbox=info,txbox_relay=info".into()),
                );
            let spans = Capture(captured).with_filter(tracing::level_filters::LevelFilter::INFO);
            tracing_subscriber::registry()
                .with(lines)
                .with(spans)
                .try_init()
                .expect("no other global tracing subscriber is installed");
            captured
        })
    }

    /// The spans named `name` whose field `field` is `value`, in the order
    /// opened.
    pub fn named_with(&self, name: &str, field: &str, value: &str) -> Vec<CapturedSpan> {
        self.spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|s| s.name == name && s.field(field) == Some(value))
            .cloned()
            .collect()
    }
}

struct Capture(&'static CapturedSpans);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut span = CapturedSpan {
            name: attrs.metadata().name(),
            fields: BTreeMap::new(),
        };
        attrs.record(&mut Fields(&mut span.fields));
        let mut spans = self.0.spans.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = spans.len();
        spans.push(span);
        if let Some(s) = ctx.span(id) {
            s.extensions_mut().insert(Slot(slot));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(s) = ctx.span(id) else { return };
        let ext = s.extensions();
        let Some(Slot(slot)) = ext.get::<Slot>() else {
            return;
        };
        let mut spans = self.0.spans.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(span) = spans.get_mut(*slot) {
            values.record(&mut Fields(&mut span.fields));
        }
    }
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}
