//! Per-key limits inside the tenant's: a key's own rate and budget bind
//! before its tenant's, other keys of the tenant are not held to them, the
//! tenant's limits still bind across its keys, a change applies at once;
//! on the in-process limits over SQLite and on two replicas over Redis and
//! PostgreSQL; bad key limits are refused naming the field.

use ascend_gateway::api::pb::v1::inference_client::InferenceClient;
use ascend_gateway::api::pb::v1::tenant_admin_client::TenantAdminClient;
use ascend_gateway::api::pb::v1::{
    CreateApiKeyRequest, GenerateRequest, Money, RevokeApiKeyRequest, TenantLimits,
    UpdateApiKeyRequest,
};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::budgets::{CENT_NANOS, budget_tenant, exact_request, replicas_on_pg_and_redis};
use crate::common::{TestGateway, admin, authed};

fn usd(nanos: i64) -> Option<Money> {
    Some(Money {
        currency_code: "USD".to_owned(),
        amount_nanos: nanos,
    })
}

/// A key of `tenant` with these limits: (key id, full key).
async fn key_with(channel: &Channel, tenant: &str, limits: TenantLimits) -> (String, String) {
    let issued = TenantAdminClient::new(channel.clone())
        .create_api_key(admin(CreateApiKeyRequest {
            tenant: tenant.to_owned(),
            name: "limited".to_owned(),
            limits: Some(limits),
            ..Default::default()
        }))
        .await
        .expect("key")
        .into_inner();
    (issued.key.expect("key").key_id, issued.secret)
}

async fn generate(
    channel: &Channel,
    key: &str,
    request: &GenerateRequest,
) -> Result<(), tonic::Status> {
    InferenceClient::new(channel.clone())
        .generate(authed(request.clone(), key))
        .await
        .map(|_| ())
}

/// Refused by `subject`, and the message says whose limit it was.
fn assert_refused(result: Result<(), tonic::Status>, owner: &str, subject: &str) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains(&format!("{owner} limit `{subject}`")),
        "{status:?}"
    );
    let failure = status.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(failure.violations[0].subject, subject, "{status:?}");
    assert!(
        failure.violations[0].description.contains(owner),
        "{status:?}"
    );
}

