//! Webhooks against a receiver of the test's own over real HTTP: budget
//! thresholds arrive once each with valid signatures from two replicas on
//! PostgreSQL and Redis; a 500 is retried with the same event id, and an
//! event written before a kill -9 of the real binary is delivered after the
//! restart; a receiver that never answers holds nothing up; bad endpoints
//! are refused with the reason; the delivery log and test events.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ascend_gateway::api::pb::v1::inference_client::InferenceClient;
use ascend_gateway::api::pb::v1::tenant_admin_client::TenantAdminClient;
use ascend_gateway::api::pb::v1::webhooks_client::WebhooksClient;
use ascend_gateway::api::pb::v1::{
    CreateWebhookRequest, DeleteWebhookRequest, ListWebhookDeliveriesRequest, SuspendTenantRequest,
    TestWebhookRequest,
};
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use tonic::Code;
use tonic::transport::Channel;

use crate::budgets::{CENT_NANOS, budget_tenant, exact_request};
use crate::common::{GatewayProcess, TestGateway, admin, authed, test_settings};

/// One POST the receiver got.
#[derive(Debug, Clone)]
struct Received {
    headers: HeaderMap,
    body: String,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("a JSON body")
    }

    fn event_id(&self) -> String {
        self.json()["id"].as_str().expect("id").to_owned()
    }
}

