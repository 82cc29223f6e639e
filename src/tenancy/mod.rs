//! Tenants (the customer companies), their limits, plans and API key
//! records, and the append-only admin audit log: the domain rules and the
//! repository that stores them.
//!
//! Every change goes through [`TenancyService`], which validates it, applies
//! it and writes its audit row in one transaction. This module knows how keys
//! are stored (hashes only) but not how requests are authenticated, and
//! nothing of gRPC.

mod error;
mod model;
pub mod operators;
mod page;
mod repo;
mod service;
mod validate;

pub use error::TenancyError;
pub use model::{
    ApiKeyRecord, AuditEvent, Budget, CacheScope, IssuedKey, Limits, NewApiKey, NewTenant, Scope,
    Tenant, TenantPatch, TenantStatus,
};
pub use page::{Page, PageRequest};
pub use repo::KeyForAuth;
/// For billing, which reads tenants inside its own transactions.
pub(crate) use repo::{fetch_tenant_by_id, plan_currency};
pub use service::{ChangeListener, TenancyService};

pub(crate) use repo::parse_scopes;
#[cfg(test)]
pub(crate) use validate::limits as validate_limits;
