//! Metering throughput: usage events persisted to PostgreSQL, and to the
//! embedded SQLite, per second (the writer's batch path), spool appends per second with group-commit fsync
//! under many concurrent requests, and the metering lag (request end to row
//! in PostgreSQL) with the gateway's own spool and writer at 5,000
//! requests/s.
//!
//! Run: `cargo bench --bench metering` (PostgreSQL at TEST_DATABASE_URL,
//! default postgres://postgres@127.0.0.1:5432/postgres; a scratch database
//! is created and dropped).

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark fails loudly by design

use std::sync::Arc;
use std::time::{Duration, Instant};

use ascend_gateway::metering::{Spool, SpoolSettings, UsageEvent, insert_batch};
use ascend_gateway::store::Db;

#[path = "support/lag.rs"]
mod lag;
#[path = "support/scratch.rs"]
mod scratch;

/// Requests per second of the lag scenario, and for how long.
const LAG_RATE: u64 = 5_000;
const LAG_SECONDS: u64 = 20;

fn event(i: u64) -> UsageEvent {
    let finished_at_us = 1_795_824_000_000_000 + i64::try_from(i).unwrap() * 1000;
    UsageEvent {
        request_id: format!("bench-{i:010}"),
        tenant_id: format!("tenant-{}", i % 100),
        key_id: "0123456789abcdef".to_owned(),
        model: if i.is_multiple_of(2) { "small" } else { "tiny" }.to_owned(),
        device_profile: "ascend-910b".to_owned(),
        prompt_tokens: 100,
        cached_prompt_tokens: 64,
        completion_tokens: 50,
        queue_time_us: 100,
        ttft_us: 1000,
        total_time_us: 5000,
        device_time_us: 700,
        energy_mj: 30,
        mean_power_mw: 350_000,
        finish_reason: ascend_gateway::metering::FinishReason::Eos,
        started_at_us: finished_at_us - 5000,
        finished_at_us,
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let scratch = scratch::ScratchDb::create().await;
        let db = scratch.connect(Duration::from_secs(5)).await;

        let total = 200_000u64;
        let batch = 5_000usize;
        let events: Vec<UsageEvent> = (0..total).map(event).collect();
        let start = Instant::now();
        for chunk in events.chunks(batch) {
            insert_batch(&db, chunk).await.expect("insert");
        }
        let elapsed = start.elapsed();
        println!(
            "postgres: {:.0} events/s persisted ({total} events, batches of {batch}, with dedup and hourly rollups)",
            total as f64 / elapsed.as_secs_f64()
        );
        let start = Instant::now();
        for chunk in events.chunks(batch) {
            insert_batch(&db, chunk).await.expect("replay");
        }
        println!(
            "postgres replay of the same events: {:.0} events/s (all skipped as duplicates)",
            total as f64 / start.elapsed().as_secs_f64()
        );
        sqlite(&events, batch).await;
        let lag = lag::lag(&db, "lag", LAG_RATE, LAG_SECONDS, |n| event(total + n)).await;
        println!(
            "lag at {:.0} requests/s for {LAG_SECONDS} s: {} of {} events in PostgreSQL; \
             request end to row p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            lag.offered_per_s, lag.landed, lag.sent, lag.p50_ms, lag.p99_ms, lag.max_ms
        );
        db.close().await;
        scratch.drop_database().await;

        let dir = tempfile::tempdir().expect("dir");
        let spool = Spool::open(dir.path(), SpoolSettings::default()).expect("spool");
        let appends = 50_000u64;
        let writers = 256u64;
        let start = Instant::now();
        let tasks: Vec<_> = (0..writers)
            .map(|w| {
                let spool = Arc::clone(&spool);
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    for i in (w..appends).step_by(writers as usize) {
                        let t0 = Instant::now();
                        spool.append(&event(i)).await.expect("append");
                        latencies.push(t0.elapsed());
                    }
                    latencies
                })
            })
            .collect();
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await.expect("task"));
        }
        let elapsed = start.elapsed();
        latencies.sort_unstable();
        println!(
            "spool: {:.0} durable appends/s (fsync per group commit, {writers} concurrent), p50 {:?}, p99 {:?}",
            appends as f64 / elapsed.as_secs_f64(),
            latencies[latencies.len() / 2],
            latencies[latencies.len() * 99 / 100]
        );
        spool.close();
    });
}

/// The embedded default: the same events into SQLite, fresh file.
async fn sqlite(events: &[UsageEvent], batch: usize) {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("bench.db").display()
    );
    let db = Db::connect_url(&url, 4, Duration::from_secs(5))
        .await
        .expect("sqlite");
    db.migrate().await.expect("migrate");
    let start = Instant::now();
    for chunk in events.chunks(batch) {
        insert_batch(&db, chunk).await.expect("insert");
    }
    println!(
        "sqlite: {:.0} events/s persisted ({} events, batches of {batch}, with dedup and hourly rollups)",
        events.len() as f64 / start.elapsed().as_secs_f64(),
        events.len()
    );
    db.close().await;
}
