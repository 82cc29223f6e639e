//! Who is calling: API keys (format, hashing), the operator's admin token,
//! the short-lived key cache, and the [`Authenticator`] that turns a
//! presented credential into a [`Principal`] or a refusal.
//!
//! Knows tenants only as far as authentication needs (status, scopes); knows
//! nothing of gRPC. The tower layer that calls it per request lives in
//! `api::auth_layer`, because it speaks HTTP/2 and gRPC statuses.

mod admin;
mod authenticator;
mod cache;
mod error;
pub mod key;
mod last_used;
mod principal;
pub mod throttle;

pub use admin::{AdminCredential, MIN_ADMIN_TOKEN_LEN};
pub use authenticator::{Authenticator, Requirement};
pub use cache::KeyCache;
pub use error::AuthError;
pub use last_used::LastUsedRecorder;
pub use principal::{OperatorPrincipal, Principal, TenantPrincipal};
