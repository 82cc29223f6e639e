//! TLS on the listeners with a test CA made here: secure gRPC and HTTPS
//! work and plaintext is refused; with a client CA the operator services
//! need a client certificate and inference does not; `ascendctl` over TLS;
//! a certificate rotated under an open connection; a broken reload keeps
//! the old certificate; bad files fail the start with exit 2 naming the
//! setting.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ascend_gateway::api::pb::v1::inference_client::InferenceClient;
use ascend_gateway::api::pb::v1::tenant_admin_client::TenantAdminClient;
use ascend_gateway::api::pb::v1::{GenerateRequest, ListModelsRequest, ListTenantsRequest};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::common::{ADMIN_TOKEN, TestGateway, admin, authed, test_settings};

/// A CA of the test's own.
fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA")
}

/// A certificate for `names` signed by `ca`, valid until `not_after`
/// (default: far away): (certificate PEM, key PEM).
fn leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    not_after: Option<(i32, u8, u8)>,
) -> (String, String) {
    let mut params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .expect("params");
    if let Some((y, m, d)) = not_after {
        params.not_before = rcgen::date_time_ymd(y - 1, m, d);
        params.not_after = rcgen::date_time_ymd(y, m, d);
    }
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, ca).expect("sign");
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// A channel over TLS trusting `ca_pem`, with an optional client identity.
pub(crate) async fn tls_channel(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Channel {
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        config = config.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(config)
        .expect("tls")
        .connect()
        .await
        .expect("a TLS connection")
}

/// The leaf certificate a new TLS handshake with `addr` presents.
async fn presented(addr: std::net::SocketAddr, ca_pem: &str, alpn: &[u8]) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("pem")).expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").expect("name"),
            stream,
        )
        .await
        .expect("handshake");
    let (_, session) = tls.get_ref();
    session.peer_certificates().expect("certificates")[0].to_vec()
}

fn der_of(pem: &str) -> Vec<u8> {
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("pem")
        .to_vec()
}

pub(crate) struct Secured {
    pub(crate) gateway: TestGateway,
    dir: tempfile::TempDir,
    server_issuer: CertifiedIssuer<'static, KeyPair>,
    pub(crate) server_ca: String,
    pub(crate) client: (String, String),
}

