//! `bench serving`: the comparison the serving design is judged by, on the
//! `small` model with `pace = "cpu"`: output tokens/s with 32 concurrent
//! clients against 1 client, and continuous against static batching (the
//! same engine with batches formed once and run to completion) at 32
//! clients, on mixed output lengths. Each configuration gets a fresh
//! in-process gateway; results go to `results.json` and `results.md` with
//! the machine and the git revision.
//!
//! Knows the runs to make and the ratios to report; the load and the
//! gateway are other modules' business.

use serde::Serialize;

use super::report::round;
use super::selfhost::{SelfHosted, connect};
use super::workload::LengthDistribution;
use super::{
    BenchError, RunReport, SuiteArgs, Target, bench_model, equal_tenants, measured_run,
    write_results,
};
use crate::serving::{Batching, Pace};

const TENANTS: usize = 4;
const MANY_CLIENTS: usize = 32;

/// What the runs show, as ratios measured in the same invocation.
#[derive(Debug, Clone, Serialize)]
pub struct ServingFindings {
    /// Output tokens/s at 32 clients over 1 client (continuous batching).
    pub scaling_32_over_1: f64,
    /// Output tokens/s of continuous over static batching, 32 clients,
    /// log-uniform output lengths.
    pub continuous_over_static: f64,
    /// The same with uniform output lengths.
    pub continuous_over_static_uniform: f64,
    /// End-to-end p99 (ms): continuous, static (log-uniform).
    pub e2e_p99_ms_continuous_static: (f64, f64),
    pub e2e_p99_ms_continuous_static_uniform: (f64, f64),
}

#[derive(Debug, Clone, Serialize)]
pub struct SuiteReport {
    pub command: String,
    pub git_revision: String,
    pub machine: String,
    pub findings: ServingFindings,
    pub runs: Vec<RunReport>,
}

/// `git rev-parse --short HEAD`, or "unknown" outside a checkout.
pub fn git_revision() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or("unknown".to_owned(), |s| s.trim().to_owned())
}

/// CPU model and logical CPU count, from /proc/cpuinfo where there is one.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, name)| name.trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned());
    format!("{cpus} logical CPUs, {model}")
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { round(a / b, 2) } else { 0.0 }
}