/// On `channels` (one per replica): a key's rate and budget, then the
/// tenant's budget across keys.
async fn keys_inside_their_tenant(channels: &[Channel], slug: &str) {
    let at = |i: usize| &channels[i % channels.len()];
    // $0.002 a request; the tenant may spend $0.01 this month.
    let (_, unlimited) = budget_tenant(at(0), slug, Some(CENT_NANOS)).await;
    let request = exact_request(at(0), &unlimited).await;

    // A key limited to one request every two seconds.
    let (slow_id, slow) = key_with(
        at(0),
        slug,
        TenantLimits {
            requests_per_second: Some(0.5),
            burst: Some(1),
            ..Default::default()
        },
    )
    .await;
    generate(at(0), &slow, &request)
        .await
        .expect("the first fits");
    assert_refused(
        generate(at(1), &slow, &request).await,
        "API key",
        "requests_per_second",
    );
    // Raised: applies at once (on the other replica within auth.cache_ttl,
    // so the same replica is asked).
    TenantAdminClient::new(at(0).clone())
        .update_api_key(admin(UpdateApiKeyRequest {
            key_id: slow_id,
            limits: Some(TenantLimits {
                requests_per_second: Some(1000.0),
                burst: Some(1000),
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .expect("update");
    generate(at(0), &slow, &request)
        .await
        .expect("the raised rate applies at once");

    // A key with a budget of its own: $0.004 of the tenant's $0.01.
    let (_, thrifty) = key_with(
        at(0),
        slug,
        TenantLimits {
            monthly_budget: usd(2 * 2_000_000),
            ..Default::default()
        },
    )
    .await;
    for i in 0..2 {
        generate(at(i), &thrifty, &request)
            .await
            .expect("within the key's budget");
    }
    assert_refused(
        generate(at(0), &thrifty, &request).await,
        "API key",
        "monthly_budget",
    );
    // $0.008 spent in all: one more request on another key, then the tenant's
    // budget refuses every key.
    generate(at(1), &unlimited, &request)
        .await
        .expect("the key's budget does not bind other keys");
    assert_refused(
        generate(at(0), &unlimited, &request).await,
        "tenant",
        "monthly_budget",
    );
    assert_refused(
        generate(at(0), &slow, &request).await,
        "tenant",
        "monthly_budget",
    );
}

#[tokio::test]
async fn key_limits_bind_inside_the_tenants_on_sqlite() {
    let gateway = TestGateway::start().await;
    keys_inside_their_tenant(std::slice::from_ref(&gateway.channel), "keyed-local").await;
    gateway.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_limits_bind_inside_the_tenants_across_replicas_on_redis() {
    let (_db, replicas) = replicas_on_pg_and_redis(2, |_| {}).await;
    let channels: Vec<Channel> = replicas.iter().map(|g| g.channel.clone()).collect();
    keys_inside_their_tenant(&channels, "keyed-redis").await;
    for replica in replicas {
        replica.stop().await.expect("stop");
    }
}

#[tokio::test]
async fn bad_key_limits_are_refused_naming_the_field() {
    let gateway = TestGateway::start().await;
    let channel = &gateway.channel;
    budget_tenant(channel, "bad-keys", None).await;
    let mut client = TenantAdminClient::new(channel.clone());
    for (limits, field) in [
        (
            TenantLimits {
                monthly_token_quota: Some(10),
                ..Default::default()
            },
            "limits.monthly_token_quota",
        ),
        (
            TenantLimits {
                monthly_budget: Some(Money {
                    currency_code: "EUR".to_owned(),
                    amount_nanos: CENT_NANOS,
                }),
                ..Default::default()
            },
            "limits.monthly_budget.currency_code",
        ),
        (
            TenantLimits {
                monthly_budget: usd(-1),
                ..Default::default()
            },
            "limits.monthly_budget.amount_nanos",
        ),
        (
            TenantLimits {
                requests_per_second: Some(f64::NAN),
                ..Default::default()
            },
            "limits.requests_per_second",
        ),
        (
            TenantLimits {
                burst: Some(5),
                ..Default::default()
            },
            "limits.burst",
        ),
    ] {
        let refused = client
            .create_api_key(admin(CreateApiKeyRequest {
                tenant: "bad-keys".to_owned(),
                limits: Some(limits.clone()),
                ..Default::default()
            }))
            .await
            .expect_err("refused");
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{limits:?}: {refused:?}"
        );
        assert!(refused.message().contains(field), "{limits:?}: {refused:?}");
    }
    let (key_id, _) = key_with(channel, "bad-keys", TenantLimits::default()).await;
    let refused = client
        .update_api_key(admin(UpdateApiKeyRequest {
            key_id: key_id.clone(),
            clear_limits: vec!["everything".to_owned()],
            ..Default::default()
        }))
        .await
        .expect_err("unknown limit name");
    assert!(refused.message().contains("clear_limits"), "{refused:?}");
    client
        .revoke_api_key(admin(RevokeApiKeyRequest {
            key_id: key_id.clone(),
        }))
        .await
        .expect("revoke");
    for id in [key_id.as_str(), "0123456789abcdef", ""] {
        let refused = client
            .update_api_key(admin(UpdateApiKeyRequest {
                key_id: id.to_owned(),
                ..Default::default()
            }))
            .await
            .expect_err("no live key");
        assert_eq!(refused.code(), Code::NotFound, "{id}: {refused:?}");
    }
    // A plan in another currency while a key's budget is in USD: refused.
    let (budgeted, _) = key_with(
        channel,
        "bad-keys",
        TenantLimits {
            monthly_budget: usd(CENT_NANOS),
            ..Default::default()
        },
    )
    .await;
    ascend_gateway::api::pb::v1::billing_client::BillingClient::new(channel.clone())
        .put_prices(admin(ascend_gateway::api::pb::v1::PutPricesRequest {
            plan: "in-euros".to_owned(),
            currency_code: "EUR".to_owned(),
            description: String::new(),
            prices: vec![ascend_gateway::api::pb::v1::Price {
                model: "tiny".to_owned(),
                prompt_per_million_tokens: Some(Money {
                    currency_code: "EUR".to_owned(),
                    amount_nanos: 1,
                }),
                completion_per_million_tokens: Some(Money {
                    currency_code: "EUR".to_owned(),
                    amount_nanos: 1,
                }),
                effective_from: Some(prost_types::Timestamp::default()),
                ..Default::default()
            }],
        }))
        .await
        .expect("a EUR plan");
    let refused = client
        .update_tenant(admin(ascend_gateway::api::pb::v1::UpdateTenantRequest {
            tenant: "bad-keys".to_owned(),
            price_plan: Some("in-euros".to_owned()),
            ..Default::default()
        }))
        .await
        .expect_err("a key budget in USD");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("price_plan") && refused.message().contains(&budgeted),
        "{refused:?}"
    );
    // A tenant key cannot change keys.
    let (_, key) = key_with(channel, "bad-keys", TenantLimits::default()).await;
    let refused = client
        .update_api_key(authed(UpdateApiKeyRequest::default(), &key))
        .await
        .expect_err("admin only");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    gateway.stop().await.expect("stop");
}
