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

/// A rolling restart: SIGTERM on one of two replicas (on one PostgreSQL and
/// one Redis) under load. Its health turns NOT_SERVING before it goes, the
/// requests it was running finish, clients see no error but UNAVAILABLE
/// (for requests that reach it after it stopped accepting) or their own
/// library's CANCELLED for a request it never wrote to the closing
/// connection (which the replica must then have no record of), the other
/// replica serves on, and every answered request is metered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_a_replica_under_load_loses_no_request() {
    use ascend_gateway::api::pb::v1::TenantLimits;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let test_db = PgTestDb::create().await;
    let redis_url =
        std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let prefix = format!("agwtest:{}:", uuid::Uuid::new_v4().simple());
    let dirs = [
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    ];
    let config = dirs[0].path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "shutdown_grace = \"20s\"\nshutdown_delay = \"300ms\"\n[limits]\nredis_prefix = {prefix:?}\n\n[[models]]\nid = \"tiny\"\n\
             dir = {:?}\nmax_output_tokens = 32\nkv_max_blocks = 256\n",
            crate::common::tiny_model_dir()
        ),
    )
    .expect("config");
    let spawn = |dir: &std::path::Path| {
        GatewayProcess::spawn(|command| {
            command
                .arg("--config")
                .arg(&config)
                .arg("--data-dir")
                .arg(dir)
                .arg("--database-url")
                .arg(&test_db.url)
                .arg("--redis-url")
                .arg(&redis_url)
                .env("ASCEND_LIMITS_REPLICAS", "2");
        })
    };
    let leaving = spawn(dirs[0].path());
    let staying = spawn(dirs[1].path());
    let channels = [leaving.channel().await, staying.channel().await];
    let (_, key) = crate::common::tenant_with_limits(
        &channels[1],
        "rolling",
        TenantLimits {
            max_concurrent_requests: Some(1000),
            requests_per_second: Some(10_000.0),
            burst: Some(1000),
            ..Default::default()
        },
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..6 {
        let (channel, key, stop) = (channels[c % 2].clone(), key.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut inference = InferenceClient::new(channel);
            let (mut answered, mut errors) = (Vec::new(), Vec::new());
            for n in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let request_id = format!("rolling-{c}-{n}");
                let request = GenerateRequest {
                    model: "tiny".to_owned(),
                    prompt: format!("client {c} request {n}"),
                    max_tokens: Some(24),
                    ignore_eos: true,
                    request_id: request_id.clone(),
                    ..Default::default()
                };
                match inference.generate(authed(request, &key)).await {
                    Ok(_) => answered.push(request_id),
                    Err(status) => {
                        errors.push((request_id, status.code(), status.message().to_owned()));
                        // The replica is gone: as a client would, wait.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            (answered, errors)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Watch the leaving replica's health while it drains.
    let mut health = HealthClient::new(channels[0].clone());
    let watcher = tokio::spawn(async move {
        let mut seen = Vec::new();
        for _ in 0..400 {
            match health.check(HealthCheckRequest::default()).await {
                Ok(answer) => {
                    let status = answer.into_inner().status();
                    if seen.last() != Some(&status) {
                        seen.push(status);
                    }
                }
                Err(_) => break,
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        seen
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (exit, _log) = leaving.terminate().await;
    assert!(
        exit.success(),
        "the leaving replica exits cleanly: {exit:?}"
    );
    let seen = watcher.await.expect("watcher");
    assert_eq!(
        seen,
        [ServingStatus::Serving, ServingStatus::NotServing],
        "health turned NOT_SERVING before the replica went"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut answered, mut never_sent) = (Vec::new(), Vec::new());
    for client in clients {
        let (ok, errors) = client.await.expect("client");
        for (request_id, code, message) in errors {
            // hyper's client cancels a request it had queued for a
            // connection that closed before writing it ("operation was
            // canceled", its Kind::Canceled; a reset stream from the server
            // reads "h2 protocol error" instead), and tonic reports that as
            // CANCELLED. The replica never saw it, which the usage table
            // must confirm below.
            let unsent =
                code == tonic::Code::Cancelled && message.starts_with("operation was canceled");
            assert!(
                code == tonic::Code::Unavailable || unsent,
                "only UNAVAILABLE, or a request the client never sent, for a replica that \
                 stopped: {request_id} got {code:?}: {message}"
            );
            if unsent {
                never_sent.push(request_id);
            }
        }
        answered.extend(ok);
    }
    assert!(answered.len() > 12, "load ran: {}", answered.len());

    let (_, _log) = staying.terminate().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let pool = sqlx::PgPool::connect(&test_db.url).await.expect("pool");
    let metered: Vec<String> = loop {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT request_id FROM usage_events WHERE request_id LIKE 'rolling-%'",
        )
        .fetch_all(&pool)
        .await
        .expect("ids");
        if ids.len() >= answered.len() || std::time::Instant::now() > deadline {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let metered: std::collections::HashSet<String> = metered.into_iter().collect();
    for id in &answered {
        assert!(metered.contains(id), "{id} was answered but not metered");
    }
    for id in &never_sent {
        assert!(!metered.contains(id), "{id} was reported unsent but ran");
    }
    pool.close().await;
}
