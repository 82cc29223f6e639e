//! The metering lag scenario, shared by the `metering` and `metering_volume`
//! benchmarks: events appended to a spool at a fixed rate while the
//! gateway's own writer ships them to PostgreSQL.

use std::time::{Duration, Instant};

use ascend_gateway::metering::{MeteringSettings, Spool, SpoolSettings, UsageEvent, UsageWriter};
use ascend_gateway::store::{Db, now_us};
use tokio_util::sync::CancellationToken;

/// What one lag run measured.
pub struct Lag {
    pub offered_per_s: f64,
    pub landed: i64,
    pub sent: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Metering lag: `rate` events a second for `seconds`, appended to a spool,
/// each stamped finished now (made by `event` from its number, request ids
/// `<prefix>-<n>`), while the gateway's writer ships them with its default
/// settings; the lag of each is `recorded_at - finished_at` in PostgreSQL.
pub async fn lag(
    db: &Db,
    prefix: &str,
    rate: u64,
    seconds: u64,
    event: impl Fn(u64) -> UsageEvent,
) -> Lag {
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
    let total = rate * seconds;
    let first_finish = now_us();
    let start = Instant::now();
    let mut sent = 0u64;
    let mut appends = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    while sent < total {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due.min(total) {
            let mut e = event(sent);
            e.request_id = format!("{prefix}-{sent:010}");
            e.finished_at_us = now_us();
            e.started_at_us = e.finished_at_us - 5000;
            let spool = spool.clone();
            appends.spawn(async move { spool.append(&e).await.expect("append") });
            sent += 1;
        }
    }
    while appends.join_next().await.is_some() {}
    let offered_per_s = total as f64 / start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(60);
    let pg = db.postgres().expect("PostgreSQL");
    // Only this run's rows: its finish times (the month partitions prune the
    // rest) and its prefix.
    let pattern = format!("{prefix}-%");
    loop {
        let landed: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM usage_events WHERE finished_at_us >= $1 AND request_id LIKE $2",
        )
        .bind(first_finish)
        .bind(&pattern)
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
         FROM usage_events WHERE finished_at_us >= $1 AND request_id LIKE $2",
    )
    .bind(first_finish)
    .bind(&pattern)
    .fetch_one(pg)
    .await
    .expect("lag percentiles");
    spool.close();
    Lag {
        offered_per_s,
        landed,
        sent: total,
        p50_ms: p50 / 1000.0,
        p99_ms: p99 / 1000.0,
        max_ms: max as f64 / 1000.0,
    }
}
