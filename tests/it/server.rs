//! The server over real gRPC: health, reflection (v1 and v1alpha), the
//! contract's services, answers for RPCs not built yet, graceful shutdown.

use ascend_gateway::api::SERVICE_NAMES;
use ascend_gateway::api::pb::v1::billing_client::BillingClient;
use ascend_gateway::api::pb::v1::tenant_admin_client::TenantAdminClient;
use ascend_gateway::api::pb::v1::{
    CreateApiKeyRequest, CreateTenantRequest, ExportRequest, ListInvoicesRequest,
};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::common::{TestGateway, admin, authed};

#[tokio::test]
async fn health_reports_serving_for_the_server_and_each_service() {
    let gateway = TestGateway::start().await;
    let mut health = HealthClient::new(gateway.channel.clone());
    for service in std::iter::once("").chain(SERVICE_NAMES.iter().copied()) {
        let status = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap_or_else(|e| panic!("health of {service:?}: {e}"))
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "service {service:?}");
    }
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn reflection_v1_lists_the_three_services_and_resolves_their_files() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let gateway = TestGateway::start().await;
    let mut client = ServerReflectionClient::new(gateway.channel.clone());
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("ascend.gateway.v1.Billing".to_owned()),
        MessageRequest::FileByFilename("google/protobuf/timestamp.proto".to_owned()),
    ]
    .map(|message| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    });
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("reflection stream")
        .into_inner();

    let listed = match responses
        .next()
        .await
        .expect("a response")
        .expect("ok")
        .message_response
    {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
        }
        other => panic!("expected a service list, got {other:?}"),
    };
    for name in SERVICE_NAMES.iter().chain(&["grpc.health.v1.Health"]) {
        assert!(
            listed.iter().any(|s| s == name),
            "{name} missing from {listed:?}"
        );
    }
    for what in ["Billing's file", "an imported well-known type"] {
        match responses
            .next()
            .await
            .expect("a response")
            .expect("ok")
            .message_response
        {
            Some(MessageResponse::FileDescriptorResponse(files)) => {
                assert!(!files.file_descriptor_proto.is_empty(), "{what}: no file")
            }
            other => panic!("{what}: expected a file descriptor, got {other:?}"),
        }
    }
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn reflection_v1alpha_lists_the_three_services() {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    let gateway = TestGateway::start().await;
    let mut client = ServerReflectionClient::new(gateway.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("reflection stream")
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = responses
        .next()
        .await
        .expect("a response")
        .expect("ok")
        .message_response
    else {
        panic!("expected a service list");
    };
    for name in SERVICE_NAMES {
        assert!(
            list.service.iter().any(|s| s.name == *name),
            "{name} missing"
        );
    }
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn every_billing_rpc_is_implemented() {
    let gateway = TestGateway::start().await;
    let mut admin_client = TenantAdminClient::new(gateway.channel.clone());
    admin_client
        .create_tenant(admin(CreateTenantRequest {
            slug: "early".to_owned(),
            ..Default::default()
        }))
        .await
        .expect("create tenant");
    let key = admin_client
        .create_api_key(admin(CreateApiKeyRequest {
            tenant: "early".to_owned(),
            scopes: vec!["billing:read".to_owned()],
            ..Default::default()
        }))
        .await
        .expect("create key")
        .into_inner()
        .secret;

    let listed = BillingClient::new(gateway.channel.clone())
        .list_invoices(authed(ListInvoicesRequest::default(), &key))
        .await
        .expect("ListInvoices answers")
        .into_inner();
    assert!(listed.invoices.is_empty(), "no usage, no invoices");

    let status = BillingClient::new(gateway.channel.clone())
        .export_usage_events(admin(ExportRequest::default()))
        .await
        .expect_err("a period is required");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("`period`"), "{status:?}");

    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn graceful_shutdown_releases_the_port() {
    let gateway = TestGateway::start().await;
    let addr = gateway.addr;
    gateway.stop().await.expect("clean stop");
    tokio::net::TcpListener::bind(addr)
        .await
        .expect("the port is free again after shutdown");
}

/// Reads until the server closes the connection (true) or `within` passes.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: std::time::Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let until = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// Sockets that never finish the HTTP/2 preface are closed after
/// `server.handshake_timeout`; past `server.max_connections` a connection
/// is closed at once; a peer that stops answering keepalive pings is
/// dropped; and real clients are served throughout once a slot is free.
#[tokio::test]
async fn idle_sockets_are_closed_and_connections_are_capped() {
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    let dir = tempfile::tempdir().expect("dir");
    let mut settings = crate::common::test_settings(&dir);
    settings.server.handshake_timeout = Duration::from_millis(300);
    settings.server.max_connections = 4;
    settings.server.http2_keepalive_interval = Duration::from_millis(200);
    settings.server.http2_keepalive_timeout = Duration::from_millis(200);
    let gateway = TestGateway::start_with(settings, dir).await;
    // The harness's own channel holds one slot.

    // Silent, trickling and wrong-protocol sockets: all closed in time.
    let mut silent = tokio::net::TcpStream::connect(gateway.addr)
        .await
        .expect("tcp");
    let mut trickle = tokio::net::TcpStream::connect(gateway.addr)
        .await
        .expect("tcp");
    trickle
        .write_all(b"PRI * HTTP/2.0\r\n")
        .await
        .expect("half a preface");
    let mut http1 = tokio::net::TcpStream::connect(gateway.addr)
        .await
        .expect("tcp");
    http1
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("http/1.1");
    for (name, socket) in [
        ("silent", &mut silent),
        ("trickle", &mut trickle),
        ("http1", &mut http1),
    ] {
        assert!(
            closed_within(socket, Duration::from_secs(3)).await,
            "{name} stayed open"
        );
    }

    // The cap: three more held open (the harness channel is the fourth),
    // then one past it is closed at once.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut socket = tokio::net::TcpStream::connect(gateway.addr)
            .await
            .expect("tcp");
        socket
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .expect("preface");
        held.push(socket);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut over = tokio::net::TcpStream::connect(gateway.addr)
        .await
        .expect("tcp");
    assert!(
        closed_within(&mut over, Duration::from_millis(500)).await,
        "a connection past the cap is closed at once"
    );
    let body = crate::common::scrape(gateway.metrics_addr).await;
    assert!(
        body.lines().any(
            |l| l.starts_with("ascend_gateway_connections_refused_over_cap_total")
                && !l.ends_with(" 0")
        ),
        "{body}"
    );

    // Held sockets sent a preface but never answer SETTINGS or PING: the
    // keepalive timeout closes them, and their slots come back.
    for socket in &mut held {
        assert!(
            closed_within(socket, Duration::from_secs(5)).await,
            "keepalive closed it"
        );
    }
    let mut health = HealthClient::new(gateway.channel.clone());
    health
        .check(HealthCheckRequest::default())
        .await
        .expect("the harness channel was served throughout");
    let fresh = tonic::transport::Channel::from_shared(format!("http://{}", gateway.addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("a slot is free again");
    HealthClient::new(fresh)
        .check(HealthCheckRequest::default())
        .await
        .expect("served");
    let body = crate::common::scrape(gateway.metrics_addr).await;
    let handshake_failures = body
        .lines()
        .find_map(|l| l.strip_prefix("ascend_gateway_connections_handshake_failures_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("handshake failures counted");
    assert!(handshake_failures >= 3.0, "{handshake_failures}");
    gateway.stop().await.expect("clean stop");
}
