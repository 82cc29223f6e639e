//! Export throughput: 1,000,000 usage events of one month to a CSV file,
//! (1) through the library (keyset pages from PostgreSQL -> records -> CSV)
//! and (2) end to end through the gRPC stream `ExportUsageEvents` of a
//! running gateway into the same CSV writer `ascendctl billing export` uses.
//! Peak resident memory is read from /proc before and after each run, to
//! show that it stays flat however many rows pass.
//!
//! Run: `cargo bench --bench billing_export` (PostgreSQL at TEST_DATABASE_URL,
//! default postgres://postgres@127.0.0.1:5432/postgres; a scratch database
//! is created and dropped). `BENCH_EVENTS` changes the row count,
//! `BENCH_CHUNK_ROWS` the library path's page size.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark fails loudly by design

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ascend_gateway::api::event_from_pb;
use ascend_gateway::api::pb::v1::ExportRequest;
use ascend_gateway::api::pb::v1::billing_client::BillingClient;
use ascend_gateway::app::App;
use ascend_gateway::billing::export::{CHUNK_ROWS, EventPager, Pager};
use ascend_gateway::billing::file::{EventRecord, ExportFile, FileFormat};
use ascend_gateway::calendar::Month;
use ascend_gateway::config::Settings;
use ascend_gateway::metering::{UsageEvent, insert_batch};
use secrecy::SecretString;

#[path = "support/scratch.rs"]
mod scratch;

const ADMIN_TOKEN: &str = "bench-admin-token-0123456789abcdef";

/// Peak resident set size of this process so far, in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn seed_event(period: Month) -> UsageEvent {
    UsageEvent {
        request_id: "seed".to_owned(),
        tenant_id: "tenant-000".to_owned(),
        key_id: "0123456789abcdef".to_owned(),
        model: "small".to_owned(),
        device_profile: "ascend-910b".to_owned(),
        prompt_tokens: 1,
        cached_prompt_tokens: 0,
        completion_tokens: 1,
        queue_time_us: 1,
        ttft_us: 1,
        total_time_us: 1,
        device_time_us: 1,
        energy_mj: 1,
        mean_power_mw: 1,
        finish_reason: ascend_gateway::metering::FinishReason::Eos,
        started_at_us: period.start_us(),
        finished_at_us: period.start_us(),
    }
}

