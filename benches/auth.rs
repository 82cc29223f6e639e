//! Cost of authenticating one request with a warm key cache: the work the
//! auth layer adds in front of every RPC. Criterion measures the mean; a
//! second pass times single calls to report p50 and p99.
//!
//! Run: `cargo bench --bench auth`

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark fails loudly by design

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ascend_gateway::auth::{
    AdminCredential, Authenticator, KeyCache, LastUsedRecorder, Requirement,
};
use ascend_gateway::store::Db;
use ascend_gateway::tenancy::{Limits, NewApiKey, NewTenant, Scope, TenancyService};
use criterion::Criterion;
use secrecy::{ExposeSecret, SecretString};

const ADMIN_TOKEN: &str = "bench-admin-token-0123456789abcdef";

struct Setup {
    runtime: tokio::runtime::Runtime,
    authenticator: Authenticator,
    tenant_header: Vec<u8>,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let (authenticator, key) = runtime.block_on(async {
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("bench.db").display()
        );
        let db = Db::connect_url(&url, 2, Duration::from_secs(5))
            .await
            .expect("db");
        db.migrate().await.expect("migrate");
        let mut tenancy = TenancyService::new(db, "standard");
        let cache = Arc::new(KeyCache::new(Duration::from_secs(3600), 1000));
        tenancy.add_listener(cache.clone());
        tenancy
            .create_tenant(
                "bench",
                NewTenant {
                    slug: "bench".to_owned(),
                    display_name: "Bench".to_owned(),
                    price_plan: None,
                    scheduling_weight: None,
                    limits: Limits::default(),
                    cache_scope: None,
                    budget_alerts: None,
                },
            )
            .await
            .expect("tenant");
        let issued = tenancy
            .create_key(
                "bench",
                "bench",
                NewApiKey {
                    name: "bench".to_owned(),
                    scopes: vec![],
                    expires_at_us: None,
                    limits: Default::default(),
                },
            )
            .await
            .expect("key");
        let admin = AdminCredential::from_token(&SecretString::from(ADMIN_TOKEN));
        let last_used = Arc::new(LastUsedRecorder::default());
        let authenticator = Authenticator::new(
            tenancy,
            cache,
            Some(admin),
            last_used,
            ascend_gateway::auth::throttle::FailureThrottle::new(20, 60),
        );
        (authenticator, issued.full_key)
    });
    let tenant_header = format!("Bearer {}", key.expose_secret()).into_bytes();
    Setup {
        runtime,
        authenticator,
        tenant_header,
        _dir: dir,
    }
}

fn percentiles(setup: &Setup, header: &[u8], requirement: Requirement) -> (Duration, Duration) {
    let mut samples: Vec<Duration> = (0..50_000)
        .map(|_| {
            let start = Instant::now();
            let result = setup.runtime.block_on(setup.authenticator.authenticate(
                Some(header),
                requirement,
                None,
            ));
            let elapsed = start.elapsed();
            assert!(result.is_ok());
            elapsed
        })
        .collect();
    samples.sort_unstable();
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}

fn main() {
    let setup = setup();
    let inference = Requirement::Scope(Scope::Inference);
    let admin_header = format!("Bearer {ADMIN_TOKEN}").into_bytes();
    // Warm the cache.
    setup
        .runtime
        .block_on(
            setup
                .authenticator
                .authenticate(Some(&setup.tenant_header), inference, None),
        )
        .expect("warm");

    let mut criterion = Criterion::default().configure_from_args();
    let mut group = criterion.benchmark_group("authenticate");
    group.bench_function("tenant_key_warm_cache", |b| {
        b.iter(|| {
            setup.runtime.block_on(setup.authenticator.authenticate(
                Some(black_box(&setup.tenant_header)),
                inference,
                None,
            ))
        })
    });
    group.bench_function("admin_token", |b| {
        b.iter(|| {
            setup.runtime.block_on(setup.authenticator.authenticate(
                Some(black_box(&admin_header)),
                Requirement::Admin,
                None,
            ))
        })
    });
    group.finish();
    criterion.final_summary();

    let (p50, p99) = percentiles(&setup, &setup.tenant_header, inference);
    println!("tenant key, warm cache: p50 {p50:?}  p99 {p99:?}  (50,000 single calls)");
    let (p50, p99) = percentiles(&setup, &admin_header, Requirement::Admin);
    println!("admin token:            p50 {p50:?}  p99 {p99:?}  (50,000 single calls)");
}
