//! Log output for the txbox binaries: human text (coloured only on a
//! terminal) or one JSON object per line, to stderr, filtered by
//! `RUST_LOG` (default `info`).

use std::io::IsTerminal as _;

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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
}
