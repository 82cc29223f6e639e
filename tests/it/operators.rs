//! Named operators with roles over real gRPC: a viewer reads but cannot
//! change, billing sets prices but cannot create tenants, an admin does
//! all, every change's audit row names its operator, a revoked token stops
//! at once, an operator token is refused on Inference, and bad input names
//! its field.

use ascend_gateway::api::pb::v1::billing_client::BillingClient;
use ascend_gateway::api::pb::v1::inference_client::InferenceClient;
use ascend_gateway::api::pb::v1::tenant_admin_client::TenantAdminClient;
use ascend_gateway::api::pb::v1::{
    CreateOperatorRequest, CreateTenantRequest, ListAuditEventsRequest, ListModelsRequest,
    ListTenantsRequest, Money, Price, PutPricesRequest, RevokeOperatorRequest,
};
use tonic::Code;
use tonic::transport::Channel;

use crate::common::{TestGateway, admin, authed};

async fn operator(channel: &Channel, name: &str, role: &str) -> String {
    TenantAdminClient::new(channel.clone())
        .create_operator(admin(CreateOperatorRequest {
            name: name.to_owned(),
            role: role.to_owned(),
        }))
        .await
        .expect("operator")
        .into_inner()
        .token
}

fn tenant(slug: &str) -> CreateTenantRequest {
    CreateTenantRequest {
        slug: slug.to_owned(),
        ..Default::default()
    }
}

fn prices(plan: &str) -> PutPricesRequest {
    let usd = |nanos| {
        Some(Money {
            currency_code: "USD".to_owned(),
            amount_nanos: nanos,
        })
    };
    PutPricesRequest {
        plan: plan.to_owned(),
        currency_code: "USD".to_owned(),
        description: String::new(),
        prices: vec![Price {
            model: "tiny".to_owned(),
            prompt_per_million_tokens: usd(1),
            completion_per_million_tokens: usd(1),
            effective_from: Some(prost_types::Timestamp::default()),
            ..Default::default()
        }],
    }
}

fn assert_denied(result: Result<impl std::fmt::Debug, tonic::Status>, role: &str) {
    let status = result.expect_err("denied");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(role), "{status:?}");
}

#[tokio::test]
async fn roles_bound_what_operators_do_and_the_audit_names_them() {
    let gateway = TestGateway::start().await;
    let channel = &gateway.channel;
    let alice = operator(channel, "alice", "admin").await;
    let vera = operator(channel, "vera", "viewer").await;
    let bill = operator(channel, "bill", "billing").await;
    let mut tenants = TenantAdminClient::new(channel.clone());

    tenants
        .create_tenant(authed(tenant("made-by-alice"), &alice))
        .await
        .expect("an admin creates tenants");
    // The viewer reads, and may not change anything.
    let listed = tenants
        .list_tenants(authed(ListTenantsRequest::default(), &vera))
        .await
        .expect("a viewer lists tenants")
        .into_inner();
    assert!(listed.tenants.iter().any(|t| t.slug == "made-by-alice"));
    assert_denied(
        tenants
            .create_tenant(authed(tenant("by-vera"), &vera))
            .await,
        "viewer",
    );
    assert_denied(
        BillingClient::new(channel.clone())
            .put_prices(authed(prices("vera-plan"), &vera))
            .await,
        "viewer",
    );
    // Billing sets prices, and may not create tenants or operators.
    BillingClient::new(channel.clone())
        .put_prices(authed(prices("bill-plan"), &bill))
        .await
        .expect("billing sets prices");
    assert_denied(
        tenants
            .create_tenant(authed(tenant("by-bill"), &bill))
            .await,
        "billing",
    );
    assert_denied(
        tenants
            .create_operator(authed(
                CreateOperatorRequest {
                    name: "mallory".to_owned(),
                    role: "admin".to_owned(),
                },
                &bill,
            ))
            .await,
        "billing",
    );
    // An operator token is not a tenant key.
    let refused = InferenceClient::new(channel.clone())
        .list_models(authed(ListModelsRequest {}, &alice))
        .await
        .expect_err("operators do not call Inference");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // Each change's audit row names its operator; the configured token is
    // `bootstrap`.
    let events = tenants
        .list_audit_events(authed(ListAuditEventsRequest::default(), &vera))
        .await
        .expect("a viewer reads the audit log")
        .into_inner()
        .events;
    let actor_of = |action: &str, target: &str| {
        events
            .iter()
            .find(|e| e.action == action && (target.is_empty() || e.target == target))
            .map(|e| e.actor.clone())
    };
    assert_eq!(
        actor_of("operator.create", "vera").as_deref(),
        Some("operator:bootstrap")
    );
    assert_eq!(
        actor_of("tenant.create", "").as_deref(),
        Some("operator:alice"),
        "{events:?}"
    );

    // Revoked: refused at once.
    tenants
        .revoke_operator(admin(RevokeOperatorRequest {
            operator: "vera".to_owned(),
        }))
        .await
        .expect("revoke");
    let refused = tenants
        .list_tenants(authed(ListTenantsRequest::default(), &vera))
        .await
        .expect_err("a revoked token");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    // A forged token of the right shape for alice's id.
    let forged = format!("{}{}", &alice[..alice.len() - 4], "0000");
    let refused = tenants
        .list_tenants(authed(ListTenantsRequest::default(), &forged))
        .await
        .expect_err("a wrong secret");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    gateway.stop().await.expect("stop");
}

#[tokio::test]
async fn bad_operators_are_refused_naming_the_field() {
    let gateway = TestGateway::start().await;
    let mut tenants = TenantAdminClient::new(gateway.channel.clone());
    for (name, role, field, code) in [
        ("ok-name", "root", "role", Code::InvalidArgument),
        ("ok-name", "", "role", Code::InvalidArgument),
        ("Bad Name", "viewer", "name", Code::InvalidArgument),
        ("bootstrap", "viewer", "name", Code::InvalidArgument),
        ("x", "viewer", "name", Code::InvalidArgument),
        ("0123456789abcdef", "viewer", "name", Code::InvalidArgument),
    ] {
        let refused = tenants
            .create_operator(admin(CreateOperatorRequest {
                name: name.to_owned(),
                role: role.to_owned(),
            }))
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), code, "{name}/{role}: {refused:?}");
        assert!(
            refused.message().contains(field),
            "{name}/{role}: {refused:?}"
        );
    }
    operator(&gateway.channel, "twice", "viewer").await;
    let refused = tenants
        .create_operator(admin(CreateOperatorRequest {
            name: "twice".to_owned(),
            role: "admin".to_owned(),
        }))
        .await
        .expect_err("a name is unique");
    assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");
    let refused = tenants
        .revoke_operator(admin(RevokeOperatorRequest {
            operator: "nobody".to_owned(),
        }))
        .await
        .expect_err("no such operator");
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
    gateway.stop().await.expect("stop");
}
