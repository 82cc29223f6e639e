//! Prometheus metrics on an HTTP admin port (`metrics_listen`, path
//! `/metrics`), named in the style of peer inference servers under an
//! `ascend_gateway_` prefix.
//!
//! Values are read from the components' own atomic counters at scrape time
//! (a collector), so components keep no metrics registry of their own and
//! the hot paths pay one relaxed atomic add at most. The two counters no
//! single component owns live here and are handed out: `requests` (every
//! response by front end and status, fed by the request layer) and
//! `tenants` (tokens per tenant, bounded series, fed by the metering sink).

pub mod refusals;
pub mod requests;
pub mod tenants;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::limits::{LimitKind, Limiter};
use crate::metering::Metering;
use crate::serving::stats::{Histogram, Outcome, ServingStats};
use crate::serving::{ModelRegistry, ServedModel};
use crate::store::now_us;

/// Reads the gateway's counters at each scrape.
pub struct GatewayCollector {
    pub limiter: Arc<Limiter>,
    pub metering: Arc<Metering>,
    pub models: ModelRegistry,
    pub connections: Arc<crate::listener::ConnectionStats>,
    pub claims: Arc<crate::idempotency::Idempotency>,
    pub authenticator: Arc<crate::auth::Authenticator>,
    pub refusals: Arc<crate::metrics::refusals::Refusals>,
    /// The listeners' TLS, when on: its certificate's expiry.
    pub tls: Option<Arc<crate::tls::TlsServer>>,
    pub requests: Arc<requests::RequestCounts>,
    pub tenant_tokens: Arc<tenants::TenantTokens>,
}

