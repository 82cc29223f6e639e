//! `bench overhead`: what the gateway adds to a request. The same load goes
//! to a bare tonic echo server and to the gateway's echo engine with
//! authentication, rate limiting and metering all on; both run in this
//! process, one after the other, in one invocation. Reported: end-to-end
//! latency at each offered rate for both and the difference, and the
//! closed-loop throughput ratio.
//!
//! Knows the runs to make; the servers and the load are other modules'.

use serde::Serialize;

use super::bare::BareServer;
use super::report::round;
use super::selfhost::{SelfHosted, TenantSpec, connect};
use super::suite::{git_revision, machine};
use super::{
    Arrival, BenchError, OverheadArgs, RunReport, Target, WorkloadSpec, measured_run, write_results,
};
use crate::api::pb::v1::TenantLimits;
use crate::serving::{Engine, ModelSettings};

const TENANTS: usize = 4;

#[derive(Debug, Clone, Serialize)]
pub struct RateComparison {
    pub offered_per_s: f64,
    pub bare: RunReport,
    pub gateway: RunReport,
    pub added_p50_ms: f64,
    pub added_p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OverheadReport {
    pub command: String,
    pub git_revision: String,
    pub machine: String,
    pub database: String,
    pub closed_loop_clients: usize,
    pub bare_max: RunReport,
    pub gateway_max: RunReport,
    /// Gateway over bare requests/s in the closed loop.
    pub throughput_ratio: f64,
    pub rates: Vec<RateComparison>,
}

/// Tenant limits for measuring the gateway's own cost: set, so every
/// request passes through the limiter, and generous, so none is refused:
/// the cost of checking, not of refusing.
pub(super) fn limits() -> TenantLimits {
    TenantLimits {
        requests_per_second: Some(1_000_000.0),
        burst: Some(1_000_000),
        tokens_per_minute: Some(10_000_000_000),
        max_concurrent_requests: Some(100_000),
        monthly_token_quota: Some(1_000_000_000_000),
    }
}

/// The echo engine's workload of the overhead measurements: short prompts,
/// 16 output tokens each.
pub(super) fn echo_workload() -> WorkloadSpec {
    WorkloadSpec {
        model: "echo".to_owned(),
        prompt_words: (4, 16),
        output_tokens: (16, 16),
        output_distribution: super::LengthDistribution::Uniform,
        temperature: 0.0,
        seed: 7,
    }
}

/// Runs the comparison; writes results.json and results.md; returns the
/// report and its Markdown.
pub async fn overhead_suite(
    args: &OverheadArgs,
    command: &str,
) -> Result<(OverheadReport, String), BenchError> {
    let workload = echo_workload();
    let closed = Arrival::Closed {
        clients: args.clients,
    };

    let bare = BareServer::start().await?;
    let bare_target = Target {
        channels: connect(&bare.endpoint(), args.connections).await?,
        keys: vec!["none".to_owned()],
    };
    let run = |label: &'static str, target: Target, arrival: Arrival, metrics| {
        let workload = workload.clone();
        async move {
            measured_run(
                label,
                &target,
                metrics,
                &workload,
                arrival,
                args.warmup,
                args.duration,
            )
            .await
        }
    };
    let bare_max = run("bare tonic echo", bare_target.clone(), closed, None).await?;
    eprintln!("{}", bare_max.markdown_row());
    let mut bare_rates = Vec::new();
    for &rate in &args.rates {
        let report = run(
            "bare tonic echo",
            bare_target.clone(),
            Arrival::Open { rate },
            None,
        )
        .await?;
        eprintln!("{}", report.markdown_row());
        bare_rates.push(report);
    }
    bare.stop().await;

