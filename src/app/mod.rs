//! Wiring: [`App::build`] turns [`Settings`] into a ready server (database
//! open and migrated, port bound), and [`App::run_until`] serves until a
//! shutdown signal, then drains in-flight requests within the grace period.
//!
//! This is the only place that knows every component; components know only
//! the narrow handles they are given here.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::api::auth_layer::AuthLayer;
use crate::api::pb::v1::billing_server::BillingServer;
use crate::api::pb::v1::inference_server::InferenceServer;
use crate::api::pb::v1::tenant_admin_server::TenantAdminServer;
use crate::api::pb::v1::webhooks_server::WebhooksServer;
use crate::api::{self, BillingApi, InferenceApi, TenantAdminApi, WebhooksApi};
use crate::auth::{Authenticator, KeyCache, LastUsedRecorder};
use crate::billing::BillingService;
use crate::billing::quote::PriceCache;
use crate::config::{Settings, redact_url};
use crate::generation::Generation;
use crate::idempotency::{Idempotency, PendingFinishes};
use crate::limits::{BackgroundSettlements, Limiter};
use crate::metering::{Metering, Spool, UsageEvent, UsageWriter};
use crate::serving::{JobUsage, ModelRegistry, Requester, UsageSink};
use crate::store::{Db, StoreError};
use crate::tenancy::TenancyService;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

mod startup;
use tokio_util::task::TaskTracker;

/// Largest header block a client may send. Keys are short; anything bigger
/// is abuse and is refused by the HTTP/2 layer before any handler runs.
const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot listen on {addr} (setting `listen`): {source}; {hint}")]
    Bind {
        addr: SocketAddr,
        hint: &'static str,
        source: std::io::Error,
    },
    #[error(
        "cannot listen on {addr} (setting `metrics_listen`): {source}; choose another port with ASCEND_METRICS_LISTEN (port 0 picks a free one)"
    )]
    MetricsBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "cannot listen on {addr} (setting `http_listen`): {source}; choose another port with ASCEND_HTTP_LISTEN (port 0 picks a free one, the empty string turns the HTTP API off)"
    )]
    HttpBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Serving(#[from] crate::serving::ServingError),
    #[error("cannot open the usage spool (setting `metering.spool_dir` / `data_dir`): {0}")]
    Spool(#[from] crate::metering::MeteringError),
    #[error(
        "cannot connect to Redis at {url} (setting `redis.url`; check that Redis is running and the URL is right, or unset it for in-process limits): {source}"
    )]
    Redis {
        url: String,
        source: redis::RedisError,
    },
    #[error(
        "Redis at {url} is a read-only {role} (setting `redis.url`): limits write on every request; point redis.url at the primary"
    )]
    RedisReadOnly { url: String, role: String },
}

