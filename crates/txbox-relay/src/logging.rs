//! Log output for the txbox binaries: human text (coloured only on a
//! terminal) or one JSON object per line, to stderr, filtered by
//! `RUST_LOG` (default `info`); with the `otlp` feature, spans exported to
//! an OpenTelemetry collector too.

use std::io::IsTerminal as _;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// How log lines are written (`--log-format`, `TXBOX_LOG_FORMAT`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; ANSI colours only when stderr is a terminal,
    /// so a pipe or a file gets plain text.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`,
    /// `spans`), for log collectors.
    Json,
}

/// A layer of the process's subscriber besides the log lines.
pub type ExtraLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Installs the process's log subscriber, writing to stderr in `format`.
/// Does nothing if one is installed already.
///
/// # Examples
///
/// ```
/// txbox_relay::logging::init(txbox_relay::logging::LogFormat::Json);
/// tracing::info!(stream = 0, "written as one JSON line");
/// ```
pub fn init(format: LogFormat) {
    init_with(format, None);
}

/// As [`init`], with one more layer (an OpenTelemetry exporter, say) that
/// sees the same spans, under the same `RUST_LOG` filter.
pub fn init_with(format: LogFormat, extra: Option<ExtraLayer>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let lines: ExtraLayer = match format {
        LogFormat::Text => lines.with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => lines
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
    };
    let layers: Vec<ExtraLayer> = std::iter::once(lines).chain(extra).collect();
    let _ = tracing_subscriber::registry()
        .with(layers)
        .with(filter)
        .try_init();
}

/// Installs the log subscriber and, when `endpoint` is set, exports spans
/// over OTLP/HTTP to that collector as `service`. Keep the guard for the
/// life of the process: dropping it flushes and stops the export.
#[cfg(feature = "otlp")]
pub fn init_with_otlp(
    format: LogFormat,
    service: &str,
    endpoint: Option<&str>,
) -> txbox::Result<Option<txbox::trace::otlp::OtlpGuard>> {
    let Some(endpoint) = endpoint else {
        init(format);
        return Ok(None);
    };
    let (layer, guard) = txbox::trace::otlp::layer::<Registry>(service, endpoint)?;
    init_with(format, Some(layer.boxed()));
    Ok(Some(guard))
}
