//! Inserting usage exactly once, with rollups, in one transaction.
//!
//! The idempotency record is the events table's primary key, `(tenant_id,
//! finished_at_us, request_id)`: a record and its replay are the same bytes,
//! so they meet on it in the month partition the event lives in, and the
//! key leaves with that partition when the month is archived. Two
//! executions of one client request id never share a key: each attempt is
//! metered under its own id (`idempotency`).
//!
//! PostgreSQL: one statement per batch. Column arrays go in through
//! `UNNEST`; the events are inserted with `ON CONFLICT DO NOTHING`, and the
//! rollups are incremented from exactly the rows it returns (the new ones).
//! SQLite: the same inside one transaction, in multi-row statements of up
//! to 512 rows, the rollups summed here from the rows each insert returns
//! (each statement is a round trip to the driver's thread: one per row cost
//! a thread wake-up per row). Either way, a batch shipped twice counts once.
//!
//! `recorded_at_us` is the database's clock when the row is written, taken
//! after the statement holds its table lock: billing finalizes an invoice
//! under a lock that waits for inserts in flight, then counts every event
//! recorded before its own clock reading as the month's, and every later one
//! as late usage. A client-side clock read before the lock could fall on the
//! wrong side of that line.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use sqlx::PgPool;

use super::{MeteringError, UsageEvent};
use crate::calendar::Month;
use crate::store::{Backend, Db};

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Drops repeats of one record's key within one batch (a statement may not
/// insert a key twice); the first occurrence wins, as across batches.
fn dedupe(events: &[UsageEvent]) -> Vec<&UsageEvent> {
    let mut seen = HashSet::new();
    events
        .iter()
        .filter(|e| {
            seen.insert((
                e.tenant_id.as_str(),
                e.finished_at_us,
                e.request_id.as_str(),
            ))
        })
        .collect()
}

/// The PostgreSQL advisory lock between inserts (shared) and a month's
/// archival (exclusive): an insert decides which months are archived and
/// inserts under it, so no event lands in a month while it leaves.
pub const ARCHIVE_LOCK_KEY: i64 = 0x6167_7761_7263_6876;

/// What one batch did.
#[derive(Debug, Default)]
pub struct Inserted {
    /// Events not recorded before.
    pub new: u64,
    /// Events of a month whose raw events were archived: the key that
    /// would tell a replay from a new record left with them, so they are
    /// not inserted (the writer keeps them aside and reports them).
    pub refused: Vec<UsageEvent>,
}

/// Inserts the events not yet recorded and not of an archived month.
pub async fn insert_batch(db: &Db, events: &[UsageEvent]) -> Result<Inserted, MeteringError> {
    let events = dedupe(events);
    if events.is_empty() {
        return Ok(Inserted::default());
    }
    match (db.backend(), db.postgres()) {
        (Backend::Postgres, Some(pg)) => insert_postgres(pg, &events).await,
        _ => insert_sqlite(db, &events).await,
    }
}

/// Month starts whose raw events are archived (a row per archived month: a
/// few hundred at most).
const ARCHIVED_MONTHS: &str = "SELECT month_start_us FROM usage_archives WHERE state = 'archived'";

/// Splits `events` into those of months still in the database and those of
/// archived months.
fn split_archived<'a>(
    events: &[&'a UsageEvent],
    archived: &[(i64,)],
) -> (Vec<&'a UsageEvent>, Vec<UsageEvent>) {
    if archived.is_empty() {
        return (events.to_vec(), Vec::new());
    }
    let archived: HashSet<i64> = archived.iter().map(|(m,)| *m).collect();
    let (refused, kept): (Vec<&UsageEvent>, Vec<&UsageEvent>) = events
        .iter()
        .partition(|e| archived.contains(&Month::of_us(e.finished_at_us).start_us()));
    (kept, refused.into_iter().cloned().collect())
}

/// Creates the monthly partitions the batch needs.
async fn ensure_partitions(pg: &PgPool, events: &[&UsageEvent]) -> Result<(), MeteringError> {
    let months: BTreeSet<Month> = events
        .iter()
        .map(|e| Month::of_us(e.finished_at_us))
        .collect();
    for month in months {
        create_partition(pg, month).await?;
    }
    Ok(())
}

/// Creates `month`'s partition of `usage_events` unless it exists.
pub(crate) async fn create_partition(pg: &PgPool, month: Month) -> Result<(), sqlx::Error> {
    crate::store::create_range_partition(
        pg,
        "usage_events",
        &format!("usage_events_{}", month.table_suffix()),
        month.start_us(),
        month.end_us(),
    )
    .await
}

