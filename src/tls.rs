//! TLS for the listeners: the certificate and key from `tls.cert_file` and
//! `tls.key_file`, reloaded when the files change (new handshakes get the
//! new certificate; open connections keep theirs), and optional mutual TLS
//! with clients verified against `tls.client_ca_file`.
//!
//! `tls.require_client_cert` says where a client certificate is required:
//! `admin` (the operator services, TenantAdmin, Billing and Webhooks: the
//! handshake accepts clients without one and the auth layer refuses them
//! there) or `all` (the handshake itself refuses a client without one).
//!
//! Knows files, certificates and rustls; nothing of gRPC services beyond
//! the policy's names.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

/// Where a client certificate is required, with `tls.client_ca_file`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClientCertPolicy {
    /// The operator services only (TenantAdmin, Billing, Webhooks).
    #[default]
    Admin,
    /// Every connection.
    All,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain (leaf first). Unset with `key_file`: plaintext.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// PEM CA certificates that client certificates must chain to; unset:
    /// no client certificates.
    pub client_ca_file: Option<PathBuf>,
    pub require_client_cert: ClientCertPolicy,
    /// How often the files are checked for a change.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl TlsSettings {
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }

    /// With TLS on, the default reload interval when none was given.
    fn reload_every(&self) -> Duration {
        if self.reload_interval.is_zero() {
            Duration::from_secs(10)
        } else {
            self.reload_interval
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A setting's file is missing, unreadable or wrong; `key` names it.
    #[error("{key} {}: {problem}", path.display())]
    File {
        key: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error("tls: {0}")]
    Config(String),
}

impl TlsError {
    /// The setting at fault, for the start-up error line.
    pub fn key(&self) -> &'static str {
        match self {
            TlsError::File { key, .. } => key,
            TlsError::Config(_) => "tls",
        }
    }
}

fn file_error(key: &'static str, path: &Path, problem: impl Into<String>) -> TlsError {
    TlsError::File {
        key,
        path: path.to_owned(),
        problem: problem.into(),
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| file_error(key, path, format!("cannot read it: {e}")))
}

/// A certificate and key read and checked: they parse, match, and the
/// leaf certificate is valid now.
struct Loaded {
    key: Arc<CertifiedKey>,
    not_after_unix: i64,
}

fn load_pair(cert_path: &Path, key_path: &Path) -> Result<Loaded, TlsError> {
    let cert_pem = read("tls.cert_file", cert_path)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            file_error(
                "tls.cert_file",
                cert_path,
                format!("not PEM certificates: {e}"),
            )
        })?;
    let Some(leaf) = chain.first() else {
        return Err(file_error(
            "tls.cert_file",
            cert_path,
            "holds no certificate",
        ));
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| {
        file_error(
            "tls.cert_file",
            cert_path,
            format!("not an X.509 certificate: {e}"),
        )
    })?;
    let validity = parsed.validity();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let not_after = validity.not_after.timestamp();
    if now > not_after {
        return Err(file_error(
            "tls.cert_file",
            cert_path,
            format!(
                "the certificate expired at {} (unix seconds {not_after})",
                validity.not_after
            ),
        ));
    }
    if now < validity.not_before.timestamp() {
        return Err(file_error(
            "tls.cert_file",
            cert_path,
            format!(
                "the certificate is not valid before {}",
                validity.not_before
            ),
        ));
    }
    let key_pem = read("tls.key_file", key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| file_error("tls.key_file", key_path, format!("no PEM private key: {e}")))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider.key_provider.load_private_key(key).map_err(|e| {
        file_error(
            "tls.key_file",
            key_path,
            format!("unusable private key: {e}"),
        )
    })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|_| {
        file_error(
            "tls.key_file",
            key_path,
            format!("does not match the certificate in {}", cert_path.display()),
        )
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        not_after_unix: not_after,
    })
}

/// The current certificate, swapped when the files change.
#[derive(Debug)]
struct Current {
    key: RwLock<Arc<CertifiedKey>>,
    not_after_unix: std::sync::atomic::AtomicI64,
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// The listeners' TLS: one certificate, two ALPN lists (gRPC speaks h2
/// only; the HTTP API h2 and HTTP/1.1).
pub struct TlsServer {
    settings: TlsSettings,
    current: Arc<Current>,
    grpc: tokio_rustls::TlsAcceptor,
    http: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer")
            .field("cert_file", &self.settings.cert_file)
            .finish_non_exhaustive()
    }
}

