//! The OTLP export pipeline: a tracer provider with the configured sampler
//! and resource, whose batch processor hands finished spans to an OTLP
//! exporter (gRPC over tonic, or HTTP/protobuf over hyper with rustls).
//!
//! The SDK's batch processor runs exports on its own plain thread, where
//! tonic's and hyper's I/O cannot run (they need a tokio reactor; peers'
//! users report silently lost traces and a panicking export thread). So the
//! exporter here hands every export to the gateway's runtime and waits for
//! it there.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanExporter,
    Tracer,
};

use super::settings::{OtelSettings, OtlpProtocol, TracesSampler};

/// Most events one span keeps: a request's coalesced batch-step runs
/// (`job`), with room to spare; more are dropped and counted by the SDK.
const MAX_EVENTS_PER_SPAN: u32 = 512;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot build the OTLP exporter for {url}: {source}")]
    Exporter {
        url: String,
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("invalid OTEL_EXPORTER_OTLP_HEADERS entry {0}")]
    Header(String),
}

/// The running export pipeline; [`Pipeline::shutdown`] flushes it.
pub struct Pipeline {
    provider: SdkTracerProvider,
    url: String,
    protocol: OtlpProtocol,
}

impl Pipeline {
    /// Builds the pipeline `settings` describe (`None` when traces are off);
    /// exports run on `runtime`.
    pub fn start(
        settings: &OtelSettings,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Option<Pipeline>, PipelineError> {
        let Some(url) = settings.traces_url().filter(|_| settings.enabled()) else {
            return Ok(None);
        };
        // tonic's lazy channel spawns its worker where it is built.
        let _entered = runtime.enter();
        let exporter = exporter(settings, &url)?;
        let batch = BatchConfigBuilder::default()
            .with_scheduled_delay(Duration::from_millis(settings.bsp_schedule_delay))
            .build();
        let processor = BatchSpanProcessor::builder(OnRuntime {
            exporter: Arc::new(exporter),
            runtime: runtime.clone(),
            url: crate::config::redact_url(&url),
            last_warning_us: std::sync::atomic::AtomicI64::new(i64::MIN),
        })
        .with_batch_config(batch)
        .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(sampler(settings))
            .with_resource(resource(settings))
            .with_max_events_per_span(MAX_EVENTS_PER_SPAN)
            .build();
        Ok(Some(Pipeline {
            provider,
            url: crate::config::redact_url(&url),
            protocol: settings.protocol(),
        }))
    }

    pub fn tracer(&self) -> Tracer {
        self.provider.tracer("ascend-gateway")
    }

    /// Where spans go, for the start-up log line.
    pub fn describe(&self) -> String {
        format!("{} to {}", self.protocol.as_str(), self.url)
    }

    /// Exports what is buffered and stops. Blocks: call it off the
    /// runtime's worker threads (it waits for exports running there).
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "the trace exporter did not flush cleanly");
        }
    }
}

fn exporter(
    settings: &OtelSettings,
    url: &str,
) -> Result<opentelemetry_otlp::SpanExporter, PipelineError> {
    let headers = settings.header_pairs();
    let timeout = Duration::from_millis(settings.timeout);
    let built = match settings.protocol() {
        OtlpProtocol::Grpc => {
            let mut metadata = tonic::metadata::MetadataMap::new();
            for (key, value) in headers {
                let name = tonic::metadata::MetadataKey::from_bytes(key.to_lowercase().as_bytes())
                    .map_err(|_| PipelineError::Header(key.clone()))?;
                let value = value
                    .parse()
                    .map_err(|_| PipelineError::Header(key.clone()))?;
                metadata.insert(name, value);
            }
            // The Mozilla roots: tonic's default TLS config trusts nothing.
            let tls = tonic::transport::ClientTlsConfig::new().with_webpki_roots();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(url)
                .with_timeout(timeout)
                .with_metadata(metadata)
                .with_tls_config(tls)
                .build()
        }
        OtlpProtocol::HttpProtobuf => {
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_webpki_roots()
                .https_or_http()
                .enable_http1()
                .enable_http2()
                .build();
            let client = opentelemetry_http::hyper::HyperClient::new(connector, timeout, None);
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(url)
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_timeout(timeout)
                .with_http_client(client)
                .with_headers(headers.into_iter().collect::<HashMap<_, _>>())
                .build()
        }
    };
    built.map_err(|source| PipelineError::Exporter {
        url: crate::config::redact_url(url),
        source,
    })
}

fn sampler(settings: &OtelSettings) -> Sampler {
    let ratio = settings.sampler_ratio();
    match settings.sampler() {
        TracesSampler::AlwaysOn => Sampler::AlwaysOn,
        TracesSampler::AlwaysOff => Sampler::AlwaysOff,
        TracesSampler::Traceidratio => Sampler::TraceIdRatioBased(ratio),
        TracesSampler::ParentbasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        TracesSampler::ParentbasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        TracesSampler::ParentbasedTraceidratio => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
        }
    }
}

/// The resource from settings alone (the SDK's default detectors would read
/// the environment behind `config`'s back).
fn resource(settings: &OtelSettings) -> Resource {
    let mut attributes: Vec<KeyValue> = settings
        .resource_pairs()
        .into_iter()
        .filter(|(key, _)| key != "service.name")
        .map(|(key, value)| KeyValue::new(key, value))
        .collect();
    attributes.push(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    attributes.push(KeyValue::new(
        "service.instance.id",
        uuid::Uuid::new_v4().to_string(),
    ));
    Resource::builder_empty()
        .with_service_name(settings.service_name.clone())
        .with_attributes(attributes)
        .build()
}

/// An exporter whose exports run on a tokio runtime, whatever thread asks,
/// and whose failures reach the log (the SDK drops them silently).
#[derive(Debug)]
struct OnRuntime<E> {
    exporter: Arc<E>,
    runtime: tokio::runtime::Handle,
    /// The collector, for the warning (credentials redacted).
    url: String,
    /// When the last failure was logged: at most one warning a minute.
    last_warning_us: std::sync::atomic::AtomicI64,
}

impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let exporter = self.exporter.clone();
        let spans = batch.len();
        let result = self
            .runtime
            .spawn(async move { exporter.export(batch).await })
            .await
            .unwrap_or_else(|e| Err(OTelSdkError::InternalFailure(e.to_string())));
        if let Err(error) = &result {
            use std::sync::atomic::Ordering;
            let now = crate::store::now_us();
            let last = self.last_warning_us.load(Ordering::Relaxed);
            if now.saturating_sub(last) >= 60_000_000
                && self
                    .last_warning_us
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                tracing::warn!(%error, spans, collector = %self.url, "traces not exported (logged at most once a minute)");
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.exporter.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.exporter.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        // The provider sets the resource once, before any export shares the
        // exporter.
        if let Some(exporter) = Arc::get_mut(&mut self.exporter) {
            exporter.set_resource(resource);
        }
    }
}