/// An HTTP receiver on 127.0.0.1 answering `status` (changeable) to every
/// POST, or never answering when `hang` is set.
struct Receiver {
    url: String,
    received: Arc<Mutex<Vec<Received>>>,
    status: Arc<Mutex<StatusCode>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(status: StatusCode, hang: bool) -> Receiver {
        let received = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(Mutex::new(status));
        let (seen, answer) = (received.clone(), status.clone());
        let app = axum::Router::new().fallback(move |headers: HeaderMap, body: String| {
            let (seen, answer) = (seen.clone(), answer.clone());
            async move {
                seen.lock().expect("lock").push(Received { headers, body });
                if hang {
                    std::future::pending::<()>().await;
                }
                *answer.lock().expect("lock")
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!(
            "http://{}/hooks/ascend",
            listener.local_addr().expect("addr")
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url,
            received,
            status,
            task,
        }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }

    fn answer(&self, status: StatusCode) {
        *self.status.lock().expect("lock") = status;
    }

    /// Waits until `done` holds for what arrived, within `limit`.
    async fn wait_for(&self, limit: Duration, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = Instant::now() + limit;
        loop {
            let received = self.received();
            if done(&received) {
                return received;
            }
            assert!(
                Instant::now() < deadline,
                "the receiver got only {} posts: {received:#?}",
                received.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Checks `Ascend-Signature` as a receiver would, with its own HMAC.
fn assert_signed(post: &Received, secret: &str) {
    let header = post
        .headers
        .get("ascend-signature")
        .and_then(|v| v.to_str().ok())
        .expect("an Ascend-Signature header");
    let (t, v1) = header
        .split_once(',')
        .and_then(|(t, v1)| Some((t.strip_prefix("t=")?, v1.strip_prefix("v1=")?)))
        .unwrap_or_else(|| panic!("t=...,v1=...: {header}"));
    let sent: i64 = t.parse().expect("unix seconds");
    let now = ascend_gateway::store::now_us() / 1_000_000;
    assert!(
        (now - sent).abs() < 300,
        "a fresh timestamp: {sent} vs {now}"
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(format!("{t}.{}", post.body).as_bytes());
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(v1, expected, "the signature verifies");
    assert_eq!(
        post.headers
            .get("ascend-event-id")
            .and_then(|v| v.to_str().ok()),
        Some(post.event_id().as_str())
    );
}

async fn create_webhook(
    channel: &Channel,
    tenant: &str,
    url: &str,
    events: &[&str],
) -> (String, String) {
    let created = WebhooksClient::new(channel.clone())
        .create_webhook(admin(CreateWebhookRequest {
            tenant: tenant.to_owned(),
            url: url.to_owned(),
            events: events.iter().map(|e| (*e).to_owned()).collect(),
        }))
        .await
        .expect("create webhook")
        .into_inner();
    (created.webhook.expect("webhook").id, created.signing_secret)
}

async fn deliveries(
    channel: &Channel,
    webhook_id: &str,
    page_size: u32,
) -> Vec<ascend_gateway::api::pb::v1::WebhookDelivery> {
    WebhooksClient::new(channel.clone())
        .list_webhook_deliveries(admin(ListWebhookDeliveriesRequest {
            id: webhook_id.to_owned(),
            page_size,
        }))
        .await
        .expect("deliveries")
        .into_inner()
        .deliveries
}

fn quick_webhooks(settings: &mut ascend_gateway::config::Settings) {
    settings.webhooks.allow_private = true;
    settings.webhooks.poll_interval = Duration::from_millis(100);
    settings.webhooks.watch_interval = Duration::from_millis(200);
    settings.webhooks.retry_base = Duration::from_millis(200);
    settings.webhooks.timeout = Duration::from_secs(2);
}

/// A gateway on the embedded default with quick webhook timings, then
/// `configure`.
async fn quick_gateway(
    configure: impl FnOnce(&mut ascend_gateway::config::Settings),
) -> TestGateway {
    let data_dir = tempfile::tempdir().expect("data dir");
    let mut settings = test_settings(&data_dir);
    quick_webhooks(&mut settings);
    configure(&mut settings);
    TestGateway::start_with(settings, data_dir).await
}

fn threshold(post: &Received) -> u64 {
    post.json()["data"]["threshold_percent"]
        .as_u64()
        .expect("threshold_percent")
}

/// The "done": a budget, a signed event at each threshold, exactly
/// once each though two replicas watch and deliver, and requests refused at
/// 100%.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_thresholds_arrive_once_each_signed_from_two_replicas() {
    let (_db, replicas) = crate::budgets::replicas_on_pg_and_redis(2, quick_webhooks).await;
    let receiver = Receiver::start(StatusCode::OK, false).await;
    let channel = replicas[0].channel.clone();
    let (tenant_id, key) = budget_tenant(&channel, "alerted", Some(CENT_NANOS)).await;
    let (_, secret) = create_webhook(
        &channel,
        "alerted",
        &receiver.url,
        &["budget.threshold_reached"],
    )
    .await;
    let request = exact_request(&channel, &key).await;
    // Five requests of $0.002 each: 20%, 40%, 60%, 80%, 100% of $0.01.
    for i in 0..5 {
        InferenceClient::new(replicas[i % 2].channel.clone())
            .generate(authed(request.clone(), &key))
            .await
            .expect("within the budget");
    }
    let refused = InferenceClient::new(replicas[1].channel.clone())
        .generate(authed(request, &key))
        .await
        .expect_err("the budget is spent");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("monthly_budget"), "{refused:?}");

    let posts = receiver
        .wait_for(Duration::from_secs(30), |posts| {
            let mut seen: Vec<u64> = posts.iter().map(threshold).collect();
            seen.sort_unstable();
            seen.dedup();
            seen == [50, 80, 100]
        })
        .await;
    // Both replicas keep watching and delivering: still once each.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let posts_later = receiver.received();
    assert_eq!(
        posts_later.len(),
        posts.len(),
        "no duplicates later: {posts_later:#?}"
    );
    let mut ids: Vec<String> = posts_later.iter().map(Received::event_id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "one event per threshold: {posts_later:#?}");
    assert_eq!(
        posts_later.len(),
        3,
        "each delivered once: {posts_later:#?}"
    );
    for post in &posts_later {
        assert_signed(post, &secret);
        let body = post.json();
        assert_eq!(body["type"], "budget.threshold_reached");
        assert_eq!(body["tenant_id"], tenant_id.as_str());
        assert_eq!(body["data"]["monthly_budget"]["amount_nanos"], CENT_NANOS);
        let spent = body["data"]["spent"]["amount_nanos"]
            .as_i64()
            .expect("spent");
        assert!(
            spent * 100 >= i64::try_from(threshold(post)).expect("small") * CENT_NANOS,
            "{body}"
        );
    }
    for replica in replicas {
        replica.stop().await.expect("stop");
    }
}

/// A receiver answering 500 gets the event again with the same id; after a
/// kill -9 of the real binary the event written before it still arrives
/// once the gateway is back, and the delivery log shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_delivery_is_retried_with_its_id_and_survives_a_kill_9() {
    let receiver = Receiver::start(StatusCode::INTERNAL_SERVER_ERROR, false).await;
    let dir = tempfile::tempdir().expect("data dir");
    let config = crate::common::tiny_model_config(dir.path());
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str(
        "\n[webhooks]\nallow_private = true\npoll_interval = \"100ms\"\n\
         watch_interval = \"200ms\"\nretry_base = \"300ms\"\ntimeout = \"2s\"\n",
    );
    std::fs::write(&config, text).expect("config");
    let spawn = || {
        GatewayProcess::spawn(|command| {
            command
                .arg("--config")
                .arg(&config)
                .arg("--data-dir")
                .arg(dir.path());
        })
    };
    let mut gateway = spawn();
    let channel = gateway.channel().await;
    TenantAdminClient::new(channel.clone())
        .create_tenant(admin(ascend_gateway::api::pb::v1::CreateTenantRequest {
            slug: "flaky-receiver".to_owned(),
            ..Default::default()
        }))
        .await
        .expect("tenant");
    let (webhook_id, secret) =
        create_webhook(&channel, "", &receiver.url, &["tenant.suspended"]).await;
    TenantAdminClient::new(channel.clone())
        .suspend_tenant(admin(SuspendTenantRequest {
            tenant: "flaky-receiver".to_owned(),
            reason: "unpaid".to_owned(),
        }))
        .await
        .expect("suspend");
    // Two attempts answered 500: the same event both times.
    let posts = receiver
        .wait_for(Duration::from_secs(20), |posts| posts.len() >= 2)
        .await;
    let event_id = posts[0].event_id();
    assert!(posts.iter().all(|p| p.event_id() == event_id), "{posts:#?}");
    for post in &posts {
        assert_signed(post, &secret);
    }
    assert_eq!(posts[0].json()["data"]["reason"], "unpaid");
    let log = deliveries(&channel, &webhook_id, 10).await;
    assert_eq!(log.len(), 1, "{log:?}");
    assert!(
        log[0].attempts >= 2 && log[0].delivered_at.is_none(),
        "{log:?}"
    );
    assert_eq!(log[0].last_status, 500, "{log:?}");

    gateway.kill9();
    let before_restart = receiver.received().len();
    receiver.answer(StatusCode::NO_CONTENT);
    let gateway = spawn();
    let posts = receiver
        .wait_for(Duration::from_secs(30), |posts| {
            posts.len() > before_restart
        })
        .await;
    let after = &posts[before_restart];
    assert_eq!(
        after.event_id(),
        event_id,
        "the same event after the restart"
    );
    assert_signed(after, &secret);
    let channel = gateway.channel().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = deliveries(&channel, &webhook_id, 10).await;
        if log[0].delivered_at.is_some() {
            assert_eq!(log[0].last_status, 204);
            break;
        }
        assert!(Instant::now() < deadline, "never marked delivered: {log:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Delivered: not sent again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        receiver.received().len(),
        posts.len(),
        "no redelivery after a 2xx"
    );
    let (status, _) = gateway.terminate().await;
    assert!(status.success(), "{status:?}");
}

/// A receiver that never answers: the change that caused the event returns
/// at once, the attempt ends at the timeout, and the log says why.
#[tokio::test]
async fn a_receiver_that_never_answers_holds_nothing_up() {
    let receiver = Receiver::start(StatusCode::OK, true).await;
    let gateway = quick_gateway(|s| {
        s.webhooks.timeout = Duration::from_millis(500);
    })
    .await;
    let channel = &gateway.channel;
    let (webhook_id, _) = create_webhook(channel, "", &receiver.url, &["tenant.suspended"]).await;
    for i in 0..20 {
        let slug = format!("hung-{i:02}");
        crate::common::tenant_with_limits(channel, &slug, Default::default()).await;
        TenantAdminClient::new(channel.clone())
            .suspend_tenant(admin(SuspendTenantRequest {
                tenant: slug,
                reason: String::new(),
            }))
            .await
            .expect("the suspension does not wait for the receiver");
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log = deliveries(channel, &webhook_id, 100).await;
        assert_eq!(log.len(), 20);
        if log
            .iter()
            .any(|d| d.last_error.contains("no answer within"))
        {
            assert!(log.iter().all(|d| d.delivered_at.is_none()));
            break;
        }
        assert!(Instant::now() < deadline, "no timeout recorded: {log:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Inference goes on meanwhile.
    let (_, key) =
        crate::common::tenant_with_limits(channel, "unhindered", Default::default()).await;
    InferenceClient::new(channel.clone())
        .generate(authed(
            ascend_gateway::api::pb::v1::GenerateRequest {
                model: "tiny".to_owned(),
                prompt: "hi".to_owned(),
                max_tokens: Some(4),
                ..Default::default()
            },
            &key,
        ))
        .await
        .expect("serving is not held up");
    gateway.stop().await.expect("stop");
}

#[tokio::test]
async fn bad_endpoints_are_refused_with_the_reason() {
    let data_dir = tempfile::tempdir().expect("data dir");
    let gateway = TestGateway::start_with(test_settings(&data_dir), data_dir).await;
    let mut client = WebhooksClient::new(gateway.channel.clone());
    let long = format!("https://example.com/{}", "a".repeat(5000));
    for (url, events, field) in [
        ("ftp://example.com/hook", vec!["tenant.suspended"], "url"),
        ("http:///nohost", vec!["tenant.suspended"], "url"),
        ("not a url", vec!["tenant.suspended"], "url"),
        ("http://127.0.0.1:9/hook", vec!["tenant.suspended"], "url"),
        ("http://localhost/hook", vec!["tenant.suspended"], "url"),
        ("http://[::1]/hook", vec!["tenant.suspended"], "url"),
        (
            "http://169.254.169.254/latest/meta-data",
            vec!["tenant.suspended"],
            "url",
        ),
        ("http://10.0.0.1/", vec!["tenant.suspended"], "url"),
        ("http://u:p@example.com/", vec!["tenant.suspended"], "url"),
        (long.as_str(), vec!["tenant.suspended"], "url"),
        ("https://93.184.216.34/hook", vec![], "events"),
        ("https://93.184.216.34/hook", vec!["budget.*"], "events"),
        ("https://93.184.216.34/hook", vec!["webhook.test"], "events"),
    ] {
        let refused = client
            .create_webhook(admin(CreateWebhookRequest {
                tenant: String::new(),
                url: url.to_owned(),
                events: events.iter().map(|e| (*e).to_owned()).collect(),
            }))
            .await
            .expect_err(url);
        assert_eq!(refused.code(), Code::InvalidArgument, "{url}: {refused:?}");
        assert!(refused.message().contains(field), "{url}: {refused:?}");
    }
    let refused = client
        .create_webhook(admin(CreateWebhookRequest {
            tenant: "nobody".to_owned(),
            url: "https://example.com/".to_owned(),
            events: vec!["tenant.suspended".to_owned()],
        }))
        .await
        .expect_err("unknown tenant");
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
    // A tenant key cannot manage webhooks.
    let (_, key) =
        crate::common::tenant_with_limits(&gateway.channel, "nosy", Default::default()).await;
    let refused = client
        .list_webhooks(authed(Default::default(), &key))
        .await
        .expect_err("admin only");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    for id in ["", "wh_missing"] {
        let refused = client
            .delete_webhook(admin(DeleteWebhookRequest { id: id.to_owned() }))
            .await
            .expect_err("no such webhook");
        assert!(
            matches!(refused.code(), Code::InvalidArgument | Code::NotFound),
            "{refused:?}"
        );
    }
    assert!(
        client
            .list_webhooks(admin(Default::default()))
            .await
            .expect("list")
            .into_inner()
            .webhooks
            .is_empty()
    );
    gateway.stop().await.expect("stop");
}

/// `webhook test` reaches that endpoint alone; a deleted endpoint gets
/// nothing more.
#[tokio::test]
async fn test_events_reach_one_endpoint_and_deleted_ones_none() {
    let gateway = quick_gateway(|_| {}).await;
    let (first, second) = (
        Receiver::start(StatusCode::OK, false).await,
        Receiver::start(StatusCode::OK, false).await,
    );
    let channel = &gateway.channel;
    let (first_id, secret) = create_webhook(channel, "", &first.url, &["tenant.suspended"]).await;
    let (second_id, _) = create_webhook(channel, "", &second.url, &["tenant.suspended"]).await;
    let event_id = WebhooksClient::new(channel.clone())
        .test_webhook(admin(TestWebhookRequest { id: first_id }))
        .await
        .expect("test")
        .into_inner()
        .event_id;
    let posts = first
        .wait_for(Duration::from_secs(10), |p| !p.is_empty())
        .await;
    assert_eq!(posts[0].event_id(), event_id);
    assert_eq!(posts[0].json()["type"], "webhook.test");
    assert_signed(&posts[0], &secret);
    WebhooksClient::new(channel.clone())
        .delete_webhook(admin(DeleteWebhookRequest { id: second_id }))
        .await
        .expect("delete");
    crate::common::tenant_with_limits(channel, "after-delete", Default::default()).await;
    TenantAdminClient::new(channel.clone())
        .suspend_tenant(admin(SuspendTenantRequest {
            tenant: "after-delete".to_owned(),
            reason: String::new(),
        }))
        .await
        .expect("suspend");
    first
        .wait_for(Duration::from_secs(10), |p| p.len() == 2)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(second.received().is_empty(), "{:?}", second.received());
    gateway.stop().await.expect("stop");
}

/// The events read off durable state by the watcher: a month's tokens
/// reaching the quota, and a key expiring within the notice, each once, to
/// an operator-wide endpoint.
#[tokio::test]
async fn quota_and_expiring_key_events_come_once_to_the_operators_endpoint() {
    use ascend_gateway::api::pb::v1::{CreateApiKeyRequest, TenantLimits};
    let gateway = quick_gateway(|_| {}).await;
    let channel = &gateway.channel;
    let receiver = Receiver::start(StatusCode::OK, false).await;
    let (_, secret) = create_webhook(
        channel,
        "",
        &receiver.url,
        &["quota.exhausted", "api_key.expiring"],
    )
    .await;
    let (tenant_id, key) = crate::common::tenant_with_limits(
        channel,
        "quota-watched",
        TenantLimits {
            monthly_token_quota: Some(20),
            ..Default::default()
        },
    )
    .await;
    let request = exact_request(channel, &key).await;
    for _ in 0..2 {
        InferenceClient::new(channel.clone())
            .generate(authed(request.clone(), &key))
            .await
            .expect("within the quota");
    }
    let in_two_days = ascend_gateway::store::now_us() / 1_000_000 + 2 * 86_400;
    let expiring = TenantAdminClient::new(channel.clone())
        .create_api_key(admin(CreateApiKeyRequest {
            tenant: "quota-watched".to_owned(),
            name: "short-lived".to_owned(),
            expires_at: Some(prost_types::Timestamp {
                seconds: in_two_days,
                nanos: 0,
            }),
            ..Default::default()
        }))
        .await
        .expect("key")
        .into_inner()
        .key
        .expect("key");
    let kinds = |posts: &[Received]| {
        let mut kinds: Vec<String> = posts
            .iter()
            .map(|p| p.json()["type"].as_str().unwrap_or_default().to_owned())
            .collect();
        kinds.sort();
        kinds
    };
    receiver
        .wait_for(Duration::from_secs(20), |posts| {
            kinds(posts) == ["api_key.expiring", "quota.exhausted"]
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let posts = receiver.received();
    assert_eq!(
        kinds(&posts),
        ["api_key.expiring", "quota.exhausted"],
        "once each: {posts:#?}"
    );
    for post in &posts {
        assert_signed(post, &secret);
        assert_eq!(post.json()["tenant_id"], tenant_id.as_str());
        match post.json()["type"].as_str() {
            Some("quota.exhausted") => {
                assert_eq!(post.json()["data"]["tokens_used"], 20);
                assert_eq!(post.json()["data"]["monthly_token_quota"], 20);
            }
            _ => {
                assert_eq!(post.json()["data"]["key_id"], expiring.key_id.as_str());
                assert_eq!(post.json()["data"]["expires_at"], in_two_days);
            }
        }
    }
    gateway.stop().await.expect("stop");
}

/// A tenant's own thresholds replace the gateway's, and finalizing an
/// invoice sends `invoice.finalized` from the finalization's transaction.
#[tokio::test]
async fn per_tenant_thresholds_and_finalized_invoices() {
    use ascend_gateway::api::pb::v1::billing_client::BillingClient;
    use ascend_gateway::api::pb::v1::{
        BudgetAlerts, CreateApiKeyRequest, CreateTenantRequest, FinalizeInvoiceRequest, Money,
        TenantLimits,
    };
    let gateway = quick_gateway(|s| {
        s.billing.grace_period = Duration::ZERO;
    })
    .await;
    let channel = &gateway.channel;
    let receiver = Receiver::start(StatusCode::OK, false).await;
    let (_, secret) = create_webhook(
        channel,
        "",
        &receiver.url,
        &["budget.threshold_reached", "invoice.finalized"],
    )
    .await;
    crate::budgets::put_plan(channel, "own-alerts-plan").await;
    let mut admin_client = TenantAdminClient::new(channel.clone());
    let tenant = admin_client
        .create_tenant(admin(CreateTenantRequest {
            slug: "own-alerts".to_owned(),
            price_plan: "own-alerts-plan".to_owned(),
            limits: Some(TenantLimits {
                monthly_budget: Some(Money {
                    currency_code: String::new(),
                    amount_nanos: CENT_NANOS,
                }),
                ..Default::default()
            }),
            budget_alerts: Some(BudgetAlerts {
                percents: vec![90, 30],
            }),
            ..Default::default()
        }))
        .await
        .expect("tenant")
        .into_inner();
    assert_eq!(tenant.budget_alert_percents, [30, 90], "kept ascending");
    for (percents, field) in [
        (vec![0], "budget_alerts.percents"),
        (vec![50, 50], "budget_alerts.percents"),
        (vec![101], "budget_alerts.percents"),
        ((1..=11).collect(), "budget_alerts.percents"),
    ] {
        let refused = admin_client
            .update_tenant(admin(ascend_gateway::api::pb::v1::UpdateTenantRequest {
                tenant: "own-alerts".to_owned(),
                budget_alerts: Some(BudgetAlerts {
                    percents: percents.clone(),
                }),
                ..Default::default()
            }))
            .await
            .expect_err("bad thresholds");
        assert_eq!(refused.code(), Code::InvalidArgument, "{percents:?}");
        assert!(refused.message().contains(field), "{refused:?}");
    }
    let key = admin_client
        .create_api_key(admin(CreateApiKeyRequest {
            tenant: "own-alerts".to_owned(),
            ..Default::default()
        }))
        .await
        .expect("key")
        .into_inner()
        .secret;
    let request = exact_request(channel, &key).await;
    // $0.004 of $0.01: past 30%, not 50% (the gateway's) nor 90%.
    for _ in 0..2 {
        InferenceClient::new(channel.clone())
            .generate(authed(request.clone(), &key))
            .await
            .expect("within the budget");
    }
    let posts = receiver
        .wait_for(Duration::from_secs(20), |p| !p.is_empty())
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.received().len(), 1, "{posts:#?}");
    assert_eq!(threshold(&posts[0]), 30);

    // Last month's usage, then its invoice finalized.
    let last_month = ascend_gateway::calendar::Month::of_us(
        ascend_gateway::calendar::Month::of_us(ascend_gateway::store::now_us()).start_us() - 1,
    );
    crate::billing::record(
        &gateway.db,
        &[(
            tenant.id.as_str(),
            "last-month-1",
            "tiny",
            last_month.start_us() + 3_600_000_000,
        )],
    )
    .await;
    let invoice_id = BillingClient::new(channel.clone())
        .get_invoice(admin(ascend_gateway::api::pb::v1::GetInvoiceRequest {
            tenant: tenant.id.clone(),
            period: last_month.to_string(),
            ..Default::default()
        }))
        .await
        .expect("last month's draft")
        .into_inner()
        .id;
    let finalized = BillingClient::new(channel.clone())
        .finalize_invoice(admin(FinalizeInvoiceRequest {
            invoice_id: invoice_id.clone(),
        }))
        .await
        .expect("finalize")
        .into_inner();
    let posts = receiver
        .wait_for(Duration::from_secs(20), |p| p.len() == 2)
        .await;
    let event = posts[1].json();
    assert_eq!(event["type"], "invoice.finalized");
    assert_eq!(event["data"]["invoice_id"], invoice_id.as_str());
    assert_eq!(
        event["data"]["total"]["amount_nanos"],
        finalized.total.expect("total").amount_nanos
    );
    assert_signed(&posts[1], &secret);
    gateway.stop().await.expect("stop");
}