/// One gauge family with a `model` label.
fn per_model(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    models: &ModelRegistry,
    value: impl Fn(&ServedModel) -> i64,
) -> std::fmt::Result {
    let kind = ConstGauge::new(0i64);
    let mut family = encoder.encode_descriptor(name, help, None, kind.metric_type())?;
    for model in models.iter() {
        let labels = [("model", model.settings.id.as_str())];
        ConstGauge::new(value(model)).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Picks one histogram out of a model's stats.
type HistogramOf = fn(&ServingStats) -> &Histogram;

/// One histogram family with a `model` label.
fn per_model_histogram(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    models: &ModelRegistry,
    histogram: impl Fn(&ServingStats) -> &Histogram,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for model in models.iter() {
        let labels = [("model", model.settings.id.as_str())];
        let snapshot = histogram(model.stats()).snapshot();
        family
            .encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(
                snapshot.sum,
                snapshot.count,
                &snapshot.buckets,
                None,
            )?;
    }
    Ok(())
}

/// One counter family with a `model` label.
fn per_model_counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    models: &ModelRegistry,
    value: impl Fn(&ServingStats) -> u64,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for model in models.iter() {
        let labels = [("model", model.settings.id.as_str())];
        ConstCounter::new(value(model.stats())).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl std::fmt::Debug for GatewayCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewayCollector")
    }
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> std::fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> std::fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for GatewayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let spool = self.metering.stats();
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        gauge(
            &mut encoder,
            "ascend_gateway_usage_spool_bytes",
            "Bytes of usage waiting in the local spool",
            as_i64(spool.bytes()),
        )?;
        gauge(
            &mut encoder,
            "ascend_gateway_usage_events_pending",
            "Usage events spooled and not yet committed to the database",
            as_i64(spool.pending_events()),
        )?;
        let oldest = spool.oldest_pending_us();
        let age_s = if oldest == 0 {
            0
        } else {
            (now_us() - oldest).max(0) / 1_000_000
        };
        gauge(
            &mut encoder,
            "ascend_gateway_usage_oldest_pending_age_seconds",
            "Age of the oldest usage event not yet in the database",
            age_s,
        )?;
        counter(
            &mut encoder,
            "ascend_gateway_usage_write_errors",
            "Failed attempts to write or ship usage",
            spool.write_errors(),
        )?;
        counter(
            &mut encoder,
            "ascend_gateway_usage_events_refused",
            "Usage events of archived months set aside under the spool's refused/ directory",
            spool.refused_events(),
        )?;
        if let Some(tls) = &self.tls {
            gauge(
                &mut encoder,
                "ascend_gateway_tls_certificate_expiry_timestamp_seconds",
                "When the listeners' TLS certificate in use expires (Unix seconds)",
                tls.not_after_unix(),
            )?;
        }
        let connections = &self.connections;
        gauge(
            &mut encoder,
            "ascend_gateway_connections_open",
            "gRPC connections open (past the HTTP/2 preface check)",
            as_i64(connections.open.load(Ordering::Relaxed)),
        )?;
        counter(
            &mut encoder,
            "ascend_gateway_connections_accepted",
            "TCP connections accepted on the gRPC port",
            connections.accepted.load(Ordering::Relaxed),
        )?;
        counter(
            &mut encoder,
            "ascend_gateway_connections_refused_over_cap",
            "Connections closed at once because server.max_connections were open",
            connections.refused_over_cap.load(Ordering::Relaxed),
        )?;
        counter(
            &mut encoder,
            "ascend_gateway_connections_handshake_failures",
            "Connections closed without a complete HTTP/2 preface within server.handshake_timeout",
            connections.handshake_failures.load(Ordering::Relaxed),
        )?;
        counter(
            &mut encoder,
            "ascend_gateway_idempotent_replays",
            "Duplicate request ids answered with the stored answer",
            self.claims.replay_count(),
        )?;
        counter(
            &mut encoder,
            "ascend_gateway_idempotency_conflicts",
            "Duplicate request ids refused (still in progress, or another request)",
            self.claims.conflict_count(),
        )?;
        gauge(
            &mut encoder,
            "ascend_gateway_limit_permits_in_flight",
            "Requests admitted by the limits on this replica and not yet ended",
            as_i64(self.limiter.in_flight()),
        )?;
        gauge(
            &mut encoder,
            "ascend_gateway_limit_leases_held",
            "Concurrency leases this replica holds in Redis; above permits_in_flight by the settlements on their way",
            as_i64(self.limiter.leases_held()),
        )?;
        counter(
            &mut encoder,
            "ascend_gateway_limit_settlements_dropped",
            "Settlements lost to a full queue (their leases expire by themselves)",
            self.limiter.settlements_dropped(),
        )?;
        counter(
            &mut encoder,
            "ascend_gateway_limit_redis_fallbacks",
            "Admissions decided by local limits because Redis was unreachable",
            self.limiter.fallback_count(),
        )?;
        let rejections = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "ascend_gateway_limit_rejections",
            "Requests refused by a tenant limit, by limit",
            None,
            rejections.metric_type(),
        )?;
        for kind in LimitKind::ALL {
            let labels = [("limit", kind.field())];
            ConstCounter::new(self.limiter.rejections(kind))
                .encode(family.encode_family(&labels)?)?;
        }
        let failures = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "ascend_gateway_auth_failures",
            "Refused credentials, by kind (throttled: refused unchecked, the address failed too often)",
            None,
            failures.metric_type(),
        )?;
        for kind in crate::auth::throttle::FailureKind::ALL {
            let labels = [("kind", kind.as_str())];
            ConstCounter::new(self.authenticator.failure_count(kind))
                .encode(family.encode_family(&labels)?)?;
        }
        let exhausted = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "ascend_gateway_resource_exhausted",
            "Every RESOURCE_EXHAUSTED answered, by cause",
            None,
            exhausted.metric_type(),
        )?;
        for cause in crate::metrics::refusals::RefusalCause::ALL {
            let labels = [("cause", cause.as_str())];
            ConstCounter::new(self.refusals.count(cause)).encode(family.encode_family(&labels)?)?;
        }
        self.encode_requests(&mut encoder)?;
        let count = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        per_model(
            &mut encoder,
            "ascend_gateway_queue_requests",
            "Requests waiting in the model's queue",
            &self.models,
            |m| count(m.queue_depth().0 as u64),
        )?;
        per_model(
            &mut encoder,
            "ascend_gateway_queue_tokens",
            "Tokens (prompt + max_tokens) of the requests waiting in the model's queue",
            &self.models,
            |m| count(m.queue_depth().1),
        )?;
        per_model(
            &mut encoder,
            "ascend_gateway_running_sequences",
            "Sequences in the workers' batches",
            &self.models,
            |m| count(m.running() as u64),
        )?;
        per_model(
            &mut encoder,
            "ascend_gateway_kv_blocks_free",
            "Free KV cache blocks, as last reported by the workers",
            &self.models,
            |m| count(m.kv_free_blocks() as u64),
        )?;
        per_model(
            &mut encoder,
            "ascend_gateway_prefix_cache_blocks",
            "KV blocks holding a cached prompt prefix (in use or retained), as last reported \
             by the workers",
            &self.models,
            |m| count(m.cached_blocks() as u64),
        )?;
        per_model(
            &mut encoder,
            "ascend_gateway_preemptions",
            "Sequences preempted because KV blocks ran out (a running total)",
            &self.models,
            |m| count(m.preemptions()),
        )?;
        self.encode_serving(&mut encoder)
    }
}