/// Checks the files `settings` names, as start-up does, without keeping
/// anything: the error names the setting.
pub fn check(settings: &TlsSettings) -> Result<(), TlsError> {
    TlsServer::load(settings).map(|_| ())
}

impl TlsServer {
    /// `None` when TLS is off.
    pub fn load(settings: &TlsSettings) -> Result<Option<Arc<TlsServer>>, TlsError> {
        let (cert, key) = match (&settings.cert_file, &settings.key_file) {
            (None, None) => {
                if settings.client_ca_file.is_some() {
                    return Err(TlsError::Config(
                        "tls.client_ca_file needs tls.cert_file and tls.key_file".to_owned(),
                    ));
                }
                return Ok(None);
            }
            (Some(cert), Some(key)) => (cert, key),
            (Some(_), None) => {
                return Err(TlsError::Config(
                    "tls.cert_file needs tls.key_file".to_owned(),
                ));
            }
            (None, Some(_)) => {
                return Err(TlsError::Config(
                    "tls.key_file needs tls.cert_file".to_owned(),
                ));
            }
        };
        let loaded = load_pair(cert, key)?;
        let current = Arc::new(Current {
            key: RwLock::new(loaded.key),
            not_after_unix: loaded.not_after_unix.into(),
        });
        let verifier = match &settings.client_ca_file {
            None => None,
            Some(path) => {
                let pem = read("tls.client_ca_file", path)?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| {
                        file_error(
                            "tls.client_ca_file",
                            path,
                            format!("not PEM certificates: {e}"),
                        )
                    })?;
                    roots.add(cert).map_err(|e| {
                        file_error(
                            "tls.client_ca_file",
                            path,
                            format!("not a CA certificate: {e}"),
                        )
                    })?;
                }
                if roots.is_empty() {
                    return Err(file_error(
                        "tls.client_ca_file",
                        path,
                        "holds no certificate",
                    ));
                }
                let builder = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::new(rustls::crypto::ring::default_provider()),
                );
                let builder = match settings.require_client_cert {
                    // The auth layer refuses the operator services without one.
                    ClientCertPolicy::Admin => builder.allow_unauthenticated(),
                    ClientCertPolicy::All => builder,
                };
                Some(
                    builder
                        .build()
                        .map_err(|e| file_error("tls.client_ca_file", path, e.to_string()))?,
                )
            }
        };
        let config = |alpn: &[&[u8]]| -> Result<tokio_rustls::TlsAcceptor, TlsError> {
            let builder = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
            let builder = match &verifier {
                Some(verifier) => builder.with_client_cert_verifier(verifier.clone()),
                None => builder.with_no_client_auth(),
            };
            let mut config = builder.with_cert_resolver(current.clone());
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
        };
        Ok(Some(Arc::new(TlsServer {
            grpc: config(&[b"h2"])?,
            http: config(&[b"h2", b"http/1.1"])?,
            settings: settings.clone(),
            current,
        })))
    }

    pub fn grpc_acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.grpc
    }

    pub fn http_acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.http
    }

    /// Whether the operator services need a verified client certificate.
    pub fn admin_needs_client_cert(&self) -> bool {
        self.settings.client_ca_file.is_some()
    }

    /// When the certificate in use expires, in Unix seconds.
    pub fn not_after_unix(&self) -> i64 {
        self.current
            .not_after_unix
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reloads the certificate and key whenever either file's modification
    /// time changes, until `stop`. A reload that fails keeps the old
    /// certificate and logs why.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let (Some(cert), Some(key)) = (&self.settings.cert_file, &self.settings.key_file) else {
            return;
        };
        let stamp = || {
            let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            (modified(cert), modified(key))
        };
        let mut seen = stamp();
        let mut tick = tokio::time::interval(self.settings.reload_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let now = stamp();
            if now == seen {
                continue;
            }
            match load_pair(cert, key) {
                Ok(loaded) => {
                    seen = now;
                    *self.current.key.write().unwrap_or_else(|e| e.into_inner()) = loaded.key;
                    self.current
                        .not_after_unix
                        .store(loaded.not_after_unix, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(cert = %cert.display(), "TLS certificate reloaded");
                }
                // Tried again next interval (the files may be mid-rotation).
                Err(error) => {
                    tracing::error!(%error, "TLS certificate not reloaded; the previous one stays in use");
                }
            }
        }
    }
}