    let model = ModelSettings {
        id: "echo".to_owned(),
        dir: Some(args.model_dir.clone()),
        init_preset: Some("small".to_owned()),
        engine: Engine::Echo,
        workers: 2,
        max_queue_requests: 100_000,
        ..ModelSettings::default()
    };
    let hosted = SelfHosted::start_with(
        vec![model],
        args.database_url.clone(),
        args.redis_url.clone(),
    )
    .await?;
    let tenants: Vec<TenantSpec> = (0..TENANTS)
        .map(|i| TenantSpec {
            slug: format!("overhead-{i}"),
            weight: 1,
            limits: limits(),
        })
        .collect();
    let keys = hosted.provision(&tenants).await?;
    let gateway_target = Target {
        channels: connect(&hosted.endpoint(), args.connections).await?,
        keys,
    };
    let gateway_max = run("gateway echo", gateway_target.clone(), closed, None).await?;
    eprintln!("{}", gateway_max.markdown_row());
    let mut rates = Vec::new();
    for (&rate, bare) in args.rates.iter().zip(bare_rates) {
        let gateway = run(
            "gateway echo",
            gateway_target.clone(),
            Arrival::Open { rate },
            None,
        )
        .await?;
        eprintln!("{}", gateway.markdown_row());
        rates.push(RateComparison {
            offered_per_s: rate,
            added_p50_ms: round(gateway.e2e_ms.p50 - bare.e2e_ms.p50, 3),
            added_p99_ms: round(gateway.e2e_ms.p99 - bare.e2e_ms.p99, 3),
            bare,
            gateway,
        });
    }
    hosted.stop().await?;

    let report = OverheadReport {
        command: command.to_owned(),
        git_revision: git_revision(),
        machine: machine(),
        database: match (&args.database_url, &args.redis_url) {
            (Some(_), Some(_)) => "PostgreSQL (--database-url), limits in Redis (--redis-url)",
            (Some(_), None) => "PostgreSQL (--database-url), limits in process",
            (None, Some(_)) => "embedded SQLite, limits in Redis (--redis-url)",
            (None, None) => "embedded SQLite, limits in process",
        }
        .to_owned(),
        closed_loop_clients: args.clients,
        throughput_ratio: round(
            gateway_max.requests_per_s / bare_max.requests_per_s.max(f64::MIN_POSITIVE),
            3,
        ),
        bare_max,
        gateway_max,
        rates,
    };
    let markdown = markdown(&report);
    write_results(&args.out_dir, &report, &markdown)?;
    Ok((report, markdown))
}

fn markdown(r: &OverheadReport) -> String {
    let mut out = format!(
        "# Gateway overhead\n\n\
         Command: `{}`  \nRevision: `{}`  \nMachine: {}  \n\
         Gateway: echo engine, {TENANTS} tenants with limits set (none binding), \
         authentication on, usage metered through the durable spool; backends: {}. \
         Reference: a bare tonic server with the same contract echoing the prompt. \
         Load generator, servers and database share the machine.\n\n\
         Closed loop, {} clients: gateway {:.0} req/s, bare {:.0} req/s: ratio **{:.2}**.\n\n\
         | offered req/s | bare p50 / p99 ms | gateway p50 / p99 ms | added p50 / p99 ms | gateway errors |\n\
         |---:|---:|---:|---:|---:|\n",
        r.command,
        r.git_revision,
        r.machine,
        r.database,
        r.closed_loop_clients,
        r.gateway_max.requests_per_s,
        r.bare_max.requests_per_s,
        r.throughput_ratio,
    );
    for c in &r.rates {
        out.push_str(&format!(
            "| {:.0} | {:.3} / {:.3} | {:.3} / {:.3} | {:.3} / {:.3} | {} |\n",
            c.offered_per_s,
            c.bare.e2e_ms.p50,
            c.bare.e2e_ms.p99,
            c.gateway.e2e_ms.p50,
            c.gateway.e2e_ms.p99,
            c.added_p50_ms,
            c.added_p99_ms,
            c.gateway.errors.values().sum::<usize>(),
        ));
    }
    out.push_str("\nEvery run:\n\n");
    out.push_str(RunReport::markdown_header());
    out.push('\n');
    for run in std::iter::once(&r.bare_max)
        .chain(std::iter::once(&r.gateway_max))
        .chain(r.rates.iter().flat_map(|c| [&c.bare, &c.gateway]))
    {
        out.push_str(&run.markdown_row());
        out.push('\n');
    }
    out
}
