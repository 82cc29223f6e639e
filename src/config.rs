//! The one typed [`Settings`] of the gateway, layered from built-in defaults,
//! a TOML file, `ASCEND_*` environment variables and command-line flags (each
//! layer overrides the previous), and validated once at start.
//!
//! Owns the names of every setting and environment variable, and the checks
//! that make a bad configuration stop start-up with one line naming the
//! setting and the fix. It knows nothing of what the settings drive.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// Environment variables read into settings, with the key each one sets.
///
/// An explicit list rather than "every `ASCEND_*` variable": hosts with the
/// CANN toolkit installed export `ASCEND_HOME_PATH`, `ASCEND_OPP_PATH` and
/// friends, which must not be mistaken for gateway settings.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("ASCEND_LISTEN", "listen"),
    ("ASCEND_DATA_DIR", "data_dir"),
    ("ASCEND_METRICS_LISTEN", "metrics_listen"),
    ("ASCEND_HTTP_LISTEN", "http_listen"),
    ("ASCEND_HTTP_MAX_BODY_BYTES", "http_max_body_bytes"),
    ("ASCEND_HTTP_BODY_TIMEOUT", "http_body_timeout"),
    ("ASCEND_SHUTDOWN_GRACE", "shutdown_grace"),
    ("ASCEND_SHUTDOWN_DELAY", "shutdown_delay"),
    ("ASCEND_DATABASE_URL", "database.url"),
    ("DATABASE_URL", "database.url"),
    (
        "ASCEND_DATABASE_MAX_CONNECTIONS",
        "database.max_connections",
    ),
    (
        "ASCEND_DATABASE_CONNECT_TIMEOUT",
        "database.connect_timeout",
    ),
    ("ASCEND_REDIS_URL", "redis.url"),
    ("REDIS_URL", "redis.url"),
    ("ASCEND_ADMIN_TOKEN", "auth.admin_token"),
    ("ASCEND_ADMIN_TOKEN_SHA256", "auth.admin_token_sha256"),
    ("ASCEND_AUTH_CACHE_TTL", "auth.cache_ttl"),
    ("ASCEND_DEFAULT_PRICE_PLAN", "tenancy.default_price_plan"),
    ("ASCEND_BILLING_GRACE_PERIOD", "billing.grace_period"),
    ("ASCEND_LIMITS_REDIS_FAILURE", "limits.redis_failure"),
    ("ASCEND_LIMITS_REPLICAS", "limits.replicas"),
    ("ASCEND_WEBHOOKS_ALLOW_PRIVATE", "webhooks.allow_private"),
    ("ASCEND_TLS_CERT_FILE", "tls.cert_file"),
    ("ASCEND_TLS_KEY_FILE", "tls.key_file"),
    ("ASCEND_TLS_CLIENT_CA_FILE", "tls.client_ca_file"),
    ("ASCEND_LOG_FORMAT", "log.format"),
    ("ASCEND_LOG", "log.filter"),
    // OpenTelemetry's standard names. The signal-specific ones come after
    // the general ones, so they win.
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "otel.endpoint"),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "otel.traces_endpoint"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "otel.protocol"),
    ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "otel.protocol"),
    ("OTEL_EXPORTER_OTLP_HEADERS", "otel.headers"),
    ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "otel.headers"),
    ("OTEL_SERVICE_NAME", "otel.service_name"),
    ("OTEL_RESOURCE_ATTRIBUTES", "otel.resource_attributes"),
    ("OTEL_TRACES_SAMPLER", "otel.traces_sampler"),
    ("OTEL_TRACES_SAMPLER_ARG", "otel.traces_sampler_arg"),
    ("OTEL_BSP_SCHEDULE_DELAY", "otel.bsp_schedule_delay"),
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "otel.timeout"),
    ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "otel.timeout"),
    ("OTEL_SDK_DISABLED", "otel.sdk_disabled"),
];

