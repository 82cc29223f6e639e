//! `ascend-gateway bench`: a load generator over real gRPC, against a
//! gateway it starts itself (the default: the embedded configuration, fresh
//! each time) or one already running (`--endpoint`). It reports throughput,
//! time to first token, inter-token and end-to-end latency percentiles and
//! the mean batch size, as JSON and Markdown.
//!
//! It is a client of the gateway: it uses the public API and `/metrics`
//! only, never the serving internals, so what it measures is what a user
//! would see.

mod bare;
mod bare_http;
mod chat;
mod device;
mod http_load;
mod load;
mod offline;
mod overhead;
mod percentile;
mod plot;
mod process;
mod replicas;
mod report;
mod scenarios;
mod scrape;
mod selfhost;
mod suite;
mod workload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use load::{Arrival, Sample, Target};
pub use percentile::{Summary, nearest_rank};
pub use report::{RunReport, TenantShare};
pub use scrape::{StepMeans, StepTotals};
pub use selfhost::{SelfHosted, TenantSpec};
pub use workload::{LengthDistribution, RequestSource, WorkloadSpec};

use crate::serving::{Batching, Engine, ModelSettings, Pace};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot connect to {endpoint} (`--endpoint`): {message}")]
    Endpoint { endpoint: String, message: String },
    #[error("the bench gateway failed: {0}")]
    Gateway(String),
    #[error("creating bench tenants failed: {0}")]
    Admin(String),
    #[error("cannot read metrics at {addr} (`--metrics-addr`): {message}")]
    Metrics { addr: SocketAddr, message: String },
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error("invalid `{flag}`: {message}")]
    Usage { flag: &'static str, message: String },
}

