//! The metering pipeline against real databases: exactly once through
//! replays and retries, rollups equal to the events, and a database outage
//! that loses nothing.

use std::time::Duration;

use ascend_gateway::metering::{
    HOUR_US, Metering, MeteringSettings, Spool, SpoolFullPolicy, SpoolSettings, UsageEvent,
    UsageWriter,
};
use ascend_gateway::store::Db;

use crate::common::PgTestDb;

/// 2026-11-28T00:00:00Z in microseconds.
const BASE_US: i64 = 1_795_824_000_000_000;

fn event(i: u32) -> UsageEvent {
    let finished_at_us = BASE_US + i64::from(i % 30) * HOUR_US / 3 + i64::from(i);
    UsageEvent {
        request_id: format!("req-{i:06}"),
        tenant_id: format!("tenant-{}", i % 3),
        key_id: "0123456789abcdef".to_owned(),
        model: if i.is_multiple_of(2) { "small" } else { "tiny" }.to_owned(),
        device_profile: "ascend-910b".to_owned(),
        prompt_tokens: 10 + i % 100,
        cached_prompt_tokens: i % 11,
        completion_tokens: 1 + i % 50,
        queue_time_us: 100,
        ttft_us: 1000,
        total_time_us: 5000,
        device_time_us: 700 + u64::from(i),
        energy_mj: 30 + u64::from(i % 7),
        mean_power_mw: 350_000,
        finish_reason: ascend_gateway::metering::FinishReason::Eos,
        started_at_us: finished_at_us - 5000,
        finished_at_us,
    }
}

/// Requests, prompt, cached prompt, completion tokens and energy.
type Totals = (i64, i64, i64, i64, i64);

async fn totals(db: &Db) -> (Totals, Totals) {
    let events: Totals = sqlx::query_as(
        "SELECT COUNT(*), CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT), \
         CAST(COALESCE(SUM(cached_prompt_tokens), 0) AS BIGINT), \
         CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT), \
         CAST(COALESCE(SUM(energy_mj), 0) AS BIGINT) FROM usage_events",
    )
    .fetch_one(db.pool())
    .await
    .expect("event totals");
    let rollups: Totals = sqlx::query_as(
        "SELECT CAST(COALESCE(SUM(requests), 0) AS BIGINT), \
         CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT), \
         CAST(COALESCE(SUM(cached_prompt_tokens), 0) AS BIGINT), \
         CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT), \
         CAST(COALESCE(SUM(energy_mj), 0) AS BIGINT) FROM usage_hourly",
    )
    .fetch_one(db.pool())
    .await
    .expect("rollup totals");
    (events, rollups)
}

async fn exactly_once(db: Db) {
    db.migrate().await.expect("migrate");
    let dir = tempfile::tempdir().expect("dir");
    let spool = Spool::open(dir.path(), SpoolSettings::default()).expect("spool");
    let writer = UsageWriter::new(spool.clone(), db.clone(), 700);
    let n = 2000;
    for i in 0..n {
        spool.append(&event(i)).await.expect("append");
    }
    // Request 7's record appended again (a worker's record replayed into
    // the spool): recorded once. (A client's retry of request 7 runs as
    // another attempt, metered under an id of its own: idempotency's test.)
    spool.append(&event(7)).await.expect("append the copy");
    spool.seal().await.expect("seal");
    let sealed = spool.sealed_segments().expect("segments");
    let backup = dir.path().join("backup");
    std::fs::create_dir(&backup).expect("backup dir");
    for segment in &sealed {
        std::fs::copy(segment, backup.join(segment.file_name().expect("name"))).expect("copy");
    }

    let first = writer.ship().await.expect("ship");
    assert_eq!(first.events, n as usize + 1);
    assert_eq!(first.inserted, u64::from(n), "the copy is not counted");
    assert!(
        spool.sealed_segments().expect("segments").is_empty(),
        "shipped segments are deleted"
    );

    // The same segments replayed (as after a crash between commit and delete).
    for segment in &sealed {
        std::fs::copy(backup.join(segment.file_name().expect("name")), segment).expect("restore");
    }
    let replay = writer.ship().await.expect("replay");
    assert_eq!(replay.events, n as usize + 1);
    assert_eq!(replay.inserted, 0, "a replay counts nothing twice");

    let expected_prompt: i64 = (0..n).map(|i| i64::from(event(i).prompt_tokens)).sum();
    let expected_cached: i64 = (0..n)
        .map(|i| i64::from(event(i).cached_prompt_tokens))
        .sum();
    let expected_completion: i64 = (0..n).map(|i| i64::from(event(i).completion_tokens)).sum();
    let expected_energy: i64 = (0..n).map(|i| event(i).energy_mj as i64).sum();
    let (events, rollups) = totals(&db).await;
    assert_eq!(
        events,
        (
            i64::from(n),
            expected_prompt,
            expected_cached,
            expected_completion,
            expected_energy
        )
    );
    assert_eq!(rollups, events, "rollups equal the sum of the events");
    spool.close();
}

