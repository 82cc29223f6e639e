//! No key or admin token ever reaches the logs: the real gateway binary runs
//! with every log level on while keys are created, used, mistyped, rotated
//! and revoked, and its whole output is searched afterwards.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ascend_gateway::api::pb::v1::inference_client::InferenceClient;
use ascend_gateway::api::pb::v1::tenant_admin_client::TenantAdminClient;
use ascend_gateway::api::pb::v1::{
    CreateApiKeyRequest, CreateTenantRequest, ListModelsRequest, RevokeApiKeyRequest,
    RotateApiKeyRequest,
};
use tonic::transport::Channel;

use crate::common::{ADMIN_TOKEN, admin, authed};

#[tokio::test]
async fn keys_and_tokens_never_appear_in_logs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[[models]]\nid = \"tiny\"\ndir = {:?}\nmax_output_tokens = 16\nkv_max_blocks = 128\n",
            crate::common::tiny_model_dir()
        ),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ascend-gateway"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path())
        .env("ASCEND_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("ASCEND_METRICS_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "trace")
        .env_remove("DATABASE_URL")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start gateway");
    let log = Arc::new(Mutex::new(String::new()));
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().expect("stderr");
    let reader = {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("gateway listening")
                    && let Some(addr) = line.split("address=").nth(1)
                {
                    let _ = addr_tx.send(addr.trim().to_owned());
                }
                let mut log = log.lock().expect("log");
                log.push_str(&line);
                log.push('\n');
            }
        })
    };
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("gateway reports its address");
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");

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

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    // Waited for off the runtime, which must stay free to answer the
    // server's GOAWAY on the client connection.
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("gateway exits");
    assert!(status.success(), "graceful exit on SIGTERM");
    reader.join().expect("reader");

    let log = log.lock().expect("log").clone();
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
