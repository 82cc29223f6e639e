//! Tenant and key operations: validate, apply, audit, all in one transaction,
//! then tell listeners (the auth cache) what changed.

use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use serde::Serialize;

use super::model::{
    ApiKeyRecord, AuditEvent, IssuedKey, Limits, NewApiKey, NewTenant, Tenant, TenantPatch,
    TenantStatus,
};
use super::page::{Page, PageRequest};
use super::repo::{self, KeyForAuth};
use super::{TenancyError, operators, validate};
use crate::auth::key;
use crate::store::{Db, now_us};

/// Longest overlap a rotation may keep the previous secret alive.
pub const MAX_ROTATION_OVERLAP: Duration = Duration::from_secs(30 * 24 * 3600);

/// Told after a change commits, so caches on this node drop stale entries at
/// once (other nodes catch up within their cache time).
pub trait ChangeListener: Send + Sync {
    fn tenant_changed(&self, tenant_id: &str);
    fn key_changed(&self, key_id: &str);
}

#[derive(Clone)]
pub struct TenancyService {
    db: Db,
    default_plan: String,
    listeners: Vec<Arc<dyn ChangeListener>>,
}

fn json<T: Serialize>(value: &T) -> String {
    // Serializing plain records into a String cannot fail; an empty object
    // keeps the audit row rather than losing the change.
    serde_json::to_string(value).unwrap_or_else(|_| "{}".to_owned())
}

impl TenancyService {
    pub fn new(db: Db, default_plan: impl Into<String>) -> TenancyService {
        TenancyService {
            db,
            default_plan: default_plan.into(),
            listeners: Vec::new(),
        }
    }

    pub fn add_listener(&mut self, listener: Arc<dyn ChangeListener>) {
        self.listeners.push(listener);
    }

    fn audit<B: Serialize, A: Serialize>(
        actor: &str,
        action: &str,
        target: &str,
        tenant_id: &str,
        before: Option<&B>,
        after: &A,
    ) -> AuditEvent {
        AuditEvent {
            id: 0,
            at_us: now_us(),
            actor: actor.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            tenant_id: Some(tenant_id.to_owned()),
            before_json: before.map(json).unwrap_or_else(|| "null".to_owned()),
            after_json: json(after),
        }
    }

