//! Range partitions of PostgreSQL tables made on demand: the monthly
//! `usage_events_YYYY_MM` and the daily `request_claims_d<day>`. Knows
//! nothing of what the tables hold.

use sqlx::PgPool;

/// Creates `table` as the partition of `parent` for `[from, to)` unless it
/// exists. Safe when several gateways race to create it: the loser finds it
/// there. `table` and `parent` are identifiers (they cannot be bound):
/// callers pass names of letters, digits and '_' only.
pub async fn create_range_partition(
    pg: &PgPool,
    parent: &str,
    table: &str,
    from: i64,
    to: i64,
) -> Result<(), sqlx::Error> {
    debug_assert!(
        [parent, table]
            .iter()
            .all(|name| name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
    );
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {table} PARTITION OF {parent} FOR VALUES FROM ({from}) TO ({to})"
    );
    if let Err(error) = sqlx::query(&sql).execute(pg).await {
        let exists: Option<(String,)> =
            sqlx::query_as("SELECT to_regclass($1)::text WHERE to_regclass($1) IS NOT NULL")
                .bind(table)
                .fetch_optional(pg)
                .await?;
        if exists.is_none() {
            return Err(error);
        }
    }
    Ok(())
}
