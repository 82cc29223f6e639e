//! Metering at volume: the same figures on a database holding only the large
//! tenants' month ("empty") and after it was filled with `BENCH_EVENTS`
//! usage events over the last 30 days ("full"), in one run (six large
//! tenants with one month each: three measured empty, three full):
//!
//! - usage events persisted per second (the writer's batch path);
//! - the metering lag at 5,000 requests/s (spool -> writer -> PostgreSQL);
//! - a `GetUsage` month query (by model and day) for a large tenant;
//! - its invoice draft computed, and three such months finalized;
//! - an export of its tenant-month (keyset pages -> CSV);
//! - the sizes of events, rollups and the idempotency claims.
//!
//! The fill is one server-side statement per 2 million events that writes
//! events and their hourly rollups together, as the writer's statement does
//! (the insert path itself is measured above, and in `metering`).
//!
//! Run: `cargo bench --bench metering_volume` (PostgreSQL at
//! TEST_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/postgres; a
//! scratch database is created and dropped). `BENCH_EVENTS` is the fill
//! (default 10,000,000), `BENCH_TENANT_EVENTS` each large tenant's month
//! (default 500,000), `BENCH_LAG_SECONDS` the lag run (default 20);
//! `BENCH_KEEP_DB` keeps the scratch database (and prints its URL).

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark fails loudly by design

use std::time::{Duration, Instant};

use ascend_gateway::billing::export::{CHUNK_ROWS, EventPager, Pager};
use ascend_gateway::billing::file::{EventRecord, ExportFile, FileFormat};
use ascend_gateway::billing::{BillingService, BillingSettings};
use ascend_gateway::calendar::Month;
use ascend_gateway::metering::{FinishReason, Grouping, UsageEvent, insert_batch};
use ascend_gateway::store::{Db, now_us};
use ascend_gateway::tenancy::{NewTenant, TenancyService};

#[path = "support/lag.rs"]
mod lag;
#[path = "support/scratch.rs"]
mod scratch;

const DAY_US: i64 = 86_400_000_000;
const HOUR_US: i64 = 3_600_000_000;
/// Background tenants the fill spreads over (skewed: a few are large).
const TENANTS: i64 = 1_000;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn event(tenant: &str, request_id: String, finished_at_us: i64) -> UsageEvent {
    UsageEvent {
        request_id,
        tenant_id: tenant.to_owned(),
        key_id: "0123456789abcdef".to_owned(),
        model: "small".to_owned(),
        device_profile: "ascend-910b".to_owned(),
        prompt_tokens: 420,
        cached_prompt_tokens: 64,
        completion_tokens: 180,
        queue_time_us: 100,
        ttft_us: 9_000,
        total_time_us: 250_000,
        device_time_us: 40_000,
        energy_mj: 14_000,
        mean_power_mw: 350_000,
        finish_reason: FinishReason::Eos,
        started_at_us: finished_at_us - 250_000,
        finished_at_us,
    }
}