/// Every setting of a running gateway. Built by [`Settings::load`]; passed by
/// reference to whatever needs a part of it, never rebuilt piecemeal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address the gRPC server binds. Port 0 picks a free port; the bound
    /// address is logged.
    pub listen: SocketAddr,
    /// Address of the HTTP admin port serving Prometheus `/metrics`.
    pub metrics_listen: SocketAddr,
    /// Address of the OpenAI-compatible HTTP API (HTTP/1.1 and cleartext
    /// HTTP/2 on one port). Port 0 picks a free port; the empty string
    /// turns it off.
    #[serde(with = "optional_addr")]
    pub http_listen: Option<SocketAddr>,
    /// Largest request body the HTTP API reads; a larger one is answered 413.
    pub http_max_body_bytes: usize,
    /// How long the HTTP API waits for a request's whole body once its
    /// headers have arrived; a body slower than this is answered 408, so a
    /// client trickling bytes cannot hold a connection and a task forever.
    #[serde(with = "humantime_serde")]
    pub http_body_timeout: Duration,
    /// Where the embedded database and other local state live.
    pub data_dir: PathBuf,
    /// How long a graceful shutdown waits for in-flight requests.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long a shutting-down gateway keeps accepting after its health
    /// turned NOT_SERVING, so load balancers that poll health move traffic
    /// away before it stops accepting.
    #[serde(with = "humantime_serde")]
    pub shutdown_delay: Duration,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub auth: AuthSettings,
    pub tenancy: TenancySettings,
    pub limits: crate::limits::LimitSettings,
    pub metering: crate::metering::MeteringSettings,
    pub billing: crate::billing::BillingSettings,
    pub idempotency: crate::idempotency::IdempotencySettings,
    pub server: crate::listener::ServerSettings,
    pub webhooks: crate::webhooks::WebhookSettings,
    /// TLS for the gRPC and HTTP listeners; off (plaintext) by default.
    pub tls: crate::tls::TlsSettings,
    /// OpenTelemetry traces over OTLP; off unless an endpoint is set.
    pub otel: crate::traces::OtelSettings,
    /// The served models (`[[models]]` tables).
    pub models: Vec<crate::serving::ModelSettings>,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// The operator's bootstrap admin token (at least 24 characters). Read
    /// once at start and kept only as its SHA-256. Unset (and no
    /// `admin_token_sha256`): admin RPCs are refused.
    #[serde(serialize_with = "serialize_redacted")]
    pub admin_token: Option<SecretString>,
    /// Alternatively, the token's SHA-256 in hex, so the token itself never
    /// reaches the server's configuration.
    pub admin_token_sha256: Option<String>,
    /// How long a key lookup is cached. Bounds how long another node keeps
    /// accepting a key revoked, or a tenant suspended, elsewhere; the node
    /// that made the change applies it at once. 0 disables the cache.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// Most keys cached at once.
    pub cache_capacity: usize,
    /// While the database cannot be reached, a key whose lookup is older
    /// than `cache_ttl` by at most this much is still judged by that lookup,
    /// so serving continues through a database outage (revocations made
    /// elsewhere meanwhile wait for the database to return). 0 disables.
    #[serde(with = "humantime_serde")]
    pub stale_if_unavailable: Duration,
    /// How often key last-use times are written to the database.
    #[serde(with = "humantime_serde")]
    pub last_used_flush: Duration,
    /// Failed authentications a client address may make at once...
    pub failed_auth_burst: u32,
    /// ...and per minute after that; past them every request from the
    /// address is refused (RESOURCE_EXHAUSTED) until its budget refills.
    pub failed_auth_per_minute: u32,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            admin_token: None,
            admin_token_sha256: None,
            cache_ttl: Duration::from_secs(5),
            cache_capacity: 100_000,
            stale_if_unavailable: Duration::from_secs(600),
            last_used_flush: Duration::from_secs(30),
            failed_auth_burst: 20,
            failed_auth_per_minute: 60,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenancySettings {
    /// Price plan of tenants created without one.
    pub default_price_plan: String,
}

