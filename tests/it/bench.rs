//! The load generator against a real gateway: what it reports must agree
//! with what the gateway metered.

use std::time::Duration;

use ascend_gateway::bench::{Arrival, LengthDistribution, Target, WorkloadSpec, measured_run};
use ascend_gateway::store::Db;

use crate::common::TestGateway;
use crate::generate::tenant_key;

fn tiny_workload() -> WorkloadSpec {
    WorkloadSpec {
        model: "tiny".to_owned(),
        prompt_words: (2, 12),
        output_tokens: (2, 24),
        output_distribution: LengthDistribution::LogUniform,
        temperature: 0.8,
        seed: 5,
    }
}

/// Requests and completion tokens metered, once `expected` requests are in.
async fn metered(db: &Db, expected: usize) -> (i64, i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let row: (i64, Option<i64>) =
            sqlx::query_as("SELECT COUNT(*), SUM(completion_tokens) FROM usage_events")
                .fetch_one(db.pool())
                .await
                .expect("query");
        if row.0 as usize >= expected || std::time::Instant::now() > deadline {
            return (row.0, row.1.unwrap_or(0));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn closed_and_open_loop_reports_agree_with_the_metered_usage() {
    let gateway = TestGateway::start().await;
    let keys = vec![
        tenant_key(&gateway, "bench-a").await,
        tenant_key(&gateway, "bench-b").await,
    ];
    let target = Target::grpc(vec![gateway.channel.clone()], keys);
    let workload = tiny_workload();
    let closed = measured_run(
        "closed",
        &target,
        Some(gateway.metrics_addr),
        &workload,
        Arrival::Closed { clients: 3 },
        Duration::ZERO,
        Duration::from_millis(800),
    )
    .await
    .expect("closed loop");
    assert!(closed.requests_ok >= 3, "{closed:?}");
    assert!(closed.errors.is_empty(), "{:?}", closed.errors);
    assert_eq!(closed.tenants.len(), 2, "clients spread over both tenants");
    let batch = closed.mean_batch_sequences.expect("read from /metrics");
    assert!((1.0..=3.0).contains(&batch), "3 clients: {batch}");
    assert_eq!(closed.ttft_ms.count, closed.requests_ok);
    assert_eq!(
        closed.inter_token_ms.count as u64,
        closed.output_tokens - closed.requests_ok as u64,
        "one gap per token after each first"
    );

    let open = measured_run(
        "open",
        &target,
        None,
        &workload,
        Arrival::Open { rate: 20.0 },
        Duration::ZERO,
        Duration::from_millis(800),
    )
    .await
    .expect("open loop");
    assert!(open.requests_ok >= 1, "{open:?}");
    assert!(open.mean_batch_sequences.is_none());

    let requests = closed.requests_ok + open.requests_ok;
    let (rows, tokens) = metered(&gateway.db, requests).await;
    assert_eq!(
        rows as usize, requests,
        "one usage row per completed request"
    );
    assert_eq!(
        tokens as u64,
        closed.output_tokens + open.output_tokens,
        "reported output tokens are the metered ones"
    );
    gateway.stop().await.expect("clean stop");
}

fn overhead_args(
    out: &std::path::Path,
    protocol: ascend_gateway::bench::OverheadProtocol,
) -> ascend_gateway::bench::OverheadArgs {
    ascend_gateway::bench::OverheadArgs {
        rates: vec![40.0],
        clients: 4,
        connections: 1,
        duration: Duration::from_millis(600),
        warmup: Duration::ZERO,
        database_url: None,
        redis_url: None,
        model_dir: crate::common::tiny_model_dir(),
        protocol,
        out_dir: out.to_owned(),
    }
}

/// Every run of one protocol's pair succeeded, and its figures are the
/// differences and ratios of its runs.
fn assert_consistent(runs: &ascend_gateway::bench::ProtocolRuns) {
    for run in [&runs.bare_max, &runs.gateway_max] {
        assert!(run.requests_ok > 0, "{run:?}");
        assert!(run.errors.is_empty(), "{:?}", run.errors);
    }
    assert_eq!(runs.rates.len(), 1);
    let compared = &runs.rates[0];
    assert!(compared.gateway.requests_ok > 0 && compared.bare.requests_ok > 0);
    assert!(
        compared.gateway.errors.is_empty(),
        "{:?}",
        compared.gateway.errors
    );
    assert_eq!(
        compared.added_p99_ms,
        ((compared.gateway.e2e_ms.p99 - compared.bare.e2e_ms.p99) * 1000.0).round() / 1000.0
    );
    let expected_ratio = runs.gateway_max.requests_per_s / runs.bare_max.requests_per_s;
    assert!((runs.throughput_ratio - expected_ratio).abs() < 0.001);
    assert!(
        runs.gateway_rounds_per_s
            .contains(&runs.gateway_max.requests_per_s),
        "the closed-loop run reported is one of the rounds"
    );
}

#[tokio::test]
async fn the_overhead_comparison_runs_both_servers_and_writes_its_report() {
    let out = tempfile::tempdir().expect("dir");
    let args = overhead_args(out.path(), ascend_gateway::bench::OverheadProtocol::Grpc);
    let (report, markdown) = ascend_gateway::bench::overhead_suite(&args, "test")
        .await
        .expect("overhead suite");
    assert_consistent(&report.grpc);
    assert_eq!(report.grpc.gateway_rounds_per_s.len(), 1);
    assert!(report.http.is_none() && report.http_over_grpc_throughput.is_none());
    let written = std::fs::read_to_string(out.path().join("results.md")).expect("results.md");
    assert_eq!(written, markdown);
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("results.json")).expect("results.json"),
    )
    .expect("valid JSON");
    assert_eq!(json["grpc"]["rates"][0]["offered_per_s"], 40.0);
}

