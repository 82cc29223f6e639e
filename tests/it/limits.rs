//! Tenant limits against real Redis and real gateways: one combined limit
//! across replicas, quota races, exact refunds, lease expiry after a crash,
//! and the Redis-outage policies (on a private Redis this test starts and
//! stops). Each test uses its own Redis key prefix.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ascend_gateway::api::pb::v1::inference_client::InferenceClient;
use ascend_gateway::api::pb::v1::tenant_admin_client::TenantAdminClient;
use ascend_gateway::api::pb::v1::{CreateTenantRequest, ListModelsRequest, TenantLimits};
use ascend_gateway::limits::{
    Cost, FailurePolicy, LimitError, LimitKind, LimitSettings, Limiter, MonthToDate, Used,
};
use ascend_gateway::tenancy::Limits;
use secrecy::SecretString;
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{
    PgTestDb, PrivateRedis, TestGateway, admin, authed, tenant_with_limits, test_settings,
};

fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn prefix() -> String {
    format!("agwtest:{}:", uuid::Uuid::new_v4().simple())
}

async fn redis_connection(url: &str) -> redis::aio::ConnectionManager {
    let client = redis::Client::open(url).expect("redis url");
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_millis(500)))
        .set_number_of_retries(1);
    redis::aio::ConnectionManager::new_with_config(client, config)
        .await
        .expect("Redis must run for these tests (TEST_REDIS_URL)")
}

fn settings(prefix: String, policy: FailurePolicy, lease_ttl: Duration) -> LimitSettings {
    LimitSettings {
        redis_failure: policy,
        replicas: 1,
        lease_ttl,
        redis_prefix: prefix,
    }
}

