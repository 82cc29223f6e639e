//! The `TenantAdmin` service: tenants, API keys, the audit log. The auth
//! layer has already required the admin token for every RPC here.

use super::status::OrStatus;
use std::time::Duration;

use secrecy::ExposeSecret;
use tonic::{Request, Response, Status};

use super::convert::{micros, opt_timestamp, principal, timestamp};
use super::pb::v1::tenant_admin_server::TenantAdmin;
use super::pb::v1::{
    self as pb, ApiKey, CreateApiKeyRequest, CreateApiKeyResponse, CreateTenantRequest,
    DeleteTenantRequest, GetTenantRequest, ListApiKeysRequest, ListApiKeysResponse,
    ListAuditEventsRequest, ListAuditEventsResponse, ListTenantsRequest, ListTenantsResponse,
    ResumeTenantRequest, RevokeApiKeyRequest, RotateApiKeyRequest, SuspendTenantRequest,
    UpdateTenantRequest,
};
use crate::tenancy::operators::{Operator, Role};
use crate::tenancy::{
    ApiKeyRecord, AuditEvent, Budget, CacheScope, IssuedKey, Limits, NewApiKey, NewTenant,
    PageRequest, TenancyService, Tenant, TenantPatch, TenantStatus,
};

/// Overlap of a rotation when the request does not say.
const DEFAULT_ROTATION_OVERLAP: Duration = Duration::from_secs(24 * 3600);

/// Handlers of `ascend.gateway.v1.TenantAdmin`.
#[derive(Clone)]
pub struct TenantAdminApi {
    tenancy: TenancyService,
}

impl TenantAdminApi {
    pub fn new(tenancy: TenancyService) -> TenantAdminApi {
        TenantAdminApi { tenancy }
    }
}

fn status_to_pb(status: TenantStatus) -> pb::TenantStatus {
    match status {
        TenantStatus::Active => pb::TenantStatus::Active,
        TenantStatus::Suspended => pb::TenantStatus::Suspended,
        TenantStatus::Deleted => pb::TenantStatus::Deleted,
    }
}

fn limits_from_pb(limits: Option<pb::TenantLimits>) -> Result<Limits, Status> {
    let limits = limits.unwrap_or_default();
    let monthly_budget = match limits.monthly_budget {
        None => None,
        Some(money) => Some(Budget {
            amount_nanos: u64::try_from(money.amount_nanos).map_err(|_| {
                Status::invalid_argument(
                    "invalid `limits.monthly_budget.amount_nanos`: must be positive",
                )
            })?,
            currency_code: money.currency_code,
        }),
    };
    Ok(Limits {
        requests_per_second: limits.requests_per_second,
        burst: limits.burst,
        tokens_per_minute: limits.tokens_per_minute,
        max_concurrent_requests: limits.max_concurrent_requests,
        monthly_token_quota: limits.monthly_token_quota,
        monthly_budget,
    })
}

fn limits_to_pb(limits: Limits) -> pb::TenantLimits {
    pb::TenantLimits {
        requests_per_second: limits.requests_per_second,
        burst: limits.burst,
        tokens_per_minute: limits.tokens_per_minute,
        max_concurrent_requests: limits.max_concurrent_requests,
        monthly_token_quota: limits.monthly_token_quota,
        monthly_budget: limits.monthly_budget.map(|b| pb::Money {
            currency_code: b.currency_code,
            amount_nanos: i64::try_from(b.amount_nanos).unwrap_or(i64::MAX),
        }),
    }
}

/// Thresholds given; empty means the gateway's default (`None`).
fn alerts_from_pb(alerts: pb::BudgetAlerts) -> Option<Vec<u32>> {
    (!alerts.percents.is_empty()).then_some(alerts.percents)
}

fn operator_to_pb(o: Operator) -> pb::Operator {
    pb::Operator {
        role: o.role.as_str().to_owned(),
        created_at: Some(timestamp(o.created_at_us)),
        revoked_at: opt_timestamp(o.revoked_at_us),
        id: o.id,
        name: o.name,
    }
}

