//! Monthly spend budgets: racing requests never overshoot the budget, on the
//! in-process limits over SQLite and on two replicas sharing Redis and
//! PostgreSQL; a budget set mid-month counts the month's earlier spend;
//! `GetBalance` agrees with the invoice draft to the nano; the HTTP API
//! answers 429; bad budgets are refused naming the field; and the limiter's
//! own counters (exact settlement, a counter seeded before its budget).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ascend_gateway::api::pb::v1::billing_client::BillingClient;
use ascend_gateway::api::pb::v1::inference_client::InferenceClient;
use ascend_gateway::api::pb::v1::tenant_admin_client::TenantAdminClient;
use ascend_gateway::api::pb::v1::{
    Balance, CountTokensRequest, CreateApiKeyRequest, CreateTenantRequest, GenerateRequest,
    GetBalanceRequest, GetInvoiceRequest, Money, Price, PutPricesRequest, TenantLimits,
    UpdateTenantRequest,
};
use ascend_gateway::calendar::Month;
use ascend_gateway::limits::{
    BackgroundSettlements, Cost, FailurePolicy, LimitError, LimitKind, LimitSettings, Limiter,
    MonthToDate, Used,
};
use ascend_gateway::tenancy::{Budget, Limits};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::common::{PgTestDb, TestGateway, admin, authed, test_settings, token_count};

/// Every generation below: this many prompt plus completion tokens.
const TOKENS_PER_REQUEST: u32 = 10;
/// The price that makes each of them cost exactly $0.002.
const PER_MILLION_NANOS: i64 = 200_000_000_000;
const REQUEST_NANOS: i64 = 2_000_000;
pub(crate) const CENT_NANOS: i64 = 10_000_000;

fn usd(nanos: i64) -> Option<Money> {
    Some(Money {
        currency_code: "USD".to_owned(),
        amount_nanos: nanos,
    })
}

/// A plan `plan` in USD pricing `tiny` on every device at $200 per million
/// tokens, prompt and completion alike.
pub(crate) async fn put_plan(channel: &Channel, plan: &str) {
    BillingClient::new(channel.clone())
        .put_prices(admin(PutPricesRequest {
            plan: plan.to_owned(),
            currency_code: "USD".to_owned(),
            description: "budget tests".to_owned(),
            prices: vec![Price {
                model: "tiny".to_owned(),
                device_class: String::new(),
                prompt_per_million_tokens: usd(PER_MILLION_NANOS),
                cached_prompt_per_million_tokens: None,
                completion_per_million_tokens: usd(PER_MILLION_NANOS),
                per_kwh: None,
                effective_from: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: 0,
                }),
            }],
        }))
        .await
        .expect("put prices");
}

