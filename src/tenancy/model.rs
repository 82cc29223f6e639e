//! Tenant, key and audit records as the domain sees them.

use secrecy::SecretString;
use serde::Serialize;

/// Lifecycle of a tenant. `Deleted` is terminal and soft: rows stay for
/// billing, keys stop working.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantStatus {
    Active,
    Suspended,
    Deleted,
}

impl TenantStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TenantStatus::Active => "active",
            TenantStatus::Suspended => "suspended",
            TenantStatus::Deleted => "deleted",
        }
    }

    pub fn parse(text: &str) -> Option<TenantStatus> {
        match text {
            "active" => Some(TenantStatus::Active),
            "suspended" => Some(TenantStatus::Suspended),
            "deleted" => Some(TenantStatus::Deleted),
            _ => None,
        }
    }
}

/// Whose cached prompt prefixes a tenant's requests may reuse (context caching). A shared
/// cache tells each tenant in it, through time to first token, whether another sent the same
/// prefix recently; so only tenants that opt in share, and only public prefixes should go
/// through it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheScope {
    /// Only the tenant's own requests (the default).
    #[default]
    Tenant,
    /// The pool every opted-in tenant shares.
    Shared,
}

impl CacheScope {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheScope::Tenant => "tenant",
            CacheScope::Shared => "shared",
        }
    }

    pub fn parse(text: &str) -> Option<CacheScope> {
        match text {
            "tenant" => Some(CacheScope::Tenant),
            "shared" => Some(CacheScope::Shared),
            _ => None,
        }
    }
}

/// Per-tenant limits; `None` means no limit of that kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Limits {
    pub requests_per_second: Option<f64>,
    pub burst: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent_requests: Option<u32>,
    pub monthly_token_quota: Option<u64>,
    /// A cap on the month's spend, in the currency of the tenant's plan.
    pub monthly_budget: Option<Budget>,
}

/// A monthly spend budget: billionths of the major unit of `currency_code`
/// (an ISO 4217 code, the tenant's plan's when it was set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Budget {
    pub currency_code: String,
    pub amount_nanos: u64,
}

impl Budget {
    /// The largest budget: 9,000,000 major units. Spend counters in Redis
    /// are Lua numbers (doubles), exact only below 2^53 nanos.
    pub const MAX_NANOS: u64 = 9_000_000 * 1_000_000_000;
}

impl Limits {
    /// Whether no limit of any kind is set.
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    /// The slowest request rate a tenant may have: one request per day.
    pub const MIN_REQUESTS_PER_SECOND: f64 = 1.0 / 86_400.0;
    /// The fastest: far above what one gateway serves, low enough that the
    /// emission interval stays a whole number of nanoseconds.
    pub const MAX_REQUESTS_PER_SECOND: f64 = 1_000_000.0;
    /// The largest burst.
    pub const MAX_BURST: u32 = 1_000_000;
    /// The longest a spent burst may take to refill (burst / rate), in
    /// seconds: keeps the rate arithmetic far from overflow.
    pub const MAX_RATE_WINDOW_SECS: u64 = 366 * 86_400;
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tenant {
    pub id: String,
    pub slug: String,
    pub display_name: String,
    pub status: TenantStatus,
    pub status_reason: String,
    pub price_plan: String,
    pub scheduling_weight: u32,
    pub limits: Limits,
    pub cache_scope: CacheScope,
    /// Percentages of the monthly budget that send
    /// `budget.threshold_reached`; `None`: the gateway's default.
    pub budget_alerts: Option<Vec<u32>>,
    pub created_at_us: i64,
    pub updated_at_us: i64,
}

#[derive(Debug, Clone)]
pub struct NewTenant {
    pub slug: String,
    pub display_name: String,
    /// `None`: the configured default plan.
    pub price_plan: Option<String>,
    pub scheduling_weight: Option<u32>,
    pub limits: Limits,
    /// `None`: [`CacheScope::Tenant`].
    pub cache_scope: Option<CacheScope>,
    /// `None`: the gateway's default thresholds.
    pub budget_alerts: Option<Vec<u32>>,
}

/// A partial update: `None` fields stay as they are.
#[derive(Debug, Clone, Default)]
pub struct TenantPatch {
    pub display_name: Option<String>,
    pub price_plan: Option<String>,
    pub scheduling_weight: Option<u32>,
    /// Replaces the whole set of limits when present.
    pub limits: Option<Limits>,
    /// Limit kinds to remove, by API field name.
    pub clear_limits: Vec<String>,
    pub cache_scope: Option<CacheScope>,
    /// `Some(None)`: back to the gateway's default thresholds.
    pub budget_alerts: Option<Option<Vec<u32>>>,
}

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Scope {
    /// Call the Inference service.
    #[serde(rename = "inference")]
    Inference,
    /// Read the tenant's own usage, invoices and exports.
    #[serde(rename = "billing:read")]
    BillingRead,
}

impl Scope {
    pub const ALL: [Scope; 2] = [Scope::Inference, Scope::BillingRead];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Inference => "inference",
            Scope::BillingRead => "billing:read",
        }
    }

    pub fn parse(text: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// A key as stored: never the secret, only its hash (which is not serialized,
/// so audit rows and JSON output cannot carry it).
#[derive(Debug, Clone, Serialize)]
pub struct ApiKeyRecord {
    pub key_id: String,
    pub tenant_id: String,
    pub name: String,
    pub scopes: Vec<Scope>,
    pub created_at_us: i64,
    pub expires_at_us: Option<i64>,
    pub revoked_at_us: Option<i64>,
    pub last_used_at_us: Option<i64>,
    pub previous_expires_at_us: Option<i64>,
    /// The key's own limits, inside its tenant's (no token quota per key).
    pub limits: Limits,
}

#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub name: String,
    /// Empty: `inference` only.
    pub scopes: Vec<String>,
    pub expires_at_us: Option<i64>,
    /// The key's own limits, inside its tenant's.
    pub limits: Limits,
}

/// A key just created or rotated: the record, and the full key, which exists
/// here and in the response to the operator, nowhere else.
#[derive(Debug)]
pub struct IssuedKey {
    pub record: ApiKeyRecord,
    pub full_key: SecretString,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AuditEvent {
    pub id: i64,
    pub at_us: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub tenant_id: Option<String>,
    pub before_json: String,
    pub after_json: String,
}