#[tokio::test]
async fn the_http_overhead_comparison_streams_completions_over_h2c_beside_grpc() {
    let out = tempfile::tempdir().expect("dir");
    let args = overhead_args(out.path(), ascend_gateway::bench::OverheadProtocol::Http);
    let (report, markdown) = ascend_gateway::bench::overhead_suite(&args, "test")
        .await
        .expect("overhead suite");
    assert_consistent(&report.grpc);
    let http = report.http.as_ref().expect("HTTP runs");
    assert_consistent(http);
    // The HTTP client read usage from the stream's usage chunk: the echo
    // engine's completions are metered tokens, not zero.
    assert!(http.gateway_max.output_tokens > 0, "{:?}", http.gateway_max);
    // Rounds alternate; the ratio is the median of the rounds' ratios.
    assert_eq!(http.gateway_rounds_per_s.len(), 3);
    assert_eq!(report.grpc.gateway_rounds_per_s.len(), 3);
    let mut each: Vec<f64> = http
        .gateway_rounds_per_s
        .iter()
        .zip(&report.grpc.gateway_rounds_per_s)
        .map(|(h, g)| ((h / g) * 1000.0).round() / 1000.0)
        .collect();
    assert_eq!(each, report.http_over_grpc_rounds);
    each.sort_by(f64::total_cmp);
    assert_eq!(report.http_over_grpc_throughput, Some(each[1]));
    assert!(markdown.contains("HTTP path over gRPC path"), "{markdown}");
}

#[tokio::test]
async fn the_device_report_runs_every_profile_and_explains_the_claims() {
    let out = tempfile::tempdir().expect("dir");
    let args = ascend_gateway::bench::ReportArgs {
        batches: vec![8, 32],
        output_tokens: 4,
        duration: Duration::from_millis(300),
        warmup: Duration::ZERO,
        electricity_usd_per_kwh: 0.1,
        amortisation_years: 4.0,
        utilisation: 0.6,
        price_910b_usd: 16_000.0,
        price_910c_usd: 28_000.0,
        price_h100_usd: 30_000.0,
        model_dir: crate::common::tiny_model_dir(),
        out_dir: out.path().to_owned(),
        shape: ascend_gateway::bench::LaunchReading::Moe,
    };
    let (report, markdown) = ascend_gateway::bench::device_report(&args, "test")
        .await
        .expect("device report");
    assert_eq!(report.points.len(), 6, "3 devices x 2 batch sizes");
    for point in &report.points {
        assert!(point.output_tokens > 0, "{point:?}");
        assert!(point.tokens_per_device_s > 0.0 && point.watts_per_device > 0.0);
        // Energy over time is a power no device can exceed at rated load.
        assert!(point.watts_per_device < 800.0, "{point:?}");
    }
    assert_eq!(report.comparisons.len(), 4);
    assert!(report.comparisons.iter().all(|c| !c.why.is_empty()));
    for file in ["results.json", "results.md", "throughput.svg", "power.svg"] {
        assert!(out.path().join(file).exists(), "{file} written");
    }
    let svg = std::fs::read_to_string(out.path().join("throughput.svg")).expect("svg");
    assert!(svg.starts_with("<svg") && svg.contains("h100-sxm"));
    assert!(markdown.contains("| ascend-910c | 32 |"));
    assert!(
        markdown.contains("mixture of experts"),
        "the shape is described"
    );
    // The plots can be redrawn from the results file alone.
    std::fs::remove_file(out.path().join("throughput.svg")).expect("remove");
    let kind = ascend_gateway::bench::replot(&out.path().join("results.json")).expect("replot");
    assert_eq!(kind, "device report");
    assert!(out.path().join("throughput.svg").exists());
}

fn tiny_workload_args() -> ascend_gateway::bench::WorkloadArgs {
    ascend_gateway::bench::WorkloadArgs {
        model: "small".to_owned(),
        prompt_words: (2, 8),
        output_tokens: (2, 12),
        output_distribution: LengthDistribution::Uniform,
        seed: 3,
    }
}

