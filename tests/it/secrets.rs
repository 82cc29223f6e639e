//! No key or admin token ever reaches the logs: the real gateway binary runs
//! with every log level on while keys are created, used, mistyped, rotated
//! and revoked, and its whole output is searched afterwards.

use ascend_gateway::api::pb::v1::inference_client::InferenceClient;
use ascend_gateway::api::pb::v1::tenant_admin_client::TenantAdminClient;
use ascend_gateway::api::pb::v1::{
    CreateApiKeyRequest, CreateTenantRequest, ListModelsRequest, RevokeApiKeyRequest,
    RotateApiKeyRequest,
};

use crate::common::{ADMIN_TOKEN, admin, authed};

#[tokio::test]
async fn keys_and_tokens_never_appear_in_logs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = crate::common::tiny_model_config(dir.path());
    let gateway = crate::common::GatewayProcess::spawn(|command| {
        command
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path())
            .env("RUST_LOG", "trace");
    });
    let channel = gateway.channel().await;

    let mut admin_client = TenantAdminClient::new(channel.clone());
    admin_client
        .create_tenant(admin(CreateTenantRequest {
            slug: "secretive".to_owned(),
            ..Default::default()
        }))
        .await
        .expect("tenant");
    let issued = admin_client
        .create_api_key(admin(CreateApiKeyRequest {
            tenant: "secretive".to_owned(),
            ..Default::default()
        }))
        .await
        .expect("key")
        .into_inner();
    let key = issued.secret.clone();
    let key_id = issued.key.expect("key").key_id;
    let mut inference = InferenceClient::new(channel.clone());
    inference
        .list_models(authed(ListModelsRequest {}, &key))
        .await
        .expect("valid key");
    let mistyped = format!("{}0", &key[..key.len() - 1]);
    let _ = inference
        .list_models(authed(ListModelsRequest {}, &mistyped))
        .await;
    let rotated = admin_client
        .rotate_api_key(admin(RotateApiKeyRequest {
            key_id: key_id.clone(),
            overlap_seconds: Some(0),
        }))
        .await
        .expect("rotate")
        .into_inner()
        .secret;
    let _ = inference
        .list_models(authed(ListModelsRequest {}, &key))
        .await;
    admin_client
        .revoke_api_key(admin(RevokeApiKeyRequest { key_id }))
        .await
        .expect("revoke");
    let _ = inference
        .list_models(authed(ListModelsRequest {}, &rotated))
        .await;
    let _ = inference
        .list_models(authed(ListModelsRequest {}, "not-a-key-but-private"))
        .await;

    let (status, log) = gateway.terminate().await;
    assert!(status.success(), "graceful exit on SIGTERM");
    assert!(
        log.contains("gateway stopped"),
        "the log was captured: {log}"
    );
    for (what, secret) in [
        ("key", key.rsplit('_').next().expect("secret part")),
        (
            "mistyped key",
            mistyped.rsplit('_').next().expect("secret part"),
        ),
        (
            "rotated key",
            rotated.rsplit('_').next().expect("secret part"),
        ),
        ("admin token", ADMIN_TOKEN),
        ("garbage credential", "not-a-key-but-private"),
    ] {
        assert!(!log.contains(secret), "the {what} appears in the log");
    }
}
