//! Test harness: a gateway started in-process on 127.0.0.1:0 with its own
//! data directory, and a fresh PostgreSQL database per test.

use std::net::SocketAddr;
use std::time::Duration;

use ascend_gateway::app::{App, ServeError};
use ascend_gateway::config::Settings;
use secrecy::SecretString;
use sqlx::{AnyConnection, Connection, Executor};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// A running gateway, stopped when [`TestGateway::stop`] is called or the
/// test's runtime ends.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The OpenAI-compatible HTTP API.
    pub http_addr: SocketAddr,
    pub channel: Channel,
    /// The gateway's own database, for asserting on stored rows.
    pub db: ascend_gateway::store::Db,
    /// The served models, for asserting on queues and KV pools.
    pub models: ascend_gateway::serving::ModelRegistry,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
    _data_dir: TempDir,
}

/// A `tiny` model directory, created once per test run and shared.
pub fn tiny_model_dir() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("agw-tiny-model")
            .tempdir()
            .expect("temp dir")
            .keep();
        ascend_gateway::model::init::init_model_dir(ascend_gateway::model::Preset::Tiny, 7, &dir)
            .expect("model init --preset tiny");
        dir
    })
    .clone()
}

/// The model every test gateway serves: `tiny` on an emulated 910B.
pub fn tiny_model() -> ascend_gateway::serving::ModelSettings {
    ascend_gateway::serving::ModelSettings {
        id: "tiny".to_owned(),
        dir: Some(tiny_model_dir()),
        init_preset: None,
        max_output_tokens: 64,
        kv_max_blocks: Some(512),
        max_batch_size: 8,
        max_batch_tokens: 256,
        ..Default::default()
    }
}

/// The admin token every test gateway is configured with.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

/// Settings for a test gateway: port 0, a temporary data directory, the test
/// admin token.
pub fn test_settings(data_dir: &TempDir) -> Settings {
    let mut settings = Settings {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        http_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        data_dir: data_dir.path().to_owned(),
        shutdown_grace: Duration::from_secs(5),
        ..Settings::default()
    };
    settings.auth.admin_token = Some(SecretString::from(ADMIN_TOKEN));
    settings.models = vec![tiny_model()];
    settings
}

/// A request carrying `authorization: Bearer <token>`.
pub fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii header"),
    );
    request
}

/// A request with the admin token.
pub fn admin<T>(message: T) -> tonic::Request<T> {
    authed(message, ADMIN_TOKEN)
}

impl TestGateway {
    /// A gateway on the embedded SQLite default.
    pub async fn start() -> TestGateway {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let settings = test_settings(&data_dir);
        Self::start_with(settings, data_dir).await
    }

    pub async fn start_with(settings: Settings, data_dir: TempDir) -> TestGateway {
        Self::start_inner(settings, data_dir, None).await
    }

    /// A gateway whose listeners speak TLS with a certificate `ca_pem`
    /// signed for "localhost"; its channel trusts that CA.
    pub async fn start_with_tls(
        settings: Settings,
        data_dir: TempDir,
        ca_pem: &str,
    ) -> TestGateway {
        Self::start_inner(settings, data_dir, Some(ca_pem)).await
    }

    async fn start_inner(
        settings: Settings,
        data_dir: TempDir,
        ca_pem: Option<&str>,
    ) -> TestGateway {
        let app = App::build(settings).await.expect("gateway builds");
        let addr = app.local_addr();
        let metrics_addr = app.metrics_addr();
        let http_addr = app.http_addr().expect("test gateways serve HTTP");
        let db = app.db().clone();
        let models = app.models().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        let channel = match ca_pem {
            None => Channel::from_shared(format!("http://{addr}")).expect("endpoint"),
            Some(ca) => Channel::from_shared(format!("https://{addr}"))
                .expect("endpoint")
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                        .domain_name("localhost"),
                )
                .expect("tls"),
        }
        .connect()
        .await
        .expect("connect to the test gateway");
        TestGateway {
            addr,
            metrics_addr,
            http_addr,
            channel,
            db,
            models,
            stop: Some(stop),
            task,
            _data_dir: data_dir,
        }
    }

    /// Signals a graceful shutdown and waits for the server to finish.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.expect("server task")
    }
}