/// Inserts `rows` generated events (numbers `first..first + rows`) whose
/// tenant, model, device, lengths and finish time come from `tenant`,
/// spread over `[from_us, from_us + span_us)`, with their hourly rollups in
/// the same statement.
async fn fill(db: &Db, tenant: &str, first: i64, rows: i64, from_us: i64, span_us: i64) {
    let pg = db.postgres().expect("PostgreSQL");
    let sql = format!(
        "WITH g AS ( \
           SELECT i, ((i * 2654435761) % 1000003)::float8 / 1000003 AS u FROM generate_series({first}::bigint, {last}::bigint) AS i \
         ), ev AS ( \
           INSERT INTO usage_events (tenant_id, request_id, key_id, model, device_profile, \
             prompt_tokens, cached_prompt_tokens, completion_tokens, queue_time_us, ttft_us, \
             total_time_us, device_time_us, energy_mj, mean_power_mw, finish_reason, \
             started_at_us, finished_at_us, recorded_at_us) \
           SELECT {tenant}, 'v-' || i, 'k' || (i % 7), \
             (ARRAY['small', 'tiny', 'v4-small'])[1 + i % 3], \
             (ARRAY['ascend-910b', 'h100-sxm'])[1 + (i / 3) % 2], \
             100 + i % 2000, (i % 2000) / 4, 1 + i % 600, 120, 9000, 250000, 40000, \
             14000 + i % 5000, 350000, 'eos', \
             {from_us} + (i * 7919) % {span_us} - 250000, {from_us} + (i * 7919) % {span_us}, \
             {from_us} + (i * 7919) % {span_us} + 200000 \
           FROM g \
           RETURNING tenant_id, model, finished_at_us, prompt_tokens, cached_prompt_tokens, \
             completion_tokens, device_time_us, energy_mj \
         ) \
         INSERT INTO usage_hourly (tenant_id, model, hour_us, requests, prompt_tokens, \
           cached_prompt_tokens, completion_tokens, device_time_us, energy_mj) \
         SELECT tenant_id, model, finished_at_us - finished_at_us % {HOUR_US}, COUNT(*), \
           SUM(prompt_tokens), SUM(cached_prompt_tokens), SUM(completion_tokens), \
           SUM(device_time_us), SUM(energy_mj) \
         FROM ev GROUP BY 1, 2, 3 \
         ON CONFLICT (tenant_id, hour_us, model) DO UPDATE SET \
           requests = usage_hourly.requests + EXCLUDED.requests, \
           prompt_tokens = usage_hourly.prompt_tokens + EXCLUDED.prompt_tokens, \
           cached_prompt_tokens = usage_hourly.cached_prompt_tokens + EXCLUDED.cached_prompt_tokens, \
           completion_tokens = usage_hourly.completion_tokens + EXCLUDED.completion_tokens, \
           device_time_us = usage_hourly.device_time_us + EXCLUDED.device_time_us, \
           energy_mj = usage_hourly.energy_mj + EXCLUDED.energy_mj",
        last = first + rows - 1,
    );
    sqlx::query(&sql).execute(pg).await.expect("fill");
}