impl Default for TenancySettings {
    fn default() -> Self {
        TenancySettings {
            default_price_plan: "standard".to_owned(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `postgres://…` for production, `sqlite://…` for a chosen file; unset
    /// means the embedded SQLite file under `data_dir`.
    #[serde(serialize_with = "serialize_redacted_url")]
    pub url: Option<SecretString>,
    pub max_connections: u32,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a running query waits for a connection: what a request
    /// waits at most on an unreachable database before its fallback (the
    /// stale key cache, local claims) or UNAVAILABLE.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// Shared rate-limit state across gateway replicas; unset means limits
    /// are kept in process.
    #[serde(serialize_with = "serialize_redacted_url")]
    pub url: Option<SecretString>,
    /// How long one limit decision waits for Redis before the
    /// `limits.redis_failure` policy applies: every request waits at most
    /// this on an unreachable Redis (then, for a second, not at all).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            url: None,
            timeout: Duration::from_millis(250),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `info,ascend_gateway=debug`.
    /// `RUST_LOG`, when set, wins (and is validated like the setting).
    pub filter: String,
}

impl LogSettings {
    /// The bench commands' log: warnings and the bench's own progress, or
    /// `RUST_LOG` when it is set and valid.
    pub fn for_bench() -> LogSettings {
        let filter = std::env::var("RUST_LOG")
            .ok()
            .filter(|spec| tracing_subscriber::EnvFilter::try_new(spec).is_ok())
            .unwrap_or_else(|| "warn,ascend_gateway::bench=info".to_owned());
        LogSettings {
            filter,
            ..LogSettings::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines, coloured on a terminal.
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            http_listen: Some(SocketAddr::from(([127, 0, 0, 1], 8000))),
            http_max_body_bytes: 4 * 1024 * 1024,
            http_body_timeout: Duration::from_secs(30),
            data_dir: PathBuf::from("data"),
            shutdown_grace: Duration::from_secs(30),
            shutdown_delay: Duration::ZERO,
            database: DatabaseSettings::default(),
            redis: RedisSettings::default(),
            auth: AuthSettings::default(),
            tenancy: TenancySettings::default(),
            limits: crate::limits::LimitSettings::default(),
            metering: crate::metering::MeteringSettings::default(),
            billing: crate::billing::BillingSettings::default(),
            idempotency: crate::idempotency::IdempotencySettings::default(),
            server: crate::listener::ServerSettings::default(),
            webhooks: crate::webhooks::WebhookSettings::default(),
            tls: crate::tls::TlsSettings::default(),
            otel: crate::traces::OtelSettings::default(),
            models: vec![crate::serving::ModelSettings::default()],
            log: LogSettings::default(),
        }
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            url: None,
            max_connections: 16,
            connect_timeout: Duration::from_secs(5),
            acquire_timeout: Duration::from_secs(1),
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Human,
            filter: "info".to_owned(),
        }
    }
}

/// Values given as command-line flags; `None` leaves the lower layers alone.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlagOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
}

/// A configuration that cannot be used. Its message is one line that names
/// the setting and says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: cannot read it: {source}; check --config / ASCEND_CONFIG")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error("invalid setting `{key}`: {problem}")]
    Invalid { key: &'static str, problem: String },
}

impl Settings {
    /// Layers defaults, the optional TOML file, the environment and the flags,
    /// then validates the result.
    pub fn load(file: Option<&Path>, flags: &FlagOverrides) -> Result<Settings, ConfigError> {
        Self::load_with_env(file, flags, |name| std::env::var(name).ok())
    }

