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

/// One teardown for every way serving ends: a component that fails stops
/// the gateway as a shutdown signal would. Health turns NOT_SERVING, the
/// stream in flight runs to its end, the workers stop and the usage reaches
/// the database before `run_until` returns the failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_component_still_drains_in_flight_requests_and_flushes_usage() {
    use ascend_gateway::api::pb::v1::generate_stream_response::Event;

    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut settings = crate::common::test_settings(&data_dir);
    settings.models.push(crate::generate::slow_model());
    let app = ascend_gateway::app::App::build(settings)
        .await
        .expect("build");
    let addr = app.local_addr();
    let failures = app.failure_reporter();
    let run = tokio::spawn(app.run_until(std::future::pending()));
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let (_, key) = crate::common::tenant_with_limits(&channel, "failing", Default::default()).await;
    let mut stream = slow_stream(&channel, &key, "in-flight-at-failure", 24).await;

    failures.report("a test component", "injected failure");
    let mut health = HealthClient::new(channel.clone());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status);
        if status
            .as_ref()
            .is_ok_and(|s| *s == ServingStatus::NotServing as i32)
            || status.is_err()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health still SERVING"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // The stream in flight is drained, not cut.
    let mut completion_tokens = None;
    while let Some(message) = stream.message().await.expect("the stream runs to its end") {
        if let Some(Event::Complete(done)) = message.event {
            completion_tokens = done.usage.map(|u| u.completion_tokens);
        }
    }
    assert_eq!(completion_tokens, Some(24));
    let error = run
        .await
        .expect("join")
        .expect_err("the failure is the result");
    assert!(error.to_string().contains("injected failure"), "{error}");

    // Its usage reached the database before run_until returned.
    let rows = usage_rows(
        &data_dir.path().join("ascend-gateway.db"),
        "in-flight-at-failure",
    )
    .await;
    assert_eq!(rows.len(), 1);
}

/// A streamed generation of `max_tokens` on the slow model (device pace),
/// past its first message.
async fn slow_stream(
    channel: &tonic::transport::Channel,
    key: &str,
    request_id: &str,
    max_tokens: u32,
) -> tonic::Streaming<ascend_gateway::api::pb::v1::GenerateStreamResponse> {
    let mut stream =
        ascend_gateway::api::pb::v1::inference_client::InferenceClient::new(channel.clone())
            .generate_stream(authed(
                ascend_gateway::api::pb::v1::GenerateRequest {
                    model: "slow".to_owned(),
                    prompt: "keep going".to_owned(),
                    max_tokens: Some(max_tokens),
                    ignore_eos: true,
                    request_id: request_id.to_owned(),
                    ..Default::default()
                },
                key,
            ))
            .await
            .expect("stream")
            .into_inner();
    stream.message().await.expect("first").expect("a message");
    stream
}

/// (finish reason, completion tokens) of every usage row of `request_id`
/// (any attempt) in the SQLite database at `path`, after its gateway stopped.
async fn usage_rows(path: &std::path::Path, request_id: &str) -> Vec<(String, i64)> {
    let db = sqlx::sqlite::SqlitePoolOptions::new()
        .connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("open the database");
    sqlx::query_as(
        "SELECT finish_reason, completion_tokens FROM usage_events WHERE request_id LIKE $1",
    )
    .bind(format!("{request_id}%"))
    .fetch_all(&db)
    .await
    .expect("usage rows")
}

/// A shutdown whose grace period runs out ends the generations still
/// running (their usage recorded as cancelled) instead of waiting for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_past_its_grace_ends_long_generations_and_meters_them() {
    // The database outlives the gateway (which removes the directory it is
    // given when it stops).
    let kept = tempfile::tempdir().expect("temp dir");
    let mut settings = crate::common::test_settings(&kept);
    settings.shutdown_grace = std::time::Duration::from_millis(200);
    settings.models.push(crate::generate::slow_model());
    let db_path = kept.path().join("ascend-gateway.db");
    let gateway = TestGateway::start_with(settings, tempfile::tempdir().expect("temp dir")).await;
    let key = crate::generate::tenant_key(&gateway, "lingering").await;
    let mut stream = slow_stream(&gateway.channel, &key, "past-the-grace", 64).await;
    gateway.stop().await.expect("stop");
    // Whatever the client saw, the generation was cut and metered.
    while let Ok(Some(_)) = stream.message().await {}
    let rows = usage_rows(&db_path, "past-the-grace").await;
    let [(reason, completion)] = rows.as_slice() else {
        panic!("one usage row, not {rows:?}");
    };
    assert_eq!(reason, "cancelled");
    assert!(
        *completion < 64,
        "{completion} tokens: the generation ran to its end"
    );
}