/// A PostgreSQL database created for one test and dropped after it.
pub struct PgTestDb {
    pub url: String,
    name: String,
    admin_url: String,
}

/// The server that test databases are created on.
fn pg_admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

impl PgTestDb {
    pub async fn create() -> PgTestDb {
        sqlx::any::install_default_drivers();
        let admin_url = pg_admin_url();
        let name = format!("agw_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = AnyConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| {
                panic!("PostgreSQL must run for these tests (TEST_DATABASE_URL={admin_url}): {e}")
            });
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create test database");
        conn.close().await.ok();
        let base = admin_url
            .rsplit_once('/')
            .map(|(base, _)| base.to_owned())
            .unwrap_or(admin_url.clone());
        PgTestDb {
            url: format!("{base}/{name}"),
            name,
            admin_url,
        }
    }

    pub fn secret_url(&self) -> SecretString {
        SecretString::from(self.url.clone())
    }

    /// Simulates a database outage for this test's database only: refuses
    /// new connections and ends the open ones (or lets them back in).
    pub async fn set_reachable(&self, reachable: bool) {
        let mut conn = AnyConnection::connect(&self.admin_url)
            .await
            .expect("admin connection");
        conn.execute(
            format!("ALTER DATABASE {} ALLOW_CONNECTIONS {reachable}", self.name).as_str(),
        )
        .await
        .expect("alter database");
        if !reachable {
            conn.execute(
                format!(
                    "SELECT pg_terminate_backend(pid)::text FROM pg_stat_activity WHERE datname = '{}'",
                    self.name
                )
                .as_str(),
            )
            .await
            .expect("terminate connections");
        }
        conn.close().await.ok();
    }
}

impl Drop for PgTestDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot block; a thread
        // with its own small runtime does the cleanup.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(async move {
                if let Ok(mut conn) = AnyConnection::connect(&admin_url).await {
                    let _ = conn
                        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                        .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// GET `/metrics` over a plain HTTP/1.1 connection.
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics port");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("response");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// Writes a config file serving the tiny model into `dir`; returns its path.
pub fn tiny_model_config(dir: &std::path::Path) -> std::path::PathBuf {
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[[models]]\nid = \"tiny\"\ndir = {:?}\nmax_output_tokens = 16\nkv_max_blocks = 128\n",
            tiny_model_dir()
        ),
    )
    .expect("config");
    config
}

/// The real `ascend-gateway serve` binary as a child process, its stderr
/// captured; for tests about crashes and logs.
pub struct GatewayProcess {
    pub child: std::process::Child,
    pub addr: String,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl GatewayProcess {
    /// Starts `serve` on a free port with the test admin token; `configure`
    /// adds flags and environment. Waits until it reports its address.
    pub fn spawn(configure: impl FnOnce(&mut std::process::Command)) -> GatewayProcess {
        use std::io::{BufRead, BufReader};
        use std::process::Stdio;
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ascend-gateway"));
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("ASCEND_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("ASCEND_METRICS_LISTEN", "127.0.0.1:0")
            .env("ASCEND_HTTP_LISTEN", "127.0.0.1:0")
            .env_remove("DATABASE_URL")
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .stdout(Stdio::null());
        configure(&mut command);
        let mut child = command.spawn().expect("start gateway");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("gateway listening")
                        && let Some(addr) = line.split("address=").nth(1)
                    {
                        let _ = addr_tx.send(addr.trim().to_owned());
                    }
                    let mut log = log.lock().expect("log");
                    log.push_str(&line);
                    log.push('\n');
                }
            })
        };
        let addr = match addr_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the gateway never reported its address:\n{}",
                    log.lock().expect("log")
                );
            }
        };
        GatewayProcess {
            child,
            addr,
            log,
            reader: Some(reader),
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect")
    }

    /// SIGKILL: no drain, no flush, no goodbye.
    pub fn kill9(&mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit (off the runtime, which must stay
    /// free to answer the server's GOAWAY) and for the log to be complete.
    pub async fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let mut child = self.child;
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .expect("join")
            .expect("gateway exits");
        if let Some(reader) = self.reader.take() {
            reader.join().expect("reader");
        }
        let log = self.log.lock().expect("log").clone();
        (status, log)
    }
}

