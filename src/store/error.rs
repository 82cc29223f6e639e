//! Errors of the storage layer.

use crate::error::{Classified, ErrorKind};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or opened at start-up. The message names
    /// the setting and what to check.
    #[error("cannot open the database at {url} (setting `database.url`; {hint})")]
    Connect {
        url: String,
        hint: &'static str,
        source: sqlx::Error,
    },
    #[error("cannot create the data directory {path} (setting `data_dir`): {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Any failure of a query once running.
    #[error("database query failed: {0}")]
    Query(#[from] sqlx::Error),
}

impl Classified for StoreError {
    fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Connect { .. } | StoreError::Query(_) => ErrorKind::Unavailable,
            StoreError::DataDir { .. } | StoreError::Migrate(_) => ErrorKind::Internal,
        }
    }
}