impl GatewayCollector {
    /// Responses by front end and status, and tokens by tenant.
    fn encode_requests(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let mut family = encoder.encode_descriptor(
            "ascend_gateway_grpc_requests",
            "gRPC calls answered, by service and final status code (a stream counts when it ends)",
            None,
            MetricType::Counter,
        )?;
        for (service, code, count) in self.requests.grpc_series() {
            let labels = [("grpc_service", service), ("grpc_code", code)];
            ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "ascend_gateway_http_requests",
            "HTTP API requests answered, by route and status (a stream counts when it ends)",
            None,
            MetricType::Counter,
        )?;
        for (route, status, count) in self.requests.http_series() {
            let status = status.to_string();
            let labels = [("route", route), ("code", status.as_str())];
            ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "ascend_gateway_tenant_tokens",
            "Tokens metered per tenant since start (kind: prompt, of it cached_prompt, completion); \
             tenants past the first 1000 of a process share tenant=\"_other\"",
            None,
            MetricType::Counter,
        )?;
        for (tenant, counts) in self.tenant_tokens.snapshot() {
            for (kind, value) in [
                ("prompt", counts.prompt),
                ("cached_prompt", counts.cached_prompt),
                ("completion", counts.completion),
            ] {
                let labels = [("tenant", tenant.as_str()), ("kind", kind)];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }

    /// Latency and batch histograms and token counters, per model.
    fn encode_serving(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let models = &self.models;
        let histograms: [(&str, &str, HistogramOf); 7] = [
            (
                "ascend_gateway_time_to_first_token_seconds",
                "From receipt of a request to its first generated token",
                |s| &s.time_to_first_token,
            ),
            (
                "ascend_gateway_inter_token_latency_seconds",
                "Between consecutive generated tokens of one request",
                |s| &s.inter_token_latency,
            ),
            (
                "ascend_gateway_e2e_request_latency_seconds",
                "From receipt of a request to its last message",
                |s| &s.end_to_end,
            ),
            (
                "ascend_gateway_request_queue_time_seconds",
                "From receipt of a request to its admission into a batch",
                |s| &s.queue_time,
            ),
            (
                "ascend_gateway_step_duration_seconds",
                "Wall time of one batched model step, pacing included",
                |s| &s.step_duration,
            ),
            (
                "ascend_gateway_step_sequences",
                "Sequences in one batched step (the running batch size)",
                |s| &s.step_sequences,
            ),
            (
                "ascend_gateway_step_tokens",
                "Tokens processed in one batched step (prefill chunks and decodes)",
                |s| &s.step_tokens,
            ),
        ];
        for (name, help, histogram) in histograms {
            per_model_histogram(encoder, name, help, models, histogram)?;
        }
        per_model_counter(
            encoder,
            "ascend_gateway_prompt_tokens",
            "Prompt tokens of requests that left serving",
            models,
            |s| s.prompt_tokens.load(Ordering::Relaxed),
        )?;
        per_model_counter(
            encoder,
            "ascend_gateway_prompt_cache_hit_tokens",
            "Prompt tokens whose KV came from the prefix cache (hit rate: hit / (hit + miss))",
            models,
            |s| s.prompt_cache_hit_tokens.load(Ordering::Relaxed),
        )?;
        per_model_counter(
            encoder,
            "ascend_gateway_prompt_cache_miss_tokens",
            "Prompt tokens computed because the prefix cache did not hold them",
            models,
            |s| s.prompt_cache_miss_tokens.load(Ordering::Relaxed),
        )?;
        let mut family = encoder.encode_descriptor(
            "ascend_gateway_prompt_cache_hit_ratio",
            "Share of prompt tokens served from the prefix cache since start (0 before any)",
            None,
            MetricType::Gauge,
        )?;
        for model in models.iter() {
            let stats = model.stats();
            let hit = stats.prompt_cache_hit_tokens.load(Ordering::Relaxed);
            let miss = stats.prompt_cache_miss_tokens.load(Ordering::Relaxed);
            let ratio = if hit + miss == 0 {
                0.0
            } else {
                hit as f64 / (hit + miss) as f64
            };
            let labels = [("model", model.settings.id.as_str())];
            ConstGauge::new(ratio).encode(family.encode_family(&labels)?)?;
        }
        per_model_counter(
            encoder,
            "ascend_gateway_prefix_cache_evictions",
            "Cached KV blocks evicted to make room or to keep the cache within its share",
            models,
            |s| s.prefix_cache_evictions.load(Ordering::Relaxed),
        )?;
        per_model_counter(
            encoder,
            "ascend_gateway_paced_steps",
            "Steps run under pace = \"device\"",
            models,
            |s| s.paced_steps.load(Ordering::Relaxed),
        )?;
        per_model_counter(
            encoder,
            "ascend_gateway_pace_overrun_steps",
            "Paced steps the CPU computed more slowly than the emulated device (clients saw \
             this machine's latency)",
            models,
            |s| s.pace_overrun_steps.load(Ordering::Relaxed),
        )?;
        let mut family = encoder.encode_descriptor(
            "ascend_gateway_pace_overrun_seconds",
            "Time paced steps ran past their emulated device time",
            None,
            MetricType::Counter,
        )?;
        for model in models.iter() {
            let us = model.stats().pace_overrun_us.load(Ordering::Relaxed);
            let labels = [("model", model.settings.id.as_str())];
            ConstCounter::new(us as f64 / 1e6).encode(family.encode_family(&labels)?)?;
        }
        per_model_counter(
            encoder,
            "ascend_gateway_generation_tokens",
            "Tokens generated",
            models,
            |s| s.generation_tokens.load(Ordering::Relaxed),
        )?;
        per_model_counter(
            encoder,
            "ascend_gateway_queue_full_rejections",
            "Requests refused because the model's queue was full",
            models,
            |s| s.queue_full_rejections.load(Ordering::Relaxed),
        )?;
        let mut family = encoder.encode_descriptor(
            "ascend_gateway_requests_finished",
            "Requests that left serving, by finish reason",
            None,
            MetricType::Counter,
        )?;
        for model in models.iter() {
            for outcome in Outcome::ALL {
                let labels = [
                    ("model", model.settings.id.as_str()),
                    ("reason", outcome.as_str()),
                ];
                ConstCounter::new(model.stats().finished(outcome))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// A registry holding the gateway collector.
pub fn registry(collector: GatewayCollector) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    registry
}

/// Serves `/metrics` on `listener` until `stop`.
pub async fn serve(listener: TcpListener, registry: Registry, stop: CancellationToken) {
    let registry = Arc::new(registry);
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &registry) {
                    Ok(()) => (
                        [(
                            CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                        .into_response(),
                    Err(_) => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                }
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "metrics endpoint stopped");
    }
}