/// The figures measured in each phase.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    insert_per_s: f64,
    lag_p50_ms: f64,
    lag_p99_ms: f64,
    lag_max_ms: f64,
    lag_offered_per_s: f64,
    lag_landed_share: f64,
    usage_query_ms: f64,
    draft_ms: f64,
    finalize_ms: f64,
    export_rows_per_s: f64,
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Every figure for `tenant`'s month `period`; `phase` tags the writer's
/// and the lag's request ids.
async fn measure(
    db: &Db,
    billing: &BillingService,
    tenants: &[String],
    period: Month,
    phase: &str,
    lag_seconds: u64,
) -> Figures {
    let mut figures = Figures::default();
    let tenant = tenants[0].as_str();
    // Writer path: 200,000 events of 100 tenants finishing now, batches of
    // 5,000 (the writer's default).
    let now = now_us();
    let events: Vec<UsageEvent> = (0..200_000i64)
        .map(|i| {
            event(
                &format!("writer-{}", i % 100),
                format!("{phase}-w-{i}"),
                now + i,
            )
        })
        .collect();
    let start = Instant::now();
    for chunk in events.chunks(5_000) {
        insert_batch(db, chunk).await.expect("insert");
    }
    figures.insert_per_s = events.len() as f64 / start.elapsed().as_secs_f64();

    let lag = lag::lag(db, &format!("{phase}-lag"), 5_000, lag_seconds, |n| {
        event(&format!("lag-{}", n % 100), String::new(), 0)
    })
    .await;
    figures.lag_p50_ms = lag.p50_ms;
    figures.lag_p99_ms = lag.p99_ms;
    figures.lag_max_ms = lag.max_ms;
    figures.lag_offered_per_s = lag.offered_per_s;
    figures.lag_landed_share = lag.landed as f64 / lag.sent as f64;

    let mut samples = Vec::new();
    for _ in 0..20 {
        let start = Instant::now();
        let (rows, total) = ascend_gateway::metering::query::usage(
            db,
            tenant,
            period.start_us(),
            period.end_us(),
            None,
            Grouping::ModelDay,
        )
        .await
        .expect("usage");
        assert!(!rows.is_empty() && total.prompt_tokens > 0);
        samples.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    figures.usage_query_ms = median(samples);

    let mut samples = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let invoice = billing.get_invoice_of(tenant, period).await.expect("draft");
        samples.push(start.elapsed().as_secs_f64() * 1000.0);
        assert!(invoice.total_nanos > 0 && !invoice.lines.is_empty());
    }
    figures.draft_ms = median(samples);
    // Each large tenant's month finalized once (a month is final once).
    let mut samples = Vec::new();
    for tenant in tenants {
        let id = billing
            .get_invoice_of(tenant, period)
            .await
            .expect("draft")
            .id;
        let start = Instant::now();
        billing.finalize("bench", &id).await.expect("finalize");
        samples.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    figures.finalize_ms = median(samples);

    let dir = tempfile::tempdir().expect("dir");
    let start = Instant::now();
    let mut pager = EventPager::open(db, Some(tenant), period, CHUNK_ROWS)
        .await
        .expect("pager");
    let total = pager.total_rows();
    let mut file =
        ExportFile::<EventRecord>::create(&dir.path().join("export.csv"), FileFormat::Csv)
            .expect("file");
    while let Some(chunk) = pager.next_chunk().await.expect("chunk") {
        let records: Vec<EventRecord> = chunk.iter().map(EventRecord::from).collect();
        file.write_chunk(&records).expect("write");
    }
    assert_eq!(file.finish().expect("finish"), total);
    figures.export_rows_per_s = total as f64 / start.elapsed().as_secs_f64();
    figures
}

async fn sizes(db: &Db) -> (i64, i64, i64, i64) {
    let pg = db.postgres().expect("PostgreSQL");
    sqlx::query_as(
        "SELECT \
           (SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_inherits i \
              JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent \
              WHERE p.relname = 'usage_events'), \
           pg_total_relation_size('usage_hourly')::bigint, \
           (SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_inherits i \
              JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent \
              WHERE p.relname = 'request_claims'), \
           (SELECT COUNT(*) FROM usage_events)::bigint",
    )
    .fetch_one(pg)
    .await
    .expect("sizes")
}

fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        sqlx::any::install_default_drivers();
        let background = i64::try_from(env_u64("BENCH_EVENTS", 10_000_000)).unwrap();
        let per_tenant = i64::try_from(env_u64("BENCH_TENANT_EVENTS", 500_000)).unwrap();
        let lag_seconds = env_u64("BENCH_LAG_SECONDS", 20);
        let scratch = scratch::ScratchDb::create().await;
        let db = scratch.connect(Duration::from_secs(30)).await;
        let tenancy = TenancyService::new(db.clone(), "standard");
        let billing = BillingService::new(db.clone(), &BillingSettings::default());

        // Large tenants with the same month of usage: three measured on
        // the empty database, three on the full.
        let now = now_us();
        let period = Month::of_us(Month::of_us(now).start_us() - 1);
        let mut subjects = Vec::new();
        for n in 0..6 {
            let slug = format!("large-{n}");
            let tenant = tenancy
                .create_tenant(
                    "bench",
                    NewTenant {
                        slug: slug.clone(),
                        display_name: slug.clone(),
                        price_plan: None,
                        scheduling_weight: None,
                        limits: Default::default(),
                        cache_scope: None,
                        budget_alerts: None,
                    },
                )
                .await
                .expect("tenant");
            // The month's partitions and the current one, through the writer.
            let seed = vec![
                event(&tenant.id, "seed-past".to_owned(), period.start_us()),
                event(&tenant.id, "seed-now".to_owned(), now),
            ];
            insert_batch(&db, &seed).await.expect("partitions");
            fill(
                &db,
                &format!("'{}'", tenant.id),
                0,
                per_tenant,
                period.start_us(),
                period.end_us() - period.start_us(),
            )
            .await;
            subjects.push(tenant.id);
        }
        // The partitions 30 days back may reach one more month.
        let fill_from = now - 30 * DAY_US;
        insert_batch(&db, &[event("writer-0", "seed-back".to_owned(), fill_from)])
            .await
            .expect("partition");
        sqlx::query("ANALYZE").execute(db.pool()).await.expect("analyze");
        let (events_bytes, hourly_bytes, claims_bytes, rows) = sizes(&db).await;
        println!(
            "empty: {rows} events ({:.0} MiB), rollups {:.0} MiB, claims {:.1} MiB",
            mib(events_bytes),
            mib(hourly_bytes),
            mib(claims_bytes)
        );
        let empty = measure(&db, &billing, &subjects[..3], period, "empty", lag_seconds).await;
        println!("empty: {empty:?}");

        // Background tenants, skewed (tenant = 1000 u^3), over 30 days to now.
        let start = Instant::now();
        let chunk = 2_000_000i64;
        let mut done = 0;
        while done < background {
            let rows = chunk.min(background - done);
            fill(
                &db,
                &format!("'bg-' || floor({TENANTS} * u * u * u)::bigint"),
                per_tenant + done,
                rows,
                fill_from,
                30 * DAY_US,
            )
            .await;
            done += rows;
            println!(
                "filled {done} of {background} events in {:.0} s",
                start.elapsed().as_secs_f64()
            );
        }
        let fill_s = start.elapsed().as_secs_f64();
        sqlx::query("ANALYZE").execute(db.pool()).await.expect("analyze");
        let (events_bytes, hourly_bytes, claims_bytes, rows) = sizes(&db).await;
        println!(
            "full: {rows} events ({:.0} MiB), rollups {:.0} MiB, claims {:.1} MiB; fill {:.0} events/s",
            mib(events_bytes),
            mib(hourly_bytes),
            mib(claims_bytes),
            background as f64 / fill_s
        );
        let full = measure(&db, &billing, &subjects[3..], period, "full", lag_seconds).await;
        println!("full: {full:?}");

        let row = |what: &str, e: f64, f: f64, higher_is_better: bool| {
            let ratio = if higher_is_better { f / e } else { e / f };
            println!("| {what} | {e:.1} | {f:.1} | {:.0}% |", ratio * 100.0);
        };
        println!("\n| Figure | empty | full | full as % of empty (speed) |\n|---|---|---|---|");
        row("events persisted / s (writer batches of 5,000)", empty.insert_per_s, full.insert_per_s, true);
        row("lag p50 at 5,000 req/s, ms", empty.lag_p50_ms, full.lag_p50_ms, false);
        row("lag p99 at 5,000 req/s, ms", empty.lag_p99_ms, full.lag_p99_ms, false);
        row("GetUsage month by model and day, ms (median of 20)", empty.usage_query_ms, full.usage_query_ms, false);
        row("invoice draft, ms (median of 5)", empty.draft_ms, full.draft_ms, false);
        row("invoice finalization, ms (median of 3 tenants)", empty.finalize_ms, full.finalize_ms, false);
        row("export tenant-month to CSV, rows / s", empty.export_rows_per_s, full.export_rows_per_s, true);
        println!(
            "lag events landed: empty {:.4}, full {:.4}",
            empty.lag_landed_share, full.lag_landed_share
        );

        db.close().await;
        if std::env::var_os("BENCH_KEEP_DB").is_some() {
            println!("kept the database for a look: {}", scratch.url);
        } else {
            scratch.drop_database().await;
        }
    });
}
