//! Limit decisions per second and their latency, in process and in Redis.
//!
//! Run: `cargo bench --bench limits` (Redis at TEST_REDIS_URL, default
//! redis://127.0.0.1:6379, for the second part).
//!
//! Local: one thread, 1,000 tenants in turn, each with a rate, a
//! concurrency cap and a tokens-per-minute limit; every decision is an admit
//! plus its settlement. Redis: 64 concurrent admissions over one
//! multiplexed connection (the connection pipelines them), for 5 seconds.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark fails loudly by design

use std::sync::Arc;
use std::time::{Duration, Instant};

use ascend_gateway::limits::{Cost, FailurePolicy, LimitSettings, Limiter, Used};
use ascend_gateway::tenancy::Limits;

fn limits() -> Limits {
    Limits {
        requests_per_second: Some(1e6),
        burst: Some(1000),
        tokens_per_minute: Some(1_000_000_000),
        max_concurrent_requests: Some(1000),
        monthly_token_quota: None,
        monthly_budget: None,
    }
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let tenants: Vec<String> = (0..1000).map(|i| format!("tenant-{i}")).collect();
    let limits = limits();

    let (local, _bg) = Limiter::new(None, LimitSettings::default());
    let n = 1_000_000;
    let mut samples = Vec::with_capacity(n);
    let start = Instant::now();
    runtime.block_on(async {
        for i in 0..n {
            let t0 = Instant::now();
            let permit = local
                .admit(&tenants[i % tenants.len()], &limits, Cost::of_tokens(100))
                .await
                .expect("admitted");
            permit.settle(Used::of_tokens(50)).await;
            samples.push(t0.elapsed());
        }
    });
    let elapsed = start.elapsed();
    samples.sort_unstable();
    println!(
        "local: {:.0} decisions/s on one thread, p50 {:?}, p99 {:?} (admit + settle, {n} decisions)",
        n as f64 / elapsed.as_secs_f64(),
        percentile(&samples, 50),
        percentile(&samples, 99)
    );

    let url = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let connection = runtime.block_on(async {
        redis::aio::ConnectionManager::new(redis::Client::open(url).expect("url"))
            .await
            .expect("Redis for the second part")
    });
    let settings = LimitSettings {
        redis_failure: FailurePolicy::FailClosed,
        redis_prefix: format!("agwbench:{}:", uuid::Uuid::new_v4().simple()),
        ..LimitSettings::default()
    };
    let (shared, _bg) = Limiter::new(Some(connection), settings);
    let run_for = Duration::from_secs(5);
    let (count, mut samples) = runtime.block_on(async {
        let start = Instant::now();
        let workers: Vec<_> = (0..64)
            .map(|w| {
                let (shared, limits, tenants) = (shared.clone(), limits.clone(), tenants.clone());
                tokio::spawn(async move {
                    let mut samples = Vec::new();
                    let mut i = w;
                    while start.elapsed() < run_for {
                        let t0 = Instant::now();
                        let permit = shared
                            .admit(&tenants[i % tenants.len()], &limits, Cost::of_tokens(100))
                            .await
                            .expect("admitted");
                        samples.push(t0.elapsed());
                        permit.settle(Used::of_tokens(50)).await;
                        i += 64;
                    }
                    samples
                })
            })
            .collect();
        let mut all = Vec::new();
        for worker in workers {
            all.extend(worker.await.expect("worker"));
        }
        (all.len(), all)
    });
    samples.sort_unstable();
    println!(
        "redis: {:.0} admissions/s (each also settled: 2 scripts), p50 {:?}, p99 {:?} (64 concurrent, {count} admissions in {run_for:?})",
        count as f64 / run_for.as_secs_f64(),
        percentile(&samples, 50),
        percentile(&samples, 99)
    );
    let _ = Arc::strong_count(&shared);
}
