//! Why a credential was refused. Messages may name a key id (public) but
//! never contain a presented credential.

use crate::error::{Classified, ErrorKind};
use crate::tenancy::TenancyError;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Missing, malformed, unknown, expired or revoked credential.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid credential that may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("cannot check the credential: {0}")]
    Lookup(#[from] TenancyError),
}

impl Classified for AuthError {
    fn kind(&self) -> ErrorKind {
        match self {
            AuthError::Unauthenticated(_) => ErrorKind::Unauthenticated,
            AuthError::PermissionDenied(_) => ErrorKind::PermissionDenied,
            AuthError::Lookup(e) => e.kind(),
        }
    }
}