    /// As [`Settings::load`], with the environment given as a lookup
    /// function, so tests need not touch the process environment.
    pub fn load_with_env(
        file: Option<&Path>,
        flags: &FlagOverrides,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(path) = file {
            // Read it ourselves: figment treats a missing file as empty, and
            // a missing config file must be an error, not a silent default.
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Unreadable {
                path: path.to_owned(),
                source,
            })?;
            figment = figment.merge(Toml::string(&text));
        }
        // Plain DATABASE_URL / REDIS_URL first, so the ASCEND_ names win.
        for (var, key) in ENV_VARS
            .iter()
            .filter(|(var, _)| !var.starts_with("ASCEND_"))
        {
            let value = env(var);
            if var.starts_with("OTEL_") {
                // OpenTelemetry's rules: an empty value is unset, and
                // OTEL_SDK_DISABLED is true only when it says "true".
                let Some(value) = value.filter(|v| !v.trim().is_empty()) else {
                    continue;
                };
                let value = match *key {
                    "otel.sdk_disabled" => {
                        figment::value::Value::from(value.trim().eq_ignore_ascii_case("true"))
                    }
                    _ => env_value(key, value),
                };
                figment = figment.merge(Serialized::global(key, value));
            } else if let Some(value) = value {
                figment = figment.merge(Serialized::global(key, env_value(key, value)));
            }
        }
        for (var, key) in ENV_VARS
            .iter()
            .filter(|(var, _)| var.starts_with("ASCEND_"))
        {
            if let Some(value) = env(var) {
                figment = figment.merge(Serialized::global(key, env_value(key, value)));
            }
        }
        // The tracing ecosystem's own variable wins over the gateway's; one
        // it cannot read is ignored, as tracing's own subscribers do.
        if let Some(value) = env("RUST_LOG")
            && tracing_subscriber::EnvFilter::try_new(&value).is_ok()
        {
            figment = figment.merge(Serialized::global("log.filter", value));
        }
        for (key, value) in flags.as_keys() {
            figment = figment.merge(Serialized::global(key, value));
        }
        let settings: Settings = figment
            .extract()
            .map_err(|e| ConfigError::Parse(describe(&e, file, flags, &env)))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks the values that types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.database.url {
            let url = url.expose_secret();
            if !is_postgres_url(url) && !url.starts_with("sqlite:") {
                return Err(ConfigError::Invalid {
                    key: "database.url",
                    problem: format!(
                        "unsupported URL {}; use postgres://user@host:5432/db or sqlite://path/to/file.db, or leave it unset for the embedded default",
                        redact_url(url)
                    ),
                });
            }
        }
        if let Some(url) = &self.redis.url {
            let url = url.expose_secret();
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(ConfigError::Invalid {
                    key: "redis.url",
                    problem: format!(
                        "unsupported URL {}; use redis://host:6379 (or rediss:// for TLS)",
                        redact_url(url)
                    ),
                });
            }
        }
        if let Some(token) = &self.auth.admin_token
            && token.expose_secret().len() < crate::auth::MIN_ADMIN_TOKEN_LEN
        {
            return Err(ConfigError::Invalid {
                key: "auth.admin_token",
                problem: format!(
                    "at least {} characters; generate one with `openssl rand -hex 32`",
                    crate::auth::MIN_ADMIN_TOKEN_LEN
                ),
            });
        }
        if let Some(hex) = &self.auth.admin_token_sha256
            && crate::auth::AdminCredential::from_sha256_hex(hex).is_none()
        {
            return Err(ConfigError::Invalid {
                key: "auth.admin_token_sha256",
                problem: "64 hex digits, e.g. the output of `printf %s TOKEN | sha256sum`"
                    .to_owned(),
            });
        }
        if self.auth.admin_token.is_some() && self.auth.admin_token_sha256.is_some() {
            return Err(ConfigError::Invalid {
                key: "auth.admin_token",
                problem: "set either auth.admin_token or auth.admin_token_sha256, not both"
                    .to_owned(),
            });
        }
        if self.auth.failed_auth_burst == 0 || self.auth.failed_auth_per_minute == 0 {
            return Err(ConfigError::Invalid {
                key: "auth.failed_auth_burst",
                problem:
                    "auth.failed_auth_burst and auth.failed_auth_per_minute must be at least 1"
                        .to_owned(),
            });
        }
        if self.auth.last_used_flush.is_zero() {
            return Err(ConfigError::Invalid {
                key: "auth.last_used_flush",
                problem: "must be positive, e.g. \"30s\"".to_owned(),
            });
        }
        if let Some((key, problem)) = self.webhooks.problem() {
            return Err(ConfigError::Invalid { key, problem });
        }
        if let Some((key, problem)) = self.otel.problem() {
            return Err(ConfigError::Invalid { key, problem });
        }
        // Read here, before any side effect: a wrong file fails the start
        // with the setting named.
        if let Err(error) = crate::tls::check(&self.tls) {
            return Err(ConfigError::Invalid {
                key: error.key(),
                problem: error.to_string(),
            });
        }
        let mut ids = std::collections::HashSet::new();
        for model in &self.models {
            if model.id.is_empty() || !ids.insert(model.id.as_str()) {
                return Err(ConfigError::Invalid {
                    key: "models",
                    problem: format!("model ids must be unique and non-empty (`{}`)", model.id),
                });
            }
            if let Some(problem) = model.problem() {
                return Err(ConfigError::Invalid {
                    key: "models",
                    problem: format!("model `{}`: {problem}", model.id),
                });
            }
        }
        if self.metering.batch_size == 0 {
            return Err(ConfigError::Invalid {
                key: "metering.batch_size",
                problem: "at least 1".to_owned(),
            });
        }
        if self.metering.ship_interval.is_zero() {
            return Err(ConfigError::Invalid {
                key: "metering.ship_interval",
                problem: "must be positive, e.g. \"200ms\"".to_owned(),
            });
        }
        if self.billing.grace_period > Duration::from_secs(90 * 24 * 3600) {
            return Err(ConfigError::Invalid {
                key: "billing.grace_period",
                problem: "at most 90d; invoices must close eventually".to_owned(),
            });
        }
        if self.billing.price_cache_ttl > Duration::from_secs(3600) {
            return Err(ConfigError::Invalid {
                key: "billing.price_cache_ttl",
                problem: "at most 1h; quotes must follow price changes".to_owned(),
            });
        }
        if self.idempotency.retention < Duration::from_secs(1)
            || self.idempotency.retention > Duration::from_secs(30 * 86_400)
        {
            return Err(ConfigError::Invalid {
                key: "idempotency.retention",
                problem: "between 1s and 30d, e.g. \"24h\"".to_owned(),
            });
        }
        if self.idempotency.in_progress_ttl < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                key: "idempotency.in_progress_ttl",
                problem: "at least 1s, and longer than the longest request".to_owned(),
            });
        }
        if self.server.max_connections == 0 {
            return Err(ConfigError::Invalid {
                key: "server.max_connections",
                problem: "at least 1".to_owned(),
            });
        }
        for (key, value) in [
            ("server.handshake_timeout", self.server.handshake_timeout),
            (
                "server.http2_keepalive_interval",
                self.server.http2_keepalive_interval,
            ),
            (
                "server.http2_keepalive_timeout",
                self.server.http2_keepalive_timeout,
            ),
        ] {
            if value < Duration::from_millis(10) || value > Duration::from_secs(3600) {
                return Err(ConfigError::Invalid {
                    key,
                    problem: "between 10ms and 1h, e.g. \"10s\"".to_owned(),
                });
            }
        }
        let rate = self.billing.tenant_requests_per_second;
        if !(rate.is_finite()
            && (crate::tenancy::Limits::MIN_REQUESTS_PER_SECOND
                ..=crate::tenancy::Limits::MAX_REQUESTS_PER_SECOND)
                .contains(&rate))
        {
            return Err(ConfigError::Invalid {
                key: "billing.tenant_requests_per_second",
                problem: "a number from 0.0000116 (one a day) to 1000000".to_owned(),
            });
        }
        if !(1..=crate::tenancy::Limits::MAX_BURST).contains(&self.billing.tenant_burst) {
            return Err(ConfigError::Invalid {
                key: "billing.tenant_burst",
                problem: "between 1 and 1000000".to_owned(),
            });
        }
        if self.redis.timeout < Duration::from_millis(10)
            || self.redis.timeout > Duration::from_secs(30)
        {
            return Err(ConfigError::Invalid {
                key: "redis.timeout",
                problem: "between 10ms and 30s, e.g. \"250ms\"".to_owned(),
            });
        }
        if self.limits.replicas == 0 {
            return Err(ConfigError::Invalid {
                key: "limits.replicas",
                problem: "at least 1".to_owned(),
            });
        }
        if self.limits.lease_ttl < Duration::from_secs(1)
            || self.limits.lease_ttl > Duration::from_secs(3600)
        {
            return Err(ConfigError::Invalid {
                key: "limits.lease_ttl",
                problem: "between 1s and 1h (leases are renewed every third of it while their request runs; a crashed gateway's slots come back after it)".to_owned(),
            });
        }
        if self.database.max_connections == 0 {
            return Err(ConfigError::Invalid {
                key: "database.max_connections",
                problem: "must be at least 1".to_owned(),
            });
        }
        if self.database.acquire_timeout < Duration::from_millis(10)
            || self.database.acquire_timeout > Duration::from_secs(60)
        {
            return Err(ConfigError::Invalid {
                key: "database.acquire_timeout",
                problem: "between 10ms and 60s, e.g. \"1s\"".to_owned(),
            });
        }
        if self.database.connect_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                key: "database.connect_timeout",
                problem: "must be positive, e.g. \"5s\"".to_owned(),
            });
        }
        if !(1024..=256 * 1024 * 1024).contains(&self.http_max_body_bytes) {
            return Err(ConfigError::Invalid {
                key: "http_max_body_bytes",
                problem: "between 1024 and 268435456 (256 MiB)".to_owned(),
            });
        }
        if self.http_body_timeout < Duration::from_millis(100)
            || self.http_body_timeout > Duration::from_secs(3600)
        {
            return Err(ConfigError::Invalid {
                key: "http_body_timeout",
                problem: "between 100ms and 1h, e.g. \"30s\"".to_owned(),
            });
        }
        if self
            .http_listen
            .is_some_and(|http| http == self.listen && http.port() != 0)
        {
            return Err(ConfigError::Invalid {
                key: "http_listen",
                problem: format!(
                    "{} is also `listen`, the gRPC port; choose another port",
                    self.listen
                ),
            });
        }
        if self.shutdown_delay > Duration::from_secs(60) {
            return Err(ConfigError::Invalid {
                key: "shutdown_delay",
                problem: "at most 60s, e.g. \"5s\"".to_owned(),
            });
        }
        if self.shutdown_grace > Duration::from_secs(3600) {
            return Err(ConfigError::Invalid {
                key: "shutdown_grace",
                problem: "at most 1h; a shutdown that waits longer looks like a hang".to_owned(),
            });
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                key: "data_dir",
                problem: "must not be empty; use a directory path such as \"data\"".to_owned(),
            });
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.filter).map_err(|e| {
            ConfigError::Invalid {
                key: "log.filter",
                problem: format!("{e}; use a filter such as \"info\" or \"info,sqlx=warn\""),
            }
        })?;
        Ok(())
    }
}