#[tokio::test]
async fn rate_limit_refusals_carry_retry_info_and_quota_failure() {
    let gateway = TestGateway::start().await;
    let limits = TenantLimits {
        requests_per_second: Some(0.5),
        burst: Some(3),
        ..Default::default()
    };
    let key = tenant_with_limits(&gateway.channel, "limited", limits)
        .await
        .1;
    let mut client = InferenceClient::new(gateway.channel.clone());
    for expected_remaining in [2, 1, 0] {
        let response = client
            .list_models(authed(ListModelsRequest {}, &key))
            .await
            .expect("within the burst");
        let state = response
            .metadata()
            .get("ratelimit")
            .expect("ratelimit field");
        assert!(
            state
                .to_str()
                .expect("ascii")
                .starts_with(&format!("\"requests\";r={expected_remaining};")),
            "{state:?}"
        );
        assert!(response.metadata().get("ratelimit-policy").is_some());
    }
    let status = client
        .list_models(authed(ListModelsRequest {}, &key))
        .await
        .expect_err("burst spent");
    assert_eq!(status.code(), Code::ResourceExhausted);
    let retry = status.get_details_retry_info().expect("RetryInfo");
    let wait = retry.retry_delay.expect("delay");
    assert!(
        wait > Duration::from_millis(1000) && wait <= Duration::from_secs(2),
        "{wait:?}"
    );
    let quota = status.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(quota.violations[0].subject, "requests_per_second");
    assert_eq!(
        status.metadata().get("retry-after").expect("retry-after"),
        "2"
    );
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn two_gateways_sharing_redis_enforce_one_combined_limit() {
    const RATE: f64 = 40.0;
    const BURST: u32 = 5;
    let test_db = PgTestDb::create().await;
    let prefix = prefix();
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let mut settings = test_settings(&data_dir);
        settings.database.url = Some(test_db.secret_url());
        settings.redis.url = Some(SecretString::from(redis_url()));
        settings.limits.redis_prefix = prefix.clone();
        gateways.push(TestGateway::start_with(settings, data_dir).await);
    }
    let key = tenant_with_limits(
        &gateways[0].channel,
        "shared",
        TenantLimits {
            requests_per_second: Some(RATE),
            burst: Some(BURST),
            ..Default::default()
        },
    )
    .await
    .1;
    let admitted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let run_for = Duration::from_secs(10);
    let mut clients = Vec::new();
    for gateway in &gateways {
        for _ in 0..3 {
            let mut client = InferenceClient::new(gateway.channel.clone());
            let (key, admitted, refused) = (key.clone(), admitted.clone(), refused.clone());
            clients.push(tokio::spawn(async move {
                while start.elapsed() < run_for {
                    match client.list_models(authed(ListModelsRequest {}, &key)).await {
                        Ok(_) => admitted.fetch_add(1, Ordering::Relaxed),
                        Err(status) => {
                            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                            refused.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            }));
        }
    }
    for client in clients {
        client.await.expect("client");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let admitted = admitted.load(Ordering::Relaxed) as f64;
    let allowed = RATE * elapsed + f64::from(BURST);
    assert!(
        refused.load(Ordering::Relaxed) > 0,
        "the load exceeded the limit"
    );
    assert!(
        admitted <= allowed * 1.01,
        "admitted {admitted} > allowed {allowed}"
    );
    assert!(
        admitted >= RATE * elapsed * 0.9,
        "admitted {admitted} is far below the limit"
    );
    for gateway in gateways {
        gateway.stop().await.expect("clean stop");
    }
}

async fn race_for_the_last_quota(limiter: &Arc<Limiter>, tenant: &str) {
    let limits = Limits {
        monthly_token_quota: Some(1000),
        ..Limits::default()
    };
    let racers: Vec<_> = (0..50)
        .map(|_| {
            let (limiter, limits, tenant) = (limiter.clone(), limits.clone(), tenant.to_owned());
            tokio::spawn(async move { limiter.admit(&tenant, &limits, Cost::of_tokens(100)).await })
        })
        .collect();
    let mut permits = Vec::new();
    for racer in racers {
        match racer.await.expect("join") {
            Ok(permit) => permits.push(permit),
            Err(LimitError::Exceeded { kind, .. }) => assert_eq!(kind, LimitKind::MonthlyQuota),
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        permits.len(),
        10,
        "exactly the quota is admitted, never more"
    );
    for permit in permits {
        permit.settle(Used::of_tokens(100)).await;
    }
    assert!(
        limiter
            .admit(tenant, &limits, Cost::of_tokens(1))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_racers_never_overshoot_the_quota() {
    let (local, _bg) = Limiter::new(None, LimitSettings::default());
    race_for_the_last_quota(&local, "racer-local").await;
    let connection = redis_connection(&redis_url()).await;
    let (shared, _bg) = Limiter::new(
        Some(connection),
        settings(prefix(), FailurePolicy::FailClosed, Duration::from_secs(60)),
    );
    race_for_the_last_quota(&shared, "racer-redis").await;
    assert_eq!(shared.fallback_count(), 0);
}

async fn refunds_are_exact_on(limiter: &Arc<Limiter>, tenant: &str) {
    let limits = Limits {
        monthly_token_quota: Some(1000),
        tokens_per_minute: Some(6000),
        ..Limits::default()
    };
    let permit = limiter
        .admit(tenant, &limits, Cost::of_tokens(1000))
        .await
        .expect("whole quota");
    permit.settle(Used::of_tokens(300)).await;
    let permit = limiter
        .admit(tenant, &limits, Cost::of_tokens(700))
        .await
        .expect("the 700 refunded tokens are available again");
    let refused = limiter.admit(tenant, &limits, Cost::of_tokens(1)).await;
    assert!(
        matches!(
            refused,
            Err(LimitError::Exceeded {
                kind: LimitKind::MonthlyQuota,
                ..
            })
        ),
        "not one token more"
    );
    permit.settle(Used::of_tokens(700)).await;

    // A fresh tenant: the first part drew on the first tenant's bucket too.
    let tenant = &format!("{tenant}-tpm");
    let limits = Limits {
        tokens_per_minute: Some(6000),
        ..Limits::default()
    };
    let permit = limiter
        .admit(tenant, &limits, Cost::of_tokens(6000))
        .await
        .expect("a full minute");
    assert!(
        limiter
            .admit(tenant, &limits, Cost::of_tokens(500))
            .await
            .is_err()
    );
    permit.settle(Used::of_tokens(1000)).await;
    // 5000 unused tokens came back (plus a few from the refill meanwhile).
    let permit = limiter
        .admit(tenant, &limits, Cost::of_tokens(5000))
        .await
        .expect("refunded tokens");
    assert!(
        limiter
            .admit(tenant, &limits, Cost::of_tokens(500))
            .await
            .is_err()
    );
    permit.settle(Used::of_tokens(5000)).await;
}

#[tokio::test]
async fn token_refunds_are_exact() {
    let (local, _bg) = Limiter::new(None, LimitSettings::default());
    refunds_are_exact_on(&local, "refund-local").await;
    let connection = redis_connection(&redis_url()).await;
    let (shared, _bg) = Limiter::new(
        Some(connection),
        settings(prefix(), FailurePolicy::FailClosed, Duration::from_secs(60)),
    );
    refunds_are_exact_on(&shared, "refund-redis").await;
}

#[tokio::test]
async fn a_crashed_gateways_concurrency_slots_come_back_after_the_lease() {
    let prefix = prefix();
    let limits = Limits {
        max_concurrent_requests: Some(2),
        ..Limits::default()
    };
    let lease = Duration::from_secs(1);
    let (crashing, _bg) = Limiter::new(
        Some(redis_connection(&redis_url()).await),
        settings(prefix.clone(), FailurePolicy::FailClosed, lease),
    );
    for _ in 0..2 {
        let permit = crashing
            .admit("leaky", &limits, Cost::default())
            .await
            .expect("slot");
        // The gateway dies holding the slot: nothing will ever settle it.
        std::mem::forget(permit);
    }
    let (survivor, _bg) = Limiter::new(
        Some(redis_connection(&redis_url()).await),
        settings(prefix, FailurePolicy::FailClosed, lease),
    );
    let refused = survivor.admit("leaky", &limits, Cost::default()).await;
    let Err(LimitError::Exceeded {
        kind: LimitKind::Concurrency,
        retry_after,
    }) = refused
    else {
        panic!("expected a concurrency refusal, got {refused:?}");
    };
    // The wait named is the real one: until the earliest lease expires.
    assert!(
        retry_after <= lease && retry_after >= Duration::from_millis(1),
        "{retry_after:?}"
    );
    tokio::time::sleep(retry_after + Duration::from_millis(100)).await;
    let permit = survivor
        .admit("leaky", &limits, Cost::default())
        .await
        .expect("the dead gateway's leases expired");
    permit.settle(Used::of_tokens(0)).await;
}

#[tokio::test]
async fn redis_outage_follows_the_policy_and_limits_resume_after() {
    let redis = PrivateRedis::start();
    let url = redis.url();
    let limits = Limits {
        requests_per_second: Some(1.0),
        burst: Some(1),
        ..Limits::default()
    };
    let (open, _bg1) = Limiter::new(
        Some(redis_connection(&url).await),
        settings(prefix(), FailurePolicy::FailOpen, Duration::from_secs(60)),
    );
    let (closed, _bg2) = Limiter::new(
        Some(redis_connection(&url).await),
        settings(prefix(), FailurePolicy::FailClosed, Duration::from_secs(60)),
    );
    open.admit("t", &limits, Cost::default())
        .await
        .expect("via redis")
        .settle(Used::of_tokens(0))
        .await;
    assert_eq!(open.fallback_count(), 0);

    let port = redis.stop();
    // fail_open: served by local limits, which still hold the tenant to its rate.
    open.admit("t", &limits, Cost::default())
        .await
        .expect("fail open")
        .settle(Used::of_tokens(0))
        .await;
    assert!(open.fallback_count() >= 1);
    let second = open.admit("t", &limits, Cost::default()).await;
    assert!(matches!(
        second,
        Err(LimitError::Exceeded {
            kind: LimitKind::Requests,
            ..
        })
    ));
    // fail_closed: refused as unavailable.
    let refused = closed.admit("t", &limits, Cost::default()).await;
    assert!(
        matches!(refused, Err(LimitError::Unavailable(_))),
        "{refused:?}"
    );

    let _redis = PrivateRedis::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match closed.admit("t2", &limits, Cost::default()).await {
            Ok(permit) => {
                permit.settle(Used::of_tokens(0)).await;
                break;
            }
            Err(LimitError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(other) => panic!("limits did not resume: {other}"),
        }
    }
    // The fail-open limiter goes back to Redis by itself: an admission that
    // does not add to the fallback count was decided by Redis.
    let deadline = Instant::now() + Duration::from_secs(15);
    for attempt in 0.. {
        let before = open.fallback_count();
        let permit = open
            .admit(&format!("t3-{attempt}"), &limits, Cost::default())
            .await
            .expect("fresh tenant within its rate");
        permit.settle(Used::of_tokens(0)).await;
        if open.fallback_count() == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fail-open limiter never went back to Redis"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_limit_changed_by_an_operator_applies_at_once() {
    let gateway = TestGateway::start().await;
    let strict = TenantLimits {
        requests_per_second: Some(0.1),
        burst: Some(1),
        ..Default::default()
    };
    let key = tenant_with_limits(&gateway.channel, "growing", strict)
        .await
        .1;
    let mut client = InferenceClient::new(gateway.channel.clone());
    client
        .list_models(authed(ListModelsRequest {}, &key))
        .await
        .expect("first request");
    let status = client
        .list_models(authed(ListModelsRequest {}, &key))
        .await
        .expect_err("burst of 1 spent");
    assert_eq!(status.code(), Code::ResourceExhausted);

    TenantAdminClient::new(gateway.channel.clone())
        .update_tenant(admin(ascend_gateway::api::pb::v1::UpdateTenantRequest {
            tenant: "growing".to_owned(),
            limits: Some(TenantLimits {
                requests_per_second: Some(100.0),
                burst: Some(100),
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .expect("raise the limit");
    client
        .list_models(authed(ListModelsRequest {}, &key))
        .await
        .expect("the new limit applies without a restart");
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn rejections_are_counted_in_the_metrics() {
    let gateway = TestGateway::start().await;
    let key = tenant_with_limits(
        &gateway.channel,
        "counted",
        TenantLimits {
            requests_per_second: Some(0.01),
            burst: Some(1),
            ..Default::default()
        },
    )
    .await
    .1;
    let mut client = InferenceClient::new(gateway.channel.clone());
    for _ in 0..3 {
        let _ = client.list_models(authed(ListModelsRequest {}, &key)).await;
    }
    let body = crate::common::scrape(gateway.metrics_addr).await;
    assert!(
        body.contains("ascend_gateway_limit_rejections_total{limit=\"requests_per_second\"} 2"),
        "{body}"
    );
    assert!(body.contains("ascend_gateway_usage_spool_bytes"), "{body}");
    assert!(
        body.contains("ascend_gateway_usage_events_pending"),
        "{body}"
    );
    assert!(
        body.contains("ascend_gateway_queue_requests{model=\"tiny\"} 0"),
        "{body}"
    );
    assert!(
        body.contains("ascend_gateway_kv_blocks_free{model=\"tiny\"}"),
        "{body}"
    );
    gateway.stop().await.expect("clean stop");
}

/// A monthly quota survives a restart of a gateway on local limits: the
/// restarted node starts the month's counter from the metered usage.
#[tokio::test]
async fn a_restarted_gateway_keeps_counting_the_months_quota() {
    use ascend_gateway::api::pb::v1::{CountTokensRequest, GenerateRequest};

    let data_dir = tempfile::tempdir().expect("data dir");
    let settings = test_settings(&data_dir);
    let quota = 100u64;
    let first =
        TestGateway::start_with(settings.clone(), tempfile::tempdir().expect("spare")).await;
    let key = tenant_with_limits(
        &first.channel,
        "quota-restart",
        TenantLimits {
            monthly_token_quota: Some(quota),
            ..Default::default()
        },
    )
    .await
    .1;
    let request = |max_tokens: u32| GenerateRequest {
        model: "tiny".to_owned(),
        prompt: "hi".to_owned(),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        seed: Some(1),
        ..Default::default()
    };
    let mut inference = InferenceClient::new(first.channel.clone());
    let prompt_tokens = u64::from(
        inference
            .count_tokens(authed(
                CountTokensRequest {
                    model: "tiny".to_owned(),
                    prompt: "hi".to_owned(),
                    ..Default::default()
                },
                &key,
            ))
            .await
            .expect("count")
            .into_inner()
            .token_count,
    );
    let mut used = 0;
    for _ in 0..4 {
        let usage = inference
            .generate(authed(request(8), &key))
            .await
            .expect("within the quota")
            .into_inner()
            .usage
            .expect("usage");
        used += u64::from(usage.total_tokens);
    }
    assert_eq!(used, 4 * (prompt_tokens + 8));
    first.stop().await.expect("stop ships the usage");

    let second = TestGateway::start_with(settings, tempfile::tempdir().expect("spare")).await;
    let mut inference = InferenceClient::new(second.channel.clone());
    // Fits a fresh month, not this one: refused.
    let too_much = u32::try_from(quota - used + 1 - prompt_tokens).expect("small");
    assert!(prompt_tokens + u64::from(too_much) <= quota);
    let refused = inference
        .generate(authed(request(too_much), &key))
        .await
        .expect_err("the month's earlier usage counts");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("quota"), "{refused:?}");
    // What is left is still there: the seed counts nothing twice.
    let rest = u32::try_from(quota - used - prompt_tokens).expect("small");
    inference
        .generate(authed(request(rest), &key))
        .await
        .expect("exactly the rest of the quota");
    second.stop().await.expect("stop");
}

/// Quota counters lost from Redis start again from the metered usage, and
/// a counter Redis still holds is never lowered by a seed.
#[tokio::test]
async fn redis_quota_counters_start_from_the_metered_usage() {
    let prefix = prefix();
    let limiter = |seeded_used: u64| {
        let prefix = prefix.clone();
        async move {
            let (limiter, background) = Limiter::new(
                Some(redis_connection(&redis_url()).await),
                settings(prefix, FailurePolicy::FailClosed, Duration::from_secs(60)),
            );
            limiter.set_quota_seed(Arc::new(
                move |_tenant: String, _since_us: i64, _with_spend: bool| {
                    Box::pin(async move { Ok(MonthToDate::of_tokens(seeded_used)) })
                },
            ));
            (limiter, background)
        }
    };
    let limits = Limits {
        monthly_token_quota: Some(1000),
        ..Limits::default()
    };
    let (first, _bg) = limiter(950).await;
    let Err(refused) = first.admit("seeded", &limits, Cost::of_tokens(100)).await else {
        panic!("950 used + 100 > 1000 must be refused");
    };
    assert!(
        matches!(
            refused,
            LimitError::Exceeded {
                kind: LimitKind::MonthlyQuota,
                ..
            }
        ),
        "{refused}"
    );
    first
        .admit("seeded", &limits, Cost::of_tokens(50))
        .await
        .expect("the rest fits")
        .settle(Used::of_tokens(50))
        .await;
    // Another node whose metered view says less does not lower the counter.
    let (second, _bg) = limiter(0).await;
    assert!(
        second
            .admit("seeded", &limits, Cost::of_tokens(1))
            .await
            .is_err(),
        "1000 of 1000 used"
    );
}

/// A rate below one request per day is refused when it is set; the slowest
/// accepted rate serves its one request and then names a wait of about a
/// day, on both backends (it used to panic the local limiter and tell Redis
/// clients to retry in microseconds).
#[tokio::test]
async fn extreme_rates_are_refused_or_served_never_panic() {
    let gateway = TestGateway::start().await;
    let mut admin_client = TenantAdminClient::new(gateway.channel.clone());
    for rps in [1e-11, 1e-300, f64::MIN_POSITIVE, 0.0, -1.0, 1e7, f64::NAN] {
        let status = admin_client
            .create_tenant(admin(CreateTenantRequest {
                slug: "too-slow".to_owned(),
                limits: Some(TenantLimits {
                    requests_per_second: Some(rps),
                    ..Default::default()
                }),
                ..Default::default()
            }))
            .await
            .expect_err("out-of-range rate");
        assert_eq!(status.code(), Code::InvalidArgument, "{rps}");
        assert!(
            status.message().contains("limits.requests_per_second"),
            "{rps}: {}",
            status.message()
        );
    }
    let status = admin_client
        .create_tenant(admin(CreateTenantRequest {
            slug: "long-window".to_owned(),
            limits: Some(TenantLimits {
                requests_per_second: Some(1.0 / 86_400.0),
                burst: Some(1_000),
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .expect_err("a 1000-day window");
    assert!(
        status.message().contains("limits.burst"),
        "{}",
        status.message()
    );

    let slowest = TenantLimits {
        requests_per_second: Some(1.0 / 86_400.0),
        ..Default::default()
    };
    let key = tenant_with_limits(&gateway.channel, "one-a-day", slowest)
        .await
        .1;
    let mut client = InferenceClient::new(gateway.channel.clone());
    client
        .list_models(authed(ListModelsRequest {}, &key))
        .await
        .expect("the day's request");
    let status = client
        .list_models(authed(ListModelsRequest {}, &key))
        .await
        .expect_err("the second of the day");
    assert_eq!(status.code(), Code::ResourceExhausted);
    let wait = status
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo");
    assert!(
        wait > Duration::from_secs(86_000) && wait <= Duration::from_secs(86_400),
        "{wait:?}"
    );
    gateway.stop().await.expect("clean stop");

    // The same on the Redis backend.
    let (shared, _bg) = Limiter::new(
        Some(redis_connection(&redis_url()).await),
        settings(prefix(), FailurePolicy::FailClosed, Duration::from_secs(60)),
    );
    let limits = Limits {
        requests_per_second: Some(1.0 / 86_400.0),
        ..Limits::default()
    };
    shared
        .admit("one-a-day", &limits, Cost::default())
        .await
        .expect("the day's request")
        .settle(Used::of_tokens(0))
        .await;
    match shared.admit("one-a-day", &limits, Cost::default()).await {
        Err(LimitError::Exceeded {
            kind: LimitKind::Requests,
            retry_after,
        }) => assert!(
            retry_after > Duration::from_secs(86_000) && retry_after <= Duration::from_secs(86_400),
            "{retry_after:?}"
        ),
        other => panic!("expected a rate refusal, got {other:?}"),
    }
    // A value stored before the checks existed is clamped, not a panic.
    let stored = Limits {
        requests_per_second: Some(1e-300),
        burst: Some(u32::MAX),
        ..Limits::default()
    };
    for limiter in [&shared, &Limiter::new(None, LimitSettings::default()).0] {
        let first = limiter.admit("legacy", &stored, Cost::default()).await;
        assert!(first.is_ok(), "{first:?}");
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// Any limit tenancy accepts is served by the Redis backend without a
    /// panic or a Redis error, and a refusal names a finite, sane wait.
    #[test]
    fn no_accepted_limit_breaks_the_redis_backend(
        rps_exp in -5.0f64..6.0,
        burst in proptest::option::of(1u32..1_000_000),
        tpm in proptest::option::of(1u64..i64::MAX as u64),
        concurrent in proptest::option::of(1u32..u32::MAX),
        quota in proptest::option::of(1u64..i64::MAX as u64),
        tokens in 0u64..100_000,
    ) {
        let rps = 10f64.powf(rps_exp).clamp(Limits::MIN_REQUESTS_PER_SECOND, Limits::MAX_REQUESTS_PER_SECOND);
        let burst = burst.map(|b| b.min((rps * Limits::MAX_RATE_WINDOW_SECS as f64) as u32).max(1));
        let limits = Limits {
            requests_per_second: Some(rps),
            burst,
            tokens_per_minute: tpm,
            max_concurrent_requests: concurrent,
            monthly_token_quota: quota,
            monthly_budget: None,
        };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let (limiter, _bg) = Limiter::new(
                Some(redis_connection(&redis_url()).await),
                settings(prefix(), FailurePolicy::FailClosed, Duration::from_secs(60)),
            );
            for _ in 0..3 {
                match limiter.admit("prop", &limits, Cost::of_tokens(tokens)).await {
                    Ok(permit) => permit.settle(Used::of_tokens(tokens / 2)).await,
                    Err(LimitError::Exceeded { retry_after, .. }) => {
                        assert!(retry_after <= Duration::from_secs(40 * 86_400), "{retry_after:?}");
                    }
                    Err(LimitError::TooLarge { .. }) => {}
                    Err(other) => panic!("{limits:?}: {other:?}"),
                }
            }
        });
    }
}

/// Leases are short and renewed: a request running past the lease keeps its
/// slot, and thousands of settlements from a worker's thread are all
/// applied (none queues behind another), leaving no lease in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_renewed_while_held_and_released_promptly() {
    let prefix = prefix();
    let lease = Duration::from_secs(1);
    let (limiter, bg) = Limiter::new(
        Some(redis_connection(&redis_url()).await),
        settings(prefix.clone(), FailurePolicy::FailClosed, lease),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let background = tokio::spawn(limiter.clone().run_background(bg, stop.clone()));
    let one = Limits {
        max_concurrent_requests: Some(1),
        ..Limits::default()
    };
    let long = limiter
        .admit("long", &one, Cost::default())
        .await
        .expect("the slot");
    tokio::time::sleep(lease * 3).await;
    let refused = limiter.admit("long", &one, Cost::default()).await;
    assert!(
        matches!(
            refused,
            Err(LimitError::Exceeded {
                kind: LimitKind::Concurrency,
                ..
            })
        ),
        "the long request still holds its slot after three lease lifetimes: {refused:?}"
    );
    assert_eq!((limiter.in_flight(), limiter.leases_held()), (1, 1));
    long.settle(Used::of_tokens(0)).await;
    limiter
        .admit("long", &one, Cost::default())
        .await
        .expect("free once settled")
        .settle(Used::of_tokens(0))
        .await;

    let many = Limits {
        max_concurrent_requests: Some(100_000),
        tokens_per_minute: Some(1_000_000_000),
        ..Limits::default()
    };
    let mut permits = Vec::new();
    for i in 0..3_000 {
        let tenant = format!("busy-{}", i % 8);
        permits.push(
            limiter
                .admit(&tenant, &many, Cost::of_tokens(10))
                .await
                .expect("admitted"),
        );
    }
    assert_eq!(limiter.leases_held(), 3_000);
    // Settled from a plain thread, as serving's workers do.
    std::thread::spawn(move || {
        for permit in permits {
            permit.settle_detached(Used::of_tokens(5));
        }
    })
    .join()
    .expect("worker thread");
    assert_eq!(limiter.in_flight(), 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while limiter.leases_held() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} leases left",
            limiter.leases_held()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // This node forgets a lease as its settlement starts; Redis drops it
    // when the settlement script runs, a moment later on a busy machine.
    let mut connection = redis_connection(&redis_url()).await;
    for t in 0..8 {
        loop {
            let held: u64 = redis::cmd("ZCARD")
                .arg(format!("{prefix}{{busy-{t}}}:leases"))
                .query_async(&mut connection)
                .await
                .expect("zcard");
            if held == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{held} leases left in Redis for busy-{t}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    stop.cancel();
    background.await.expect("background task");
}

/// A Redis that forgot the scripts (SCRIPT FLUSH, a restart) or answers
/// with an error is handled: scripts are loaded again, errors follow the
/// failure policy, nothing panics.
#[tokio::test]
async fn a_redis_that_forgot_its_scripts_or_errors_is_handled() {
    let redis = PrivateRedis::start();
    let prefix = prefix();
    let (limiter, _bg) = Limiter::new(
        Some(redis_connection(&redis.url()).await),
        settings(
            prefix.clone(),
            FailurePolicy::FailClosed,
            Duration::from_secs(30),
        ),
    );
    let limits = Limits {
        max_concurrent_requests: Some(10),
        tokens_per_minute: Some(1_000_000),
        ..Limits::default()
    };
    let permit = limiter
        .admit("flushed", &limits, Cost::of_tokens(10))
        .await
        .expect("admitted");
    let mut admin = redis_connection(&redis.url()).await;
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut admin)
        .await
        .expect("script flush");
    permit.settle(Used::of_tokens(5)).await;
    limiter
        .admit("flushed", &limits, Cost::of_tokens(10))
        .await
        .expect("the script is loaded again")
        .settle(Used::of_tokens(5))
        .await;
    // A key of the wrong type makes the script fail: an error, not a panic.
    let () = redis::cmd("SET")
        .arg(format!("{prefix}{{broken}}:leases"))
        .arg("not a sorted set")
        .query_async(&mut admin)
        .await
        .expect("set");
    let refused = limiter.admit("broken", &limits, Cost::of_tokens(10)).await;
    assert!(
        matches!(refused, Err(LimitError::Unavailable(_))),
        "fail_closed: {refused:?}"
    );
    drop(redis);
}

/// A Redis that loses its keys while the gateways run (a restart without
/// persistence) does not hand the month's quota out again: the next
/// admission finds the counter missing and seeds it from the metered usage.
#[tokio::test]
async fn a_quota_counter_lost_by_redis_is_seeded_again() {
    let redis = PrivateRedis::start();
    let prefix = prefix();
    let (limiter, _bg) = Limiter::new(
        Some(redis_connection(&redis.url()).await),
        settings(
            prefix.clone(),
            FailurePolicy::FailClosed,
            Duration::from_secs(30),
        ),
    );
    // What the metering database says this month's usage is.
    let metered = Arc::new(AtomicU64::new(900));
    let seen = metered.clone();
    limiter.set_quota_seed(Arc::new(
        move |_tenant: String, _since: i64, _with_spend: bool| {
            let used = seen.load(Ordering::Relaxed);
            Box::pin(async move { Ok(MonthToDate::of_tokens(used)) })
        },
    ));
    let limits = Limits {
        monthly_token_quota: Some(1_000),
        ..Limits::default()
    };
    limiter
        .admit("lossy", &limits, Cost::of_tokens(50))
        .await
        .expect("within the quota")
        .settle(Used::of_tokens(50))
        .await;
    metered.store(950, Ordering::Relaxed);
    let mut admin = redis_connection(&redis.url()).await;
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut admin)
        .await
        .expect("Redis loses every key");
    let refused = limiter.admit("lossy", &limits, Cost::of_tokens(100)).await;
    assert!(
        matches!(
            refused,
            Err(LimitError::Exceeded {
                kind: LimitKind::MonthlyQuota,
                ..
            })
        ),
        "950 metered + 100 > 1000: {refused:?}"
    );
    // A request admitted before Redis lost its keys settles after: that
    // must not recreate the counter near zero (the next admission seeds it).
    let held = limiter
        .admit("lossy", &limits, Cost::of_tokens(50))
        .await
        .expect("exactly the rest");
    metered.store(1_000, Ordering::Relaxed);
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut admin)
        .await
        .expect("Redis loses every key again");
    held.settle(Used::of_tokens(50)).await;
    let refused = limiter.admit("lossy", &limits, Cost::of_tokens(10)).await;
    assert!(
        matches!(
            refused,
            Err(LimitError::Exceeded {
                kind: LimitKind::MonthlyQuota,
                ..
            })
        ),
        "the month is used up: {refused:?}"
    );
    drop(redis);
}