    pub async fn create_tenant(&self, actor: &str, new: NewTenant) -> Result<Tenant, TenancyError> {
        validate::slug(&new.slug)?;
        validate::display_name("display_name", &new.display_name)?;
        let weight = new.scheduling_weight.unwrap_or(1);
        validate::weight(weight)?;
        validate::limits(&new.limits)?;
        let plan = new.price_plan.unwrap_or_else(|| self.default_plan.clone());
        let now = now_us();
        let tenant = Tenant {
            id: uuid::Uuid::now_v7().to_string(),
            slug: new.slug,
            display_name: new.display_name,
            status: TenantStatus::Active,
            status_reason: String::new(),
            price_plan: plan,
            scheduling_weight: weight,
            limits: new.limits,
            cache_scope: new.cache_scope.unwrap_or_default(),
            budget_alerts: new
                .budget_alerts
                .as_deref()
                .map(validate::budget_alerts)
                .transpose()?,
            created_at_us: now,
            updated_at_us: now,
        };
        let mut tenant = tenant;
        let mut tx = self.db.begin_write().await?;
        let Some(currency) = repo::plan_currency(&mut tx, &tenant.price_plan).await? else {
            return Err(TenancyError::invalid(
                "price_plan",
                format!("unknown plan {:?}", tenant.price_plan),
            ));
        };
        validate::budget_currency(&mut tenant.limits, &currency, false)?;
        repo::insert_tenant(&mut tx, &tenant).await?;
        let event = Self::audit::<(), _>(
            actor,
            "tenant.create",
            &tenant.id,
            &tenant.id,
            None,
            &tenant,
        );
        repo::insert_audit(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(tenant)
    }

    pub async fn get_tenant(&self, id_or_slug: &str) -> Result<Tenant, TenancyError> {
        if id_or_slug.is_empty() {
            return Err(TenancyError::invalid(
                "tenant",
                "required: a tenant id or slug",
            ));
        }
        let mut conn = self.db.pool().acquire().await?;
        repo::fetch_tenant(&mut conn, id_or_slug)
            .await?
            .ok_or_else(|| TenancyError::NotFound(format!("tenant {id_or_slug:?}")))
    }

    pub async fn list_tenants(
        &self,
        status: Option<TenantStatus>,
        page: PageRequest,
    ) -> Result<Page<Tenant>, TenancyError> {
        let mut conn = self.db.pool().acquire().await?;
        let rows = repo::list_tenants(&mut conn, status, page.after.as_deref(), page.fetch_limit())
            .await?;
        Ok(page.finish("tenants", rows, |t| t.id.clone()))
    }

    pub async fn update_tenant(
        &self,
        actor: &str,
        id_or_slug: &str,
        patch: TenantPatch,
    ) -> Result<Tenant, TenancyError> {
        let mut tx = self.db.begin_write().await?;
        let before = Self::live_tenant(&mut tx, id_or_slug).await?;
        let mut after = before.clone();
        if let Some(name) = patch.display_name {
            validate::display_name("display_name", &name)?;
            after.display_name = name;
        }
        if let Some(weight) = patch.scheduling_weight {
            validate::weight(weight)?;
            after.scheduling_weight = weight;
        }
        if let Some(limits) = patch.limits {
            after.limits = limits;
        }
        if let Some(scope) = patch.cache_scope {
            after.cache_scope = scope;
        }
        if let Some(alerts) = patch.budget_alerts {
            after.budget_alerts = alerts.as_deref().map(validate::budget_alerts).transpose()?;
        }
        validate::clear_limits(&mut after.limits, &patch.clear_limits)?;
        validate::limits(&after.limits)?;
        let plan_changed = patch.price_plan.is_some();
        if let Some(plan) = patch.price_plan {
            after.price_plan = plan;
        }
        let Some(currency) = repo::plan_currency(&mut tx, &after.price_plan).await? else {
            return Err(TenancyError::invalid(
                "price_plan",
                format!("unknown plan {:?}", after.price_plan),
            ));
        };
        let budget_given = after.limits.monthly_budget != before.limits.monthly_budget;
        validate::budget_currency(&mut after.limits, &currency, plan_changed && !budget_given)?;
        if plan_changed
            && let Some(key_id) =
                repo::key_budget_in_other_currency(&mut tx, &after.id, &currency).await?
        {
            return Err(TenancyError::invalid(
                "price_plan",
                format!(
                    "the new plan bills in {currency} but key {key_id} has a monthly budget in another currency; clear or change it first"
                ),
            ));
        }
        after.updated_at_us = now_us();
        repo::update_tenant(&mut tx, &after).await?;
        let event = Self::audit(
            actor,
            "tenant.update",
            &after.id,
            &after.id,
            Some(&before),
            &after,
        );
        repo::insert_audit(&mut tx, &event).await?;
        tx.commit().await?;
        self.notify_tenant(&after.id);
        Ok(after)
    }

    /// Suspends, resumes or deletes. Repeating a change is a no-op; nothing
    /// leaves `Deleted`.
    pub async fn set_status(
        &self,
        actor: &str,
        id_or_slug: &str,
        status: TenantStatus,
        reason: &str,
    ) -> Result<Tenant, TenancyError> {
        if !reason.is_empty() {
            validate::printable_text("reason", reason, 500)?;
        }
        let mut tx = self.db.begin_write().await?;
        let before = {
            let found = repo::fetch_tenant(&mut tx, id_or_slug).await?;
            found.ok_or_else(|| TenancyError::NotFound(format!("tenant {id_or_slug:?}")))?
        };
        if before.status == status {
            return Ok(before);
        }
        if before.status == TenantStatus::Deleted {
            return Err(TenancyError::Conflict(format!(
                "tenant {:?} is deleted; a deleted tenant cannot change status",
                before.slug
            )));
        }
        let mut after = before.clone();
        after.status = status;
        after.status_reason = reason.to_owned();
        after.updated_at_us = now_us();
        repo::update_tenant(&mut tx, &after).await?;
        let action = match status {
            TenantStatus::Active => "tenant.resume",
            TenantStatus::Suspended => "tenant.suspend",
            TenantStatus::Deleted => "tenant.delete",
        };
        let event = Self::audit(actor, action, &after.id, &after.id, Some(&before), &after);
        repo::insert_audit(&mut tx, &event).await?;
        if status == TenantStatus::Suspended {
            // In the same transaction: the suspension and its webhook event
            // exist together or not at all.
            crate::outbox::record(
                &mut tx,
                &crate::outbox::NewEvent {
                    event_type: crate::outbox::EventType::TenantSuspended,
                    tenant_id: Some(after.id.clone()),
                    dedupe_key: format!("tenant.suspended:{}:{}", after.id, after.updated_at_us),
                    data: serde_json::json!({
                        "tenant_id": after.id,
                        "slug": after.slug,
                        "reason": after.status_reason,
                    }),
                },
                None,
            )
            .await?;
        }
        tx.commit().await?;
        self.notify_tenant(&after.id);
        Ok(after)
    }

    pub async fn create_key(
        &self,
        actor: &str,
        tenant: &str,
        new: NewApiKey,
    ) -> Result<IssuedKey, TenancyError> {
        validate::display_name("name", &new.name)?;
        let scopes = validate::scopes(&new.scopes)?;
        let now = now_us();
        if new.expires_at_us.is_some_and(|at| at <= now) {
            return Err(TenancyError::invalid("expires_at", "must be in the future"));
        }
        let mut tx = self.db.begin_write().await?;
        let owner = Self::live_tenant(&mut tx, tenant).await?;
        let mut limits = new.limits;
        Self::check_key_limits(&mut tx, &owner, &mut limits).await?;
        let key_id = key::new_key_id()?;
        let (full_key, hash) = key::new_secret(&key_id)?;
        let record = ApiKeyRecord {
            key_id,
            tenant_id: owner.id.clone(),
            name: new.name,
            scopes,
            created_at_us: now,
            expires_at_us: new.expires_at_us,
            revoked_at_us: None,
            last_used_at_us: None,
            previous_expires_at_us: None,
            limits,
        };
        repo::insert_key(&mut tx, &record, &hash.to_hex()).await?;
        let event = Self::audit::<(), _>(
            actor,
            "key.create",
            &record.key_id,
            &owner.id,
            None,
            &record,
        );
        repo::insert_audit(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(IssuedKey { record, full_key })
    }

    /// A key's limits checked as a tenant's are (plus: no token quota per
    /// key), its budget in the tenant's plan's currency.
    async fn check_key_limits(
        conn: &mut sqlx::AnyConnection,
        owner: &Tenant,
        limits: &mut Limits,
    ) -> Result<(), TenancyError> {
        if limits.monthly_token_quota.is_some() {
            return Err(TenancyError::invalid(
                "limits.monthly_token_quota",
                "not available per key; set it on the tenant",
            ));
        }
        validate::limits(limits)?;
        let currency = repo::plan_currency(conn, &owner.price_plan)
            .await?
            .unwrap_or_default();
        validate::budget_currency(limits, &currency, false)
    }

    /// Sets the kinds of limit `patch` has on a key, keeps the others, then
    /// clears the named kinds; applies at once on this node (its cached
    /// lookups are dropped).
    pub async fn update_key_limits(
        &self,
        actor: &str,
        key_id: &str,
        patch: Limits,
        clear: &[String],
    ) -> Result<ApiKeyRecord, TenancyError> {
        let mut tx = self.db.begin_write().await?;
        let before = repo::fetch_key(&mut tx, key_id)
            .await?
            .filter(|k| k.revoked_at_us.is_none())
            .ok_or_else(|| TenancyError::NotFound(format!("live key {key_id:?}")))?;
        let owner = Self::live_tenant(&mut tx, &before.tenant_id).await?;
        let mut after = before.clone();
        let kept = &before.limits;
        after.limits = Limits {
            requests_per_second: patch.requests_per_second.or(kept.requests_per_second),
            burst: patch.burst.or(kept.burst),
            tokens_per_minute: patch.tokens_per_minute.or(kept.tokens_per_minute),
            max_concurrent_requests: patch
                .max_concurrent_requests
                .or(kept.max_concurrent_requests),
            monthly_token_quota: patch.monthly_token_quota,
            monthly_budget: patch.monthly_budget.or_else(|| kept.monthly_budget.clone()),
        };
        validate::clear_limits(&mut after.limits, clear)?;
        Self::check_key_limits(&mut tx, &owner, &mut after.limits).await?;
        repo::update_key_limits(&mut tx, key_id, &after.limits).await?;
        self.commit_key_change(tx, actor, "key.update", &before, after)
            .await
    }

    /// Audits a key's change, commits it and drops this node's cached
    /// lookups of the key.
    async fn commit_key_change(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Any>,
        actor: &str,
        action: &str,
        before: &ApiKeyRecord,
        after: ApiKeyRecord,
    ) -> Result<ApiKeyRecord, TenancyError> {
        let event = Self::audit(
            actor,
            action,
            &after.key_id,
            &after.tenant_id,
            Some(before),
            &after,
        );
        repo::insert_audit(&mut tx, &event).await?;
        tx.commit().await?;
        self.notify_key(&after.key_id);
        Ok(after)
    }

    /// A new named operator and its token (shown this once).
    pub async fn create_operator(
        &self,
        actor: &str,
        name: &str,
        role: operators::Role,
    ) -> Result<operators::IssuedOperator, TenancyError> {
        operators::validate_name(name)?;
        let id = key::new_key_id()?;
        let (token, hash) = key::new_operator_token(&id)?;
        let operator = operators::Operator {
            id,
            name: name.to_owned(),
            role,
            created_at_us: now_us(),
            revoked_at_us: None,
        };
        let mut tx = self.db.begin_write().await?;
        operators::insert(&mut tx, &operator, &hash.to_hex()).await?;
        let event = Self::operator_audit(actor, "operator.create", None, &operator);
        repo::insert_audit(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(operators::IssuedOperator { operator, token })
    }

    pub async fn list_operators(&self) -> Result<Vec<operators::Operator>, TenancyError> {
        let mut conn = self.db.pool().acquire().await?;
        operators::list(&mut conn).await
    }

    /// Revokes an operator (by id or name) at once; twice is a no-op.
    pub async fn revoke_operator(
        &self,
        actor: &str,
        id_or_name: &str,
    ) -> Result<operators::Operator, TenancyError> {
        let mut tx = self.db.begin_write().await?;
        let (before, _) = operators::fetch(&mut tx, id_or_name)
            .await?
            .ok_or_else(|| TenancyError::NotFound(format!("operator {id_or_name:?}")))?;
        if before.revoked_at_us.is_some() {
            return Ok(before);
        }
        operators::revoke(&mut tx, &before.id, now_us()).await?;
        let (after, _) = operators::fetch(&mut tx, &before.id)
            .await?
            .ok_or_else(|| TenancyError::NotFound(format!("operator {id_or_name:?}")))?;
        let event = Self::operator_audit(actor, "operator.revoke", Some(&before), &after);
        repo::insert_audit(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(after)
    }

    /// A live operator by id with its token hash, for authentication.
    pub async fn operator_for_auth(
        &self,
        id: &str,
    ) -> Result<Option<(operators::Operator, String)>, TenancyError> {
        let mut conn = self.db.pool().acquire().await?;
        Ok(operators::fetch_by_id(&mut conn, id)
            .await?
            .filter(|(o, _)| o.revoked_at_us.is_none()))
    }

    fn operator_audit(
        actor: &str,
        action: &str,
        before: Option<&operators::Operator>,
        after: &operators::Operator,
    ) -> AuditEvent {
        // About no tenant.
        AuditEvent {
            tenant_id: None,
            ..Self::audit(actor, action, &after.name, "", before, after)
        }
    }

    pub async fn list_keys(
        &self,
        tenant: &str,
        include_revoked: bool,
        page: PageRequest,
    ) -> Result<Page<ApiKeyRecord>, TenancyError> {
        let owner = self.get_tenant(tenant).await?;
        let mut conn = self.db.pool().acquire().await?;
        let rows = repo::list_keys(
            &mut conn,
            &owner.id,
            include_revoked,
            page.after.as_deref(),
            page.fetch_limit(),
        )
        .await?;
        Ok(page.finish("keys", rows, |k| k.key_id.clone()))
    }

    /// Revokes a key at once on this node. Revoking twice is a no-op.
    pub async fn revoke_key(
        &self,
        actor: &str,
        key_id: &str,
    ) -> Result<ApiKeyRecord, TenancyError> {
        let mut tx = self.db.begin_write().await?;
        let before = Self::existing_key(&mut tx, key_id).await?;
        if before.revoked_at_us.is_some() {
            return Ok(before);
        }
        repo::revoke_key(&mut tx, key_id, now_us()).await?;
        let after = Self::existing_key(&mut tx, key_id).await?;
        self.commit_key_change(tx, actor, "key.revoke", &before, after)
            .await
    }

    /// A new secret under the same key id; the old one works for `overlap`.
    pub async fn rotate_key(
        &self,
        actor: &str,
        key_id: &str,
        overlap: Duration,
    ) -> Result<IssuedKey, TenancyError> {
        if overlap > MAX_ROTATION_OVERLAP {
            return Err(TenancyError::invalid(
                "overlap_seconds",
                format!("at most {} seconds", MAX_ROTATION_OVERLAP.as_secs()),
            ));
        }
        let mut tx = self.db.begin_write().await?;
        let before = Self::existing_key(&mut tx, key_id).await?;
        if before.revoked_at_us.is_some() {
            return Err(TenancyError::Conflict(format!(
                "key {key_id} is revoked; create a new key instead"
            )));
        }
        let (full_key, hash) = key::new_secret(key_id)?;
        let overlap_us = i64::try_from(overlap.as_micros()).unwrap_or(i64::MAX);
        repo::rotate_key(
            &mut tx,
            key_id,
            &hash.to_hex(),
            now_us().saturating_add(overlap_us),
        )
        .await?;
        let record = Self::existing_key(&mut tx, key_id).await?;
        let event = Self::audit(
            actor,
            "key.rotate",
            key_id,
            &record.tenant_id,
            Some(&before),
            &record,
        );
        repo::insert_audit(&mut tx, &event).await?;
        tx.commit().await?;
        self.notify_key(key_id);
        debug_assert!(!full_key.expose_secret().is_empty());
        Ok(IssuedKey { record, full_key })
    }

    pub async fn list_audit(
        &self,
        tenant: Option<&str>,
        page: PageRequest,
    ) -> Result<Page<AuditEvent>, TenancyError> {
        let tenant_id = match tenant {
            Some(t) => Some(self.get_tenant(t).await?.id),
            None => None,
        };
        let after = match page.after.as_deref() {
            Some(id) => id
                .parse::<i64>()
                .map_err(|_| TenancyError::invalid("page_token", "not from this listing"))?,
            None => 0,
        };
        let mut conn = self.db.pool().acquire().await?;
        let rows =
            repo::list_audit(&mut conn, tenant_id.as_deref(), after, page.fetch_limit()).await?;
        Ok(page.finish("audit", rows, |e| e.id.to_string()))
    }

    /// The key and its tenant, for authentication.
    pub async fn key_for_auth(&self, key_id: &str) -> Result<Option<KeyForAuth>, TenancyError> {
        let mut conn = self.db.pool().acquire().await?;
        repo::key_for_auth(&mut conn, key_id).await
    }

    pub async fn touch_last_used(&self, uses: &[(String, i64)]) -> Result<(), TenancyError> {
        let mut tx = self.db.begin_write().await?;
        repo::touch_last_used(&mut tx, uses).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn live_tenant(
        conn: &mut sqlx::AnyConnection,
        id_or_slug: &str,
    ) -> Result<Tenant, TenancyError> {
        if id_or_slug.is_empty() {
            return Err(TenancyError::invalid(
                "tenant",
                "required: a tenant id or slug",
            ));
        }
        let tenant = repo::fetch_tenant(conn, id_or_slug)
            .await?
            .ok_or_else(|| TenancyError::NotFound(format!("tenant {id_or_slug:?}")))?;
        if tenant.status == TenantStatus::Deleted {
            return Err(TenancyError::Conflict(format!(
                "tenant {:?} is deleted",
                tenant.slug
            )));
        }
        Ok(tenant)
    }

    async fn existing_key(
        conn: &mut sqlx::AnyConnection,
        key_id: &str,
    ) -> Result<ApiKeyRecord, TenancyError> {
        if key_id.is_empty() {
            return Err(TenancyError::invalid("key_id", "required"));
        }
        repo::fetch_key(conn, key_id)
            .await?
            .ok_or_else(|| TenancyError::NotFound(format!("key {key_id:?}")))
    }

    fn notify_tenant(&self, tenant_id: &str) {
        for listener in &self.listeners {
            listener.tenant_changed(tenant_id);
        }
    }

    fn notify_key(&self, key_id: &str) {
        for listener in &self.listeners {
            listener.key_changed(key_id);
        }
    }
}