async fn insert_postgres(pg: &PgPool, events: &[&UsageEvent]) -> Result<Inserted, MeteringError> {
    let mut tx = pg.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
        .bind(ARCHIVE_LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    let archived: Vec<(i64,)> = sqlx::query_as(ARCHIVED_MONTHS).fetch_all(&mut *tx).await?;
    let (events, refused) = split_archived(events, &archived);
    if events.is_empty() {
        tx.commit().await?;
        return Ok(Inserted { new: 0, refused });
    }
    let events = events.as_slice();
    ensure_partitions(pg, events).await?;
    let col_s = |f: fn(&UsageEvent) -> &str| -> Vec<String> {
        events.iter().map(|e| f(e).to_owned()).collect()
    };
    let col_i = |f: fn(&UsageEvent) -> i64| -> Vec<i64> { events.iter().map(|e| f(e)).collect() };
    let (inserted,): (i64,) = sqlx::query_as(
        "WITH batch AS ( \
           SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], \
             $12::bigint[], $13::bigint[], $14::text[], $15::bigint[], $16::bigint[], \
             $17::bigint[]) \
           AS b(tenant_id, request_id, key_id, model, device_profile, prompt_tokens, \
             completion_tokens, queue_time_us, ttft_us, total_time_us, device_time_us, energy_mj, \
             mean_power_mw, finish_reason, started_at_us, finished_at_us, cached_prompt_tokens) \
         ), inserted AS ( \
           INSERT INTO usage_events (tenant_id, request_id, key_id, model, device_profile, \
             prompt_tokens, completion_tokens, queue_time_us, ttft_us, total_time_us, \
             device_time_us, energy_mj, mean_power_mw, finish_reason, started_at_us, \
             finished_at_us, cached_prompt_tokens, recorded_at_us) \
           SELECT b.*, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint \
           FROM batch b \
           ON CONFLICT (tenant_id, finished_at_us, request_id) DO NOTHING \
           RETURNING tenant_id, model, finished_at_us, prompt_tokens, cached_prompt_tokens, \
             completion_tokens, device_time_us, energy_mj \
         ), rolled AS ( \
           INSERT INTO usage_hourly AS h (tenant_id, model, hour_us, requests, prompt_tokens, \
             cached_prompt_tokens, completion_tokens, device_time_us, energy_mj) \
           SELECT tenant_id, model, (finished_at_us / 3600000000) * 3600000000, count(*), \
             sum(prompt_tokens), sum(cached_prompt_tokens), sum(completion_tokens), \
             sum(device_time_us), sum(energy_mj) \
           FROM inserted GROUP BY 1, 2, 3 \
           ON CONFLICT (tenant_id, hour_us, model) DO UPDATE SET \
             requests = h.requests + EXCLUDED.requests, \
             prompt_tokens = h.prompt_tokens + EXCLUDED.prompt_tokens, \
             cached_prompt_tokens = h.cached_prompt_tokens + EXCLUDED.cached_prompt_tokens, \
             completion_tokens = h.completion_tokens + EXCLUDED.completion_tokens, \
             device_time_us = h.device_time_us + EXCLUDED.device_time_us, \
             energy_mj = h.energy_mj + EXCLUDED.energy_mj \
           RETURNING 1 \
         ) SELECT count(*) FROM inserted",
    )
    .bind(col_s(|e| &e.tenant_id))
    .bind(col_s(|e| &e.request_id))
    .bind(col_s(|e| &e.key_id))
    .bind(col_s(|e| &e.model))
    .bind(col_s(|e| &e.device_profile))
    .bind(col_i(|e| i64::from(e.prompt_tokens)))
    .bind(col_i(|e| i64::from(e.completion_tokens)))
    .bind(col_i(|e| i64_of(e.queue_time_us)))
    .bind(col_i(|e| i64_of(e.ttft_us)))
    .bind(col_i(|e| i64_of(e.total_time_us)))
    .bind(col_i(|e| i64_of(e.device_time_us)))
    .bind(col_i(|e| i64_of(e.energy_mj)))
    .bind(col_i(|e| i64_of(e.mean_power_mw)))
    .bind(col_s(|e| e.finish_reason.as_str()))
    .bind(col_i(|e| e.started_at_us))
    .bind(col_i(|e| e.finished_at_us))
    .bind(col_i(|e| i64::from(e.cached_prompt_tokens)))
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Inserted {
        new: u64::try_from(inserted).unwrap_or(0),
        refused,
    })
}

/// Rows per multi-row SQLite statement: 17 parameters each stays well
/// under SQLite's 32,766-parameter limit.
const SQLITE_ROWS_PER_STATEMENT: usize = 512;

/// `count` groups of `width` placeholders: `(?, ?), (?, ?)`.
fn placeholders(count: usize, width: usize) -> String {
    let row = format!("({})", vec!["?"; width].join(", "));
    vec![row; count].join(", ")
}

