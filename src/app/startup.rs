//! The steps of [`App::build`](super::App::build) that are more than a
//! constructor call: the admin credential, the database, the listeners, the
//! quota seed and the models. Each maps its failure to a [`StartupError`]
//! naming the setting; none starts serving.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use super::StartupError;
use crate::auth::AdminCredential;
use crate::billing::BillingService;
use crate::config::Settings;
use crate::limits::{MonthToDate, QuotaSeed, SeedError};
use crate::metering::Grouping;
use crate::serving::{ModelRegistry, UsageSink};
use crate::store::{Db, StoreError};

/// The admin credential from the settings. The token is hashed now and the
/// plaintext dropped: from here on the process holds only its SHA-256.
pub(super) fn admin_credential(settings: &mut Settings) -> Option<AdminCredential> {
    let admin = match (
        settings.auth.admin_token.take(),
        &settings.auth.admin_token_sha256,
    ) {
        (Some(token), _) => Some(AdminCredential::from_token(&token)),
        (None, Some(hex)) => AdminCredential::from_sha256_hex(hex),
        (None, None) => None,
    };
    if admin.is_none() {
        tracing::warn!(
            "no admin token configured (auth.admin_token / ASCEND_ADMIN_TOKEN): TenantAdmin RPCs will be refused"
        );
    }
    admin
}

/// The data directory made private, the database connected and migrated.
pub(super) async fn open_database(settings: &Settings) -> Result<Db, StartupError> {
    // The data directory holds usage and the embedded database: the
    // gateway's user only.
    crate::private_fs::private_dir(&settings.data_dir).map_err(|source| StoreError::DataDir {
        path: settings.data_dir.clone(),
        source,
    })?;
    let db = Db::connect(settings).await?;
    let report = db.migrate().await?;
    tracing::info!(
        database = db.display_url(),
        applied = report.applied_now,
        total = report.total,
        "database ready"
    );
    Ok(db)
}

/// The bound sockets: gRPC, `/metrics`, and the HTTP API when on.
pub(super) struct Listeners {
    pub grpc: TcpListener,
    pub grpc_addr: SocketAddr,
    pub metrics: TcpListener,
    pub metrics_addr: SocketAddr,
    pub http: Option<TcpListener>,
    pub http_addr: Option<SocketAddr>,
}

impl Listeners {
    pub(super) async fn bind(settings: &Settings) -> Result<Listeners, StartupError> {
        let grpc = TcpListener::bind(settings.listen)
            .await
            .map_err(|source| StartupError::Bind {
                addr: settings.listen,
                hint: match source.kind() {
                    std::io::ErrorKind::AddrInUse => {
                        "another process holds this port; stop it or choose another with --listen / ASCEND_LISTEN (port 0 picks a free one)"
                    }
                    std::io::ErrorKind::PermissionDenied => {
                        "ports below 1024 need privileges; choose a higher port with --listen"
                    }
                    _ => "check that the address belongs to this machine",
                },
                source,
            })?;
        let grpc_addr = grpc.local_addr().map_err(|source| StartupError::Bind {
            addr: settings.listen,
            hint: "the socket has no local address",
            source,
        })?;
        let metrics_error = |source| StartupError::MetricsBind {
            addr: settings.metrics_listen,
            source,
        };
        let metrics = TcpListener::bind(settings.metrics_listen)
            .await
            .map_err(metrics_error)?;
        let metrics_addr = metrics.local_addr().map_err(metrics_error)?;
        let (http, http_addr) = match settings.http_listen {
            Some(addr) => {
                let http_error = |source| StartupError::HttpBind { addr, source };
                let listener = TcpListener::bind(addr).await.map_err(http_error)?;
                let bound = listener.local_addr().map_err(http_error)?;
                (Some(listener), Some(bound))
            }
            None => (None, None),
        };
        Ok(Listeners {
            grpc,
            grpc_addr,
            metrics,
            metrics_addr,
            http,
            http_addr,
        })
    }
}

/// Where monthly counters start on this node: the metered usage of the
/// month (tokens from the rollups) and, for a budget, its exact spend.
pub(super) fn quota_seed(db: Db, drafts: BillingService) -> QuotaSeed {
    Arc::new(move |tenant_id: String, since_us: i64, with_spend: bool| {
        let db = db.clone();
        let drafts = drafts.clone();
        Box::pin(async move {
            // An API key's own counters: no token quota per key, its
            // budget from its own usage.
            if let Some((tenant, key)) = crate::generation::parse_key_subject(&tenant_id) {
                let spend_nanos = match with_spend {
                    true => Some(
                        drafts
                            .key_month_spend(tenant, key)
                            .await
                            .map_err(SeedError::from)?
                            .max(0)
                            .unsigned_abs(),
                    ),
                    false => None,
                };
                return Ok(MonthToDate {
                    tokens: 0,
                    spend_nanos,
                });
            }
            let (_, total) = crate::metering::query::usage(
                &db,
                &tenant_id,
                since_us,
                i64::MAX,
                None,
                Grouping::Total,
            )
            .await
            .map_err(SeedError::from)?;
            // The budget counts each request at its exact cost: the
            // month's draft lines before their rounding.
            let spend_nanos = match with_spend {
                true => Some(
                    drafts
                        .month_spend(&tenant_id)
                        .await
                        .map_err(SeedError::from)?
                        .exact_nanos
                        .max(0)
                        .unsigned_abs(),
                ),
                false => None,
            };
            Ok(MonthToDate {
                tokens: total.prompt_tokens + total.completion_tokens,
                spend_nanos,
            })
        })
    })
}

/// Loads (or first creates) every model and starts its workers: heavy
/// compute, so off the runtime.
pub(super) async fn start_models(
    settings: &Settings,
    sink: Arc<dyn UsageSink>,
) -> Result<ModelRegistry, StartupError> {
    let (models, data_dir) = (settings.models.clone(), settings.data_dir.clone());
    let registry =
        tokio::task::spawn_blocking(move || ModelRegistry::start(&models, &data_dir, sink))
            .await
            .map_err(|e| crate::serving::ServingError::Thread {
                id: "registry".to_owned(),
                source: std::io::Error::other(e.to_string()),
            })??;
    Ok(registry)
}
