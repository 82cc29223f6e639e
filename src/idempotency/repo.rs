//! The SQL of idempotency claims.
//!
//! Each attempt of an id is a row of its own; the newest decides. A claim is
//! one writer transaction: on PostgreSQL under an advisory lock on the id
//! (the partitioned table cannot make the id unique by itself, see the
//! migration `request_claims_by_day`), on SQLite as the one writer. In it,
//! the newest attempt is read and a new one inserted only if that attempt
//! was released, its running lease ran out, or its answer's retention
//! passed (the same number when the last was vacated before any work ran).
//!
//! Claims live in day partitions on PostgreSQL (`request_claims_d<day>`),
//! created ahead by [`ensure_days`] and dropped whole by [`drop_days_before`];
//! SQLite deletes claims made before the window.

use sqlx::Row;

use super::{Decision, RequestKey};
use crate::store::{Backend, Db};

/// Microseconds in a day: the span of one claims partition.
pub(super) const DAY_US: i64 = 86_400_000_000;

/// attempt, state, fingerprint, lease_until_us, expires_at_us, answer.
type ClaimRow = (i64, String, String, i64, i64, Option<Vec<u8>>);

/// What the newest attempt of an id says about a new claim at `now_us`.
fn decide(newest: Option<ClaimRow>, now_us: i64) -> Result<i64, Decision> {
    let Some((attempt, state, fingerprint, lease_until, expires_at, answer)) = newest else {
        return Ok(0);
    };
    match state.as_str() {
        "running" if lease_until > now_us => Err(Decision::Running),
        "completed" if expires_at > now_us => Err(Decision::Completed {
            fingerprint,
            answer,
        }),
        // Released before any work ran: nothing was metered under it.
        "vacated" => Ok(attempt),
        _ => Ok(attempt + 1),
    }
}

pub(super) async fn claim(
    db: &Db,
    key: &RequestKey,
    fingerprint: &str,
    now_us: i64,
    lease_until_us: i64,
) -> Result<Decision, sqlx::Error> {
    let mut tx = db.begin_write().await?;
    if db.backend() == Backend::Postgres {
        // Claims of one id wait for each other here, on every replica; ids
        // whose hashes collide only wait a little.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(31) || $2, 0))")
            .bind(&key.tenant_id)
            .bind(&key.request_id)
            .execute(&mut *tx)
            .await?;
    }
    let newest: Option<ClaimRow> = sqlx::query_as(
        "SELECT attempt, state, fingerprint, lease_until_us, expires_at_us, answer \
         FROM request_claims WHERE tenant_id = $1 AND request_id = $2 \
         ORDER BY attempt DESC, claimed_at_us DESC LIMIT 1",
    )
    .bind(&key.tenant_id)
    .bind(&key.request_id)
    .fetch_optional(&mut *tx)
    .await?;
    let attempt = match decide(newest, now_us) {
        Ok(attempt) => attempt,
        Err(decision) => {
            tx.rollback().await?;
            return Ok(decision);
        }
    };
    sqlx::query(
        "INSERT INTO request_claims (tenant_id, request_id, attempt, state, fingerprint, \
         claimed_at_us, lease_until_us, expires_at_us, answer) \
         VALUES ($1, $2, $3, 'running', $4, $5, $6, $6, NULL)",
    )
    .bind(&key.tenant_id)
    .bind(&key.request_id)
    .bind(attempt)
    .bind(fingerprint)
    .bind(now_us)
    .bind(lease_until_us)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Decision::Won(attempt))
}

/// Whether `error` says the day's partition does not exist yet.
pub(super) fn is_missing_day(error: &sqlx::Error) -> bool {
    // 23514: "no partition of relation ... found for row".
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "23514")
}

fn day_table(day: i64) -> String {
    format!("request_claims_d{day}")
}

/// Creates the claims partitions of days `from..=to` (PostgreSQL; nothing
/// on SQLite). Idempotent, and safe when replicas race.
pub(super) async fn ensure_days(db: &Db, from: i64, to: i64) -> Result<(), sqlx::Error> {
    let Some(pg) = db.postgres() else {
        return Ok(());
    };
    for day in from..=to {
        crate::store::create_range_partition(
            pg,
            "request_claims",
            &day_table(day),
            day * DAY_US,
            (day + 1) * DAY_US,
        )
        .await?;
    }
    Ok(())
}

/// Removes every claim made before day `first_kept`: whole partitions on
/// PostgreSQL, rows on SQLite. Returns the partitions (or rows) removed.
pub(super) async fn drop_days_before(db: &Db, first_kept: i64) -> Result<u64, sqlx::Error> {
    let Some(pg) = db.postgres() else {
        let done = sqlx::query("DELETE FROM request_claims WHERE claimed_at_us < $1")
            .bind(first_kept.saturating_mul(DAY_US))
            .execute(db.pool())
            .await?;
        return Ok(done.rows_affected());
    };
    let mut dropped = 0;
    for day in claim_days(db).await? {
        if day < first_kept {
            sqlx::query(&format!("DROP TABLE IF EXISTS {}", day_table(day)))
                .execute(pg)
                .await?;
            dropped += 1;
        }
    }
    Ok(dropped)
}

/// The days that have a claims partition (PostgreSQL), in order.
pub async fn claim_days(db: &Db) -> Result<Vec<i64>, sqlx::Error> {
    let Some(pg) = db.postgres() else {
        return Ok(Vec::new());
    };
    let rows = sqlx::query(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'request_claims'",
    )
    .fetch_all(pg)
    .await?;
    let mut days: Vec<i64> = rows
        .iter()
        .filter_map(|row| {
            let name: String = row.try_get(0).ok()?;
            name.strip_prefix("request_claims_d")?.parse().ok()
        })
        .collect();
    days.sort_unstable();
    Ok(days)
}

pub(super) async fn complete(
    db: &Db,
    key: &RequestKey,
    attempt: i64,
    answer: &[u8],
    expires_at_us: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE request_claims SET state = 'completed', answer = $1, expires_at_us = $2 \
         WHERE tenant_id = $3 AND request_id = $4 AND attempt = $5 AND state = 'running'",
    )
    .bind(answer)
    .bind(expires_at_us)
    .bind(&key.tenant_id)
    .bind(&key.request_id)
    .bind(attempt)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// Gives the id up: `worked` says whether the attempt ran (its usage is
/// metered under its number, which the next claim must not reuse).
pub(super) async fn release(
    db: &Db,
    key: &RequestKey,
    attempt: i64,
    worked: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE request_claims SET state = $1 \
         WHERE tenant_id = $2 AND request_id = $3 AND attempt = $4 AND state = 'running'",
    )
    .bind(if worked { "released" } else { "vacated" })
    .bind(&key.tenant_id)
    .bind(&key.request_id)
    .bind(attempt)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// Drops stored answers past their retention, before their day goes: the
/// rows stay until then, so a later claim of the id knows its attempt
/// number.
pub(super) async fn drop_expired_answers(db: &Db, now_us: i64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE request_claims SET answer = NULL WHERE answer IS NOT NULL AND expires_at_us <= $1",
    )
    .bind(now_us)
    .execute(db.pool())
    .await?;
    Ok(done.rows_affected())
}
