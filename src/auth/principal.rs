//! The authenticated caller, attached to each request by the auth layer and
//! read by handlers; never re-derived from headers downstream.

use std::sync::Arc;

use crate::tenancy::{CacheScope, Limits, Scope};

#[derive(Debug, Clone)]
pub enum Principal {
    /// The operator, holding the admin token.
    Admin,
    Tenant(Arc<TenantPrincipal>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct TenantPrincipal {
    pub tenant_id: String,
    pub tenant_slug: String,
    /// Public key id; safe to log and to meter by.
    pub key_id: String,
    pub scopes: Vec<Scope>,
    pub scheduling_weight: u32,
    /// The tenant's price plan, for the cost quoted with each answer.
    pub price_plan: String,
    /// The tenant's limits as of the key lookup (at most `auth.cache_ttl` old).
    pub limits: Limits,
    /// The key's own limits, which a request must pass too.
    pub key_limits: Limits,
    /// Whose cached prompt prefixes its requests may reuse.
    pub cache_scope: CacheScope,
}

impl Principal {
    /// How the audit log and logs name this caller.
    pub fn actor(&self) -> String {
        match self {
            Principal::Admin => "admin".to_owned(),
            Principal::Tenant(t) => format!("key:{}", t.key_id),
        }
    }
}
