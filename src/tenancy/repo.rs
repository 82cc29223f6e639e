//! SQL for tenants, keys and the audit log, written once for both backends
//! (see `store` for the conventions). Functions take a connection so the
//! service can group them in one transaction.

use sqlx::{AnyConnection, FromRow};

use super::TenancyError;
use super::model::{
    ApiKeyRecord, AuditEvent, Budget, CacheScope, Limits, Scope, Tenant, TenantStatus,
};

#[derive(FromRow)]
struct TenantRow {
    id: String,
    slug: String,
    display_name: String,
    status: String,
    status_reason: String,
    price_plan: String,
    scheduling_weight: i64,
    requests_per_second: Option<f64>,
    burst: Option<i64>,
    tokens_per_minute: Option<i64>,
    max_concurrent_requests: Option<i64>,
    monthly_token_quota: Option<i64>,
    monthly_budget_nanos: Option<i64>,
    monthly_budget_currency: Option<String>,
    cache_scope: String,
    budget_alert_percents: Option<String>,
    created_at_us: i64,
    updated_at_us: i64,
}

const TENANT_COLUMNS: &str = "id, slug, display_name, status, status_reason, price_plan, \
     scheduling_weight, requests_per_second, burst, tokens_per_minute, \
     max_concurrent_requests, monthly_token_quota, monthly_budget_nanos, \
     monthly_budget_currency, cache_scope, budget_alert_percents, created_at_us, updated_at_us";

fn corrupt(what: &str) -> TenancyError {
    TenancyError::from(sqlx::Error::Decode(
        format!("unexpected value in column {what}").into(),
    ))
}

fn to_u32(v: i64, what: &str) -> Result<u32, TenancyError> {
    u32::try_from(v).map_err(|_| corrupt(what))
}

fn to_u64(v: i64, what: &str) -> Result<u64, TenancyError> {
    u64::try_from(v).map_err(|_| corrupt(what))
}

