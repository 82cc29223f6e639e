//! TLS for ascendctl's channel: an `https://` endpoint is verified against
//! `--ca-cert` (else the Mozilla roots), and `--client-cert` with
//! `--client-key` present a client certificate for mutual TLS.

use anyhow::{Context, bail};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::settings::Resolved;

fn read(flag: &str, path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("--{flag} {}: cannot read it", path.display()))
}

/// `endpoint` with TLS when it is `https://` (or TLS files were given).
pub fn configure(endpoint: Endpoint, resolved: &Resolved) -> anyhow::Result<Endpoint> {
    let tls = &resolved.tls;
    let https = resolved.endpoint.starts_with("https://");
    let any_file = tls.ca_cert.is_some() || tls.client_cert.is_some() || tls.client_key.is_some();
    if !https {
        if any_file {
            bail!(
                "--ca-cert, --client-cert and --client-key need an https:// endpoint, not {}",
                resolved.endpoint
            );
        }
        return Ok(endpoint);
    }
    let mut config = ClientTlsConfig::new();
    config = match &tls.ca_cert {
        Some(path) => config.ca_certificate(Certificate::from_pem(read("ca-cert", path)?)),
        None => config.with_webpki_roots(),
    };
    match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            config = config.identity(Identity::from_pem(
                read("client-cert", cert)?,
                read("client-key", key)?,
            ));
        }
        (None, None) => {}
        _ => bail!("--client-cert and --client-key go together"),
    }
    endpoint
        .tls_config(config)
        .context("the TLS settings for the endpoint are not usable")
}