/// Per (tenant, model, hour): requests, prompt, cached prompt, completion,
/// device time, energy.
type HourlySums<'a> = BTreeMap<(&'a str, &'a str, i64), [i64; 6]>;

async fn insert_sqlite(db: &Db, events: &[&UsageEvent]) -> Result<Inserted, MeteringError> {
    // The write lock serializes this with a month's archival.
    let mut tx = db.begin_write().await?;
    let archived: Vec<(i64,)> = sqlx::query_as(ARCHIVED_MONTHS).fetch_all(&mut *tx).await?;
    let (events, refused) = split_archived(events, &archived);
    let events = events.as_slice();
    let mut inserted_rows: Vec<(String, i64, String)> = Vec::new();
    for chunk in events.chunks(SQLITE_ROWS_PER_STATEMENT) {
        // `WHERE true`: SQLite's parser needs it between a SELECT and an
        // upsert clause.
        let sql = format!(
            "INSERT INTO usage_events (tenant_id, request_id, key_id, model, device_profile, \
             prompt_tokens, completion_tokens, queue_time_us, ttft_us, total_time_us, \
             device_time_us, energy_mj, mean_power_mw, finish_reason, started_at_us, \
             finished_at_us, cached_prompt_tokens, recorded_at_us) \
             SELECT *, CAST(unixepoch('subsec') * 1000000 AS INTEGER) FROM (VALUES {}) \
             WHERE true \
             ON CONFLICT (tenant_id, finished_at_us, request_id) DO NOTHING \
             RETURNING tenant_id, finished_at_us, request_id",
            placeholders(chunk.len(), 17)
        );
        let mut query = sqlx::query_as::<_, (String, i64, String)>(&sql);
        for e in chunk {
            query = query
                .bind(&e.tenant_id)
                .bind(&e.request_id)
                .bind(&e.key_id)
                .bind(&e.model)
                .bind(&e.device_profile)
                .bind(i64::from(e.prompt_tokens))
                .bind(i64::from(e.completion_tokens))
                .bind(i64_of(e.queue_time_us))
                .bind(i64_of(e.ttft_us))
                .bind(i64_of(e.total_time_us))
                .bind(i64_of(e.device_time_us))
                .bind(i64_of(e.energy_mj))
                .bind(i64_of(e.mean_power_mw))
                .bind(e.finish_reason.as_str())
                .bind(e.started_at_us)
                .bind(e.finished_at_us)
                .bind(i64::from(e.cached_prompt_tokens));
        }
        inserted_rows.extend(query.fetch_all(&mut *tx).await?);
    }
    let inserted: HashSet<(&str, i64, &str)> = inserted_rows
        .iter()
        .map(|(tenant, finished, request)| (tenant.as_str(), *finished, request.as_str()))
        .collect();
    let new: Vec<&UsageEvent> = events
        .iter()
        .copied()
        .filter(|e| {
            inserted.contains(&(
                e.tenant_id.as_str(),
                e.finished_at_us,
                e.request_id.as_str(),
            ))
        })
        .collect();
    let mut hourly: HourlySums = BTreeMap::new();
    for e in &new {
        let sums = hourly
            .entry((e.tenant_id.as_str(), e.model.as_str(), e.hour_us()))
            .or_default();
        for (sum, add) in sums.iter_mut().zip([
            1,
            i64::from(e.prompt_tokens),
            i64::from(e.cached_prompt_tokens),
            i64::from(e.completion_tokens),
            i64_of(e.device_time_us),
            i64_of(e.energy_mj),
        ]) {
            *sum = sum.saturating_add(add);
        }
    }
    let groups: Vec<_> = hourly.into_iter().collect();
    for chunk in groups.chunks(SQLITE_ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO usage_hourly (tenant_id, model, hour_us, requests, prompt_tokens, \
             cached_prompt_tokens, completion_tokens, device_time_us, energy_mj) VALUES {} \
             ON CONFLICT (tenant_id, hour_us, model) DO UPDATE SET \
             requests = usage_hourly.requests + excluded.requests, \
             prompt_tokens = usage_hourly.prompt_tokens + excluded.prompt_tokens, \
             cached_prompt_tokens = usage_hourly.cached_prompt_tokens \
               + excluded.cached_prompt_tokens, \
             completion_tokens = usage_hourly.completion_tokens + excluded.completion_tokens, \
             device_time_us = usage_hourly.device_time_us + excluded.device_time_us, \
             energy_mj = usage_hourly.energy_mj + excluded.energy_mj",
            placeholders(chunk.len(), 9)
        );
        let mut query = sqlx::query(&sql);
        for ((tenant, model, hour), sums) in chunk {
            query = query.bind(*tenant).bind(*model).bind(*hour);
            for sum in sums {
                query = query.bind(*sum);
            }
        }
        query.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(Inserted {
        new: new.len() as u64,
        refused,
    })
}