fn to_i64(v: u64) -> i64 {
    // Validation caps every stored u64 at i64::MAX.
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl TryFrom<TenantRow> for Tenant {
    type Error = TenancyError;

    fn try_from(row: TenantRow) -> Result<Tenant, TenancyError> {
        Ok(Tenant {
            status: TenantStatus::parse(&row.status).ok_or_else(|| corrupt("tenants.status"))?,
            scheduling_weight: to_u32(row.scheduling_weight, "tenants.scheduling_weight")?,
            cache_scope: CacheScope::parse(&row.cache_scope)
                .ok_or_else(|| corrupt("tenants.cache_scope"))?,
            limits: Limits {
                requests_per_second: row.requests_per_second,
                burst: row.burst.map(|v| to_u32(v, "tenants.burst")).transpose()?,
                tokens_per_minute: row
                    .tokens_per_minute
                    .map(|v| to_u64(v, "tenants.tokens_per_minute"))
                    .transpose()?,
                max_concurrent_requests: row
                    .max_concurrent_requests
                    .map(|v| to_u32(v, "tenants.max_concurrent_requests"))
                    .transpose()?,
                monthly_token_quota: row
                    .monthly_token_quota
                    .map(|v| to_u64(v, "tenants.monthly_token_quota"))
                    .transpose()?,
                monthly_budget: budget_of(row.monthly_budget_nanos, row.monthly_budget_currency),
            },
            budget_alerts: row
                .budget_alert_percents
                .as_deref()
                .map(parse_percents)
                .transpose()?,
            id: row.id,
            slug: row.slug,
            display_name: row.display_name,
            status_reason: row.status_reason,
            price_plan: row.price_plan,
            created_at_us: row.created_at_us,
            updated_at_us: row.updated_at_us,
        })
    }
}

/// Stored alert percentages: "50 80 100".
fn parse_percents(text: &str) -> Result<Vec<u32>, TenancyError> {
    text.split_whitespace()
        .map(|p| {
            p.parse()
                .map_err(|_| corrupt("tenants.budget_alert_percents"))
        })
        .collect()
}

fn join_percents(percents: &[u32]) -> String {
    percents
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The budget stored in a tenant row's two columns (both set or neither;
/// the CHECK keeps the amount positive).
fn budget_of(nanos: Option<i64>, currency_code: Option<String>) -> Option<Budget> {
    match (nanos, currency_code) {
        (Some(nanos), Some(currency_code)) => Some(Budget {
            currency_code,
            amount_nanos: u64::try_from(nanos).unwrap_or(0),
        }),
        _ => None,
    }
}

/// How an operator named a tenant: ids are UUIDs and slugs never are (see
/// `validate::slug`), so the two can never select each other's tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantRef<'a> {
    Id(&'a str),
    Slug(&'a str),
}

impl<'a> TenantRef<'a> {
    pub fn parse(text: &'a str) -> TenantRef<'a> {
        if uuid::Uuid::try_parse(text).is_ok() {
            TenantRef::Id(text)
        } else {
            TenantRef::Slug(text)
        }
    }
}

/// A tenant by id or slug.
pub async fn fetch_tenant(
    conn: &mut AnyConnection,
    id_or_slug: &str,
) -> Result<Option<Tenant>, TenancyError> {
    let (column, value) = match TenantRef::parse(id_or_slug) {
        TenantRef::Id(id) => ("id", id),
        TenantRef::Slug(slug) => ("slug", slug),
    };
    let sql = format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE {column} = $1");
    let row: Option<TenantRow> = sqlx::query_as(&sql)
        .bind(value)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(Tenant::try_from).transpose()
}

/// A tenant by id only: for callers holding an id from another table (an
/// invoice's), which must never match a slug.
pub async fn fetch_tenant_by_id(
    conn: &mut AnyConnection,
    id: &str,
) -> Result<Option<Tenant>, TenancyError> {
    let sql = format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE id = $1");
    let row: Option<TenantRow> = sqlx::query_as(&sql)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(Tenant::try_from).transpose()
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// Binds the columns a tenant update may change, in the order both
/// statements below list them.
fn bind_mutable<'q>(query: AnyQuery<'q>, t: &'q Tenant) -> AnyQuery<'q> {
    query
        .bind(&t.display_name)
        .bind(t.status.as_str())
        .bind(&t.status_reason)
        .bind(&t.price_plan)
        .bind(i64::from(t.scheduling_weight))
        .bind(t.limits.requests_per_second)
        .bind(t.limits.burst.map(i64::from))
        .bind(t.limits.tokens_per_minute.map(to_i64))
        .bind(t.limits.max_concurrent_requests.map(i64::from))
        .bind(t.limits.monthly_token_quota.map(to_i64))
        .bind(t.updated_at_us)
        .bind(t.cache_scope.as_str())
        .bind(
            t.limits
                .monthly_budget
                .as_ref()
                .map(|b| to_i64(b.amount_nanos)),
        )
        .bind(
            t.limits
                .monthly_budget
                .as_ref()
                .map(|b| b.currency_code.clone()),
        )
        .bind(t.budget_alerts.as_deref().map(join_percents))
}

pub async fn insert_tenant(conn: &mut AnyConnection, t: &Tenant) -> Result<(), TenancyError> {
    let query = sqlx::query(
        "INSERT INTO tenants (id, slug, created_at_us, display_name, status, status_reason, \
         price_plan, scheduling_weight, requests_per_second, burst, tokens_per_minute, \
         max_concurrent_requests, monthly_token_quota, updated_at_us, cache_scope, \
         monthly_budget_nanos, monthly_budget_currency, budget_alert_percents) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
    )
    .bind(&t.id)
    .bind(&t.slug)
    .bind(t.created_at_us);
    let result = bind_mutable(query, t).execute(&mut *conn).await;
    match result {
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(
            TenancyError::AlreadyExists(format!("a tenant with slug {:?}", t.slug)),
        ),
        other => other.map(|_| ()).map_err(TenancyError::from),
    }
}

/// Writes every mutable column of `t`.
pub async fn update_tenant(conn: &mut AnyConnection, t: &Tenant) -> Result<(), TenancyError> {
    let query = sqlx::query(
        "UPDATE tenants SET display_name = $2, status = $3, status_reason = $4, price_plan = $5, \
         scheduling_weight = $6, requests_per_second = $7, burst = $8, tokens_per_minute = $9, \
         max_concurrent_requests = $10, monthly_token_quota = $11, updated_at_us = $12, \
         cache_scope = $13, monthly_budget_nanos = $14, monthly_budget_currency = $15, \
         budget_alert_percents = $16 WHERE id = $1",
    )
    .bind(&t.id);
    bind_mutable(query, t).execute(&mut *conn).await?;
    Ok(())
}

/// Tenants ordered by id (ids are time-ordered UUIDv7), after `after`.
pub async fn list_tenants(
    conn: &mut AnyConnection,
    status: Option<TenantStatus>,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<Tenant>, TenancyError> {
    // Without a status filter, deleted tenants are left out.
    let sql = format!(
        "SELECT {TENANT_COLUMNS} FROM tenants \
         WHERE (($1 = '' AND status <> 'deleted') OR status = $1) AND id > $2 \
         ORDER BY id LIMIT $3"
    );
    let rows: Vec<TenantRow> = sqlx::query_as(&sql)
        .bind(status.map(TenantStatus::as_str).unwrap_or(""))
        .bind(after.unwrap_or(""))
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
    rows.into_iter().map(Tenant::try_from).collect()
}

/// The currency of plan `name`; `None` when there is no such plan.
pub async fn plan_currency(
    conn: &mut AnyConnection,
    name: &str,
) -> Result<Option<String>, TenancyError> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT currency_code FROM price_plans WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(row.map(|(code,)| code))
}

#[derive(FromRow)]
struct KeyRow {
    key_id: String,
    tenant_id: String,
    name: String,
    scopes: String,
    created_at_us: i64,
    expires_at_us: Option<i64>,
    revoked_at_us: Option<i64>,
    last_used_at_us: Option<i64>,
    previous_expires_at_us: Option<i64>,
    requests_per_second: Option<f64>,
    burst: Option<i64>,
    tokens_per_minute: Option<i64>,
    max_concurrent_requests: Option<i64>,
    monthly_budget_nanos: Option<i64>,
    monthly_budget_currency: Option<String>,
}

const KEY_COLUMNS: &str = "key_id, tenant_id, name, scopes, created_at_us, expires_at_us, \
     revoked_at_us, last_used_at_us, previous_expires_at_us, requests_per_second, burst, \
     tokens_per_minute, max_concurrent_requests, monthly_budget_nanos, monthly_budget_currency";

/// Limits as stored in a row's columns (the checks keep them in range).
fn stored_limits(
    requests_per_second: Option<f64>,
    burst: Option<i64>,
    tokens_per_minute: Option<i64>,
    max_concurrent_requests: Option<i64>,
    monthly_token_quota: Option<i64>,
    budget: Option<Budget>,
) -> Limits {
    let u32_of = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
    let u64_of = |v: i64| u64::try_from(v).unwrap_or(0);
    Limits {
        requests_per_second,
        burst: burst.map(u32_of),
        tokens_per_minute: tokens_per_minute.map(u64_of),
        max_concurrent_requests: max_concurrent_requests.map(u32_of),
        monthly_token_quota: monthly_token_quota.map(u64_of),
        monthly_budget: budget,
    }
}

pub(crate) fn parse_scopes(text: &str) -> Vec<Scope> {
    text.split_whitespace().filter_map(Scope::parse).collect()
}

fn join_scopes(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

impl From<KeyRow> for ApiKeyRecord {
    fn from(row: KeyRow) -> ApiKeyRecord {
        ApiKeyRecord {
            scopes: parse_scopes(&row.scopes),
            key_id: row.key_id,
            tenant_id: row.tenant_id,
            name: row.name,
            created_at_us: row.created_at_us,
            expires_at_us: row.expires_at_us,
            revoked_at_us: row.revoked_at_us,
            last_used_at_us: row.last_used_at_us,
            previous_expires_at_us: row.previous_expires_at_us,
            limits: stored_limits(
                row.requests_per_second,
                row.burst,
                row.tokens_per_minute,
                row.max_concurrent_requests,
                None,
                budget_of(row.monthly_budget_nanos, row.monthly_budget_currency),
            ),
        }
    }
}

pub async fn insert_key(
    conn: &mut AnyConnection,
    key: &ApiKeyRecord,
    secret_hash: &str,
) -> Result<(), TenancyError> {
    sqlx::query(
        "INSERT INTO api_keys (key_id, tenant_id, name, scopes, secret_hash, created_at_us, \
         expires_at_us) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&key.key_id)
    .bind(&key.tenant_id)
    .bind(&key.name)
    .bind(join_scopes(&key.scopes))
    .bind(secret_hash)
    .bind(key.created_at_us)
    .bind(key.expires_at_us)
    .execute(&mut *conn)
    .await?;
    update_key_limits(conn, &key.key_id, &key.limits).await
}

/// A live key of the tenant whose budget is not in `currency`, if any.
pub async fn key_budget_in_other_currency(
    conn: &mut AnyConnection,
    tenant_id: &str,
    currency: &str,
) -> Result<Option<String>, TenancyError> {
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT key_id FROM api_keys WHERE tenant_id = $1 AND revoked_at_us IS NULL \
         AND monthly_budget_currency IS NOT NULL AND monthly_budget_currency <> $2 LIMIT 1",
    )
    .bind(tenant_id)
    .bind(currency)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|(key_id,)| key_id))
}

/// Writes a key's limit columns.
pub async fn update_key_limits(
    conn: &mut AnyConnection,
    key_id: &str,
    limits: &Limits,
) -> Result<(), TenancyError> {
    sqlx::query(
        "UPDATE api_keys SET requests_per_second = $2, burst = $3, tokens_per_minute = $4, \
         max_concurrent_requests = $5, monthly_budget_nanos = $6, \
         monthly_budget_currency = $7 WHERE key_id = $1",
    )
    // Not a cached statement: through sqlx's Any driver PostgreSQL would
    // keep the parameter types of the first execution, where an unset
    // limit's NULL carried no float type, and refuse a later rate.
    .persistent(false)
    .bind(key_id)
    .bind(limits.requests_per_second)
    .bind(limits.burst.map(i64::from))
    .bind(limits.tokens_per_minute.map(to_i64))
    .bind(limits.max_concurrent_requests.map(i64::from))
    .bind(
        limits
            .monthly_budget
            .as_ref()
            .map(|b| to_i64(b.amount_nanos)),
    )
    .bind(
        limits
            .monthly_budget
            .as_ref()
            .map(|b| b.currency_code.clone()),
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub async fn fetch_key(
    conn: &mut AnyConnection,
    key_id: &str,
) -> Result<Option<ApiKeyRecord>, TenancyError> {
    let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE key_id = $1");
    let row: Option<KeyRow> = sqlx::query_as(&sql)
        .bind(key_id)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.map(ApiKeyRecord::from))
}

pub async fn revoke_key(
    conn: &mut AnyConnection,
    key_id: &str,
    at_us: i64,
) -> Result<(), TenancyError> {
    sqlx::query(
        "UPDATE api_keys SET revoked_at_us = $2 WHERE key_id = $1 AND revoked_at_us IS NULL",
    )
    .bind(key_id)
    .bind(at_us)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Installs a new secret; the current one becomes the previous secret,
/// accepted until `previous_expires_at_us`.
pub async fn rotate_key(
    conn: &mut AnyConnection,
    key_id: &str,
    new_hash: &str,
    previous_expires_at_us: i64,
) -> Result<(), TenancyError> {
    sqlx::query(
        "UPDATE api_keys SET previous_secret_hash = secret_hash, secret_hash = $2, \
         previous_expires_at_us = $3 WHERE key_id = $1",
    )
    .bind(key_id)
    .bind(new_hash)
    .bind(previous_expires_at_us)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub async fn list_keys(
    conn: &mut AnyConnection,
    tenant_id: &str,
    include_revoked: bool,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<ApiKeyRecord>, TenancyError> {
    let sql = format!(
        "SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant_id = $1 AND key_id > $2 \
         AND ($3 = 1 OR revoked_at_us IS NULL) ORDER BY key_id LIMIT $4"
    );
    let rows: Vec<KeyRow> = sqlx::query_as(&sql)
        .bind(tenant_id)
        .bind(after.unwrap_or(""))
        .bind(i64::from(include_revoked))
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows.into_iter().map(ApiKeyRecord::from).collect())
}

/// Everything authentication needs about a key, in one round trip.
#[derive(Debug, Clone, FromRow)]
pub struct KeyForAuth {
    pub key_id: String,
    pub tenant_id: String,
    pub scopes: String,
    pub secret_hash: String,
    pub previous_secret_hash: Option<String>,
    pub previous_expires_at_us: Option<i64>,
    pub expires_at_us: Option<i64>,
    pub revoked_at_us: Option<i64>,
    pub tenant_slug: String,
    pub tenant_status: String,
    pub price_plan: String,
    pub scheduling_weight: i64,
    pub requests_per_second: Option<f64>,
    pub burst: Option<i64>,
    pub tokens_per_minute: Option<i64>,
    pub max_concurrent_requests: Option<i64>,
    pub monthly_token_quota: Option<i64>,
    pub monthly_budget_nanos: Option<i64>,
    pub monthly_budget_currency: Option<String>,
    pub cache_scope: String,
    pub key_requests_per_second: Option<f64>,
    pub key_burst: Option<i64>,
    pub key_tokens_per_minute: Option<i64>,
    pub key_max_concurrent_requests: Option<i64>,
    pub key_monthly_budget_nanos: Option<i64>,
    pub key_monthly_budget_currency: Option<String>,
}

impl KeyForAuth {
    /// The tenant's limits as stored (the checks keep them in range).
    pub fn limits(&self) -> Limits {
        stored_limits(
            self.requests_per_second,
            self.burst,
            self.tokens_per_minute,
            self.max_concurrent_requests,
            self.monthly_token_quota,
            budget_of(
                self.monthly_budget_nanos,
                self.monthly_budget_currency.clone(),
            ),
        )
    }

    /// The key's own limits as stored.
    pub fn key_limits(&self) -> Limits {
        stored_limits(
            self.key_requests_per_second,
            self.key_burst,
            self.key_tokens_per_minute,
            self.key_max_concurrent_requests,
            None,
            budget_of(
                self.key_monthly_budget_nanos,
                self.key_monthly_budget_currency.clone(),
            ),
        )
    }
}

pub async fn key_for_auth(
    conn: &mut AnyConnection,
    key_id: &str,
) -> Result<Option<KeyForAuth>, TenancyError> {
    let row: Option<KeyForAuth> = sqlx::query_as(
        "SELECT k.key_id, k.tenant_id, k.scopes, k.secret_hash, k.previous_secret_hash, \
         k.previous_expires_at_us, k.expires_at_us, k.revoked_at_us, t.slug AS tenant_slug, \
         t.status AS tenant_status, t.price_plan, t.scheduling_weight, t.requests_per_second, \
         t.burst, \
         t.tokens_per_minute, t.max_concurrent_requests, t.monthly_token_quota, \
         t.monthly_budget_nanos, t.monthly_budget_currency, t.cache_scope, \
         k.requests_per_second AS key_requests_per_second, k.burst AS key_burst, \
         k.tokens_per_minute AS key_tokens_per_minute, \
         k.max_concurrent_requests AS key_max_concurrent_requests, \
         k.monthly_budget_nanos AS key_monthly_budget_nanos, \
         k.monthly_budget_currency AS key_monthly_budget_currency \
         FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.key_id = $1",
    )
    .bind(key_id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row)
}

/// Records when keys were last used; never moves a time backwards.
pub async fn touch_last_used(
    conn: &mut AnyConnection,
    uses: &[(String, i64)],
) -> Result<(), TenancyError> {
    for (key_id, at_us) in uses {
        sqlx::query(
            "UPDATE api_keys SET last_used_at_us = $2 WHERE key_id = $1 \
             AND (last_used_at_us IS NULL OR last_used_at_us < $2)",
        )
        .bind(key_id)
        .bind(*at_us)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

pub async fn insert_audit(
    conn: &mut AnyConnection,
    event: &AuditEvent,
) -> Result<(), TenancyError> {
    sqlx::query(
        "INSERT INTO admin_audit_log (at_us, actor, action, target, tenant_id, before_json, \
         after_json) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(event.at_us)
    .bind(&event.actor)
    .bind(&event.action)
    .bind(&event.target)
    .bind(event.tenant_id.as_deref())
    .bind(&event.before_json)
    .bind(&event.after_json)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Audit events, oldest first, after id `after`.
pub async fn list_audit(
    conn: &mut AnyConnection,
    tenant_id: Option<&str>,
    after: i64,
    limit: i64,
) -> Result<Vec<AuditEvent>, TenancyError> {
    let rows: Vec<AuditEvent> = sqlx::query_as(
        "SELECT id, at_us, actor, action, target, tenant_id, before_json, after_json \
         FROM admin_audit_log WHERE ($1 = '' OR tenant_id = $1) AND id > $2 \
         ORDER BY id LIMIT $3",
    )
    .bind(tenant_id.unwrap_or(""))
    .bind(after)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows)
}
