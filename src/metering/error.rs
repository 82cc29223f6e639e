//! Errors of the metering pipeline.

use crate::error::{Classified, ErrorKind};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum MeteringError {
    #[error("usage spool I/O failed in {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode a usage event: {0}")]
    Encode(#[from] serde_json::Error),
    /// The spool is over `metering.spool_max_bytes` and the policy rejects.
    #[error("usage spool is full ({bytes} bytes): the database has been unreachable too long")]
    SpoolFull { bytes: u64 },
    #[error("the usage spool is stopped")]
    Stopped,
    #[error(transparent)]
    Store(#[from] StoreError),
    /// One failure that several waiters share (a group commit's).
    #[error(transparent)]
    Shared(std::sync::Arc<MeteringError>),
}

impl From<sqlx::Error> for MeteringError {
    fn from(error: sqlx::Error) -> Self {
        MeteringError::Store(StoreError::Query(error))
    }
}

impl Classified for MeteringError {
    fn kind(&self) -> ErrorKind {
        match self {
            MeteringError::SpoolFull { .. } | MeteringError::Stopped => ErrorKind::Unavailable,
            MeteringError::Store(e) => e.kind(),
            MeteringError::Io { .. } | MeteringError::Encode(_) => ErrorKind::Internal,
            MeteringError::Shared(e) => e.kind(),
        }
    }
}
