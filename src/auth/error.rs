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
    /// Too many failed authentications from this client's address.
    #[error("too many failed authentications from this address; retry in {}", humantime::format_duration(*retry_after))]
    Throttled { retry_after: std::time::Duration },
}

impl Classified for AuthError {
    fn kind(&self) -> ErrorKind {
        match self {
            AuthError::Unauthenticated(_) => ErrorKind::Unauthenticated,
            AuthError::PermissionDenied(_) => ErrorKind::PermissionDenied,
            AuthError::Lookup(e) => e.kind(),
            AuthError::Throttled { .. } => ErrorKind::ResourceExhausted,
        }
    }

    fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            // Whole seconds: a guesser learns nothing finer.
            AuthError::Throttled { retry_after } => {
                Some(std::time::Duration::from_secs(retry_after.as_secs() + 1))
            }
            _ => None,
        }
    }

    fn quota_violation(&self) -> Option<(&'static str, String)> {
        match self {
            AuthError::Throttled { .. } => Some((
                "authentication_failures",
                "too many failed authentications from this address".to_owned(),
            )),
            _ => None,
        }
    }
}
