//! Database access: one pool for PostgreSQL (production) or SQLite (the
//! embedded default), migrations, and the conventions repository code follows
//! so that a query is written once for both.
//!
//! The decision, for every later repository: queries go through sqlx's `Any`
//! driver with portable SQL: `$1` placeholders (SQLite accepts them too),
//! `ON CONFLICT`, no `RETURNING *` of backend-specific types; timestamps are
//! `BIGINT` microseconds since the Unix epoch (UTC), ids are `TEXT`, money is
//! `BIGINT` nanos, booleans are avoided in favour of status text. A query that
//! truly needs one backend's power (PostgreSQL `UNNEST` batch inserts,
//! partitions) branches on [`Backend`] in that one repository function.
//! Migrations keep the same logical schema in `migrations/postgres` and
//! `migrations/sqlite`.
//!
//! This module knows nothing of tenants, requests or gRPC.

mod db;
mod error;
pub mod meta;
mod partition;

pub use db::{Backend, Db};
pub use error::StoreError;
pub use partition::create_range_partition;

/// Current time as stored in the database: microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_micros()).unwrap_or(i64::MAX)
}
