//! Installation-wide facts kept in the `gateway_meta` table, such as the id
//! that names this deployment in exports and shared Redis keys.

use super::{Db, StoreError, now_us};

const INSTALLATION_ID: &str = "installation_id";

/// The id of this installation, created on first use. Every gateway sharing
/// the database gets the same one, even when several start at once: the
/// first insert wins and the others read it back.
pub async fn installation_id(db: &Db) -> Result<String, StoreError> {
    let candidate = uuid::Uuid::now_v7().to_string();
    sqlx::query(
        "INSERT INTO gateway_meta (key, value, updated_at_us) VALUES ($1, $2, $3) \
         ON CONFLICT (key) DO NOTHING",
    )
    .bind(INSTALLATION_ID)
    .bind(&candidate)
    .bind(now_us())
    .execute(db.pool())
    .await?;
    get(db, INSTALLATION_ID)
        .await?
        .ok_or_else(|| StoreError::Query(sqlx::Error::RowNotFound))
}

/// The value stored under `key`, if any.
pub async fn get(db: &Db, key: &str) -> Result<Option<String>, StoreError> {
    let row: Option<(String,)> = sqlx::query_as("SELECT value FROM gateway_meta WHERE key = $1")
        .bind(key)
        .fetch_optional(db.pool())
        .await?;
    Ok(row.map(|(value,)| value))
}