#[tokio::test]
async fn the_tenants_scenario_shares_by_weight_and_refuses_the_limited_tenant() {
    let out = tempfile::tempdir().expect("dir");
    let args = ascend_gateway::bench::TenantsArgs {
        workload: tiny_workload_args(),
        weights: vec![1, 4],
        limited_rps: 1.0,
        clients_per_tenant: 4,
        max_batch_size: 2,
        duration: Duration::from_millis(1500),
        warmup: Duration::ZERO,
        model_dir: crate::common::tiny_model_dir(),
        out_dir: out.path().to_owned(),
    };
    let (report, markdown) = ascend_gateway::bench::tenants_scenario(&args, "test")
        .await
        .expect("tenants scenario");
    assert_eq!(report.tenants.len(), 3);
    let (light, heavy, limited) = (&report.tenants[0], &report.tenants[1], &report.tenants[2]);
    assert!(
        heavy.output_tokens > light.output_tokens,
        "weight 4 gets more than weight 1 under contention: {heavy:?} vs {light:?}"
    );
    assert!(limited.limited);
    assert!(
        limited
            .refusals
            .get("ResourceExhausted")
            .copied()
            .unwrap_or(0)
            > 0,
        "{limited:?}"
    );
    assert!((light.weight_share - 0.2).abs() < 1e-9);
    assert!(markdown.contains("| rate-limited | 1 |"));
    assert!(out.path().join("shares.svg").exists());
    std::fs::remove_file(out.path().join("shares.svg")).expect("remove");
    let kind = ascend_gateway::bench::replot(&out.path().join("results.json")).expect("replot");
    assert_eq!(kind, "tenants scenario");
    assert!(out.path().join("shares.svg").exists());
}

#[tokio::test]
async fn the_server_scenario_reports_the_highest_rate_within_bounds() {
    let out = tempfile::tempdir().expect("dir");
    let args = ascend_gateway::bench::ServerArgs {
        workload: tiny_workload_args(),
        rates: vec![5.0, 10.0],
        ttft_p99_ms: 60_000.0,
        tpot_p99_ms: 60_000.0,
        duration: Duration::from_millis(800),
        warmup: Duration::ZERO,
        model_dir: crate::common::tiny_model_dir(),
        out_dir: out.path().to_owned(),
    };
    let (report, _) = ascend_gateway::bench::server_scenario(&args, "test")
        .await
        .expect("server scenario");
    assert_eq!(report.rates.len(), 2);
    assert!(report.rates.iter().all(|r| r.within_bounds), "{report:?}");
    assert_eq!(report.highest_rate_within_bounds, Some(10.0));
    assert!(out.path().join("results.md").exists());
    let svg = std::fs::read_to_string(out.path().join("latency.svg")).expect("latency.svg");
    assert!(svg.contains("p99 TTFT"));
}

#[tokio::test]
async fn the_offline_scenario_reports_its_best_run() {
    let out = tempfile::tempdir().expect("dir");
    let args = ascend_gateway::bench::OfflineArgs {
        workload: tiny_workload_args(),
        clients: vec![1, 4],
        max_batch_size: 4,
        duration: Duration::from_millis(800),
        warmup: Duration::ZERO,
        model_dir: crate::common::tiny_model_dir(),
        out_dir: out.path().to_owned(),
    };
    let (report, markdown) = ascend_gateway::bench::offline_scenario(&args, "test")
        .await
        .expect("offline scenario");
    assert_eq!(report.runs.len(), 2);
    for run in &report.runs {
        assert!(run.requests_ok > 0 && run.errors.is_empty(), "{run:?}");
    }
    let most = report
        .runs
        .iter()
        .map(|r| r.output_tokens_per_s)
        .fold(0.0f64, f64::max);
    assert_eq!(report.best_output_tokens_per_s, most);
    let best_run = &report.runs[args
        .clients
        .iter()
        .position(|&c| c == report.best_clients)
        .expect("a tried count")];
    assert_eq!(best_run.output_tokens_per_s, most);
    assert!(markdown.contains("Maximum:"));
    assert!(out.path().join("results.json").exists());
}

/// `bench replicas` starts real gateway processes on one PostgreSQL and one
/// Redis, spreads the load over them and reports every configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replicas_comparison_runs_gateway_processes_on_shared_backends() {
    let db = crate::common::PgTestDb::create().await;
    let out = tempfile::tempdir().expect("dir");
    let args = ascend_gateway::bench::ReplicasArgs {
        database_url: db.url.clone(),
        redis_url: std::env::var("TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned()),
        replicas: 2,
        clients: 4,
        connections_per_replica: 1,
        duration: Duration::from_millis(800),
        warmup: Duration::ZERO,
        model_dir: crate::common::tiny_model_dir(),
        out_dir: out.path().to_owned(),
        gateway_binary: Some(env!("CARGO_BIN_EXE_ascend-gateway").into()),
    };
    let (report, markdown) = ascend_gateway::bench::replicas_suite(&args, "test")
        .await
        .expect("replicas suite");
    assert_eq!(report.configurations.len(), 4);
    for c in &report.configurations {
        assert!(c.run.requests_ok > 0, "{}: {:?}", c.name, c.run);
        assert!(c.run.errors.is_empty(), "{}: {:?}", c.name, c.run.errors);
    }
    assert_eq!(report.configurations[1].vs_embedded, 1.0);
    assert!(markdown.contains("PostgreSQL + Redis x2"), "{markdown}");
    assert!(out.path().join("results.json").exists());
}
