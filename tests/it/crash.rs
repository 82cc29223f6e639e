//! A crash under load: the real gateway binary is killed with SIGKILL while
//! clients are mid-request, then restarted on the same data directory. Every
//! request whose final response a client received is in PostgreSQL exactly
//! once, and the rollups equal the events.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ascend_gateway::api::pb::v1::inference_client::InferenceClient;
use ascend_gateway::api::pb::v1::tenant_admin_client::TenantAdminClient;
use ascend_gateway::api::pb::v1::{CreateApiKeyRequest, CreateTenantRequest, GenerateRequest};
use sqlx::postgres::PgPoolOptions;

use crate::common::{GatewayProcess, PgTestDb, admin, authed, tiny_model_config};

const CLIENTS: usize = 6;

#[tokio::test]
async fn a_kill_9_under_load_loses_no_acknowledged_usage_and_counts_none_twice() {
    let test_db = PgTestDb::create().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = tiny_model_config(dir.path());
    let spawn = || {
        GatewayProcess::spawn(|command| {
            command
                .arg("--config")
                .arg(&config)
                .arg("--data-dir")
                .arg(dir.path())
                .arg("--database-url")
                .arg(&test_db.url);
        })
    };
    let mut gateway = spawn();
    let channel = gateway.channel().await;
    let mut tenants = TenantAdminClient::new(channel.clone());
    tenants
        .create_tenant(admin(CreateTenantRequest {
            slug: "crashy".to_owned(),
            ..Default::default()
        }))
        .await
        .expect("tenant");
    let key = tenants
        .create_api_key(admin(CreateApiKeyRequest {
            tenant: "crashy".to_owned(),
            ..Default::default()
        }))
        .await
        .expect("key")
        .into_inner()
        .secret;

    // Clients send back to back and note every request answered in full.
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let failing = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (channel, key) = (channel.clone(), key.clone());
        let (acknowledged, failing) = (acknowledged.clone(), failing.clone());
        clients.push(tokio::spawn(async move {
            let mut inference = InferenceClient::new(channel);
            for n in 0.. {
                let request_id = format!("crash-{c}-{n}");
                let request = GenerateRequest {
                    model: "tiny".to_owned(),
                    prompt: format!("client {c} request {n}"),
                    max_tokens: Some(8),
                    request_id: request_id.clone(),
                    ..Default::default()
                };
                match inference.generate(authed(request, &key)).await {
                    Ok(_) => acknowledged.lock().expect("lock").push(request_id),
                    Err(_) => {
                        failing.store(true, Ordering::Relaxed);
                        return;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !failing.load(Ordering::Relaxed),
        "requests failed before the crash"
    );
    gateway.kill9();
    for client in clients {
        client.await.expect("client task");
    }
    let acknowledged = acknowledged.lock().expect("lock").clone();
    assert!(
        acknowledged.len() >= CLIENTS,
        "load ran before the crash: {}",
        acknowledged.len()
    );

    // The restart replays the spool into the database.
    let restarted = spawn();
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&test_db.url)
        .await
        .expect("pool");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let missing = loop {
        let found: Vec<String> =
            sqlx::query_scalar("SELECT request_id FROM usage_events WHERE request_id = ANY($1)")
                .bind(&acknowledged)
                .fetch_all(&pool)
                .await
                .expect("query");
        let missing: Vec<&String> = acknowledged
            .iter()
            .filter(|id| !found.contains(id))
            .collect();
        if missing.is_empty() || std::time::Instant::now() > deadline {
            break missing.into_iter().cloned().collect::<Vec<_>>();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        missing.is_empty(),
        "acknowledged but not metered after the restart: {missing:?}"
    );
    let twice: Vec<(String, i64)> = sqlx::query_as(
        "SELECT request_id, COUNT(*) FROM usage_events GROUP BY tenant_id, request_id HAVING COUNT(*) > 1",
    )
    .fetch_all(&pool)
    .await
    .expect("duplicates");
    assert!(twice.is_empty(), "counted twice: {twice:?}");
    let (events, rollups): ((i64, i64), (i64, i64)) = (
        sqlx::query_as(
            "SELECT COUNT(*), CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT) FROM usage_events",
        )
        .fetch_one(&pool)
        .await
        .expect("events"),
        sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(requests), 0) AS BIGINT), \
             CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT) FROM usage_hourly",
        )
        .fetch_one(&pool)
        .await
        .expect("rollups"),
    );
    assert_eq!(rollups, events, "rollups equal the events");
    assert!(events.0 >= acknowledged.len() as i64);
    pool.close().await;
    let (status, log) = restarted.terminate().await;
    assert!(status.success(), "clean stop after the restart:\n{log}");
}