impl FlagOverrides {
    /// The flags as dotted setting keys, for the top layer.
    fn as_keys(&self) -> Vec<(&'static str, figment::value::Value)> {
        let mut keys = Vec::new();
        let mut put = |key: &'static str, value: Option<String>| {
            if let Some(value) = value {
                keys.push((key, figment::value::Value::from(value)));
            }
        };
        put("listen", self.listen.map(|a| a.to_string()));
        put(
            "data_dir",
            self.data_dir.as_ref().map(|p| p.display().to_string()),
        );
        put("database.url", self.database_url.clone());
        put("redis.url", self.redis_url.clone());
        put(
            "log.format",
            self.log_format.map(|f| match f {
                LogFormat::Human => "human".to_owned(),
                LogFormat::Json => "json".to_owned(),
            }),
        );
        keys
    }
}

/// One line for a figment error: the setting's dotted key, where its value
/// came from (the highest layer that sets it), and what is wrong.
fn describe(
    error: &figment::Error,
    file: Option<&Path>,
    flags: &FlagOverrides,
    env: &impl Fn(&str) -> Option<String>,
) -> String {
    let key = error.path.join(".");
    let problem = error.kind.to_string();
    if key.is_empty() {
        return problem;
    }
    let flag = flags
        .as_keys()
        .into_iter()
        .any(|(flag_key, _)| flag_key == key)
        .then(|| format!("--{}", key.replace(['.', '_'], "-")));
    let env_var = ENV_VARS
        .iter()
        .filter(|(_, env_key)| *env_key == key)
        .map(|(var, _)| *var)
        .filter(|var| env(var).is_some())
        .min_by_key(|var| !var.starts_with("ASCEND_"));
    let source = flag
        .or(env_var.map(str::to_owned))
        .or(file.map(|path| path.display().to_string()));
    match source {
        Some(source) => format!("setting `{key}` (from {source}): {problem}"),
        None => format!("setting `{key}`: {problem}"),
    }
}

