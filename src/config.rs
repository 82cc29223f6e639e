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
    ("ASCEND_SHUTDOWN_GRACE", "shutdown_grace"),
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
    ("ASCEND_LOG_FORMAT", "log.format"),
    ("ASCEND_LOG", "log.filter"),
];

/// Every setting of a running gateway. Built by [`Settings::load`]; passed by
/// reference to whatever needs a part of it, never rebuilt piecemeal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address the gRPC server binds. Port 0 picks a free port; the bound
    /// address is logged.
    pub listen: SocketAddr,
    /// Where the embedded database and other local state live.
    pub data_dir: PathBuf,
    /// How long a graceful shutdown waits for in-flight requests.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub log: LogSettings,
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
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// Shared rate-limit state across gateway replicas; unset means limits
    /// are kept in process.
    #[serde(serialize_with = "serialize_redacted_url")]
    pub url: Option<SecretString>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `info,ascend_gateway=debug`.
    /// `RUST_LOG`, when set, wins.
    pub filter: String,
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
            data_dir: PathBuf::from("data"),
            shutdown_grace: Duration::from_secs(30),
            database: DatabaseSettings::default(),
            redis: RedisSettings::default(),
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
            if let Some(value) = env(var) {
                figment = figment.merge(Serialized::global(key, env_value(value)));
            }
        }
        for (var, key) in ENV_VARS
            .iter()
            .filter(|(var, _)| var.starts_with("ASCEND_"))
        {
            if let Some(value) = env(var) {
                figment = figment.merge(Serialized::global(key, env_value(value)));
            }
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
        if self.database.max_connections == 0 {
            return Err(ConfigError::Invalid {
                key: "database.max_connections",
                problem: "must be at least 1".to_owned(),
            });
        }
        if self.database.connect_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                key: "database.connect_timeout",
                problem: "must be positive, e.g. \"5s\"".to_owned(),
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
fn env_value(value: String) -> figment::value::Value {
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

fn serialize_redacted_url<S: serde::Serializer>(
    url: &Option<SecretString>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match url {
        Some(url) => serializer.serialize_some(&redact_url(url.expose_secret())),
        None => serializer.serialize_none(),
    }
}