/// A tenant on its own priced plan with `budget_nanos` (if any), and a key
/// with `inference` and `billing:read`: (tenant id, key).
pub(crate) async fn budget_tenant(
    channel: &Channel,
    slug: &str,
    budget_nanos: Option<i64>,
) -> (String, String) {
    let plan = format!("{slug}-plan");
    put_plan(channel, &plan).await;
    let request = CreateTenantRequest {
        slug: slug.to_owned(),
        price_plan: plan,
        limits: Some(TenantLimits {
            monthly_budget: budget_nanos.map(|nanos| Money {
                // Empty: the plan's currency.
                currency_code: String::new(),
                amount_nanos: nanos,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = crate::common::create_tenant(channel, request).await;
    let mut admin_client = TenantAdminClient::new(channel.clone());
    let key = admin_client
        .create_api_key(admin(CreateApiKeyRequest {
            tenant: slug.to_owned(),
            scopes: vec!["inference".to_owned(), "billing:read".to_owned()],
            ..Default::default()
        }))
        .await
        .expect("key")
        .into_inner()
        .secret;
    (id, key)
}

/// A request of exactly [`TOKENS_PER_REQUEST`] tokens: its worst case is
/// its exact cost, so the number that fit a budget is known.
pub(crate) async fn exact_request(channel: &Channel, key: &str) -> GenerateRequest {
    let prompt_tokens = token_count(
        channel,
        key,
        CountTokensRequest {
            model: "tiny".to_owned(),
            prompt: "hi".to_owned(),
            ..Default::default()
        },
    )
    .await;
    GenerateRequest {
        model: "tiny".to_owned(),
        prompt: "hi".to_owned(),
        max_tokens: Some(TOKENS_PER_REQUEST - prompt_tokens),
        ignore_eos: true,
        seed: Some(3),
        ..Default::default()
    }
}

/// The balance as the tenant's own key sees it.
async fn balance(channel: &Channel, key: &str) -> Balance {
    BillingClient::new(channel.clone())
        .get_balance(authed(GetBalanceRequest::default(), key))
        .await
        .expect("balance")
        .into_inner()
}

/// Waits until the month's draft holds `nanos` of exact spend (the metering
/// writers ship usage in the background), asking with the admin token (a
/// tenant key's billing calls are rate-limited). The draft's own total
/// rounds each line to the cent; its exact sum is in the invoice lines.
async fn wait_for_spend(channel: &Channel, tenant_id: &str, nanos: i64) -> Balance {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let b = BillingClient::new(channel.clone())
            .get_balance(admin(GetBalanceRequest {
                tenant: tenant_id.to_owned(),
            }))
            .await
            .expect("balance")
            .into_inner();
        let draft = BillingClient::new(channel.clone())
            .get_invoice(admin(GetInvoiceRequest {
                tenant: tenant_id.to_owned(),
                period: Month::of_us(ascend_gateway::store::now_us()).to_string(),
                ..Default::default()
            }))
            .await;
        let spent = match draft {
            Ok(draft) => exact_nanos(&draft.into_inner()),
            Err(status) if status.code() == Code::NotFound => 0,
            Err(status) => panic!("draft: {status:?}"),
        };
        if spent == nanos {
            return b;
        }
        assert!(
            Instant::now() < deadline,
            "the draft shows {spent} nanos, not {nanos}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The draft's lines at their exact amounts: quantity x unit price / 1e6,
/// computed here from what the invoice shows.
fn exact_nanos(draft: &ascend_gateway::api::pb::v1::Invoice) -> i64 {
    draft
        .lines
        .iter()
        .map(|line| {
            let unit = line.unit_price.as_ref().map_or(0, |m| m.amount_nanos);
            i64::try_from(line.quantity).expect("quantity") * unit / 1_000_000
        })
        .sum()
}

/// 50 requests at $0.002 each race for a $0.01 budget across `channels`
/// (one per replica): exactly five are admitted, the rest are refused with
/// a `QuotaFailure` naming the budget, and the spend is the budget exactly.
/// Then the balance agrees with the invoice draft to the nano.
async fn race_for_the_budget(channels: &[Channel], slug: &str) {
    let budget = CENT_NANOS;
    let (tenant_id, key) = budget_tenant(&channels[0], slug, Some(budget)).await;
    let request = exact_request(&channels[0], &key).await;
    let racers: Vec<_> = (0..50)
        .map(|i| {
            let channel = channels[i % channels.len()].clone();
            let (key, request) = (key.clone(), request.clone());
            tokio::spawn(async move {
                InferenceClient::new(channel)
                    .generate(authed(request, &key))
                    .await
            })
        })
        .collect();
    let mut spent = 0;
    let mut admitted = 0;
    for racer in racers {
        match racer.await.expect("join") {
            Ok(answer) => {
                admitted += 1;
                let cost = answer
                    .into_inner()
                    .usage
                    .expect("usage")
                    .cost
                    .expect("cost");
                assert_eq!(cost.amount_nanos, REQUEST_NANOS, "each costs $0.002");
                spent += cost.amount_nanos;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                let violation = status
                    .get_details_quota_failure()
                    .expect("a QuotaFailure detail");
                assert_eq!(
                    violation.violations[0].subject, "monthly_budget",
                    "{status:?}"
                );
            }
        }
    }
    assert!(spent <= budget, "spent {spent} of a {budget} budget");
    assert_eq!(admitted, 5, "the racers that fit are admitted, no more");

    wait_for_spend(&channels[0], &tenant_id, budget).await;
    let b = balance(&channels[0], &key).await;
    let draft = BillingClient::new(channels[0].clone())
        .get_invoice(authed(
            GetInvoiceRequest {
                period: Month::of_us(ascend_gateway::store::now_us()).to_string(),
                ..Default::default()
            },
            &key,
        ))
        .await
        .expect("draft")
        .into_inner();
    assert_eq!(b.spent, draft.total, "the balance is the draft's total");
    assert_eq!(b.budget_spent, usd(budget), "each request counted exactly");
    assert_eq!(b.monthly_budget, usd(budget));
    assert_eq!(b.reserved, usd(0), "nothing in flight");
    assert_eq!(b.remaining, usd(0));
    assert!(!b.is_available);
    let refused = InferenceClient::new(channels[1 % channels.len()].clone())
        .generate(authed(request, &key))
        .await
        .expect_err("the budget is spent");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("monthly_budget"), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_racers_never_overshoot_the_budget_on_sqlite() {
    let gateway = TestGateway::start().await;
    race_for_the_budget(std::slice::from_ref(&gateway.channel), "racers-local").await;
    gateway.stop().await.expect("stop");
}

/// `count` gateways sharing one fresh PostgreSQL database and one Redis
/// key prefix of their own (limits fail closed), each set up by `configure`
/// first. The database lives as long as the returned handle.
pub(crate) async fn replicas_on_pg_and_redis(
    count: usize,
    configure: impl Fn(&mut ascend_gateway::config::Settings),
) -> (PgTestDb, Vec<TestGateway>) {
    let test_db = PgTestDb::create().await;
    let prefix = format!("agwtest:{}:", uuid::Uuid::new_v4().simple());
    let mut replicas = Vec::new();
    for _ in 0..count {
        let data_dir = tempfile::tempdir().expect("data dir");
        let mut settings = test_settings(&data_dir);
        settings.database.url = Some(test_db.secret_url());
        settings.redis.url = Some(secrecy::SecretString::from(
            std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned()),
        ));
        settings.limits.redis_prefix = prefix.clone();
        settings.limits.redis_failure = FailurePolicy::FailClosed;
        configure(&mut settings);
        replicas.push(TestGateway::start_with(settings, data_dir).await);
    }
    (test_db, replicas)
}

/// Two replicas sharing one Redis and one PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_racers_never_overshoot_the_budget_across_replicas_on_redis() {
    let (_db, replicas) = replicas_on_pg_and_redis(2, |_| {}).await;
    let channels: Vec<Channel> = replicas.iter().map(|g| g.channel.clone()).collect();
    race_for_the_budget(&channels, "racers-redis").await;
    for replica in replicas {
        replica.stop().await.expect("stop");
    }
}

#[tokio::test]
async fn a_budget_set_mid_month_counts_the_months_earlier_spend() {
    let gateway = TestGateway::start().await;
    let channel = &gateway.channel;
    let (tenant_id, key) = budget_tenant(channel, "mid-month", None).await;
    let request = exact_request(channel, &key).await;
    let mut inference = InferenceClient::new(channel.clone());
    for _ in 0..3 {
        inference
            .generate(authed(request.clone(), &key))
            .await
            .expect("no budget yet");
    }
    let before = wait_for_spend(channel, &tenant_id, 3 * REQUEST_NANOS).await;
    assert_eq!(before.monthly_budget, None);
    assert_eq!(before.budget_spent, None);
    assert_eq!(before.remaining, None);
    assert!(before.is_available);

    TenantAdminClient::new(channel.clone())
        .update_tenant(admin(UpdateTenantRequest {
            tenant: tenant_id.clone(),
            limits: Some(TenantLimits {
                monthly_budget: usd(CENT_NANOS),
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .expect("set a budget");
    // $0.006 spent of $0.01: two more requests fit, the third does not.
    for _ in 0..2 {
        inference
            .generate(authed(request.clone(), &key))
            .await
            .expect("within what is left");
    }
    let refused = inference
        .generate(authed(request, &key))
        .await
        .expect_err("the month's earlier spend counts");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("monthly_budget"), "{refused:?}");

    // The HTTP API says so in OpenAI's terms.
    let reply = crate::http::post(
        &gateway,
        "/v1/completions",
        &key,
        &serde_json::json!({"model": "tiny", "prompt": "hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(reply.status, 429, "{}", reply.body);
    assert_eq!(
        reply.json()["error"]["code"],
        "insufficient_quota",
        "{}",
        reply.body
    );

    // DeepSeek's balance endpoint, with the same key: nothing left.
    let reply = crate::http::get(&gateway, "/user/balance", &key).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["is_available"], false, "{body}");
    assert_eq!(body["balance_infos"][0]["currency"], "USD", "{body}");
    assert_eq!(body["balance_infos"][0]["total_balance"], "0.00", "{body}");
    assert_eq!(
        body["balance_infos"][0]["granted_balance"], "0.00",
        "{body}"
    );
    // A tenant without a budget is available and has no balance to show.
    let (_, unbudgeted) = budget_tenant(channel, "no-budget", None).await;
    let body = crate::http::get(&gateway, "/user/balance", &unbudgeted)
        .await
        .json();
    assert_eq!(body["is_available"], true, "{body}");
    assert_eq!(body["balance_infos"], serde_json::json!([]), "{body}");
    let reply = crate::http::get(&gateway, "/user/balance", "agw_nonsense").await;
    assert_eq!(reply.status, 401, "{}", reply.body);
    gateway.stop().await.expect("stop");
}

#[tokio::test]
async fn bad_budgets_are_refused_naming_the_field() {
    let gateway = TestGateway::start().await;
    let channel = &gateway.channel;
    put_plan(channel, "bad-budget-plan").await;
    let mut client = TenantAdminClient::new(channel.clone());
    let create = |slug: &str, budget: Money| CreateTenantRequest {
        slug: slug.to_owned(),
        price_plan: "bad-budget-plan".to_owned(),
        limits: Some(TenantLimits {
            monthly_budget: Some(budget),
            ..Default::default()
        }),
        ..Default::default()
    };
    let money = |code: &str, nanos: i64| Money {
        currency_code: code.to_owned(),
        amount_nanos: nanos,
    };
    for (budget, field) in [
        (money("USD", -1), "limits.monthly_budget.amount_nanos"),
        (money("USD", i64::MIN), "limits.monthly_budget.amount_nanos"),
        (money("USD", 0), "limits.monthly_budget.amount_nanos"),
        (money("USD", i64::MAX), "limits.monthly_budget.amount_nanos"),
        (
            money("EUR", CENT_NANOS),
            "limits.monthly_budget.currency_code",
        ),
        (
            money("usd\u{0}", CENT_NANOS),
            "limits.monthly_budget.currency_code",
        ),
    ] {
        let refused = client
            .create_tenant(admin(create("bad-budget", budget.clone())))
            .await
            .expect_err("refused");
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{budget:?}: {refused:?}"
        );
        assert!(refused.message().contains(field), "{budget:?}: {refused:?}");
    }
    // A budget counts money: a model without a price under the plan is
    // refused rather than counted as free.
    BillingClient::new(channel.clone())
        .put_prices(admin(PutPricesRequest {
            plan: "prices-small-only".to_owned(),
            currency_code: "USD".to_owned(),
            description: String::new(),
            prices: vec![Price {
                model: "small".to_owned(),
                device_class: String::new(),
                prompt_per_million_tokens: usd(1),
                cached_prompt_per_million_tokens: None,
                completion_per_million_tokens: usd(1),
                per_kwh: None,
                effective_from: Some(prost_types::Timestamp::default()),
            }],
        }))
        .await
        .expect("a plan without tiny");
    let (_, key) = crate::common::tenant_with(
        channel,
        CreateTenantRequest {
            slug: "unpriced".to_owned(),
            price_plan: "prices-small-only".to_owned(),
            limits: Some(TenantLimits {
                monthly_budget: usd(CENT_NANOS),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    let refused = InferenceClient::new(channel.clone())
        .generate(authed(
            GenerateRequest {
                model: "tiny".to_owned(),
                prompt: "hi".to_owned(),
                max_tokens: Some(2),
                ..Default::default()
            },
            &key,
        ))
        .await
        .expect_err("no price for tiny");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("no price for model `tiny`"),
        "{refused:?}"
    );
    // Nothing was created by the refusals; a good budget still is.
    let tenant = client
        .create_tenant(admin(create("bad-budget", money("", CENT_NANOS))))
        .await
        .expect("a good budget")
        .into_inner();
    assert_eq!(
        tenant.limits.and_then(|l| l.monthly_budget),
        usd(CENT_NANOS),
        "the plan's currency is filled in"
    );
    gateway.stop().await.expect("stop");
}

fn budget_limits(nanos: u64) -> Limits {
    Limits {
        monthly_budget: Some(Budget {
            currency_code: "USD".to_owned(),
            amount_nanos: nanos,
        }),
        ..Limits::default()
    }
}

fn spend(tokens: u64, spend_nanos: u64) -> Cost {
    Cost {
        tokens,
        spend_nanos,
    }
}

/// Exact settlement on one limiter: an unused reservation comes back, a
/// spend past its reservation is counted in full, and a refusal names the
/// budget.
async fn settlement_is_exact_on(limiter: &Arc<Limiter>, tenant: &str) {
    let limits = budget_limits(10_000);
    let permit = limiter
        .admit(tenant, &limits, spend(10, 10_000))
        .await
        .expect("the whole budget");
    assert!(limiter.admit(tenant, &limits, spend(1, 1)).await.is_err());
    permit
        .settle(Used {
            tokens: 10,
            spend_nanos: 4_000,
        })
        .await;
    let counters = limiter.budget_counters(tenant).await.expect("counters");
    assert_eq!((counters.spent_nanos, counters.reserved_nanos), (4_000, 0));
    let permit = limiter
        .admit(tenant, &limits, spend(10, 1_000))
        .await
        .expect("6,000 left");
    assert_eq!(
        limiter
            .budget_counters(tenant)
            .await
            .expect("counters")
            .reserved_nanos,
        1_000
    );
    // It cost more than reserved (a price changed meanwhile): counted in full.
    permit
        .settle(Used {
            tokens: 10,
            spend_nanos: 5_500,
        })
        .await;
    let refused = limiter.admit(tenant, &limits, spend(10, 501)).await;
    assert!(
        matches!(
            refused,
            Err(LimitError::Exceeded {
                kind: LimitKind::MonthlyBudget,
                ..
            })
        ),
        "{refused:?}"
    );
    limiter
        .admit(tenant, &limits, spend(10, 500))
        .await
        .expect("exactly what is left")
        .settle(Used {
            tokens: 10,
            spend_nanos: 500,
        })
        .await;
    // A call that generates nothing is never refused by the budget.
    limiter
        .admit(tenant, &limits, Cost::default())
        .await
        .expect("a listing")
        .settle(Used::NOTHING)
        .await;
}

/// A limiter on the shared Redis under `prefix`, and its settlement queue
/// (kept alive by the caller).
async fn redis_limiter(prefix: &str) -> (Arc<Limiter>, BackgroundSettlements) {
    let url =
        std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let connection = redis::aio::ConnectionManager::new(redis::Client::open(url).expect("url"))
        .await
        .expect("Redis must run for these tests (TEST_REDIS_URL)");
    Limiter::new(
        Some(connection),
        LimitSettings {
            redis_failure: FailurePolicy::FailClosed,
            redis_prefix: prefix.to_owned(),
            ..LimitSettings::default()
        },
    )
}

#[tokio::test]
async fn budget_settlement_is_exact_on_both_backends() {
    let (local, _bg) = Limiter::new(None, LimitSettings::default());
    settlement_is_exact_on(&local, "exact-local").await;
    let prefix = format!("agwtest:{}:", uuid::Uuid::new_v4().simple());
    let (shared, _bg) = redis_limiter(&prefix).await;
    settlement_is_exact_on(&shared, "exact-redis").await;
}

/// A Redis counter made for a token quota before the tenant had a budget
/// has no spend in it: the first budgeted admission seeds the month's spend
/// from the invoice draft instead of counting from zero.
#[tokio::test]
async fn a_counter_seeded_before_its_budget_gets_the_months_spend() {
    let prefix = format!("agwtest:{}:", uuid::Uuid::new_v4().simple());
    let (limiter, _bg) = redis_limiter(&prefix).await;
    limiter.set_quota_seed(Arc::new(
        |_tenant: String, _since: i64, with_spend: bool| {
            Box::pin(async move {
                Ok(MonthToDate {
                    tokens: 100,
                    spend_nanos: with_spend.then_some(9_000),
                })
            })
        },
    ));
    let quota_only = Limits {
        monthly_token_quota: Some(1_000_000),
        ..Limits::default()
    };
    limiter
        .admit("late-budget", &quota_only, Cost::of_tokens(10))
        .await
        .expect("a quota counter without spend")
        .settle(Used::of_tokens(10))
        .await;
    let budgeted = Limits {
        monthly_token_quota: Some(1_000_000),
        ..budget_limits(10_000)
    };
    let refused = limiter
        .admit("late-budget", &budgeted, spend(10, 1_001))
        .await;
    assert!(
        matches!(
            refused,
            Err(LimitError::Exceeded {
                kind: LimitKind::MonthlyBudget,
                ..
            })
        ),
        "9,000 of 10,000 already spent this month: {refused:?}"
    );
    limiter
        .admit("late-budget", &budgeted, spend(10, 1_000))
        .await
        .expect("the last 1,000");
}