fn tenant_to_pb(t: Tenant) -> pb::Tenant {
    pb::Tenant {
        status: status_to_pb(t.status).into(),
        limits: Some(limits_to_pb(t.limits)),
        budget_alert_percents: t.budget_alerts.unwrap_or_default(),
        created_at: Some(timestamp(t.created_at_us)),
        updated_at: Some(timestamp(t.updated_at_us)),
        id: t.id,
        slug: t.slug,
        display_name: t.display_name,
        price_plan: t.price_plan,
        scheduling_weight: t.scheduling_weight,
        cache_scope: match t.cache_scope {
            CacheScope::Tenant => pb::CacheScope::Tenant,
            CacheScope::Shared => pb::CacheScope::Shared,
        }
        .into(),
    }
}

/// A request's `cache_scope`: `None` when unspecified.
fn cache_scope_from_pb(value: i32) -> Result<Option<CacheScope>, Status> {
    match pb::CacheScope::try_from(value) {
        Ok(pb::CacheScope::Unspecified) => Ok(None),
        Ok(pb::CacheScope::Tenant) => Ok(Some(CacheScope::Tenant)),
        Ok(pb::CacheScope::Shared) => Ok(Some(CacheScope::Shared)),
        Err(_) => Err(Status::invalid_argument(format!(
            "invalid `cache_scope`: unknown value {value}"
        ))),
    }
}

fn key_to_pb(k: ApiKeyRecord) -> ApiKey {
    ApiKey {
        scopes: k.scopes.iter().map(|s| s.as_str().to_owned()).collect(),
        created_at: Some(timestamp(k.created_at_us)),
        expires_at: opt_timestamp(k.expires_at_us),
        revoked_at: opt_timestamp(k.revoked_at_us),
        last_used_at: opt_timestamp(k.last_used_at_us),
        previous_secret_expires_at: opt_timestamp(k.previous_expires_at_us),
        limits: Some(limits_to_pb(k.limits)),
        key_id: k.key_id,
        tenant_id: k.tenant_id,
        name: k.name,
    }
}

fn issued_to_pb(issued: IssuedKey) -> CreateApiKeyResponse {
    CreateApiKeyResponse {
        secret: issued.full_key.expose_secret().to_owned(),
        key: Some(key_to_pb(issued.record)),
    }
}

fn audit_to_pb(e: AuditEvent) -> pb::AuditEvent {
    pb::AuditEvent {
        id: e.id,
        actor: e.actor,
        action: e.action,
        target: e.target,
        before_json: e.before_json,
        after_json: e.after_json,
        at: Some(timestamp(e.at_us)),
    }
}

#[tonic::async_trait]
impl TenantAdmin for TenantAdminApi {
    async fn create_tenant(
        &self,
        request: Request<CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let actor = principal(&request)?.actor();
        let r = request.into_inner();
        let new = NewTenant {
            display_name: if r.display_name.is_empty() {
                r.slug.clone()
            } else {
                r.display_name
            },
            slug: r.slug,
            price_plan: (!r.price_plan.is_empty()).then_some(r.price_plan),
            scheduling_weight: r.scheduling_weight,
            limits: limits_from_pb(r.limits)?,
            cache_scope: cache_scope_from_pb(r.cache_scope)?,
            budget_alerts: r.budget_alerts.and_then(alerts_from_pb),
        };
        let tenant = self.tenancy.create_tenant(&actor, new).await.or_status()?;
        Ok(Response::new(tenant_to_pb(tenant)))
    }

    async fn get_tenant(
        &self,
        request: Request<GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let tenant = self
            .tenancy
            .get_tenant(&request.into_inner().tenant)
            .await
            .or_status()?;
        Ok(Response::new(tenant_to_pb(tenant)))
    }