/// A gateway with TLS from a test CA, client certificates from another CA
/// required on the operator services, and quick reloads.
pub(crate) async fn secured() -> Secured {
    let dir = tempfile::tempdir().expect("dir");
    let server_ca = ca("server CA");
    let client_ca = ca("client CA");
    let (cert, key) = leaf(&server_ca, &["localhost", "127.0.0.1"], None);
    let data_dir = tempfile::tempdir().expect("data dir");
    let mut settings = test_settings(&data_dir);
    settings.tls.cert_file = Some(write(dir.path(), "server.pem", &cert));
    settings.tls.key_file = Some(write(dir.path(), "server.key", &key));
    settings.tls.client_ca_file = Some(write(dir.path(), "client-ca.pem", &client_ca.pem()));
    settings.tls.reload_interval = Duration::from_millis(100);
    let gateway = TestGateway::start_with_tls(settings, data_dir, &server_ca.pem()).await;
    Secured {
        gateway,
        server_ca: server_ca.pem(),
        server_issuer: server_ca,
        client: leaf(&client_ca, &["operator"], None),
        dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_secure_clients_refuses_plaintext_and_guards_the_operator_services() {
    let s = secured().await;
    let addr = s.gateway.addr;
    let operator = tls_channel(addr, &s.server_ca, Some((&s.client.0, &s.client.1))).await;
    let (_, key) =
        crate::common::tenant_with_limits(&operator, "over-tls", Default::default()).await;

    // Without a client certificate: inference yes, the operator services no.
    let anonymous = tls_channel(addr, &s.server_ca, None).await;
    InferenceClient::new(anonymous.clone())
        .list_models(authed(ListModelsRequest {}, &key))
        .await
        .expect("inference needs no client certificate");
    let refused = TenantAdminClient::new(anonymous)
        .list_tenants(admin(ListTenantsRequest::default()))
        .await
        .expect_err("the admin token alone is not enough");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("client certificate"),
        "{refused:?}"
    );

    // Plaintext gRPC on the TLS port gets nowhere.
    let plaintext = Channel::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    let refused = InferenceClient::new(plaintext)
        .list_models(authed(ListModelsRequest {}, &key))
        .await
        .expect_err("plaintext is refused");
    assert!(
        matches!(
            refused.code(),
            // The server closes the connection at the failed handshake.
            Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
        ),
        "{refused:?}"
    );

    // The HTTP API speaks TLS too (ALPN http/1.1 here).
    let http_addr = s.gateway.http_addr;
    assert_eq!(
        presented(http_addr, &s.server_ca, b"http/1.1").await,
        der_of(&std::fs::read_to_string(s.dir.path().join("server.pem")).expect("pem"))
    );

    // The certificate's expiry is a metric (for the 14-day alert).
    let metrics = crate::common::scrape(s.gateway.metrics_addr).await;
    let expiry: i64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ascend_gateway_tls_certificate_expiry_timestamp_seconds "))
        .expect("the expiry gauge")
        .trim()
        .parse()
        .expect("a number");
    assert!(
        expiry > ascend_gateway::store::now_us() / 1_000_000 + 365 * 86_400,
        "{expiry}"
    );

    // ascendctl over TLS, with and without its client certificate.
    let ca_file = write(s.dir.path(), "server-ca.pem", &s.server_ca);
    let cert_file = write(s.dir.path(), "operator.pem", &s.client.0);
    let key_file = write(s.dir.path(), "operator.key", &s.client.1);
    let run = move |with_identity: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ascendctl"));
        command
            .args(["--endpoint", &format!("https://{addr}"), "--ca-cert"])
            .arg(&ca_file)
            .args(["-o", "json", "tenant", "list"])
            .env("ASCENDCTL_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("XDG_CONFIG_HOME", "/nonexistent");
        if with_identity {
            command
                .arg("--client-cert")
                .arg(&cert_file)
                .arg("--client-key")
                .arg(&key_file);
        }
        command.output().expect("ascendctl")
    };
    let listed = tokio::task::spawn_blocking(move || (run(true), run(false)))
        .await
        .expect("join");
    assert!(
        listed.0.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.0.stderr)
    );
    assert!(String::from_utf8_lossy(&listed.0.stdout).contains("over-tls"));
    let stderr = String::from_utf8_lossy(&listed.1.stderr);
    assert!(
        !listed.1.status.success() && stderr.contains("client certificate"),
        "{stderr}"
    );
    s.gateway.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_reaches_new_connections_and_a_broken_one_is_not_used() {
    let s = secured().await;
    let addr = s.gateway.addr;
    let first = std::fs::read_to_string(s.dir.path().join("server.pem")).expect("pem");
    let operator = tls_channel(addr, &s.server_ca, Some((&s.client.0, &s.client.1))).await;
    let (_, tenant_key) =
        crate::common::tenant_with_limits(&operator, "rotating", Default::default()).await;
    let inference = tls_channel(addr, &s.server_ca, None).await;
    let mut stream = InferenceClient::new(inference.clone())
        .generate_stream(authed(
            GenerateRequest {
                model: "tiny".to_owned(),
                prompt: "a long answer".to_owned(),
                max_tokens: Some(48),
                ignore_eos: true,
                ..Default::default()
            },
            &tenant_key,
        ))
        .await
        .expect("stream")
        .into_inner();
    stream
        .message()
        .await
        .expect("first message")
        .expect("some");

    // A broken certificate file: logged, and the old certificate stays.
    std::fs::write(s.dir.path().join("server.pem"), "not a certificate").expect("write");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(presented(addr, &s.server_ca, b"h2").await, der_of(&first));

    // The new pair, key first, then the certificate: in between, the files
    // do not match and the old certificate stays in use.
    let (cert, key) = leaf(&s.server_issuer, &["localhost", "127.0.0.1"], None);
    std::fs::write(s.dir.path().join("server.key"), &key).expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(presented(addr, &s.server_ca, b"h2").await, der_of(&first));
    std::fs::write(s.dir.path().join("server.pem"), &cert).expect("write");
    let deadline = Instant::now() + Duration::from_secs(10);
    while presented(addr, &s.server_ca, b"h2").await != der_of(&cert) {
        assert!(
            Instant::now() < deadline,
            "the new certificate never reached new connections"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The stream opened before the rotation finishes on its connection, and
    // that connection keeps serving.
    let mut messages = 1;
    while let Some(message) = stream.message().await.expect("the stream goes on") {
        messages += 1;
        if matches!(
            message.event,
            Some(ascend_gateway::api::pb::v1::generate_stream_response::Event::Complete(_))
        ) {
            break;
        }
    }
    assert!(messages > 1);
    InferenceClient::new(inference)
        .list_models(authed(ListModelsRequest {}, &tenant_key))
        .await
        .expect("the connection from before the rotation keeps serving");
    s.gateway.stop().await.expect("stop");
}

/// Bad TLS files fail the real binary's start with exit 2 and one line
/// naming the setting.
#[tokio::test]
async fn bad_tls_files_fail_the_start_naming_the_setting() {
    let dir = tempfile::tempdir().expect("dir");
    let issuer = ca("server CA");
    let (cert, key) = leaf(&issuer, &["localhost"], None);
    let (_, other_key) = leaf(&issuer, &["localhost"], None);
    let (expired, expired_key) = leaf(&issuer, &["localhost"], Some((2020, 1, 1)));
    let cert = write(dir.path(), "cert.pem", &cert);
    let key = write(dir.path(), "key.pem", &key);
    let other_key = write(dir.path(), "other.key", &other_key);
    let expired = write(dir.path(), "expired.pem", &expired);
    let expired_key = write(dir.path(), "expired.key", &expired_key);
    let garbage = write(
        dir.path(),
        "garbage.pem",
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    );
    let missing = dir.path().join("missing.pem");
    let cases: Vec<(Option<&Path>, Option<&Path>, &str, &str)> = vec![
        (Some(&missing), Some(&key), "tls.cert_file", "cannot read"),
        (Some(&cert), Some(&missing), "tls.key_file", "cannot read"),
        (
            Some(&cert),
            Some(&other_key),
            "tls.key_file",
            "does not match",
        ),
        (
            Some(&expired),
            Some(&expired_key),
            "tls.cert_file",
            "expired",
        ),
        (Some(&garbage), Some(&key), "tls.cert_file", "PEM"),
        (Some(&cert), None, "tls", "tls.key_file"),
    ];
    for (cert_file, key_file, setting, reason) in cases {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ascend-gateway"));
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path())
            .env_remove("ASCEND_TLS_CERT_FILE")
            .env_remove("ASCEND_TLS_KEY_FILE");
        if let Some(path) = cert_file {
            command.env("ASCEND_TLS_CERT_FILE", path);
        }
        if let Some(path) = key_file {
            command.env("ASCEND_TLS_KEY_FILE", path);
        }
        let output = tokio::time::timeout(Duration::from_secs(60), command.output())
            .await
            .expect("exits at once")
            .expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{setting}: {stderr}");
        assert!(
            stderr.contains(setting) && stderr.contains(reason),
            "{setting}: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
}
