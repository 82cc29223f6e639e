//! The SQL of idempotency claims.
//!
//! Each attempt of an id is a row of its own, its number unique for the id;
//! the highest decides (never the clock, which replicas do not share). A
//! claim is
//! one writer transaction: on PostgreSQL under an advisory lock on the id
//! (the partitioned table cannot make the id unique by itself, see the
//! migration `request_claims_by_day`), on SQLite as the one writer. In it,
//! the newest attempt is read and a new one inserted only if that attempt
//! was released, its running lease ran out, or its answer's retention
//! passed. A vacated attempt (released before any work ran) is taken over in
//! place instead, keeping its number: its row moves to today's partition.
//!
//! Claims live in day partitions on PostgreSQL (`request_claims_d<day>`),
//! created ahead by [`ensure_days`] and dropped whole by [`drop_days_before`];
//! SQLite deletes claims made before the window.

use sqlx::Row;

use super::{Decision, RequestKey};
use crate::store::{Backend, Db};

/// Microseconds in a day: the span of one claims partition.
pub(super) const DAY_US: i64 = 86_400_000_000;

/// attempt, state, fingerprint, lease_until_us, expires_at_us, answer,
/// claimed_at_us.
type ClaimRow = (i64, String, String, i64, i64, Option<Vec<u8>>, i64);

/// How a claim that wins takes its attempt.
enum Take {
    /// A new row with this number.
    New(i64),
    /// The vacated attempt's row (its number and claim time): nothing was
    /// metered under it, so its number is reused.
    Vacated(i64, i64),
}

/// What the newest attempt of an id says about a new claim at `now_us`.
fn decide(newest: Option<ClaimRow>, now_us: i64) -> Result<Take, Decision> {
    let Some((attempt, state, fingerprint, lease_until, expires_at, answer, claimed_at)) = newest
    else {
        return Ok(Take::New(0));
    };
    match state.as_str() {
        "running" if lease_until > now_us => Err(Decision::Running),
        "completed" if expires_at > now_us => Err(Decision::Completed {
            fingerprint,
            answer,
        }),
        "vacated" => Ok(Take::Vacated(attempt, claimed_at)),
        _ => Ok(Take::New(attempt + 1)),
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
        // Each statement below must see what committed before it started
        // (the lock's waiters, above all), whatever the server's default.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut *tx)
            .await?;
        // Claims of one id wait for each other here, on every replica; ids
        // whose hashes collide only wait a little.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(31) || $2, 0))")
            .bind(&key.tenant_id)
            .bind(&key.request_id)
            .execute(&mut *tx)
            .await?;
    }
    let newest: Option<ClaimRow> = sqlx::query_as(
        "SELECT attempt, state, fingerprint, lease_until_us, expires_at_us, answer, \
         claimed_at_us FROM request_claims WHERE tenant_id = $1 AND request_id = $2 \
         ORDER BY attempt DESC LIMIT 1",
    )
    .bind(&key.tenant_id)
    .bind(&key.request_id)
    .fetch_optional(&mut *tx)
    .await?;
    let take = match decide(newest, now_us) {
        Ok(take) => take,
        Err(decision) => {
            tx.rollback().await?;
            return Ok(decision);
        }
    };
    let attempt = match take {
        Take::New(attempt) => {
            sqlx::query(
                "INSERT INTO request_claims (tenant_id, request_id, attempt, state, \
                 fingerprint, claimed_at_us, lease_until_us, expires_at_us, answer) \
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
            attempt
        }
        Take::Vacated(attempt, claimed_at) => {
            // A new claim time moves the row to today's partition, so it
            // stays as long as a claim made now.
            sqlx::query(
                "UPDATE request_claims SET state = 'running', fingerprint = $1, \
                 claimed_at_us = $2, lease_until_us = $3, expires_at_us = $3, answer = NULL \
                 WHERE tenant_id = $4 AND request_id = $5 AND attempt = $6 \
                 AND claimed_at_us = $7",
            )
            .bind(fingerprint)
            .bind(now_us)
            .bind(lease_until_us)
            .bind(&key.tenant_id)
            .bind(&key.request_id)
            .bind(attempt)
            .bind(claimed_at)
            .execute(&mut *tx)
            .await?;
            attempt
        }
    };
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
        // In batches: each holds SQLite's one write lock only briefly.
        let mut deleted = 0;
        loop {
            let done = sqlx::query(
                "DELETE FROM request_claims WHERE rowid IN (SELECT rowid FROM request_claims \
                 WHERE claimed_at_us < $1 LIMIT 10000)",
            )
            .bind(first_kept.saturating_mul(DAY_US))
            .execute(db.pool())
            .await?;
            deleted += done.rows_affected();
            if done.rows_affected() == 0 {
                return Ok(deleted);
            }
        }
    };
    let mut dropped = 0;
    for day in claim_days(db).await? {
        if day < first_kept {
            // Dropping a partition locks the whole table: give up soon
            // rather than queue every claim behind a long statement (the
            // next sweep tries again).
            let mut tx = pg.begin().await?;
            sqlx::query("SET LOCAL lock_timeout = '2s'")
                .execute(&mut *tx)
                .await?;
            sqlx::query(&format!("DROP TABLE IF EXISTS {}", day_table(day)))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
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
         WHERE i.inhparent = 'request_claims'::regclass",
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
