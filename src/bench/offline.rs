//! `bench offline`: the MLPerf offline scenario, maximum throughput. Closed
//! loops of rising client counts against one model; each run's output
//! tokens/s, and the best of them with the client count that reached it.
//!
//! Knows the sweep; the gateway and the load are other modules'.

use serde::Serialize;

use super::selfhost::{SelfHosted, connect};
use super::suite::{git_revision, machine};
use super::{
    Arrival, BenchError, OfflineArgs, RunReport, Target, equal_tenants, measured_run,
    scenario_model, write_results,
};

#[derive(Debug, Clone, Serialize)]
pub struct OfflineReport {
    pub command: String,
    pub git_revision: String,
    pub machine: String,
    pub model: String,
    pub max_batch_size: usize,
    pub runs: Vec<RunReport>,
    /// Client count of the run with the most output tokens/s.
    pub best_clients: usize,
    pub best_output_tokens_per_s: f64,
}

/// The run with the most output tokens/s, as (clients, tokens/s).
pub fn best(clients: &[usize], runs: &[RunReport]) -> Option<(usize, f64)> {
    clients
        .iter()
        .zip(runs)
        .map(|(&c, r)| (c, r.output_tokens_per_s))
        .fold(None, |best, (c, t)| match best {
            Some((_, b)) if b >= t => best,
            _ => Some((c, t)),
        })
}

/// `bench offline`.
pub async fn offline_scenario(
    args: &OfflineArgs,
    command: &str,
) -> Result<(OfflineReport, String), BenchError> {
    let workload = args.workload.spec();
    let model = scenario_model(&workload.model, args.model_dir.clone(), args.max_batch_size);
    let hosted = SelfHosted::start(vec![model]).await?;
    let result = sweep(args, &hosted, &workload).await;
    hosted.stop().await?;
    let runs = result?;
    let (best_clients, best_output_tokens_per_s) =
        best(&args.clients, &runs).ok_or_else(|| BenchError::Gateway("no runs".to_owned()))?;
    let report = OfflineReport {
        command: command.to_owned(),
        git_revision: git_revision(),
        machine: machine(),
        model: workload.model.clone(),
        max_batch_size: args.max_batch_size,
        runs,
        best_clients,
        best_output_tokens_per_s,
    };
    let mut markdown = format!(
        "# Offline scenario (maximum throughput)\n\nCommand: `{}`  \nRevision: `{}`  \n\
         Machine: {}  \nModel `{}` (pace cpu, continuous batching, at most {} sequences per \
         step), closed loops of rising client counts, 4 tenants.\n\n\
         Maximum: **{:.1} output tokens/s** with {} clients.\n\n{}\n",
        report.command,
        report.git_revision,
        report.machine,
        report.model,
        report.max_batch_size,
        report.best_output_tokens_per_s,
        report.best_clients,
        RunReport::markdown_header(),
    );
    for run in &report.runs {
        markdown.push_str(&run.markdown_row());
        markdown.push('\n');
    }
    write_results(&args.out_dir, &report, &markdown)?;
    Ok((report, markdown))
}

async fn sweep(
    args: &OfflineArgs,
    hosted: &SelfHosted,
    workload: &super::WorkloadSpec,
) -> Result<Vec<RunReport>, BenchError> {
    let target = Target::grpc(
        connect(&hosted.endpoint(), 2).await?,
        hosted.provision(&equal_tenants(4)).await?,
    );
    let mut runs = Vec::new();
    for &clients in &args.clients {
        let run = measured_run(
            &format!("{clients} clients"),
            &target,
            Some(hosted.metrics_addr),
            workload,
            Arrival::Closed { clients },
            args.warmup,
            args.duration,
        )
        .await?;
        eprintln!("{}", run.markdown_row());
        runs.push(run);
    }
    Ok(runs)
}
