//! Logging and traces: `tracing` to stderr (readable lines on a terminal,
//! or one JSON object per line for collectors) and, when an OTLP pipeline is
//! given, the `traces` spans to OpenTelemetry. Knows nothing of what is
//! logged or traced.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::{LogFormat, LogSettings};
use crate::traces::Pipeline;

/// Installs the global subscriber with the log's filter (`log.filter`, which
/// `RUST_LOG` sets in `config`; the traces have their own). A second call
/// (tests start many servers) is a no-op.
pub fn init(log: &LogSettings, traces: Option<&Pipeline>) {
    // Validated by the settings already; "info" only for a hand-made one.
    let filter = EnvFilter::try_new(&log.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let stderr = match log.format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(false)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let otel = traces.map(|pipeline| {
        tracing_opentelemetry::layer()
            .with_tracer(pipeline.tracer())
            .with_location(false)
            .with_threads(false)
            .with_filter(crate::traces::layer_filter())
    });
    // Ignoring the result is deliberate: it only fails when a subscriber is
    // already installed, and then that one stays.
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(otel)
        .try_init();
}
