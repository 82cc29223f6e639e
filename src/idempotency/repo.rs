//! The SQL of idempotency claims, one portable statement each.
//!
//! The claim is one upsert: a new id inserts attempt 0; an existing row is
//! taken over only if it was released, its running lease ran out, or its
//! answer's retention passed, as the next attempt (the same one when the
//! last was vacated before any work ran). The database's unique key
//! decides between racers on every replica; the loser reads the row.

use super::{Decision, RequestKey};
use crate::store::Db;

/// state, fingerprint, lease_until_us, expires_at_us, answer.
type ClaimRow = (String, String, i64, i64, Option<Vec<u8>>);

const CLAIM: &str = "INSERT INTO request_claims AS c (tenant_id, request_id, attempt, state, \
       fingerprint, claimed_at_us, lease_until_us, expires_at_us, answer) \
     VALUES ($1, $2, 0, 'running', $3, $4, $5, $5, NULL) \
     ON CONFLICT (tenant_id, request_id) DO UPDATE SET \
       attempt = CASE WHEN c.state = 'vacated' THEN c.attempt ELSE c.attempt + 1 END, \
       state = 'running', fingerprint = EXCLUDED.fingerprint, \
       claimed_at_us = EXCLUDED.claimed_at_us, lease_until_us = EXCLUDED.lease_until_us, \
       expires_at_us = EXCLUDED.expires_at_us, answer = NULL \
     WHERE c.state IN ('released', 'vacated') \
        OR (c.state = 'running' AND c.lease_until_us <= EXCLUDED.claimed_at_us) \
        OR (c.state = 'completed' AND c.expires_at_us <= EXCLUDED.claimed_at_us) \
     RETURNING attempt";

pub(super) async fn claim(
    db: &Db,
    key: &RequestKey,
    fingerprint: &str,
    now_us: i64,
    lease_until_us: i64,
) -> Result<Decision, sqlx::Error> {
    let won: Option<(i64,)> = sqlx::query_as(CLAIM)
        .bind(&key.tenant_id)
        .bind(&key.request_id)
        .bind(fingerprint)
        .bind(now_us)
        .bind(lease_until_us)
        .fetch_optional(db.pool())
        .await?;
    if let Some((attempt,)) = won {
        return Ok(Decision::Won(attempt));
    }
    let row: Option<ClaimRow> = sqlx::query_as(
        "SELECT state, fingerprint, lease_until_us, expires_at_us, answer FROM request_claims \
         WHERE tenant_id = $1 AND request_id = $2",
    )
    .bind(&key.tenant_id)
    .bind(&key.request_id)
    .fetch_optional(db.pool())
    .await?;
    Ok(match row {
        Some((state, _, lease_until, _, _)) if state == "running" && lease_until > now_us => {
            Decision::Running
        }
        Some((state, fingerprint, _, expires_at, answer))
            if state == "completed" && expires_at > now_us =>
        {
            Decision::Completed {
                fingerprint,
                answer,
            }
        }
        _ => Decision::Retry,
    })
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

/// Drops stored answers past their retention. The rows stay (small, like
/// the metering table's ids), so the next claim of the id knows its attempt
/// number and is metered under a key of its own.
pub(super) async fn drop_expired_answers(db: &Db, now_us: i64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE request_claims SET answer = NULL WHERE answer IS NOT NULL AND expires_at_us <= $1",
    )
    .bind(now_us)
    .execute(db.pool())
    .await?;
    Ok(done.rows_affected())
}
