//! A gateway started inside the bench process, on the embedded SQLite
//! default with a throwaway data directory and admin token, so one command
//! measures a configuration from scratch; and the tenants and keys a run
//! needs, created over the admin API as an operator would.
//!
//! Knows how to start the application and call the admin API; not the load.

use std::net::SocketAddr;
use std::path::PathBuf;

use secrecy::SecretString;
use tokio::sync::oneshot;
use tonic::transport::Channel;

use super::BenchError;
use crate::api::pb::v1::tenant_admin_client::TenantAdminClient;
use crate::api::pb::v1::{CreateApiKeyRequest, CreateTenantRequest, TenantLimits};
use crate::app::App;
use crate::config::Settings;
use crate::serving::ModelSettings;

/// A tenant to create for a run.
#[derive(Debug, Clone)]
pub struct TenantSpec {
    pub slug: String,
    pub weight: u32,
    pub limits: TenantLimits,
}

/// A running in-process gateway.
pub struct SelfHosted {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The HTTP API's address.
    pub http_addr: Option<SocketAddr>,
    admin_token: String,
    data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), crate::app::ServeError>>,
}

/// Connects `count` separate HTTP/2 connections to `endpoint`.
pub async fn connect(endpoint: &str, count: usize) -> Result<Vec<Channel>, BenchError> {
    let mut channels = Vec::new();
    for _ in 0..count.max(1) {
        let channel = Channel::from_shared(endpoint.to_owned())
            .map_err(|e| BenchError::Endpoint {
                endpoint: endpoint.to_owned(),
                message: e.to_string(),
            })?
            .connect()
            .await
            .map_err(|e| BenchError::Endpoint {
                endpoint: endpoint.to_owned(),
                message: e.to_string(),
            })?;
        channels.push(channel);
    }
    Ok(channels)
}

fn bearer<T>(message: T, token: &str) -> Result<tonic::Request<T>, BenchError> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {token}")
        .parse()
        .map_err(|_| BenchError::Admin("the token is not a valid header value".to_owned()))?;
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

impl SelfHosted {
    /// Starts a gateway serving `models` on loopback ports chosen by the OS,
    /// on the embedded SQLite default.
    pub async fn start(models: Vec<ModelSettings>) -> Result<SelfHosted, BenchError> {
        Self::start_with(models, None, None).await
    }

    /// As [`SelfHosted::start`], on the database at `database_url` and with
    /// limits in the Redis at `redis_url`, when given.
    pub async fn start_with(
        models: Vec<ModelSettings>,
        database_url: Option<String>,
        redis_url: Option<String>,
    ) -> Result<SelfHosted, BenchError> {
        let admin_token = uuid::Uuid::new_v4().simple().to_string();
        let data_dir = std::env::temp_dir().join(format!(
            "agw-bench-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        ));
        let mut settings = Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            data_dir: data_dir.clone(),
            models,
            ..Settings::default()
        };
        settings.auth.admin_token = Some(SecretString::from(admin_token.clone()));
        settings.database.url = database_url.map(SecretString::from);
        if let Some(url) = redis_url {
            settings.redis.url = Some(SecretString::from(url));
            // A prefix of this run's own: earlier runs' counters stay apart.
            settings.limits.redis_prefix = format!("agwbench:{}:", uuid::Uuid::now_v7().simple());
        }
        let app = App::build(settings)
            .await
            .map_err(|e| BenchError::Gateway(crate::error::one_line(&e)))?;
        let addr = app.local_addr();
        let metrics_addr = app.metrics_addr();
        let http_addr = app.http_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        Ok(SelfHosted {
            addr,
            metrics_addr,
            http_addr,
            admin_token,
            data_dir,
            stop: Some(stop),
            task,
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates the tenants, each with one inference key; returns the keys
    /// in the same order.
    pub async fn provision(&self, tenants: &[TenantSpec]) -> Result<Vec<String>, BenchError> {
        provision(&self.endpoint(), &self.admin_token, tenants).await
    }

    /// Drains and stops the gateway and removes its data directory.
    pub async fn stop(mut self) -> Result<(), BenchError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = (&mut self.task).await;
        let _ = std::fs::remove_dir_all(&self.data_dir);
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BenchError::Gateway(e.to_string())),
            Err(e) => Err(BenchError::Gateway(e.to_string())),
        }
    }
}

/// Creates the tenants on the gateway at `endpoint` with the admin token,
/// each with one inference key; returns the keys in the same order.
pub async fn provision(
    endpoint: &str,
    admin_token: &str,
    tenants: &[TenantSpec],
) -> Result<Vec<String>, BenchError> {
    let channel = connect(endpoint, 1).await?.remove(0);
    let mut admin = TenantAdminClient::new(channel);
    let failed = |e: tonic::Status| BenchError::Admin(e.message().to_owned());
    let mut keys = Vec::new();
    for tenant in tenants {
        let create = CreateTenantRequest {
            slug: tenant.slug.clone(),
            scheduling_weight: Some(tenant.weight),
            limits: Some(tenant.limits.clone()),
            ..Default::default()
        };
        admin
            .create_tenant(bearer(create, admin_token)?)
            .await
            .map_err(failed)?;
        let key = CreateApiKeyRequest {
            tenant: tenant.slug.clone(),
            name: "bench".to_owned(),
            ..Default::default()
        };
        let created = admin
            .create_api_key(bearer(key, admin_token)?)
            .await
            .map_err(failed)?;
        keys.push(created.into_inner().secret);
    }
    Ok(keys)
}