/// Environment values are strings; figment's `Env` would guess types (so
/// `ASCEND_LOG=1` became a number), but every setting parses from a string.
/// Settings set by environment variables whose type is a number: their
/// value is read as one (an environment variable is always text).
const NUMERIC_ENV_KEYS: &[&str] = &[
    "database.max_connections",
    "limits.replicas",
    "http_max_body_bytes",
    "otel.bsp_schedule_delay",
    "otel.timeout",
];

/// An address that may be turned off: the empty string is `None`.
mod optional_addr {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(addr: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match addr {
            Some(addr) => s.collect_str(addr),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!(
                "{text:?} is not an address such as \"127.0.0.1:8000\" (port 0 picks a free port; the empty string turns it off)"
            ))
        })
    }
}

/// Settings set by environment variables whose type is a boolean: `true`
/// or `false` (any case) is read as one; anything else stays text and is
/// refused naming the variable.
const BOOLEAN_ENV_KEYS: &[&str] = &["webhooks.allow_private"];

fn env_value(key: &str, value: String) -> figment::value::Value {
    if NUMERIC_ENV_KEYS.contains(&key)
        && let Ok(number) = value.trim().parse::<u64>()
    {
        return figment::value::Value::from(number);
    }
    if BOOLEAN_ENV_KEYS.contains(&key)
        && let Ok(flag) = value.trim().to_ascii_lowercase().parse::<bool>()
    {
        return figment::value::Value::from(flag);
    }
    figment::value::Value::from(value)
}

fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// A URL with any password replaced by `***`, safe to log or print.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            let password_hidden = if userinfo.contains(':') { ":***" } else { "" };
            format!(
                "{}{}{}{}",
                &url[..scheme_end + 3],
                user,
                password_hidden,
                &rest[at..]
            )
        }
        None => url.to_owned(),
    }
}

pub(crate) fn serialize_redacted<S: serde::Serializer>(
    secret: &Option<SecretString>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match secret {
        Some(_) => serializer.serialize_some("***"),
        None => serializer.serialize_none(),
    }
}

