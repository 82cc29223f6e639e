//! OpenTelemetry traces: which spans a request makes, how they get their
//! parent from a client's W3C `traceparent`, and how they leave the process
//! over OTLP.
//!
//! A traced request is one trace: the `request` server span (opened by
//! [`TraceLayer`] in front of the gRPC services and the HTTP routes, closed
//! when the response body ends) with children `authenticate`, `tokenize`,
//! `idempotency.claim`, `limits.admit`, `queue`, `generate` (its batch steps
//! as events, see [`job`]) and `metering.record`. The spans are `tracing`
//! spans at debug level under one target; only the OpenTelemetry layer
//! (installed by `telemetry` when `OTEL_EXPORTER_OTLP_ENDPOINT` is set)
//! turns them on, so with traces off they cost a disabled callsite check.
//!
//! Owns span names and attribute keys; the components only say what
//! happened. No span carries a credential or prompt text: ids, counts,
//! statuses and model names only.

pub mod job;
pub mod pipeline;
pub mod request;
pub mod settings;

pub use job::{JobEnd, JobTrace, StepRecord};
pub use pipeline::{Pipeline, PipelineError};
pub use request::{Protocol, TraceLayer, TracedBody};
pub use settings::{OtelSettings, OtlpProtocol, TracesSampler};

use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The `tracing` target of every span this module defines.
pub const TARGET: &str = "ascend_gateway::traces";

/// Sets an attribute on the current span (the request's, in a handler), if
/// it is traced.
pub fn set_current(key: &'static str, value: impl Into<opentelemetry::Value>) {
    set(&tracing::Span::current(), key, value);
}

/// Sets an attribute on `span`, if it is traced.
pub fn set(span: &tracing::Span, key: &'static str, value: impl Into<opentelemetry::Value>) {
    if !span.is_disabled() {
        span.set_attribute(key, value);
    }
}

/// What the OpenTelemetry layer sees: this module's spans, the gateway's
/// own log events at info and above (they become span events of the
/// request they happened in), and any crate's warnings and errors.
pub fn layer_filter() -> tracing_subscriber::filter::FilterFn {
    tracing_subscriber::filter::filter_fn(|meta| {
        if meta.is_span() {
            return meta.target() == TARGET;
        }
        let level = *meta.level();
        level <= tracing::Level::WARN
            || (level <= tracing::Level::INFO && meta.target().starts_with("ascend_gateway"))
    })
}

/// Opens a child span of the current one for one step of a request.
#[macro_export]
macro_rules! trace_span {
    ($name:literal) => {
        tracing::debug_span!(target: "ascend_gateway::traces", $name)
    };
}
