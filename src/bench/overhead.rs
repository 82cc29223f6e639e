//! `bench overhead`: what the gateway adds to a request. The same load goes
//! to a bare tonic echo server and to the gateway's echo engine with
//! authentication, rate limiting and metering all on; both run in this
//! process, one after the other, in one invocation. With `--protocol
//! http` the same is done for the HTTP API (a bare HTTP echo route on the
//! same listener code, then the gateway's `/v1/completions`), against the
//! same gateway. Reported: end-to-end latency at each offered rate for
//! each pair and the difference, the closed-loop throughput ratios, and
//! the HTTP path's throughput over the gRPC path's.
//!
//! Knows the runs to make; the servers and the load are other modules'.

use serde::Serialize;

use super::bare::BareServer;
use super::bare_http::BareHttpServer;
use super::report::round;
use super::selfhost::{SelfHosted, TenantSpec, connect};
use super::suite::{git_revision, machine};
use super::{
    Arrival, BenchError, OverheadArgs, OverheadProtocol, RunReport, Target, WorkloadSpec,
    measured_run, write_results,
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

/// One front end's runs: its bare reference and the gateway, closed loop
/// and at each offered rate.
#[derive(Debug, Clone, Serialize)]
pub struct ProtocolRuns {
    pub protocol: OverheadProtocol,
    pub bare_max: RunReport,
    /// The gateway's closed-loop run (the median of its rounds).
    pub gateway_max: RunReport,
    /// Requests/s of each of the gateway's closed-loop rounds, in order.
    pub gateway_rounds_per_s: Vec<f64>,
    /// Gateway over bare requests/s in the closed loop.
    pub throughput_ratio: f64,
    pub rates: Vec<RateComparison>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OverheadReport {
    pub command: String,
    pub git_revision: String,
    pub machine: String,
    pub database: String,
    pub closed_loop_clients: usize,
    pub grpc: ProtocolRuns,
    /// With `--protocol http`: the HTTP API's runs, against the gateway's
    /// own HTTP listener serving a bare echo route.
    pub http: Option<ProtocolRuns>,
    /// With `--protocol http`: the gateway's closed-loop requests/s over
    /// HTTP divided by the same over gRPC in the round just before, the
    /// median of the rounds' ratios.
    pub http_over_grpc_throughput: Option<f64>,
    /// Each round's ratio, in order.
    pub http_over_grpc_rounds: Vec<f64>,
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
        monthly_budget: None,
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

/// A closed-loop run and one run at each offered rate.
struct Measured {
    max: RunReport,
    /// Every closed-loop round, in order (`max` is the median of them).
    rounds: Vec<RunReport>,
    rates: Vec<RunReport>,
}

/// Closed-loop rounds when front ends are compared: the machine's speed
/// drifts over minutes, so each protocol's rounds alternate with the
/// other's and the ratio is the median of adjacent rounds' ratios.
const COMPARED_ROUNDS: usize = 3;

/// Measures each of `targets` closed loop and at each offered rate,
/// alternating between them at every step so drift hits all alike.
async fn measure(
    targets: &[(&'static str, &Target)],
    args: &OverheadArgs,
    workload: &WorkloadSpec,
) -> Result<Vec<Measured>, BenchError> {
    let run = |label: &'static str, target: &Target, arrival| {
        let workload = workload.clone();
        let target = target.clone();
        async move {
            let report = measured_run(
                label,
                &target,
                None,
                &workload,
                arrival,
                args.warmup,
                args.duration,
            )
            .await?;
            eprintln!("{}", report.markdown_row());
            Ok::<_, BenchError>(report)
        }
    };
    let rounds_per_target = if targets.len() > 1 {
        COMPARED_ROUNDS
    } else {
        1
    };
    let mut rounds = vec![Vec::new(); targets.len()];
    for _ in 0..rounds_per_target {
        for (i, &(label, target)) in targets.iter().enumerate() {
            let closed = Arrival::Closed {
                clients: args.clients,
            };
            rounds[i].push(run(label, target, closed).await?);
        }
    }
    let mut rates = vec![Vec::new(); targets.len()];
    for &rate in &args.rates {
        for (i, &(label, target)) in targets.iter().enumerate() {
            rates[i].push(run(label, target, Arrival::Open { rate }).await?);
        }
    }
    Ok(rounds
        .into_iter()
        .zip(rates)
        .map(|(rounds, rates)| {
            let mut by_throughput: Vec<&RunReport> = rounds.iter().collect();
            by_throughput.sort_by(|a, b| a.requests_per_s.total_cmp(&b.requests_per_s));
            Measured {
                max: by_throughput[by_throughput.len() / 2].clone(),
                rounds,
                rates,
            }
        })
        .collect())
}

/// The median of adjacent rounds' throughput ratios, and each of them.
fn round_ratios(numerator: &Measured, denominator: &Measured) -> (f64, Vec<f64>) {
    let each: Vec<f64> = numerator
        .rounds
        .iter()
        .zip(&denominator.rounds)
        .map(|(n, d)| ratio(n.requests_per_s, d.requests_per_s))
        .collect();
    let mut sorted = each.clone();
    sorted.sort_by(f64::total_cmp);
    (sorted.get(sorted.len() / 2).copied().unwrap_or(0.0), each)
}

fn compare(
    protocol: OverheadProtocol,
    offered: &[f64],
    bare: Measured,
    gateway: Measured,
) -> ProtocolRuns {
    let rates = offered
        .iter()
        .zip(bare.rates.into_iter().zip(gateway.rates))
        .map(|(&offered_per_s, (bare, gateway))| RateComparison {
            offered_per_s,
            added_p50_ms: round(gateway.e2e_ms.p50 - bare.e2e_ms.p50, 3),
            added_p99_ms: round(gateway.e2e_ms.p99 - bare.e2e_ms.p99, 3),
            bare,
            gateway,
        })
        .collect();
    ProtocolRuns {
        protocol,
        gateway_rounds_per_s: gateway.rounds.iter().map(|r| r.requests_per_s).collect(),
        throughput_ratio: ratio(gateway.max.requests_per_s, bare.max.requests_per_s),
        bare_max: bare.max,
        gateway_max: gateway.max,
        rates,
    }
}

fn one(mut measured: Vec<Measured>) -> Measured {
    // `measure` returns one `Measured` per target, and it was given one.
    measured.remove(0)
}

fn ratio(numerator: f64, denominator: f64) -> f64 {
    round(numerator / denominator.max(f64::MIN_POSITIVE), 3)
}

/// Runs the comparison; writes results.json and results.md; returns the
/// report and its Markdown.
pub async fn overhead_suite(
    args: &OverheadArgs,
    command: &str,
) -> Result<(OverheadReport, String), BenchError> {
    let workload = echo_workload();
    let with_http = args.protocol == OverheadProtocol::Http;

    let bare = BareServer::start().await?;
    let bare_target = Target::grpc(
        connect(&bare.endpoint(), args.connections).await?,
        vec!["none".to_owned()],
    );
    let bare_grpc = one(measure(&[("bare tonic echo", &bare_target)], args, &workload).await?);
    bare.stop().await;
    let bare_http = if with_http {
        let bare = BareHttpServer::start().await?;
        let target = Target::http(&bare.endpoint(), args.connections, vec!["none".to_owned()])?;
        let measured = measure(&[("bare HTTP echo", &target)], args, &workload).await;
        bare.stop().await;
        Some(one(measured?))
    } else {
        None
    };

    let model = ModelSettings {
        id: "echo".to_owned(),
        dir: Some(args.model_dir.clone()),
        init_preset: Some(crate::model::Preset::Small),
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
    let measured = async {
        let tenants: Vec<TenantSpec> = (0..TENANTS)
            .map(|i| TenantSpec {
                slug: format!("overhead-{i}"),
                weight: 1,
                limits: limits(),
            })
            .collect();
        let keys = hosted.provision(&tenants).await?;
        let grpc_target = Target::grpc(
            connect(&hosted.endpoint(), args.connections).await?,
            keys.clone(),
        );
        let http_target = match (&bare_http, hosted.http_addr) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(BenchError::Gateway(
                    "the gateway has no HTTP listener".to_owned(),
                ));
            }
            (Some(_), Some(addr)) => Some(Target::http(
                &format!("http://{addr}"),
                args.connections,
                keys,
            )?),
        };
        let mut targets = vec![("gateway echo", &grpc_target)];
        targets.extend(http_target.as_ref().map(|t| ("gateway HTTP echo", t)));
        let mut measured = measure(&targets, args, &workload).await?.into_iter();
        let grpc = measured
            .next()
            .ok_or(BenchError::Gateway("no gRPC runs".to_owned()))?;
        Ok((grpc, measured.next()))
    }
    .await;
    hosted.stop().await?;
    let (gateway_grpc, gateway_http) = measured?;
    let (http_over_grpc_throughput, http_over_grpc_rounds) = match &gateway_http {
        Some(http) => {
            let (median, each) = round_ratios(http, &gateway_grpc);
            (Some(median), each)
        }
        None => (None, Vec::new()),
    };

    let grpc = compare(OverheadProtocol::Grpc, &args.rates, bare_grpc, gateway_grpc);
    let http = bare_http
        .zip(gateway_http)
        .map(|(bare, gateway)| compare(OverheadProtocol::Http, &args.rates, bare, gateway));
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
        http_over_grpc_throughput,
        http_over_grpc_rounds,
        grpc,
        http,
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
         Reference: a bare tonic server with the same contract echoing the prompt{}. \
         Load generator, servers and database share the machine.\n\n",
        r.command,
        r.git_revision,
        r.machine,
        r.database,
        if r.http.is_some() {
            "; for HTTP, the gateway's own HTTP listener with one bare route \
             streaming the prompt back in OpenAI's chunk shape"
        } else {
            ""
        },
    );
    for runs in std::iter::once(&r.grpc).chain(r.http.as_ref()) {
        out.push_str(&format!(
            "{}: closed loop, {} clients: gateway {:.0} req/s, bare {:.0} req/s: ratio **{:.2}**.\n\n",
            protocol_name(runs.protocol),
            r.closed_loop_clients,
            runs.gateway_max.requests_per_s,
            runs.bare_max.requests_per_s,
            runs.throughput_ratio,
        ));
    }
    if let (Some(http), Some(ratio)) = (&r.http, r.http_over_grpc_throughput) {
        let rounds: Vec<String> = (r.grpc.gateway_rounds_per_s.iter())
            .zip(&http.gateway_rounds_per_s)
            .zip(&r.http_over_grpc_rounds)
            .map(|((grpc, http), ratio)| format!("{http:.0} / {grpc:.0} = {ratio:.2}"))
            .collect();
        out.push_str(&format!(
            "HTTP path over gRPC path, gateway closed loop, {} alternating rounds \
             (HTTP / gRPC req/s): {}; median **{ratio:.2}**.\n\n\
             | offered req/s | gRPC added p50 / p99 ms | HTTP added p50 / p99 ms |\n\
             |---:|---:|---:|\n",
            rounds.len(),
            rounds.join("; "),
        ));
        for (grpc, http) in r.grpc.rates.iter().zip(&http.rates) {
            out.push_str(&format!(
                "| {:.0} | {:.3} / {:.3} | {:.3} / {:.3} |\n",
                grpc.offered_per_s,
                grpc.added_p50_ms,
                grpc.added_p99_ms,
                http.added_p50_ms,
                http.added_p99_ms,
            ));
        }
        out.push('\n');
    }
    for runs in std::iter::once(&r.grpc).chain(r.http.as_ref()) {
        out.push_str(&format!(
            "{}:\n\n\
             | offered req/s | bare p50 / p99 ms | gateway p50 / p99 ms | added p50 / p99 ms | gateway errors |\n\
             |---:|---:|---:|---:|---:|\n",
            protocol_name(runs.protocol),
        ));
        for c in &runs.rates {
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
        out.push('\n');
    }
    out.push_str("Runs (of the gateway's closed-loop rounds, the median one):\n\n");
    out.push_str(RunReport::markdown_header());
    out.push('\n');
    for runs in std::iter::once(&r.grpc).chain(r.http.as_ref()) {
        for run in [&runs.bare_max, &runs.gateway_max]
            .into_iter()
            .chain(runs.rates.iter().flat_map(|c| [&c.bare, &c.gateway]))
        {
            out.push_str(&run.markdown_row());
            out.push('\n');
        }
    }
    out
}

fn protocol_name(protocol: OverheadProtocol) -> &'static str {
    match protocol {
        OverheadProtocol::Http => "HTTP (`/v1/completions`, streamed, h2c)",
        OverheadProtocol::Grpc => "gRPC (`GenerateStream`)",
    }
}