fn serialize_redacted_url<S: serde::Serializer>(
    url: &Option<SecretString>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match url {
        Some(url) => serializer.serialize_some(&redact_url(url.expose_secret())),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn rust_log_wins_over_the_gateways_own_filter_unless_unreadable() {
        let env = &[("ASCEND_LOG", "warn"), ("RUST_LOG", "debug,h2=info")];
        let settings = load(
            Some("[log]\nfilter = \"error\"\n"),
            &FlagOverrides::default(),
            env,
        )
        .expect("load");
        assert_eq!(settings.log.filter, "debug,h2=info");
        let ignored = load(None, &FlagOverrides::default(), &[("RUST_LOG", "[=")])
            .expect("a filter RUST_LOG cannot hold is ignored");
        assert_eq!(ignored.log.filter, "info");
    }

    fn load(
        toml: Option<&str>,
        flags: &FlagOverrides,
        env: &'static [(&'static str, &'static str)],
    ) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("gateway.toml");
        if let Some(text) = toml {
            std::fs::write(&path, text).expect("write config");
        }
        Settings::load_with_env(toml.map(|_| path.as_path()), flags, env_of(env))
    }

    #[test]
    fn defaults_are_valid_and_embedded() {
        let settings = load(None, &FlagOverrides::default(), &[]).expect("defaults load");
        assert_eq!(settings.listen.to_string(), "127.0.0.1:50051");
        assert!(
            settings.database.url.is_none(),
            "embedded SQLite by default"
        );
    }

    #[test]
    fn layers_override_in_order_file_env_flags() {
        let file = "listen = \"127.0.0.1:7000\"\n[database]\nurl = \"sqlite://from-file.db\"\n";
        let from_file = load(Some(file), &FlagOverrides::default(), &[]).expect("load");
        assert_eq!(from_file.listen.port(), 7000);

        let env = &[
            ("ASCEND_LISTEN", "127.0.0.1:7001"),
            ("DATABASE_URL", "postgres://plain@h/db"),
            ("ASCEND_DATABASE_URL", "postgres://ascend@h/db"),
        ];
        let from_env = load(Some(file), &FlagOverrides::default(), env).expect("load");
        assert_eq!(from_env.listen.port(), 7001);
        let url = from_env.database.url.as_ref().expect("url");
        assert_eq!(
            url.expose_secret(),
            "postgres://ascend@h/db",
            "ASCEND_ name wins"
        );

        let flags = FlagOverrides {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 7002))),
            database_url: Some("postgres://flag@h/db".to_owned()),
            ..FlagOverrides::default()
        };
        let from_flags = load(Some(file), &flags, env).expect("load");
        assert_eq!(from_flags.listen.port(), 7002);
        let url = from_flags.database.url.as_ref().expect("url");
        assert_eq!(url.expose_secret(), "postgres://flag@h/db");
    }

    #[test]
    fn numeric_settings_read_from_the_environment() {
        let env = &[
            ("ASCEND_LIMITS_REPLICAS", "3"),
            ("ASCEND_DATABASE_MAX_CONNECTIONS", "32"),
        ];
        let settings = load(None, &FlagOverrides::default(), env).expect("load");
        assert_eq!(settings.limits.replicas, 3);
        assert_eq!(settings.database.max_connections, 32);
        let bad = load(
            None,
            &FlagOverrides::default(),
            &[("ASCEND_LIMITS_REPLICAS", "three")],
        )
        .expect_err("not a number");
        assert!(bad.to_string().contains("limits.replicas"), "{bad}");
    }

    #[test]
    fn cann_toolkit_variables_are_not_settings() {
        let env = &[
            (
                "ASCEND_HOME_PATH",
                "/usr/local/Ascend/ascend-toolkit/latest",
            ),
            ("ASCEND_OPP_PATH", "/usr/local/Ascend/opp"),
            ("ASCEND_AICPU_PATH", "/usr/local/Ascend"),
        ];
        load(None, &FlagOverrides::default(), env).expect("CANN variables are ignored");
    }

    #[test]
    fn billing_grace_period_from_file_and_env() {
        let settings = load(None, &FlagOverrides::default(), &[]).expect("defaults");
        assert_eq!(
            settings.billing.grace_period,
            Duration::from_secs(3 * 86_400)
        );
        let from_file = load(
            Some("[billing]\ngrace_period = \"5d\"\n"),
            &FlagOverrides::default(),
            &[],
        )
        .expect("load");
        assert_eq!(
            from_file.billing.grace_period,
            Duration::from_secs(5 * 86_400)
        );
        let from_env = load(
            None,
            &FlagOverrides::default(),
            &[("ASCEND_BILLING_GRACE_PERIOD", "12h")],
        )
        .expect("load");
        assert_eq!(
            from_env.billing.grace_period,
            Duration::from_secs(12 * 3600)
        );
        let err = load(
            None,
            &FlagOverrides::default(),
            &[("ASCEND_BILLING_GRACE_PERIOD", "400d")],
        )
        .expect_err("too long");
        assert!(err.to_string().contains("billing.grace_period"), "{err}");
    }

    #[test]
    fn webhook_settings_come_from_env_and_are_checked() {
        let default = load(None, &FlagOverrides::default(), &[]).expect("load");
        assert!(
            !default.webhooks.allow_private,
            "private targets are refused by default"
        );
        let allowed = load(
            None,
            &FlagOverrides::default(),
            &[("ASCEND_WEBHOOKS_ALLOW_PRIVATE", "true")],
        )
        .expect("load");
        assert!(allowed.webhooks.allow_private);
        for env in [
            &[("ASCEND_WEBHOOKS_ALLOW_PRIVATE", "maybe")],
            &[("ASCEND_WEBHOOKS_ALLOW_PRIVATE", "")],
        ] {
            let err = load(None, &FlagOverrides::default(), env).expect_err("not a boolean");
            assert!(
                err.to_string().contains("ASCEND_WEBHOOKS_ALLOW_PRIVATE"),
                "{err}"
            );
        }
        let mut settings = Settings::default();
        settings.webhooks.budget_thresholds = vec![50, 50];
        let err = settings.validate().expect_err("a repeated threshold");
        assert!(
            err.to_string().contains("webhooks.budget_thresholds"),
            "{err}"
        );
        settings.webhooks.budget_thresholds = vec![0, 101];
        assert!(settings.validate().is_err());
        settings.webhooks.budget_thresholds = vec![80];
        settings.webhooks.timeout = Duration::ZERO;
        let err = settings.validate().expect_err("zero timeout");
        assert!(err.to_string().contains("webhooks.timeout"), "{err}");
    }

    #[test]
    fn a_served_as_mixture_of_experts_reads_from_the_file() {
        let file = "[[models]]\nid = \"m\"\n[models.served_as]\nname = \"moe\"\n\
                    total_params = 175000000000\nactive_params = 10000000000\ndevices = 8\n\
                    tp_efficiency = 0.9\nlayers = 61\n[models.served_as.moe]\n\
                    routed_experts = 256\nexperts_per_token = 8\nshared_experts = 1\n\
                    dense_layers = 3\n";
        let settings = load(Some(file), &FlagOverrides::default(), &[]).expect("load");
        let shape = settings.models[0].served_as.as_ref().expect("served_as");
        let moe = shape.moe.expect("moe");
        assert_eq!((moe.routed_experts, moe.experts_per_token), (256, 8));
        assert_eq!(shape.dims().expect("dims").hidden, 3840);
    }

    #[test]
    fn the_example_file_loads() {
        load(
            Some(include_str!("../gateway.example.toml")),
            &FlagOverrides::default(),
            &[],
        )
        .expect("gateway.example.toml is valid");
    }

    #[test]
    fn prefix_cache_settings_are_checked_naming_the_model() {
        for (share, ok) in [
            ("0.0", true),
            ("1.0", true),
            ("1.5", false),
            ("-0.1", false),
        ] {
            let file = format!("[[models]]\nid = \"m\"\nprefix_cache_max_share = {share}\n");
            let result = load(Some(&file), &FlagOverrides::default(), &[]);
            match (result, ok) {
                (Ok(_), true) => {}
                (Err(e), false) => {
                    let text = e.to_string();
                    assert!(
                        text.contains("prefix_cache_max_share") && text.contains("`m`"),
                        "{text}"
                    );
                }
                (other, _) => panic!("share {share}: {other:?}"),
            }
        }
        let err = load(
            Some("[[models]]\nid = \"m\"\nworkers = 65\n"),
            &FlagOverrides::default(),
            &[],
        )
        .expect_err("too many workers");
        assert!(err.to_string().contains("at most 64"), "{err}");
        let file = "[[models]]\nid = \"m\"\nprefix_cache = false\ncache_affinity_margin = 2\n";
        let settings = load(Some(file), &FlagOverrides::default(), &[]).expect("load");
        assert!(!settings.models[0].prefix_cache);
        assert_eq!(settings.models[0].cache_affinity_margin, 2);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load(
            Some("[database]\nurll = \"x\"\n"),
            &FlagOverrides::default(),
            &[],
        )
        .expect_err("unknown key");
        assert!(err.to_string().contains("urll"), "{err}");
    }

    #[test]
    fn bad_env_value_names_setting_and_variable() {
        let err = load(
            None,
            &FlagOverrides::default(),
            &[("ASCEND_LISTEN", "nope")],
        )
        .expect_err("bad address");
        let message = err.to_string();
        assert!(message.contains("`listen`"), "{message}");
        assert!(message.contains("ASCEND_LISTEN"), "{message}");
    }

    #[test]
    fn unsupported_database_scheme_is_refused_without_leaking_password() {
        let err = load(
            None,
            &FlagOverrides::default(),
            &[("DATABASE_URL", "mysql://root:hunter2@h/db")],
        )
        .expect_err("mysql is not supported");
        let message = err.to_string();
        assert!(message.contains("database.url"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn missing_config_file_is_an_error_not_a_default() {
        let flags = FlagOverrides::default();
        let err =
            Settings::load_with_env(Some(Path::new("/nonexistent/gw.toml")), &flags, |_| None)
                .expect_err("missing file");
        assert!(matches!(err, ConfigError::Unreadable { .. }));
    }

    #[test]
    fn secrets_do_not_print() {
        let settings = load(
            None,
            &FlagOverrides::default(),
            &[("DATABASE_URL", "postgres://u:hunter2@h/db")],
        )
        .expect("load");
        assert!(!format!("{settings:?}").contains("hunter2"));
        let shown = toml::to_string(&settings).expect("serialize");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("postgres://u:***@h/db"), "{shown}");
    }

    #[test]
    fn redact_url_hides_only_the_password() {
        assert_eq!(
            redact_url("postgres://u:p@h:5432/db?x=1"),
            "postgres://u:***@h:5432/db?x=1"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("redis://:p@h:6379"), "redis://:***@h:6379");
        assert_eq!(redact_url("sqlite://data/a.db"), "sqlite://data/a.db");
    }
}
