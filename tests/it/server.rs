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