/// Runs the comparison and writes its files; returns the Markdown.
pub async fn serving_suite(args: &SuiteArgs, command: &str) -> Result<String, BenchError> {
    let base = args.workload.spec();
    let plan: [(Batching, &str, LengthDistribution, usize); 5] = [
        (
            Batching::Continuous,
            "continuous",
            LengthDistribution::LogUniform,
            1,
        ),
        (
            Batching::Continuous,
            "continuous",
            LengthDistribution::LogUniform,
            MANY_CLIENTS,
        ),
        (
            Batching::Continuous,
            "continuous",
            LengthDistribution::Uniform,
            MANY_CLIENTS,
        ),
        (
            Batching::Static,
            "static",
            LengthDistribution::LogUniform,
            MANY_CLIENTS,
        ),
        (
            Batching::Static,
            "static",
            LengthDistribution::Uniform,
            MANY_CLIENTS,
        ),
    ];
    let mut runs = Vec::new();
    for batching in [Batching::Continuous, Batching::Static] {
        let model = bench_model(
            &base.model,
            args.model_dir.clone(),
            "ascend-910b",
            Pace::Cpu,
            batching,
            MANY_CLIENTS,
        );
        let hosted = SelfHosted::start(vec![model]).await?;
        let keys = hosted.provision(&equal_tenants(TENANTS)).await?;
        let channels = connect(&hosted.endpoint(), 2).await?;
        let target = Target::grpc(channels, keys);
        for (_, name, distribution, clients) in plan.iter().filter(|p| p.0 == batching) {
            let workload = super::WorkloadSpec {
                output_distribution: *distribution,
                ..base.clone()
            };
            let label = format!(
                "{name}, {}",
                match distribution {
                    LengthDistribution::LogUniform => "log-uniform",
                    LengthDistribution::Uniform => "uniform",
                }
            );
            tracing::info!(%label, clients, "bench run");
            let report = measured_run(
                &label,
                &target,
                Some(hosted.metrics_addr),
                &workload,
                super::Arrival::Closed { clients: *clients },
                args.warmup,
                args.duration,
            )
            .await?;
            eprintln!("{}", report.markdown_row());
            runs.push(report);
        }
        hosted.stop().await?;
    }
    let find = |name: &str, clients: usize| {
        runs.iter()
            .find(|r| r.label == name && r.arrival == super::Arrival::Closed { clients })
            .cloned()
    };
    let missing = || BenchError::Gateway("a run of the plan is missing".to_owned());
    let one = find("continuous, log-uniform", 1).ok_or_else(missing)?;
    let cont = find("continuous, log-uniform", MANY_CLIENTS).ok_or_else(missing)?;
    let stat = find("static, log-uniform", MANY_CLIENTS).ok_or_else(missing)?;
    let cont_u = find("continuous, uniform", MANY_CLIENTS).ok_or_else(missing)?;
    let stat_u = find("static, uniform", MANY_CLIENTS).ok_or_else(missing)?;
    let findings = ServingFindings {
        scaling_32_over_1: ratio(cont.output_tokens_per_s, one.output_tokens_per_s),
        continuous_over_static: ratio(cont.output_tokens_per_s, stat.output_tokens_per_s),
        continuous_over_static_uniform: ratio(
            cont_u.output_tokens_per_s,
            stat_u.output_tokens_per_s,
        ),
        e2e_p99_ms_continuous_static: (cont.e2e_ms.p99, stat.e2e_ms.p99),
        e2e_p99_ms_continuous_static_uniform: (cont_u.e2e_ms.p99, stat_u.e2e_ms.p99),
    };
    let report = SuiteReport {
        command: command.to_owned(),
        git_revision: git_revision(),
        machine: machine(),
        findings,
        runs,
    };
    let markdown = markdown(&report, args);
    write_results(&args.out_dir, &report, &markdown)?;
    Ok(markdown)
}

fn markdown(report: &SuiteReport, args: &SuiteArgs) -> String {
    let f = &report.findings;
    let mut out = format!(
        "# Serving benchmark\n\n\
         Command: `{}`  \nRevision: `{}`  \nMachine: {}  \n\
         Model `{}` (pace cpu, emulated ascend-910b, max_batch_size {MANY_CLIENTS}), \
         {TENANTS} equal tenants, prompts of {}-{} words, outputs of {}-{} tokens \
         (ignore_eos), {} s measured after {} s of warm-up per run.\n\n",
        report.command,
        report.git_revision,
        report.machine,
        args.workload.model,
        args.workload.prompt_words.0,
        args.workload.prompt_words.1,
        args.workload.output_tokens.0,
        args.workload.output_tokens.1,
        args.duration.as_secs_f64(),
        args.warmup.as_secs_f64(),
    );
    out.push_str(RunReport::markdown_header());
    out.push('\n');
    for run in &report.runs {
        out.push_str(&run.markdown_row());
        out.push('\n');
    }
    out.push_str(&format!(
        "\n| finding | measured | target |\n|---|---:|---:|\n\
         | output tok/s, 32 clients / 1 client | {:.2}x | >= 8x |\n\
         | continuous / static, log-uniform lengths | {:.2}x | >= 2x |\n\
         | continuous / static, uniform lengths | {:.2}x | - |\n\
         | e2e p99 ms continuous vs static, log-uniform | {:.0} vs {:.0} | equal or better |\n\
         | e2e p99 ms continuous vs static, uniform | {:.0} vs {:.0} | - |\n",
        f.scaling_32_over_1,
        f.continuous_over_static,
        f.continuous_over_static_uniform,
        f.e2e_p99_ms_continuous_static.0,
        f.e2e_p99_ms_continuous_static.1,
        f.e2e_p99_ms_continuous_static_uniform.0,
        f.e2e_p99_ms_continuous_static_uniform.1,
    ));
    out
}
