//! Errors of billing operations.

use crate::error::{Classified, ErrorKind};
use crate::store::StoreError;
use crate::tenancy::TenancyError;

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// A field of the request is wrong. `field` is its name in the API.
    #[error("invalid `{field}`: {problem}")]
    Invalid { field: String, problem: String },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// Valid, but not in the current state (finalize twice, too early, out
    /// of order, usage without a price).
    #[error("{0}")]
    Precondition(String),
    /// An amount does not fit the 64-bit nanos of `Money`.
    #[error("amount out of range: {0}")]
    Overflow(String),
    /// A bug or a task that died; opaque to clients.
    #[error("internal error: {0}")]
    Internal(String),
    #[error(transparent)]
    Tenancy(#[from] TenancyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Outbox(#[from] crate::outbox::OutboxError),
}

impl BillingError {
    pub(crate) fn invalid(field: impl Into<String>, problem: impl Into<String>) -> BillingError {
        BillingError::Invalid {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

impl From<sqlx::Error> for BillingError {
    fn from(error: sqlx::Error) -> Self {
        BillingError::Store(StoreError::Query(error))
    }
}

impl Classified for BillingError {
    fn kind(&self) -> ErrorKind {
        match self {
            BillingError::Invalid { .. } => ErrorKind::InvalidArgument,
            BillingError::NotFound(_) => ErrorKind::NotFound,
            BillingError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            BillingError::Precondition(_) | BillingError::Overflow(_) => {
                ErrorKind::FailedPrecondition
            }
            BillingError::Internal(_) => ErrorKind::Internal,
            BillingError::Tenancy(e) => e.kind(),
            BillingError::Store(e) => e.kind(),
            BillingError::Outbox(_) => ErrorKind::Unavailable,
        }
    }
}
