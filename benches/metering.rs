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

use ascend_gateway::metering::{
    MeteringSettings, Spool, SpoolSettings, UsageEvent, UsageWriter, insert_batch,
};
use ascend_gateway::store::{Db, now_us};
use sqlx::{AnyConnection, Connection, Executor};
use tokio_util::sync::CancellationToken;

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
        sqlx::any::install_default_drivers();
        let admin_url = std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let name = format!("agw_bench_{}", uuid::Uuid::new_v4().simple());
        let mut admin = AnyConnection::connect(&admin_url).await.expect("PostgreSQL");
        admin.execute(format!("CREATE DATABASE {name}").as_str()).await.expect("create");
        let base = admin_url.rsplit_once('/').map(|(b, _)| b.to_owned()).unwrap();
        let db = Db::connect_url(&format!("{base}/{name}"), 4, Duration::from_secs(5))
            .await
            .expect("db");
        db.migrate().await.expect("migrate");

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
        lag(&db, total).await;
        db.close().await;
        admin
            .execute(format!("DROP DATABASE {name} WITH (FORCE)").as_str())
            .await
            .expect("drop");

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

/// Requests per second of the lag scenario, and for how long.
const LAG_RATE: u64 = 5_000;
const LAG_SECONDS: u64 = 20;

/// Metering lag: events appended to a spool at `LAG_RATE` per second, each
/// stamped finished now, while the gateway's writer ships them with its
/// default settings; the lag of each is `recorded_at - finished_at` in
/// PostgreSQL (recorded_at is stamped when its batch is inserted).
async fn lag(db: &Db, first_id: u64) {
    let dir = tempfile::tempdir().expect("dir");
    let spool = Spool::open(dir.path(), SpoolSettings::default()).expect("spool");
    let settings = MeteringSettings::default();
    let writer = UsageWriter::new(spool.clone(), db.clone(), settings.batch_size);
    let stop = CancellationToken::new();
    let shipping = tokio::spawn(writer.run(
        settings.ship_interval,
        Duration::from_secs(30),
        stop.clone(),
    ));
    // Each tick appends the events due by then: 1 ms ticks, so at most a
    // few events wait for their tick.
    let total = LAG_RATE * LAG_SECONDS;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut appends = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    while sent < total {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * LAG_RATE as f64) as u64;
        while sent < due.min(total) {
            let mut e = event(first_id + sent);
            e.request_id = format!("lag-{sent:010}");
            e.finished_at_us = now_us();
            e.started_at_us = e.finished_at_us - 5000;
            let spool = spool.clone();
            appends.spawn(async move { spool.append(&e).await.expect("append") });
            sent += 1;
        }
    }
    while appends.join_next().await.is_some() {}
    let offered = total as f64 / start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(60);
    let pg = db.postgres().expect("PostgreSQL");
    loop {
        let landed: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM usage_events WHERE request_id LIKE 'lag-%'")
                .fetch_one(pg)
                .await
                .expect("count");
        if landed as u64 == total || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    shipping.await.expect("writer");
    let (landed, p50, p99, max): (i64, f64, f64, i64) = sqlx::query_as(
        "SELECT COUNT(*), \
         percentile_disc(0.5) WITHIN GROUP (ORDER BY recorded_at_us - finished_at_us)::float8, \
         percentile_disc(0.99) WITHIN GROUP (ORDER BY recorded_at_us - finished_at_us)::float8, \
         MAX(recorded_at_us - finished_at_us) \
         FROM usage_events WHERE request_id LIKE 'lag-%'",
    )
    .fetch_one(pg)
    .await
    .expect("lag percentiles");
    println!(
        "lag at {offered:.0} requests/s for {LAG_SECONDS} s: {landed} of {total} events in PostgreSQL; \
         request end to row p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        p50 / 1000.0,
        p99 / 1000.0,
        max as f64 / 1000.0
    );
    spool.close();
}