#[tokio::test]
async fn usage_is_recorded_exactly_once_on_postgres() {
    let test_db = PgTestDb::create().await;
    let db = Db::connect_url(&test_db.url, 4, Duration::from_secs(5))
        .await
        .expect("db");
    exactly_once(db.clone()).await;
    let partitions: Vec<(String,)> = sqlx::query_as(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'usage_events' ORDER BY 1",
    )
    .fetch_all(db.postgres().expect("pg pool"))
    .await
    .expect("partitions");
    let names: Vec<&str> = partitions.iter().map(|(n,)| n.as_str()).collect();
    assert!(names.contains(&"usage_events_2026_11"), "{names:?}");
    db.close().await;
}

#[tokio::test]
async fn usage_is_recorded_exactly_once_on_sqlite() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("m.db").display());
    let db = Db::connect_url(&url, 4, Duration::from_secs(5))
        .await
        .expect("db");
    exactly_once(db).await;
}

#[tokio::test]
async fn a_database_outage_loses_nothing_and_the_backlog_drains() {
    let test_db = PgTestDb::create().await;
    let db = Db::connect_url(&test_db.url, 4, Duration::from_secs(2))
        .await
        .expect("db");
    db.migrate().await.expect("migrate");
    let dir = tempfile::tempdir().expect("dir");
    let spool = Spool::open(dir.path(), SpoolSettings::default()).expect("spool");
    let writer = UsageWriter::new(spool.clone(), db.clone(), 500);
    for i in 0..300 {
        spool.append(&event(i)).await.expect("append");
    }
    writer.ship().await.expect("ship while up");

    test_db.set_reachable(false).await;
    // Requests keep finishing while the database is down: their usage spools.
    for i in 300..1300 {
        spool
            .append(&event(i))
            .await
            .expect("append during the outage");
        if i % 250 == 0 {
            assert!(
                writer.ship().await.is_err(),
                "shipping fails while the database is down"
            );
        }
    }
    assert!(spool.stats().pending_events() >= 1000);
    test_db.set_reachable(true).await;

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match writer.ship().await {
            Ok(_) if spool.sealed_segments().expect("segments").is_empty() => break,
            _ if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => panic!("backlog did not drain: {other:?}"),
        }
    }
    let (events, rollups) = totals(&db).await;
    assert_eq!(events.0, 1300, "every event, none twice");
    assert_eq!(rollups, events);
    spool.close();
    db.close().await;
}

#[tokio::test]
async fn a_full_spool_rejects_new_work_under_the_reject_policy() {
    let dir = tempfile::tempdir().expect("dir");
    let spool = Spool::open(dir.path(), SpoolSettings::default()).expect("spool");
    let settings = MeteringSettings {
        spool_max_bytes: 1000,
        on_spool_full: SpoolFullPolicy::Reject,
        ..MeteringSettings::default()
    };
    let metering = Metering::new(spool.clone(), &settings);
    assert!(metering.admitting().is_ok());
    for i in 0..10 {
        metering.record(&event(i)).await.expect("record");
    }
    assert!(
        metering.admitting().is_err(),
        "over the cap: new requests refused"
    );
    let keep = Metering::new(
        spool.clone(),
        &MeteringSettings {
            on_spool_full: SpoolFullPolicy::KeepServing,
            ..settings
        },
    );
    assert!(keep.admitting().is_ok());
    spool.close();
}