    async fn list_tenants(
        &self,
        request: Request<ListTenantsRequest>,
    ) -> Result<Response<ListTenantsResponse>, Status> {
        let r = request.into_inner();
        let status = match pb::TenantStatus::try_from(r.status) {
            Ok(pb::TenantStatus::Unspecified) => None,
            Ok(pb::TenantStatus::Active) => Some(TenantStatus::Active),
            Ok(pb::TenantStatus::Suspended) => Some(TenantStatus::Suspended),
            Ok(pb::TenantStatus::Deleted) => Some(TenantStatus::Deleted),
            Err(_) => return Err(Status::invalid_argument("invalid `status`: unknown value")),
        };
        let page = PageRequest::parse("tenants", r.page_size, &r.page_token).or_status()?;
        let page = self.tenancy.list_tenants(status, page).await.or_status()?;
        Ok(Response::new(ListTenantsResponse {
            tenants: page.items.into_iter().map(tenant_to_pb).collect(),
            next_page_token: page.next_token.unwrap_or_default(),
        }))
    }

    async fn update_tenant(
        &self,
        request: Request<UpdateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let actor = principal(&request)?.actor();
        let r = request.into_inner();
        let patch = TenantPatch {
            display_name: r.display_name,
            price_plan: r.price_plan,
            scheduling_weight: r.scheduling_weight,
            limits: r.limits.map(|l| limits_from_pb(Some(l))).transpose()?,
            clear_limits: r.clear_limits,
            cache_scope: cache_scope_from_pb(r.cache_scope)?,
            budget_alerts: r.budget_alerts.map(alerts_from_pb),
        };
        let tenant = self
            .tenancy
            .update_tenant(&actor, &r.tenant, patch)
            .await
            .or_status()?;
        Ok(Response::new(tenant_to_pb(tenant)))
    }

    async fn suspend_tenant(
        &self,
        request: Request<SuspendTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let actor = principal(&request)?.actor();
        let r = request.into_inner();
        let tenant = self
            .tenancy
            .set_status(&actor, &r.tenant, TenantStatus::Suspended, &r.reason)
            .await
            .or_status()?;
        Ok(Response::new(tenant_to_pb(tenant)))
    }

    async fn resume_tenant(
        &self,
        request: Request<ResumeTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let actor = principal(&request)?.actor();
        let r = request.into_inner();
        let tenant = self
            .tenancy
            .set_status(&actor, &r.tenant, TenantStatus::Active, "")
            .await
            .or_status()?;
        Ok(Response::new(tenant_to_pb(tenant)))
    }

    async fn delete_tenant(
        &self,
        request: Request<DeleteTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let actor = principal(&request)?.actor();
        let r = request.into_inner();
        let tenant = self
            .tenancy
            .set_status(&actor, &r.tenant, TenantStatus::Deleted, "")
            .await
            .or_status()?;
        Ok(Response::new(tenant_to_pb(tenant)))
    }

    async fn create_api_key(
        &self,
        request: Request<CreateApiKeyRequest>,
    ) -> Result<Response<CreateApiKeyResponse>, Status> {
        let actor = principal(&request)?.actor();
        let r = request.into_inner();
        let expires_at_us = r
            .expires_at
            .as_ref()
            .map(|ts| micros("expires_at", ts))
            .transpose()?;
        let new = NewApiKey {
            name: if r.name.is_empty() {
                "default".to_owned()
            } else {
                r.name
            },
            scopes: r.scopes,
            expires_at_us,
            limits: limits_from_pb(r.limits)?,
        };
        let issued = self
            .tenancy
            .create_key(&actor, &r.tenant, new)
            .await
            .or_status()?;
        Ok(Response::new(issued_to_pb(issued)))
    }