/// A tenant with these limits and an `inference` key: (tenant id, key).
pub async fn tenant_with_limits(
    channel: &Channel,
    slug: &str,
    limits: ascend_gateway::api::pb::v1::TenantLimits,
) -> (String, String) {
    tenant_with(
        channel,
        ascend_gateway::api::pb::v1::CreateTenantRequest {
            slug: slug.to_owned(),
            limits: Some(limits),
            ..Default::default()
        },
    )
    .await
}

/// A tenant with default limits and an `inference` key: the key's secret.
pub async fn tenant_key(gateway: &TestGateway, slug: &str) -> String {
    let request = ascend_gateway::api::pb::v1::CreateTenantRequest {
        slug: slug.to_owned(),
        ..Default::default()
    };
    tenant_with(&gateway.channel, request).await.1
}

/// The tenant `request` creates, without a key: its id. Every test makes
/// its tenants through here or [`tenant_with`].
pub async fn create_tenant(
    channel: &Channel,
    request: ascend_gateway::api::pb::v1::CreateTenantRequest,
) -> String {
    use ascend_gateway::api::pb::v1::tenant_admin_client::TenantAdminClient;
    TenantAdminClient::new(channel.clone())
        .create_tenant(admin(request))
        .await
        .expect("create tenant")
        .into_inner()
        .id
}

/// The tenant `request` creates, with an `inference` key: (tenant id, key).
pub async fn tenant_with(
    channel: &Channel,
    request: ascend_gateway::api::pb::v1::CreateTenantRequest,
) -> (String, String) {
    use ascend_gateway::api::pb::v1::CreateApiKeyRequest;
    use ascend_gateway::api::pb::v1::tenant_admin_client::TenantAdminClient;
    let slug = request.slug.clone();
    let id = create_tenant(channel, request).await;
    let key = TenantAdminClient::new(channel.clone())
        .create_api_key(admin(CreateApiKeyRequest {
            tenant: slug,
            ..Default::default()
        }))
        .await
        .expect("key")
        .into_inner()
        .secret;
    (id, key)
}

/// A Redis server of this test's own, so stopping it disturbs no other test.
pub struct PrivateRedis {
    port: u16,
    child: std::process::Child,
}

impl PrivateRedis {
    pub fn start_on(port: u16) -> PrivateRedis {
        Self::start_with(port, &[])
    }

    /// On `port`, with more `redis-server` arguments (e.g. `--replicaof`).
    pub fn start_with(port: u16, extra: &[&str]) -> PrivateRedis {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "private redis did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        PrivateRedis { port, child }
    }

    pub fn start() -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        Self::start_on(port)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn stop(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to 10 s until `model` runs nothing and has `free_blocks` KV
/// blocks free again (its worker reports its gauges when it next goes idle).
pub async fn wait_until_idle(model: &ascend_gateway::serving::ServedModel, free_blocks: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while model.running() != 0 || model.kv_free_blocks() != free_blocks {
        assert!(
            std::time::Instant::now() < deadline,
            "slot or KV blocks not returned: running {}, free {} of {free_blocks}",
            model.running(),
            model.kv_free_blocks()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `CountTokens` as the tenant with `key`: the prompt's token count.
pub async fn token_count(
    channel: &Channel,
    key: &str,
    request: ascend_gateway::api::pb::v1::CountTokensRequest,
) -> u32 {
    ascend_gateway::api::pb::v1::inference_client::InferenceClient::new(channel.clone())
        .count_tokens(authed(request, key))
        .await
        .expect("count")
        .into_inner()
        .token_count
}
