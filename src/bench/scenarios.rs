//! The MLPerf-style scenarios beyond a single run: `bench server` (Poisson
//! arrivals at rising rates; whether p99 time to first token and p99 time
//! per output token stay within their bounds, and the highest rate that
//! does) and `bench tenants` (tenants of different weights, one of them
//! rate-limited, sharing a contended model; each tenant's share of the
//! output tokens against its weight, and refusals by status). The offline
//! scenario is `bench offline` (its own module).
//!
//! Knows the scenarios' rules; the gateway and the load are other modules'.

use serde::{Deserialize, Serialize};

use super::selfhost::{SelfHosted, TenantSpec, connect};
use super::suite::{git_revision, machine};
use super::{
    Arrival, BenchError, RunReport, ServerArgs, Target, TenantsArgs, equal_tenants, measured_run,
    scenario_model, write_results,
};
use crate::api::pb::v1::TenantLimits;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RateResult {
    pub rate: f64,
    pub ttft_p99_ms: f64,
    pub tpot_p99_ms: f64,
    pub errors: usize,
    pub within_bounds: bool,
    pub run: RunReport,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerReport {
    pub command: String,
    pub git_revision: String,
    pub machine: String,
    pub ttft_p99_bound_ms: f64,
    pub tpot_p99_bound_ms: f64,
    pub rates: Vec<RateResult>,
    /// The highest offered rate whose run kept both bounds, if any.
    pub highest_rate_within_bounds: Option<f64>,
}

/// Whether a run kept the server scenario's bounds: every request served,
/// p99 TTFT and p99 time per output token at or under their limits.
pub fn within_bounds(run: &RunReport, ttft_ms: f64, tpot_ms: f64) -> bool {
    run.errors.is_empty()
        && run.requests_ok > 0
        && run.ttft_ms.p99 <= ttft_ms
        && run.time_per_output_token_ms.p99 <= tpot_ms
}

/// `bench server`.
pub async fn server_scenario(
    args: &ServerArgs,
    command: &str,
) -> Result<(ServerReport, String), BenchError> {
    let workload = args.workload.spec();
    let model = scenario_model(&workload.model, args.model_dir.clone(), 32);
    let hosted = SelfHosted::start(vec![model]).await?;
    let keys = hosted.provision(&equal_tenants(4)).await?;
    let target = Target::grpc(connect(&hosted.endpoint(), 2).await?, keys);
    let mut rates = Vec::new();
    for &rate in &args.rates {
        let run = measured_run(
            &format!("server {rate} req/s"),
            &target,
            Some(hosted.metrics_addr),
            &workload,
            Arrival::Open { rate },
            args.warmup,
            args.duration,
        )
        .await;
        let run = match run {
            Ok(run) => run,
            Err(e) => {
                hosted.stop().await?;
                return Err(e);
            }
        };
        eprintln!("{}", run.markdown_row());
        rates.push(RateResult {
            rate,
            ttft_p99_ms: run.ttft_ms.p99,
            tpot_p99_ms: run.time_per_output_token_ms.p99,
            errors: run.errors.values().sum(),
            within_bounds: within_bounds(&run, args.ttft_p99_ms, args.tpot_p99_ms),
            run,
        });
    }
    hosted.stop().await?;
    let report = ServerReport {
        command: command.to_owned(),
        git_revision: git_revision(),
        machine: machine(),
        ttft_p99_bound_ms: args.ttft_p99_ms,
        tpot_p99_bound_ms: args.tpot_p99_ms,
        highest_rate_within_bounds: rates
            .iter()
            .filter(|r| r.within_bounds)
            .map(|r| r.rate)
            .fold(None, |best: Option<f64>, r| {
                Some(best.map_or(r, |b| b.max(r)))
            }),
        rates,
    };
    let mut markdown = format!(
        "# Server scenario\n\nCommand: `{}`  \nRevision: `{}`  \nMachine: {}  \n\
         Model `{}` (pace cpu, continuous batching), Poisson arrivals; bounds: p99 time to first \
         token <= {} ms and p99 time per output token <= {} ms, every request served.\n\n\
         Highest rate within bounds: **{}**\n\n\
         | offered req/s | p99 TTFT ms | p99 TPOT ms | errors | within bounds |\n|---:|---:|---:|---:|---|\n",
        report.command,
        report.git_revision,
        report.machine,
        args.workload.model,
        args.ttft_p99_ms,
        args.tpot_p99_ms,
        report
            .highest_rate_within_bounds
            .map_or("none of the rates tried".to_owned(), |r| format!(
                "{r} req/s"
            )),
    );
    for r in &report.rates {
        markdown.push_str(&format!(
            "| {} | {:.1} | {:.2} | {} | {} |\n",
            r.rate,
            r.ttft_p99_ms,
            r.tpot_p99_ms,
            r.errors,
            if r.within_bounds { "yes" } else { "no" }
        ));
    }
    markdown.push_str("\n![latency](latency.svg)\n");
    write_results(&args.out_dir, &report, &markdown)?;
    super::plot::server_plot(&report, &args.out_dir)?;
    Ok((report, markdown))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantResult {
    pub slug: String,
    pub weight: u32,
    pub limited: bool,
    pub requests_ok: usize,
    pub output_tokens: u64,
    pub token_share: f64,
    /// weight / sum of the unlimited tenants' weights.
    pub weight_share: f64,
    pub refusals: std::collections::BTreeMap<String, usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantsReport {
    pub command: String,
    pub git_revision: String,
    pub machine: String,
    pub max_batch_size: usize,
    pub clients_per_tenant: usize,
    pub tenants: Vec<TenantResult>,
    pub run: RunReport,
}

/// `bench tenants`.
pub async fn tenants_scenario(
    args: &TenantsArgs,
    command: &str,
) -> Result<(TenantsReport, String), BenchError> {
    let workload = args.workload.spec();
    let model = scenario_model(&workload.model, args.model_dir.clone(), args.max_batch_size);
    let mut specs: Vec<TenantSpec> = args
        .weights
        .iter()
        .enumerate()
        .map(|(i, &weight)| TenantSpec {
            slug: format!("weight-{weight}-{i}"),
            weight,
            limits: TenantLimits::default(),
        })
        .collect();
    specs.push(TenantSpec {
        slug: "rate-limited".to_owned(),
        weight: 1,
        limits: TenantLimits {
            requests_per_second: Some(args.limited_rps),
            burst: Some(1),
            ..TenantLimits::default()
        },
    });
    let hosted = SelfHosted::start(vec![model]).await?;
    let keys = hosted.provision(&specs).await?;
    let target = Target::grpc(connect(&hosted.endpoint(), 2).await?, keys);
    let run = measured_run(
        "tenants",
        &target,
        Some(hosted.metrics_addr),
        &workload,
        Arrival::Closed {
            clients: args.clients_per_tenant * specs.len(),
        },
        args.warmup,
        args.duration,
    )
    .await;
    hosted.stop().await?;
    let run = run?;
    let weights: u32 = args.weights.iter().sum();
    let tenants = specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let share = run.tenants.iter().find(|t| t.tenant == i);
            let limited = i == specs.len() - 1;
            TenantResult {
                slug: spec.slug.clone(),
                weight: spec.weight,
                limited,
                requests_ok: share.map_or(0, |s| s.requests),
                output_tokens: share.map_or(0, |s| s.output_tokens),
                token_share: share.map_or(0.0, |s| s.token_share),
                weight_share: if limited {
                    0.0
                } else {
                    f64::from(spec.weight) / f64::from(weights.max(1))
                },
                refusals: share.map(|s| s.errors.clone()).unwrap_or_default(),
            }
        })
        .collect();
    let report = TenantsReport {
        command: command.to_owned(),
        git_revision: git_revision(),
        machine: machine(),
        max_batch_size: args.max_batch_size,
        clients_per_tenant: args.clients_per_tenant,
        tenants,
        run,
    };
    let mut markdown = format!(
        "# Multi-tenant scenario\n\nCommand: `{}`  \nRevision: `{}`  \nMachine: {}  \n\
         Model `{}` (pace cpu, max_batch_size {}: contended), {} clients per tenant, closed \
         loop; the last tenant is limited to {} requests/s (a client backs off 50 ms after a \
         refusal).\n\n\
         | tenant | weight | requests | output tokens | token share | weight share | refusals |\n\
         |---|---:|---:|---:|---:|---:|---|\n",
        report.command,
        report.git_revision,
        report.machine,
        args.workload.model,
        args.max_batch_size,
        args.clients_per_tenant,
        args.limited_rps,
    );
    for t in &report.tenants {
        let refusals = if t.refusals.is_empty() {
            "-".to_owned()
        } else {
            t.refusals
                .iter()
                .map(|(code, n)| format!("{code}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        markdown.push_str(&format!(
            "| {} | {} | {} | {} | {:.3} | {} | {} |\n",
            t.slug,
            t.weight,
            t.requests_ok,
            t.output_tokens,
            t.token_share,
            if t.limited {
                "limited".to_owned()
            } else {
                format!("{:.3}", t.weight_share)
            },
            refusals
        ));
    }
    markdown.push_str("\n![shares](shares.svg)\n");
    write_results(&args.out_dir, &report, &markdown)?;
    super::plot::tenant_plot(&report, &args.out_dir)?;
    Ok((report, markdown))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{Sample, Summary};
    use std::time::Duration;

    #[test]
    fn bounds_need_every_request_served_and_both_p99s_under() {
        let sample = Sample {
            tenant: 0,
            sent_at: Duration::ZERO,
            ttft_us: Some(100_000),
            inter_token_us: vec![10_000],
            e2e_us: 110_000,
            prompt_tokens: 3,
            cached_prompt_tokens: 0,
            completion_tokens: 2,
            text: String::new(),
            device_time_us: 0,
            energy_mj: 0,
            outcome: Ok(()),
        };
        let run = RunReport::new(
            "r",
            Arrival::Open { rate: 1.0 },
            std::slice::from_ref(&sample),
            Duration::from_secs(1),
        );
        assert_eq!(run.ttft_ms.p99, 100.0);
        assert_eq!(run.time_per_output_token_ms.p99, 10.0);
        assert!(within_bounds(&run, 100.0, 10.0));
        assert!(!within_bounds(&run, 99.0, 10.0));
        assert!(!within_bounds(&run, 100.0, 9.0));
        let mut refused = sample;
        refused.outcome = Err("ResourceExhausted".to_owned());
        let run = RunReport::new(
            "r",
            Arrival::Open { rate: 1.0 },
            &[refused],
            Duration::from_secs(1),
        );
        assert!(!within_bounds(&run, 1e9, 1e9), "an error fails the run");
        assert_eq!(Summary::default().p99, 0.0);
    }
}
