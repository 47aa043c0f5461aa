//! The bridge to OpenTelemetry through `tracing-opentelemetry`.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::TraceContext;

/// The current `tracing` span's OpenTelemetry context, when a
/// `tracing-opentelemetry` layer gave it a valid one.
pub(super) fn current_span() -> Option<TraceContext> {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return None;
    }
    let out = TraceContext::new(
        sc.trace_id().to_bytes(),
        sc.span_id().to_bytes(),
        sc.is_sampled(),
    )?;
    let state = sc.trace_state().header();
    Some(if state.is_empty() {
        out
    } else {
        out.with_state(state)
    })
}

/// Makes `parent` (a consumed message's context) the OpenTelemetry parent
/// of `span`. Without a `tracing-opentelemetry` layer this does nothing.
pub(crate) fn set_parent(span: &tracing::Span, parent: &TraceContext) {
    let flags = if parent.sampled() {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let state = parent
        .state()
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let remote = SpanContext::new(
        TraceId::from_bytes(parent.trace_id_bytes()),
        SpanId::from_bytes(parent.parent_id_bytes()),
        flags,
        true,
        state,
    );
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}
