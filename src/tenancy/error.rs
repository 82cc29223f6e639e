//! Errors of tenancy operations.

use crate::error::{Classified, ErrorKind};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum TenancyError {
    /// A field of the request is wrong. `field` is its name in the API.
    #[error("invalid `{field}`: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The change does not fit the record's current state.
    #[error("{0}")]
    Conflict(String),
    #[error("cannot generate a key")]
    Random(#[from] crate::auth::key::KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Outbox(#[from] crate::outbox::OutboxError),
}

impl TenancyError {
    pub(crate) fn invalid(field: &'static str, problem: impl Into<String>) -> TenancyError {
        TenancyError::Invalid {
            field,
            problem: problem.into(),
        }
    }
}

impl From<sqlx::Error> for TenancyError {
    fn from(error: sqlx::Error) -> Self {
        TenancyError::Store(StoreError::Query(error))
    }
}

impl Classified for TenancyError {
    fn kind(&self) -> ErrorKind {
        match self {
            TenancyError::Invalid { .. } => ErrorKind::InvalidArgument,
            TenancyError::NotFound(_) => ErrorKind::NotFound,
            TenancyError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            TenancyError::Conflict(_) => ErrorKind::FailedPrecondition,
            TenancyError::Random(_) => ErrorKind::Internal,
            TenancyError::Store(e) => e.kind(),
            TenancyError::Outbox(_) => ErrorKind::Unavailable,
        }
    }
}
