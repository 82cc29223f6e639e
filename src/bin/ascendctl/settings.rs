//! Where ascendctl finds its gateway, credential and TLS files: flags, then the
//! `ASCENDCTL_*` environment, then a TOML file (`--config`,
//! `ASCENDCTL_CONFIG`, or `$XDG_CONFIG_HOME/ascendctl/config.toml`, falling
//! back to `~/.config/ascendctl/config.toml`).

use std::path::PathBuf;

use anyhow::Context;
use serde::Deserialize;

pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:50051";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    endpoint: Option<String>,
    admin_token: Option<String>,
    ca_cert: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

/// TLS for an `https://` endpoint: the CA to trust (else the Mozilla roots)
/// and a client certificate for mutual TLS.
#[derive(Debug, Default, Clone)]
pub struct TlsFiles {
    pub ca_cert: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

pub struct Resolved {
    pub endpoint: String,
    pub admin_token: Option<String>,
    pub tls: TlsFiles,
}

fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
    Some(base.join("ascendctl").join("config.toml"))
}

/// Combines flag/env values (already merged by clap) with the config file.
pub fn resolve(
    endpoint: Option<String>,
    admin_token: Option<String>,
    tls: TlsFiles,
    config: Option<PathBuf>,
) -> anyhow::Result<Resolved> {
    let explicit = config.is_some();
    let file = match config.or_else(default_path) {
        Some(path) if explicit || path.exists() => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read the config file {}", path.display()))?;
            toml::from_str::<FileSettings>(&text)
                .with_context(|| format!("invalid config file {}", path.display()))?
        }
        _ => FileSettings::default(),
    };
    Ok(Resolved {
        endpoint: endpoint
            .or(file.endpoint)
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned()),
        admin_token: admin_token.or(file.admin_token),
        tls: TlsFiles {
            ca_cert: tls.ca_cert.or(file.ca_cert),
            client_cert: tls.client_cert.or(file.client_cert),
            client_key: tls.client_key.or(file.client_key),
        },
    })
}