    async fn list_api_keys(
        &self,
        request: Request<ListApiKeysRequest>,
    ) -> Result<Response<ListApiKeysResponse>, Status> {
        let r = request.into_inner();
        let page = PageRequest::parse("keys", r.page_size, &r.page_token).or_status()?;
        let page = self
            .tenancy
            .list_keys(&r.tenant, r.include_revoked, page)
            .await
            .or_status()?;
        Ok(Response::new(ListApiKeysResponse {
            keys: page.items.into_iter().map(key_to_pb).collect(),
            next_page_token: page.next_token.unwrap_or_default(),
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<RevokeApiKeyRequest>,
    ) -> Result<Response<ApiKey>, Status> {
        let actor = principal(&request)?.actor();
        let key = self
            .tenancy
            .revoke_key(&actor, &request.into_inner().key_id)
            .await
            .or_status()?;
        Ok(Response::new(key_to_pb(key)))
    }

    async fn create_operator(
        &self,
        request: Request<pb::CreateOperatorRequest>,
    ) -> Result<Response<pb::CreateOperatorResponse>, Status> {
        let actor = principal(&request)?.actor();
        let r = request.into_inner();
        let role = Role::parse(&r.role).ok_or_else(|| {
            Status::invalid_argument(format!(
                "invalid `role`: {:?}; one of admin, billing, viewer",
                r.role
            ))
        })?;
        let issued = self
            .tenancy
            .create_operator(&actor, &r.name, role)
            .await
            .or_status()?;
        Ok(Response::new(pb::CreateOperatorResponse {
            operator: Some(operator_to_pb(issued.operator)),
            token: issued.token.expose_secret().to_owned(),
        }))
    }

    async fn list_operators(
        &self,
        _request: Request<pb::ListOperatorsRequest>,
    ) -> Result<Response<pb::ListOperatorsResponse>, Status> {
        let operators = self.tenancy.list_operators().await.or_status()?;
        Ok(Response::new(pb::ListOperatorsResponse {
            operators: operators.into_iter().map(operator_to_pb).collect(),
        }))
    }

    async fn revoke_operator(
        &self,
        request: Request<pb::RevokeOperatorRequest>,
    ) -> Result<Response<pb::Operator>, Status> {
        let actor = principal(&request)?.actor();
        let operator = self
            .tenancy
            .revoke_operator(&actor, &request.into_inner().operator)
            .await
            .or_status()?;
        Ok(Response::new(operator_to_pb(operator)))
    }

    async fn update_api_key(
        &self,
        request: Request<pb::UpdateApiKeyRequest>,
    ) -> Result<Response<ApiKey>, Status> {
        let actor = principal(&request)?.actor();
        let r = request.into_inner();
        let patch = limits_from_pb(r.limits)?;
        let key = self
            .tenancy
            .update_key_limits(&actor, &r.key_id, patch, &r.clear_limits)
            .await
            .or_status()?;
        Ok(Response::new(key_to_pb(key)))
    }

    async fn rotate_api_key(
        &self,
        request: Request<RotateApiKeyRequest>,
    ) -> Result<Response<CreateApiKeyResponse>, Status> {
        let actor = principal(&request)?.actor();
        let r = request.into_inner();
        let overlap = r
            .overlap_seconds
            .map(|s| Duration::from_secs(u64::from(s)))
            .unwrap_or(DEFAULT_ROTATION_OVERLAP);
        let issued = self
            .tenancy
            .rotate_key(&actor, &r.key_id, overlap)
            .await
            .or_status()?;
        Ok(Response::new(issued_to_pb(issued)))
    }

    async fn list_audit_events(
        &self,
        request: Request<ListAuditEventsRequest>,
    ) -> Result<Response<ListAuditEventsResponse>, Status> {
        let r = request.into_inner();
        let page = PageRequest::parse("audit", r.page_size, &r.page_token).or_status()?;
        let tenant = (!r.tenant.is_empty()).then_some(r.tenant.as_str());
        let page = self.tenancy.list_audit(tenant, page).await.or_status()?;
        Ok(Response::new(ListAuditEventsResponse {
            events: page.items.into_iter().map(audit_to_pb).collect(),
            next_page_token: page.next_token.unwrap_or_default(),
        }))
    }
}
