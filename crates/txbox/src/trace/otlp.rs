//! Exporting `tracing` spans to an OpenTelemetry collector over OTLP/HTTP
//! (feature `otlp`), for binaries: the relay and services that link the
//! inbox.
//!
//! # Examples
//!
//! ```no_run
//! use tracing_subscriber::layer::SubscriberExt as _;
//! use tracing_subscriber::util::SubscriberInitExt as _;
//!
//! # fn main() -> txbox::Result<()> {
//! let (otlp, _guard) = txbox::trace::otlp::layer("payments", "http://127.0.0.1:4318")?;
//! tracing_subscriber::registry()
//!     .with(tracing_subscriber::EnvFilter::new("info"))
//!     .with(tracing_subscriber::fmt::layer())
//!     .with(otlp)
//!     .init();
//! // ... run the service; dropping `_guard` flushes the spans not yet sent.
//! # Ok(()) }
//! ```

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::registry::LookupSpan;

use crate::error::{Error, Result};

/// How long the export of a batch of spans may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Flushes the spans not yet exported and stops the exporter when dropped.
/// Keep it alive as long as the process runs.
#[must_use = "dropping the guard stops the export"]
pub struct OtlpGuard {
    provider: SdkTracerProvider,
}

impl std::fmt::Debug for OtlpGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpGuard").finish_non_exhaustive()
    }
}

impl Drop for OtlpGuard {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "OTLP exporter did not shut down cleanly; spans may be lost");
        }
    }
}

/// A layer exporting the spans it sees, with `service.name` = `service`,
/// in batches over OTLP/HTTP (protobuf) to `endpoint`, the collector's base
/// URL as in `OTEL_EXPORTER_OTLP_ENDPOINT` (`/v1/traces` is appended).
///
/// Fails with [`Error::Config`] on an endpoint that is not an `http://`
/// URL (the exporter is built without TLS: run a collector beside the
/// process). An unreachable collector is no error: spans that cannot be
/// sent are dropped and the process goes on.
pub fn layer<S>(
    service: &str,
    endpoint: &str,
) -> Result<(impl tracing_subscriber::Layer<S> + Send + Sync, OtlpGuard)>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span> + Send + Sync,
{
    let base = endpoint.trim().trim_end_matches('/');
    if !base.starts_with("http://") || base.len() <= "http://".len() {
        return Err(Error::config(format!(
            "OTLP endpoint {base:?} must be an http:// URL (the collector's base URL, as in \
             OTEL_EXPORTER_OTLP_ENDPOINT)"
        )));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{base}/v1/traces"))
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| Error::config(format!("OTLP exporter for {base}: {e}")))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        )
        .build();
    let tracer = provider.tracer(service.to_owned());
    let layer = tracing_opentelemetry::layer().with_tracer(tracer);
    Ok((layer, OtlpGuard { provider }))
}