#[tokio::test]
async fn get_usage_answers_from_rollups_and_keeps_tenants_apart() {
    use ascend_gateway::api::pb::v1::billing_client::BillingClient;
    use ascend_gateway::api::pb::v1::tenant_admin_client::TenantAdminClient;
    use ascend_gateway::api::pb::v1::{
        CreateApiKeyRequest, CreateTenantRequest, GetUsageRequest, UsageGrouping,
    };
    use prost_types::Timestamp;
    use tonic::Code;

    use crate::common::{TestGateway, admin, authed};

    let gateway = TestGateway::start().await;
    let mut admin_client = TenantAdminClient::new(gateway.channel.clone());
    let mut ids = Vec::new();
    let mut keys = Vec::new();
    for slug in ["usage-a", "usage-b"] {
        let tenant = admin_client
            .create_tenant(admin(CreateTenantRequest {
                slug: slug.to_owned(),
                ..Default::default()
            }))
            .await
            .expect("tenant")
            .into_inner();
        ids.push(tenant.id);
        keys.push(
            admin_client
                .create_api_key(admin(CreateApiKeyRequest {
                    tenant: slug.to_owned(),
                    scopes: vec!["billing:read".to_owned()],
                    ..Default::default()
                }))
                .await
                .expect("key")
                .into_inner()
                .secret,
        );
    }
    let events: Vec<UsageEvent> = (0..60)
        .map(|i| {
            let mut e = event(i);
            e.tenant_id = ids[(i % 2) as usize].clone();
            e
        })
        .collect();
    ascend_gateway::metering::insert_batch(&gateway.db, &events)
        .await
        .expect("insert usage");
    let own: Vec<&UsageEvent> = events.iter().filter(|e| e.tenant_id == ids[0]).collect();

    let range = |group_by: UsageGrouping, tenant: &str| GetUsageRequest {
        tenant: tenant.to_owned(),
        start_time: Some(Timestamp {
            seconds: BASE_US / 1_000_000,
            nanos: 0,
        }),
        end_time: Some(Timestamp {
            seconds: BASE_US / 1_000_000 + 2 * 86_400,
            nanos: 0,
        }),
        group_by: group_by.into(),
        model: String::new(),
    };
    let mut billing = BillingClient::new(gateway.channel.clone());
    let usage = billing
        .get_usage(authed(range(UsageGrouping::Model, ""), &keys[0]))
        .await
        .expect("own usage")
        .into_inner();
    assert_eq!(usage.tenant_id, ids[0]);
    let total = usage.total.expect("total");
    assert_eq!(total.requests, own.len() as u64);
    assert_eq!(
        total.prompt_tokens,
        own.iter().map(|e| u64::from(e.prompt_tokens)).sum::<u64>()
    );
    assert_eq!(
        usage.buckets.len(),
        1,
        "tenant A's events are all one model"
    );
    assert_eq!(usage.buckets[0].requests, total.requests);

    let status = billing
        .get_usage(authed(
            range(UsageGrouping::Unspecified, "usage-b"),
            &keys[0],
        ))
        .await
        .expect_err("A reads B");
    assert_eq!(status.code(), Code::PermissionDenied);

    let other = billing
        .get_usage(admin(range(UsageGrouping::Hour, "usage-b")))
        .await
        .expect("the admin reads any tenant")
        .into_inner();
    assert_eq!(other.tenant_id, ids[1]);
    assert_eq!(other.total.expect("total").requests, 30);
    assert!(other.buckets.len() > 1);

    let status = billing
        .get_usage(admin(range(UsageGrouping::Unspecified, "")))
        .await
        .expect_err("the admin must name a tenant");
    assert_eq!(status.code(), Code::InvalidArgument);
    let mut off_hour = range(UsageGrouping::Unspecified, "");
    off_hour.start_time = Some(Timestamp {
        seconds: BASE_US / 1_000_000 + 5,
        nanos: 0,
    });
    let status = billing
        .get_usage(authed(off_hour, &keys[0]))
        .await
        .expect_err("not on an hour");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("start_time"));
    gateway.stop().await.expect("clean stop");
}

/// How long the database stays away in the outage test (the issue asks for
/// 30 s; `AGW_OUTAGE_SECS` shortens it while working on the test).
fn outage() -> Duration {
    let secs = std::env::var("AGW_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    Duration::from_secs(secs)
}

#[tokio::test]
async fn the_gateway_serves_through_a_database_outage_and_meters_every_request_after() {
    use ascend_gateway::api::pb::v1::GenerateRequest;
    use ascend_gateway::api::pb::v1::inference_client::InferenceClient;

    let test_db = PgTestDb::create().await;
    let dir = tempfile::tempdir().expect("dir");
    let mut settings = crate::common::test_settings(&dir);
    settings.database.url = Some(test_db.secret_url());
    settings.database.connect_timeout = Duration::from_secs(1);
    // Short, so the outage outlives every fresh cache entry.
    settings.auth.cache_ttl = Duration::from_millis(500);
    let gateway = crate::common::TestGateway::start_with(settings, dir).await;
    let key = crate::generate::tenant_key(&gateway, "resilient").await;
    let mut client = InferenceClient::new(gateway.channel.clone());
    let request = |n: usize| GenerateRequest {
        model: "tiny".to_owned(),
        prompt: format!("request {n} while the database may be away"),
        max_tokens: Some(6),
        request_id: format!("outage-{n}"),
        ..Default::default()
    };
    client
        .generate(crate::common::authed(request(0), &key))
        .await
        .expect("served before the outage");

    test_db.set_reachable(false).await;
    let started = std::time::Instant::now();
    let mut served = 1;
    while started.elapsed() < outage() {
        client
            .generate(crate::common::authed(request(served), &key))
            .await
            .unwrap_or_else(|status| panic!("request {served} during the outage: {status:?}"));
        served += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = crate::common::scrape(gateway.metrics_addr).await;
    let pending: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("ascend_gateway_usage_events_pending "))
        .and_then(|v| v.trim().parse().ok())
        .expect("pending gauge");
    assert!(pending >= 1.0, "usage waits in the spool: {pending}");
    test_db.set_reachable(true).await;

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let count: Option<i64> = sqlx::query_scalar(
            "SELECT COUNT(*) FROM usage_events WHERE request_id LIKE 'outage-%'",
        )
        .fetch_one(gateway.db.pool())
        .await
        .ok();
        if count == Some(served as i64) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the backlog did not drain: {count:?} of {served}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (events, rollups) = totals(&gateway.db).await;
    assert_eq!(events.0, served as i64, "every request once");
    assert_eq!(rollups, events, "rollups equal the events");
    gateway.stop().await.expect("clean stop");
}