/// `LO-HI`, both inclusive.
fn parse_range(text: &str) -> Result<(u32, u32), String> {
    let (lo, hi) = text
        .split_once('-')
        .ok_or_else(|| "expected LO-HI, e.g. 8-256".to_owned())?;
    let lo: u32 = lo.trim().parse().map_err(|e| format!("{lo}: {e}"))?;
    let hi: u32 = hi.trim().parse().map_err(|e| format!("{hi}: {e}"))?;
    if lo == 0 || lo > hi {
        return Err("need 1 <= LO <= HI".to_owned());
    }
    Ok((lo, hi))
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchCommand {
    /// One load run (closed loop with --clients, or open loop with --rate).
    Run(RunArgs),
    /// The serving comparison: 1 against 32 clients, continuous against
    /// static batching, on mixed output lengths; writes JSON and Markdown.
    Serving(SuiteArgs),
    /// What the gateway adds: its echo engine with auth, limits and
    /// metering on, against a bare tonic echo server, same load.
    Overhead(OverheadArgs),
    /// The Ascend 910B / 910C against H100 report: one workload with
    /// pace = device and the launch material's 175B shape on each profile.
    Report(ReportArgs),
    /// Redraws the plots beside each given results.json (of report, server
    /// or tenants) without running anything.
    Replot(ReplotArgs),
    /// MLPerf-style offline scenario: closed loops of rising client counts;
    /// the maximum output tokens/s.
    Offline(OfflineArgs),
    /// MLPerf-style server scenario: Poisson arrivals at each rate; whether
    /// p99 TTFT and p99 time per output token stay within bounds.
    Server(ServerArgs),
    /// Tenants of different weights (and one rate-limited) sharing a
    /// contended model: each one's token share against its weight.
    Tenants(TenantsArgs),
    /// The production topology: gateway processes on one PostgreSQL and one
    /// Redis (one, then --replicas of them) against the embedded default
    /// and a bare tonic server, same load, with the CPU each part used.
    Replicas(ReplicasArgs),
    /// Multi-turn chat (shared system prompts, every turn resending the
    /// conversation) with context caching on and off: time to first token,
    /// prompt tokens/s and hit rate against the workload's ideal.
    Chat(ChatArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct ReplicasArgs {
    /// PostgreSQL shared by the replicas (tenants, metering)
    #[arg(long)]
    pub database_url: String,
    /// Redis shared by the replicas (limits)
    #[arg(long)]
    pub redis_url: String,
    /// Gateway processes of the multi-replica configuration
    #[arg(long, default_value_t = 3)]
    pub replicas: u32,
    /// Clients of each closed loop, spread over the replicas
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// HTTP/2 connections from the load generator to each replica
    #[arg(long, default_value_t = 2)]
    pub connections_per_replica: usize,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Any model directory: the echo engine uses its tokenizer only
    #[arg(long, default_value = "data/models/small")]
    pub model_dir: PathBuf,
    #[arg(long, default_value = "benchmarks/replicas")]
    pub out_dir: PathBuf,
    /// The `ascend-gateway` binary to start (default: this one)
    #[arg(long)]
    pub gateway_binary: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ReplotArgs {
    /// results.json files
    #[arg(required = true)]
    pub results: Vec<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct OfflineArgs {
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Closed-loop client counts to try
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,32,64")]
    pub clients: Vec<usize>,
    #[arg(long, default_value_t = 32)]
    pub max_batch_size: usize,
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    #[arg(long, default_value = "data/models/small")]
    pub model_dir: PathBuf,
    #[arg(long, default_value = "benchmarks/offline")]
    pub out_dir: PathBuf,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Offered rates to try, requests/s
    #[arg(long, value_delimiter = ',', default_value = "0.5,1,2,4")]
    pub rates: Vec<f64>,
    #[arg(long, default_value_t = 2000.0)]
    pub ttft_p99_ms: f64,
    #[arg(long, default_value_t = 200.0)]
    pub tpot_p99_ms: f64,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    #[arg(long, default_value = "data/models/small")]
    pub model_dir: PathBuf,
    #[arg(long, default_value = "benchmarks/server")]
    pub out_dir: PathBuf,
}

#[derive(Debug, Clone, clap::Args)]
pub struct TenantsArgs {
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Scheduling weights of the unlimited tenants
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub weights: Vec<u32>,
    /// Request rate limit of the extra, limited tenant
    #[arg(long, default_value_t = 1.0)]
    pub limited_rps: f64,
    #[arg(long, default_value_t = 8)]
    pub clients_per_tenant: usize,
    /// Sequence cap: below the client count, so tenants contend
    #[arg(long, default_value_t = 8)]
    pub max_batch_size: usize,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    #[arg(long, default_value = "data/models/small")]
    pub model_dir: PathBuf,
    #[arg(long, default_value = "benchmarks/tenants")]
    pub out_dir: PathBuf,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// How to read the launch material's 175B: a DeepSeek-style mixture of
    /// experts or a dense transformer
    #[arg(long, value_enum, default_value = "moe")]
    pub shape: device::LaunchReading,
    /// Batch sizes (closed-loop clients) to run each device at
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    pub batches: Vec<usize>,
    /// Output tokens of every request (ignore_eos)
    #[arg(long, default_value_t = 64)]
    pub output_tokens: u32,
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Assumption: electricity price
    #[arg(long, default_value_t = 0.10)]
    pub electricity_usd_per_kwh: f64,
    /// Assumption: years over which a device's price is spread
    #[arg(long, default_value_t = 4.0)]
    pub amortisation_years: f64,
    /// Assumption: share of the time the devices serve at this rate
    #[arg(long, default_value_t = 0.6)]
    pub utilisation: f64,
    /// Assumption: price of one Ascend 910B, USD
    #[arg(long, default_value_t = 16_000.0)]
    pub price_910b_usd: f64,
    /// Assumption: price of one Ascend 910C, USD
    #[arg(long, default_value_t = 28_000.0)]
    pub price_910c_usd: f64,
    /// Assumption: price of one H100 SXM, USD
    #[arg(long, default_value_t = 30_000.0)]
    pub price_h100_usd: f64,
    #[arg(long, default_value = "data/models/small")]
    pub model_dir: PathBuf,
    #[arg(long, default_value = "benchmarks/devices")]
    pub out_dir: PathBuf,
}

#[derive(Debug, Clone, clap::Args)]
pub struct OverheadArgs {
    /// Open-loop rates to compare at, requests/s
    #[arg(long, value_delimiter = ',', default_value = "1000,2500,5000")]
    pub rates: Vec<f64>,
    /// Clients of the closed-loop (maximum throughput) run
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    #[arg(long, default_value_t = 2)]
    pub connections: usize,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Metering database of the gateway (default: embedded SQLite)
    #[arg(long)]
    pub database_url: Option<String>,
    /// Redis for the gateway's limits (default: in process)
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Any model directory: the echo engine uses its tokenizer only
    #[arg(long, default_value = "data/models/small")]
    pub model_dir: PathBuf,
    /// `http` adds the OpenAI-compatible HTTP API to the gRPC runs: a
    /// bare HTTP echo server and the gateway's HTTP path, in this run
    #[arg(long, value_enum, default_value = "grpc")]
    pub protocol: OverheadProtocol,
    #[arg(long, default_value = "benchmarks/overhead")]
    pub out_dir: PathBuf,
}

/// Which front ends `bench overhead` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OverheadProtocol {
    /// gRPC only.
    Grpc,
    /// gRPC, then the HTTP API beside it.
    Http,
}

/// The gateway under load.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// A running gateway (http://host:port); default: start one in-process
    #[arg(long)]
    pub endpoint: Option<String>,
    /// API key for --endpoint, one per tenant (repeat the flag)
    #[arg(long = "api-key", requires = "endpoint")]
    pub api_keys: Vec<String>,
    /// Its metrics address, for the mean batch size
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Tenants to create on the in-process gateway
    #[arg(long, default_value_t = 4)]
    pub tenants: usize,
    /// HTTP/2 connections the clients share
    #[arg(long, default_value_t = 2)]
    pub connections: usize,
    /// Model directory of the in-process gateway (created on first use)
    #[arg(long, default_value = "data/models/small")]
    pub model_dir: PathBuf,
    /// Device profile of the in-process gateway's workers
    #[arg(long, default_value = "ascend-910b")]
    pub device: String,
    #[arg(long, value_enum, default_value = "cpu")]
    pub pace: Pace,
    #[arg(long, value_enum, default_value = "continuous")]
    pub batching: Batching,
    /// `echo` answers with the prompt at once (gateway overhead only)
    #[arg(long, value_enum, default_value = "npu")]
    pub engine: Engine,
    /// Sequence cap of a step
    #[arg(long, default_value_t = 32)]
    pub max_batch_size: usize,
}

/// What the requests look like.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkloadArgs {
    #[arg(long, default_value = "small")]
    pub model: String,
    /// Prompt length in words, LO-HI
    #[arg(long, default_value = "4-96", value_parser = parse_range)]
    pub prompt_words: (u32, u32),
    /// Output tokens (max_tokens, generated in full), LO-HI
    #[arg(long, default_value = "8-256", value_parser = parse_range)]
    pub output_tokens: (u32, u32),
    #[arg(long, value_enum, default_value = "log-uniform")]
    pub output_distribution: LengthDistribution,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl WorkloadArgs {
    pub fn spec(&self) -> WorkloadSpec {
        WorkloadSpec {
            model: self.model.clone(),
            prompt_words: self.prompt_words,
            output_tokens: self.output_tokens,
            output_distribution: self.output_distribution,
            temperature: 0.8,
            seed: self.seed,
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub gateway: GatewayArgs,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Closed loop: this many concurrent clients
    #[arg(long, conflicts_with = "rate")]
    pub clients: Option<usize>,
    /// Open loop: Poisson arrivals at this many requests per second
    #[arg(long)]
    pub rate: Option<f64>,
    /// How long new requests are sent
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Load before measuring, not reported
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Also write the report as JSON here
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct SuiteArgs {
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Measured time of each run
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    #[arg(long, default_value = "data/models/small")]
    pub model_dir: PathBuf,
    /// Where results.json and results.md go
    #[arg(long, default_value = "benchmarks/serving")]
    pub out_dir: PathBuf,
}

/// The scenarios' model: the 910B profile at CPU pace with continuous
/// batching.
pub fn scenario_model(id: &str, dir: PathBuf, max_batch_size: usize) -> ModelSettings {
    bench_model(
        id,
        dir,
        "ascend-910b",
        Pace::Cpu,
        Batching::Continuous,
        max_batch_size,
    )
}

/// The model settings of an in-process bench gateway.
pub fn bench_model(
    id: &str,
    dir: PathBuf,
    device: &str,
    pace: Pace,
    batching: Batching,
    max_batch_size: usize,
) -> ModelSettings {
    ModelSettings {
        id: id.to_owned(),
        dir: Some(dir),
        init_preset: Some(crate::model::Preset::Small),
        device_profile: crate::npu::ProfileSource::parse(device),
        pace,
        batching,
        max_batch_size,
        ..ModelSettings::default()
    }
}

/// Equal tenants with no limits: the bench measures serving, not limits.
pub fn equal_tenants(count: usize) -> Vec<TenantSpec> {
    (0..count.max(1))
        .map(|i| TenantSpec {
            slug: format!("bench-tenant-{i}"),
            weight: 1,
            limits: Default::default(),
        })
        .collect()
}

/// Runs `arrival` after a warm-up, reading the batch size from `metrics`.
pub async fn measured_run(
    label: &str,
    target: &Target,
    metrics: Option<SocketAddr>,
    workload: &WorkloadSpec,
    arrival: Arrival,
    warmup: Duration,
    duration: Duration,
) -> Result<RunReport, BenchError> {
    if !warmup.is_zero() {
        load::run(target, workload, arrival, warmup).await;
    }
    let before = match metrics {
        Some(addr) => Some(scrape::step_totals(
            &scrape::fetch(addr).await?,
            &workload.model,
        )),
        None => None,
    };
    let (samples, elapsed) = load::run(target, workload, arrival, duration).await;
    let mut report = RunReport::new(label, arrival, &samples, elapsed);
    if let (Some(addr), Some(before)) = (metrics, before) {
        let after = scrape::step_totals(&scrape::fetch(addr).await?, &workload.model);
        let means = after.means_since(&before);
        report.mean_batch_sequences = Some((means.sequences * 100.0).round() / 100.0);
        report.mean_batch_tokens = Some((means.tokens * 10.0).round() / 10.0);
        report.mean_step_ms = Some((means.duration_ms * 1000.0).round() / 1000.0);
    }
    Ok(report)
}

/// `bench run`.
pub async fn run_command(args: &RunArgs) -> Result<RunReport, BenchError> {
    let arrival = match (args.clients, args.rate) {
        (_, Some(rate)) if !(rate.is_finite() && rate > 0.0) => {
            return Err(BenchError::Usage {
                flag: "--rate",
                message: "a positive number of requests per second".to_owned(),
            });
        }
        (_, Some(rate)) => Arrival::Open { rate },
        (Some(clients), None) => Arrival::Closed { clients },
        (None, None) => Arrival::Closed { clients: 1 },
    };
    let workload = args.workload.spec();
    let gateway = &args.gateway;
    let (target, metrics, hosted) = match &gateway.endpoint {
        Some(endpoint) => {
            if gateway.api_keys.is_empty() {
                return Err(BenchError::Usage {
                    flag: "--api-key",
                    message: "at least one with --endpoint".to_owned(),
                });
            }
            let channels = selfhost::connect(endpoint, gateway.connections).await?;
            let target = Target::grpc(channels, gateway.api_keys.clone());
            (target, gateway.metrics_addr, None)
        }
        None => {
            let mut model = bench_model(
                &workload.model,
                gateway.model_dir.clone(),
                &gateway.device,
                gateway.pace,
                gateway.batching,
                gateway.max_batch_size,
            );
            model.engine = gateway.engine;
            let hosted = SelfHosted::start(vec![model]).await?;
            let keys = hosted.provision(&equal_tenants(gateway.tenants)).await?;
            let channels = selfhost::connect(&hosted.endpoint(), gateway.connections).await?;
            let metrics = Some(hosted.metrics_addr);
            (Target::grpc(channels, keys), metrics, Some(hosted))
        }
    };
    let report = measured_run(
        "run",
        &target,
        metrics,
        &workload,
        arrival,
        args.warmup,
        args.duration,
    )
    .await;
    if let Some(hosted) = hosted {
        hosted.stop().await?;
    }
    let report = report?;
    if let Some(path) = &args.out {
        write_json(path, &report)?;
    }
    Ok(report)
}

/// Writes a suite's `results.json` and `results.md` into `dir`.
pub fn write_results(
    dir: &std::path::Path,
    report: &impl serde::Serialize,
    markdown: &str,
) -> Result<(), BenchError> {
    write_json(&dir.join("results.json"), report)?;
    let path = dir.join("results.md");
    std::fs::write(&path, markdown).map_err(|e| BenchError::Write {
        path,
        message: e.to_string(),
    })
}

/// Writes `value` as pretty JSON, creating the directory.
pub fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> Result<(), BenchError> {
    let failed = |message: String| BenchError::Write {
        path: path.to_owned(),
        message,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| failed(e.to_string()))?;
    }
    let text = serde_json::to_string_pretty(value).map_err(|e| failed(e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| failed(e.to_string()))
}

pub use chat::{ChatArgs, ChatReport, chat_scenario};
pub use device::{DeviceReport, LaunchReading, device_report, launch_shape};
pub use offline::{OfflineReport, offline_scenario};
pub use overhead::{OverheadReport, ProtocolRuns, RateComparison, overhead_suite};
pub use plot::replot;
pub use replicas::{ReplicasReport, replicas_suite};
pub use scenarios::{
    ServerReport, TenantsReport, server_scenario, tenants_scenario, within_bounds,
};
pub use suite::{SuiteReport, git_revision, machine, serving_suite};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_or_say_why_not() {
        assert_eq!(parse_range("8-256"), Ok((8, 256)));
        assert_eq!(parse_range(" 4 - 4 "), Ok((4, 4)));
        assert!(parse_range("9-8").is_err());
        assert!(parse_range("0-8").is_err());
        assert!(parse_range("eight").is_err());
    }
}