impl StartupError {
    /// Whether the settings themselves are wrong (the binary exits 2, as
    /// for a bad flag): a served model whose directory cannot be loaded
    /// (a tokenizer that does not parse, more token ids than the embedding
    /// has rows, no directory to load) is named by the `models` setting;
    /// an I/O failure reading or writing it is not.
    pub fn is_configuration(&self) -> bool {
        use crate::model::ModelError;
        use crate::serving::ServingError;
        match self {
            // A disk that fails or fills is the machine's fault, not the settings'.
            StartupError::Serving(ServingError::Model { source, .. }) => {
                !matches!(source, ModelError::Io { .. })
            }
            StartupError::Serving(
                ServingError::MissingDir { .. } | ServingError::Device { .. },
            ) => true,
            _ => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The descriptor set is built into the binary, so this is a build defect.
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The TLS files changed between the start's check and their use.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A part the gateway cannot serve without stopped; the gateway drained
    /// and flushed, then stopped too, so its supervisor restarts it.
    #[error("{component} failed: {reason}")]
    Component {
        component: &'static str,
        reason: String,
    },
}

/// Where a component reports that it failed beyond repair: the gateway then
/// stops as on a shutdown signal (health NOT_SERVING, in-flight requests
/// drained within `shutdown_grace`, workers stopped, usage flushed) and
/// `run_until` returns the failure. Cheap to clone.
#[derive(Clone)]
pub struct FailureReporter(tokio::sync::mpsc::UnboundedSender<ServeError>);

impl FailureReporter {
    pub fn report(&self, component: &'static str, reason: impl Into<String>) {
        let _ = self.0.send(ServeError::Component {
            component,
            reason: reason.into(),
        });
    }
}

/// A gateway ready to serve.
pub struct App {
    settings: Arc<Settings>,
    listener: TcpListener,
    local_addr: SocketAddr,
    db: Db,
    tenancy: TenancyService,
    authenticator: Arc<Authenticator>,
    last_used: Arc<LastUsedRecorder>,
    limiter: Arc<Limiter>,
    settlements: BackgroundSettlements,
    metering: Arc<Metering>,
    usage_writer: UsageWriter,
    metrics_listener: TcpListener,
    metrics_addr: SocketAddr,
    http_listener: Option<TcpListener>,
    http_addr: Option<SocketAddr>,
    registry: ModelRegistry,
    claims: Arc<Idempotency>,
    pending_claims: PendingFinishes,
    tenant_tokens: Arc<crate::metrics::tenants::TenantTokens>,
    failures: (
        FailureReporter,
        tokio::sync::mpsc::UnboundedReceiver<ServeError>,
    ),
}

/// Turns a finished job's usage into a usage event on the spool. The
/// worker's thread hands the event straight to the spool's commit thread,
/// which runs the job's last steps once the event is durable; the usage
/// writer's last round at shutdown seals the spool behind every append.
struct MeteringSink {
    metering: Arc<Metering>,
    /// Tokens per tenant for `/metrics`.
    tenant_tokens: Arc<crate::metrics::tenants::TenantTokens>,
}

impl UsageSink for MeteringSink {
    fn record(
        &self,
        requester: &Requester,
        started_at_us: i64,
        usage: &JobUsage,
        outcome: crate::serving::stats::Outcome,
        then: crate::serving::WhenRecorded,
    ) {
        // mJ per us is kW; times 1e6 gives mW. No device time, no power.
        let mean_power_mw = usage
            .energy_mj
            .saturating_mul(1_000_000)
            .checked_div(usage.device_time_us)
            .unwrap_or(0);
        let event = UsageEvent {
            request_id: requester.request_id.clone(),
            tenant_id: requester.tenant_id.clone(),
            key_id: requester.key_id.clone(),
            model: requester.model.clone(),
            device_profile: usage.device_profile.clone(),
            prompt_tokens: usage.prompt_tokens,
            cached_prompt_tokens: usage.cached_prompt_tokens,
            completion_tokens: usage.completion_tokens,
            queue_time_us: usage.queue_time_us,
            ttft_us: usage.ttft_us,
            total_time_us: usage.total_time_us,
            device_time_us: usage.device_time_us,
            energy_mj: usage.energy_mj,
            mean_power_mw,
            finish_reason: finish_reason(outcome),
            started_at_us,
            finished_at_us: crate::store::now_us(),
        };
        self.tenant_tokens.add(
            &requester.tenant_slug,
            usage.prompt_tokens,
            usage.cached_prompt_tokens,
            usage.completion_tokens,
        );
        self.metering.record_then(
            &event,
            Box::new(move |durable| then(durable.map_err(|e| e as crate::serving::RecordError))),
        );
    }
}

/// How serving's outcome of a job is recorded.
fn finish_reason(outcome: crate::serving::stats::Outcome) -> crate::metering::FinishReason {
    use crate::metering::FinishReason;
    use crate::serving::stats::Outcome;
    match outcome {
        Outcome::Eos => FinishReason::Eos,
        Outcome::Stop => FinishReason::Stop,
        Outcome::Length => FinishReason::Length,
        Outcome::Cancelled => FinishReason::Cancelled,
        Outcome::DeadlineExceeded => FinishReason::DeadlineExceeded,
        Outcome::Error => FinishReason::Error,
    }
}

/// Opens the shared limit store, failing fast so a wrong URL is found at
/// start rather than at the first request.
async fn connect_redis(
    url: &str,
    timeout: std::time::Duration,
) -> Result<redis::aio::ConnectionManager, StartupError> {
    let error = |source| StartupError::Redis {
        url: redact_url(url),
        source,
    };
    let client = redis::Client::open(url).map_err(error)?;
    // One quick reconnect attempt per command, not the library's six with
    // doubling delays (about 6 s): a request must not wait that long for a
    // limit decision while Redis is away; the failure policy answers.
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_min_delay(std::time::Duration::from_millis(10))
        .set_max_delay(timeout);
    let mut connection = redis::aio::ConnectionManager::new_with_config(client, config)
        .await
        .map_err(error)?;
    // Limits write on every admission: a read-only replica would refuse
    // each one. Say so now rather than at the first request.
    let role: Vec<redis::Value> = redis::cmd("ROLE")
        .query_async(&mut connection)
        .await
        .map_err(error)?;
    let role = match role.first() {
        Some(redis::Value::BulkString(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
        Some(redis::Value::SimpleString(text)) => text.clone(),
        _ => String::new(),
    };
    if role != "master" {
        return Err(StartupError::RedisReadOnly {
            url: redact_url(url),
            role,
        });
    }
    Ok(connection)
}

impl App {
    /// Opens and migrates the database, then binds the listen address.
    pub async fn build(mut settings: Settings) -> Result<App, StartupError> {
        let admin = startup::admin_credential(&mut settings);
        let db = startup::open_database(&settings).await?;
        let listeners = startup::Listeners::bind(&settings).await?;
        let cache = Arc::new(
            KeyCache::new(settings.auth.cache_ttl, settings.auth.cache_capacity)
                .with_stale_window(settings.auth.stale_if_unavailable),
        );
        let mut tenancy = TenancyService::new(db.clone(), &settings.tenancy.default_price_plan);
        tenancy.add_listener(cache.clone());
        let redis = match &settings.redis.url {
            Some(url) => Some(connect_redis(url.expose_secret(), settings.redis.timeout).await?),
            None => None,
        };
        let (limiter, settlements) = Limiter::new(redis, settings.limits.clone());
        limiter.set_quota_seed(startup::quota_seed(
            db.clone(),
            BillingService::new(db.clone(), &settings.billing),
        ));
        let spool_dir = settings
            .metering
            .spool_dir
            .clone()
            .unwrap_or_else(|| settings.data_dir.join("spool"));
        let spool = Spool::open(&spool_dir, settings.metering.spool.clone())?;
        let metering = Arc::new(Metering::new(spool.clone(), &settings.metering));
        let usage_writer = UsageWriter::new(spool, db.clone(), settings.metering.batch_size);
        let tenant_tokens = Arc::new(crate::metrics::tenants::TenantTokens::default());
        let sink: Arc<dyn UsageSink> = Arc::new(MeteringSink {
            metering: metering.clone(),
            tenant_tokens: tenant_tokens.clone(),
        });
        let registry = startup::start_models(&settings, sink).await?;
        let (claims, pending_claims) = Idempotency::new(db.clone(), settings.idempotency.clone());
        let last_used = Arc::new(LastUsedRecorder::default());
        let authenticator = Arc::new(Authenticator::new(
            tenancy.clone(),
            cache,
            admin,
            last_used.clone(),
            crate::auth::throttle::FailureThrottle::new(
                settings.auth.failed_auth_burst,
                settings.auth.failed_auth_per_minute,
            ),
        ));
        let startup::Listeners {
            grpc: listener,
            grpc_addr: local_addr,
            metrics: metrics_listener,
            metrics_addr,
            http: http_listener,
            http_addr,
        } = listeners;
        Ok(App {
            settings: Arc::new(settings),
            listener,
            local_addr,
            db,
            tenancy,
            authenticator,
            last_used,
            limiter,
            settlements,
            metering,
            usage_writer,
            metrics_listener,
            metrics_addr,
            http_listener,
            http_addr,
            registry,
            claims,
            pending_claims,
            tenant_tokens,
            failures: {
                let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
                (FailureReporter(sender), receiver)
            },
        })
    }

    /// Where components report a failure that must stop the gateway.
    pub fn failure_reporter(&self) -> FailureReporter {
        self.failures.0.clone()
    }

    /// The address actually bound (differs from the setting when it asked
    /// for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The address of the `/metrics` endpoint actually bound.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The address of the OpenAI-compatible HTTP API actually bound;
    /// `None` when `http_listen` turned it off.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The served models.
    pub fn models(&self) -> &ModelRegistry {
        &self.registry
    }

    /// Where serving records usage.
    pub fn metering(&self) -> &Arc<Metering> {
        &self.metering
    }

    /// Serves until `shutdown` completes, then stops accepting, reports
    /// NOT_SERVING on health, and waits up to `shutdown_grace` for in-flight
    /// requests before closing.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
        let App {
            settings,
            listener,
            local_addr,
            db,
            tenancy,
            authenticator,
            last_used,
            limiter,
            settlements,
            metering,
            usage_writer,
            metrics_listener,
            metrics_addr,
            http_listener,
            http_addr,
            registry,
            claims,
            pending_claims,
            tenant_tokens,
            failures: (_, mut failures),
        } = self;
        // Built before any task starts, so a failure here leaves nothing running.
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(api::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(api::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let tasks = TaskTracker::new();
        let stop_tasks = CancellationToken::new();
        let metering_handle = metering.clone();
        let usage_barrier = metering.clone();
        let connections = Arc::new(crate::listener::ConnectionStats::default());
        let refusals = Arc::new(crate::metrics::refusals::Refusals::default());
        let requests = Arc::new(crate::metrics::requests::RequestCounts::default());
        // Checked by the settings' validation already; loaded for use here.
        let tls = crate::tls::TlsServer::load(&settings.tls)?;
        if let Some(tls) = &tls {
            tasks.spawn(tls.clone().watch(stop_tasks.clone()));
        }
        let metrics_registry = crate::metrics::registry(crate::metrics::GatewayCollector {
            limiter: limiter.clone(),
            metering,
            models: registry.clone(),
            connections: connections.clone(),
            claims: claims.clone(),
            authenticator: authenticator.clone(),
            refusals: refusals.clone(),
            tls: tls.clone(),
            requests: requests.clone(),
            tenant_tokens,
        });
        tasks.spawn(crate::metrics::serve(
            metrics_listener,
            metrics_registry,
            stop_tasks.clone(),
        ));
        tracing::info!(address = %metrics_addr, "metrics on http://{metrics_addr}/metrics");
        {
            let (last_used, tenancy, stop) =
                (last_used.clone(), tenancy.clone(), stop_tasks.clone());
            let interval = settings.auth.last_used_flush;
            tasks.spawn(async move { last_used.run(tenancy, interval, stop).await });
        }
        tasks.spawn(
            limiter
                .clone()
                .run_background(settlements, stop_tasks.clone()),
        );
        tasks.spawn(claims.clone().run(pending_claims, stop_tasks.clone()));
        let archive_dir = settings
            .billing
            .archive_dir
            .clone()
            .unwrap_or_else(|| settings.data_dir.join("archive"));
        if settings.billing.raw_retention_months > 0 {
            let archiver = crate::billing::archive::Archiver::new(db.clone(), archive_dir.clone());
            tasks.spawn(
                archiver.run_retention(settings.billing.raw_retention_months, stop_tasks.clone()),
            );
        }
        tasks.spawn(usage_writer.run(
            settings.metering.ship_interval,
            settings.shutdown_grace,
            stop_tasks.clone(),
        ));
        match crate::webhooks::delivery::Deliverer::new(db.clone(), settings.webhooks.clone()) {
            Ok(deliverer) => {
                tasks.spawn(Arc::new(deliverer).run(stop_tasks.clone()));
            }
            Err(error) => tracing::error!(%error, "webhook deliveries are off"),
        }
        // One billing service for the watcher, the Billing API and balances.
        let billing = BillingService::new(db.clone(), &settings.billing);
        tasks.spawn(
            crate::webhooks::watcher::Watcher::new(
                db.clone(),
                billing.clone(),
                settings.webhooks.clone(),
            )
            .run(stop_tasks.clone()),
        );
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        for name in api::SERVICE_NAMES.iter().chain(std::iter::once(&"")) {
            health_reporter
                .set_service_status(*name, ServingStatus::Serving)
                .await;
        }

        let generation = Generation::new(
            limiter.clone(),
            registry.clone(),
            metering_handle,
            Arc::new(PriceCache::new(
                db.clone(),
                settings.billing.price_cache_ttl,
            )),
            claims.clone(),
        );
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let stop_accepting = CancellationToken::new();
        let (incoming, accept_loop) = crate::listener::accept(
            listener,
            &settings.server,
            tls.as_ref().map(|t| t.grpc_acceptor().clone()),
            connections.clone(),
            stop_accepting.clone(),
        );
        tasks.spawn(accept_loop);
        let server = Server::builder()
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            .http2_keepalive_interval(Some(settings.server.http2_keepalive_interval))
            .http2_keepalive_timeout(Some(settings.server.http2_keepalive_timeout))
            .layer(crate::traces::TraceLayer::new(
                crate::traces::Protocol::Grpc,
                requests.clone(),
            ))
            .layer(AuthLayer::new(
                authenticator.clone(),
                refusals.clone(),
                tls.as_ref().is_some_and(|t| t.admin_needs_client_cert()),
            ))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(InferenceServer::new(InferenceApi::new(generation.clone())))
            .add_service(TenantAdminServer::new(TenantAdminApi::new(tenancy.clone())))
            .add_service(BillingServer::new(BillingApi::new(
                db.clone(),
                tenancy.clone(),
                billing.clone(),
                limiter.clone(),
                &settings.billing,
                archive_dir,
            )))
            .add_service(WebhooksServer::new(WebhooksApi::new(
                crate::webhooks::WebhookService::new(db.clone(), &settings.webhooks),
                tenancy.clone(),
            )))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            });
        tokio::pin!(server);
        tracing::info!(address = %local_addr, "gateway listening");
        let http_api = crate::http::HttpApi::new(
            generation,
            crate::billing::balance::Balances::new(billing.clone(), limiter.clone()),
            authenticator,
            refusals,
            requests,
            crate::http::BodyBounds {
                max_bytes: settings.http_max_body_bytes,
                timeout: settings.http_body_timeout,
            },
        );
        let stop_http = CancellationToken::new();
        let mut http_server = http_listener.map(|listener| {
            tokio::spawn(crate::http::serve(
                listener,
                http_api.router(),
                tls.as_ref().map(|t| t.http_acceptor().clone()),
                settings.server.clone(),
                connections.clone(),
                stop_http.clone(),
            ))
        });
        if let Some(address) = http_addr {
            tracing::info!(%address, "http listening");
        }

        let grace = settings.shutdown_grace;
        // The shutdown signal, then health NOT_SERVING while still serving
        // for `shutdown_delay`: balancers that poll health move traffic away
        // before this replica stops accepting.
        let announce_shutdown = async {
            shutdown.await;
            tracing::info!(?grace, "shutting down: draining in-flight requests");
            for name in api::SERVICE_NAMES.iter().chain(std::iter::once(&"")) {
                health_reporter
                    .set_service_status(*name, ServingStatus::NotServing)
                    .await;
            }
            http_api.set_not_serving();
            tokio::time::sleep(settings.shutdown_delay).await;
        };
        // Serving ends with the shutdown signal, or with a component that
        // failed (the gRPC server or the HTTP API ending on their own count
        // as failed). Either way the one teardown below runs.
        let mut grpc_result = None;
        let mut http_ended = false;
        let serving: Result<(), ServeError> = tokio::select! {
            result = &mut server => {
                let failure = match result {
                    Err(e) => ServeError::from(e),
                    Ok(()) => ServeError::Component {
                        component: "the gRPC server",
                        reason: "it stopped serving".to_owned(),
                    },
                };
                grpc_result = Some(Ok(()));
                Err(failure)
            }
            ended = async {
                match http_server.as_mut() {
                    Some(http) => http.await,
                    None => std::future::pending().await,
                }
            } => {
                http_ended = true;
                Err(ServeError::Component {
                    component: "the HTTP API",
                    reason: match ended {
                        Err(e) => e.to_string(),
                        Ok(()) => "it stopped serving".to_owned(),
                    },
                })
            }
            Some(failure) = failures.recv() => Err(failure),
            () = announce_shutdown => Ok(()),
        };
        if let Err(failure) = &serving {
            tracing::error!(error = %failure, ?grace, "stopping: draining in-flight requests");
            for name in api::SERVICE_NAMES.iter().chain(std::iter::once(&"")) {
                health_reporter
                    .set_service_status(*name, ServingStatus::NotServing)
                    .await;
            }
            http_api.set_not_serving();
        }
        if http_ended {
            http_server = None;
        }
        let _ = stop_tx.send(());
        stop_accepting.cancel();
        stop_http.cancel();
        // Both ports drain together within the one grace period.
        let drained = async {
            let grpc = match grpc_result.take() {
                Some(done) => done,
                None => (&mut server).await,
            };
            if let Some(http) = http_server.as_mut() {
                let _ = http.await;
            }
            grpc
        };
        let drained = match tokio::time::timeout(grace, drained).await {
            Ok(result) => result.map_err(ServeError::from),
            Err(_) => {
                if let Some(http) = &http_server {
                    http.abort();
                }
                // gRPC handlers run on tasks of their own: their sequences
                // are ended instead, so the workers stop without waiting
                // for long generations.
                registry.abandon_running();
                tracing::warn!(
                    ?grace,
                    "grace period over with requests still running; ending them"
                );
                Ok(())
            }
        };
        // Workers finish what they run (recording its usage) before the
        // usage writer's last round.
        let models = registry.clone();
        let _ = tokio::task::spawn_blocking(move || models.stop()).await;
        // The spool answers a seal only after every earlier append's
        // completion has run, so the jobs' last settlements are queued
        // before the limiter's background task makes its last round.
        if let Err(e) = usage_barrier.flush().await {
            tracing::error!(error = %e, "usage spool: cannot flush at shutdown");
        }
        // Background tasks finish their last flush before the pool closes.
        stop_tasks.cancel();
        tasks.close();
        tasks.wait().await;
        db.close().await;
        tracing::info!("gateway stopped");
        serving.and(drained)
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("received SIGINT"),
        () = terminate => tracing::info!("received SIGTERM"),
    }
}
