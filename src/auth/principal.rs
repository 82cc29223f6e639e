//! The authenticated caller, attached to each request by the auth layer and
//! read by handlers; never re-derived from headers downstream.

use std::sync::Arc;

use crate::tenancy::operators::Role;
use crate::tenancy::{CacheScope, Limits, Scope};

#[derive(Debug, Clone)]
pub enum Principal {
    /// An operator: a named one, or `bootstrap` with the configured admin
    /// token.
    Admin(OperatorPrincipal),
    Tenant(Arc<TenantPrincipal>),
}

/// Who an operator is and what they may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorPrincipal {
    pub name: String,
    pub role: Role,
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
            Principal::Admin(operator) => format!("operator:{}", operator.name),
            Principal::Tenant(t) => format!("key:{}", t.key_id),
        }
    }
}