fn report(what: &str, rows: u64, elapsed: Duration, bytes: u64, rss_before: f64) {
    println!(
        "{what}: {rows} rows in {:.2} s = {:.0} rows/s, {:.1} MiB CSV; peak RSS {:.1} MiB (was {:.1} MiB before)",
        elapsed.as_secs_f64(),
        rows as f64 / elapsed.as_secs_f64(),
        bytes as f64 / (1024.0 * 1024.0),
        peak_rss_mib(),
        rss_before,
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        sqlx::any::install_default_drivers();
        let total: u64 = std::env::var("BENCH_EVENTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        let scratch = scratch::ScratchDb::create().await;
        let url = scratch.url.clone();
        let db = scratch.connect(Duration::from_secs(5)).await;

        // Last month, filled with `total` events of 100 tenants by one
        // server-side statement (the insert path has its own benchmark).
        let period = Month::of_us(Month::of_us(ascend_gateway::store::now_us()).start_us() - 1);
        insert_batch(&db, &[seed_event(period)]).await.expect("partition");
        let start = Instant::now();
        let span = period.end_us() - period.start_us();
        sqlx::query(&format!(
            "INSERT INTO usage_events (tenant_id, request_id, key_id, model, device_profile, \
             prompt_tokens, completion_tokens, queue_time_us, ttft_us, total_time_us, \
             device_time_us, energy_mj, mean_power_mw, finish_reason, started_at_us, \
             finished_at_us, recorded_at_us) \
             SELECT 'tenant-' || lpad((i % 100)::text, 3, '0'), 'req-' || lpad(i::text, 10, '0'), \
             '0123456789abcdef', CASE WHEN i % 2 = 0 THEN 'small' ELSE 'tiny' END, 'ascend-910b', \
             100 + i % 1000, 1 + i % 300, 120, 9000, 250000, 40000, 14000 + i % 5000, 350000, 'eos', \
             {start} + (i * 7919) % {span} - 250000, {start} + (i * 7919) % {span}, 0 \
             FROM generate_series(1::bigint, {total} - 1) AS i",
            start = period.start_us(),
        ))
        .execute(db.postgres().expect("pg"))
        .await
        .expect("fill");
        sqlx::query("ANALYZE usage_events").execute(db.pool()).await.expect("analyze");
        println!("filled {total} events in {:.1} s", start.elapsed().as_secs_f64());

        let dir = tempfile::tempdir().expect("dir");

        // (1) The library path.
        let rss_before = peak_rss_mib();
        let out = dir.path().join("library.csv");
        let start = Instant::now();
        let chunk_rows: usize = std::env::var("BENCH_CHUNK_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(CHUNK_ROWS);
        let mut pager = EventPager::open(&db, None, period, chunk_rows).await.expect("pager");
        assert_eq!(pager.total_rows(), total);
        let mut file = ExportFile::<EventRecord>::create(&out, FileFormat::Csv).expect("file");
        let (mut reading, mut writing) = (Duration::ZERO, Duration::ZERO);
        loop {
            let t0 = Instant::now();
            let Some(chunk) = pager.next_chunk().await.expect("chunk") else {
                break;
            };
            let t1 = Instant::now();
            let records: Vec<EventRecord> = chunk.iter().map(EventRecord::from).collect();
            file.write_chunk(&records).expect("write");
            reading += t1 - t0;
            writing += t1.elapsed();
        }
        let rows = file.finish().expect("finish");
        assert_eq!(rows, total);
        let bytes = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
        report(&format!("library DB -> CSV, pages of {chunk_rows}"), rows, start.elapsed(), bytes, rss_before);
        println!(
            "  of which reading pages {:.2} s, converting and writing CSV {:.2} s",
            reading.as_secs_f64(),
            writing.as_secs_f64()
        );

        // (2) Through a running gateway's gRPC stream.
        let data_dir = tempfile::tempdir().expect("data dir");
        let mut settings = Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_listen: None,
            data_dir: data_dir.path().to_owned(),
            ..Settings::default()
        };
        settings.database.url = Some(SecretString::from(url.clone()));
        settings.auth.admin_token = Some(SecretString::from(ADMIN_TOKEN));
        settings.models = Vec::new();
        let app = App::build(settings).await.expect("gateway");
        let addr = app.local_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        let mut client = BillingClient::connect(format!("http://{addr}"))
            .await
            .expect("connect")
            .max_decoding_message_size(64 << 20);
        let rss_before = peak_rss_mib();
        let out = dir.path().join("grpc.csv");
        let start = Instant::now();
        let mut request = tonic::Request::new(ExportRequest {
            period: period.to_string(),
            tenant: String::new(),
        });
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {ADMIN_TOKEN}").parse().unwrap(),
        );
        let mut stream = client.export_usage_events(request).await.expect("export").into_inner();
        let mut file = ExportFile::<EventRecord>::create(&out, FileFormat::Csv).expect("file");
        while let Some(message) = stream.message().await.expect("message") {
            let records: Vec<EventRecord> = message
                .events
                .iter()
                .map(|e| EventRecord::from(&event_from_pb(e)))
                .collect();
            file.write_chunk(&records).expect("write");
        }
        let rows = file.finish().expect("finish");
        assert_eq!(rows, total);
        let bytes = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
        report("gRPC stream -> CSV (server and client in this process)", rows, start.elapsed(), bytes, rss_before);

        let _ = stop.send(());
        let _ = server.await;
        db.close().await;
        scratch.drop_database().await;
    });
}
