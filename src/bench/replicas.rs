//! `bench replicas`: the production topology against the embedded default,
//! in one invocation and on one machine. Configurations, each a closed loop
//! of the same clients and workload on the echo engine:
//!
//! 1. a bare tonic echo server (the reference);
//! 2. one gateway process on the embedded default (SQLite, limits in
//!    process);
//! 3. one gateway process on PostgreSQL and Redis;
//! 4. `--replicas` gateway processes on the same PostgreSQL and Redis, the
//!    clients spread over them round robin (as gRPC's `round_robin` policy
//!    spreads calls).
//!
//! Each gateway's tenants have every limit set and none binding, so every
//! request passes through the limiter. Reported: throughput against the
//! embedded configuration and against bare tonic, errors by code, and the
//! CPU each part used (gateways, load generator, PostgreSQL, Redis), read
//! from `/proc`, to show where the machine's cores go.
//!
//! Knows the configurations; servers, load and processes are other
//! modules'.

use std::time::Instant;

use serde::Serialize;

use super::bare::BareServer;
use super::overhead::{echo_workload, limits};
use super::process::{GatewayProcess, ProcessSpec, cpu_seconds, group_cpu_seconds, pids_named};
use super::report::round;
use super::selfhost::{TenantSpec, connect, provision};
use super::suite::{git_revision, machine};
use super::{
    Arrival, BenchError, ReplicasArgs, RunReport, Target, WorkloadSpec, measured_run, write_results,
};

const TENANTS: usize = 4;

/// Cores each part of the system kept busy during one configuration's run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuUse {
    pub gateways: f64,
    pub load_generator: f64,
    pub postgres: f64,
    pub redis: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Configuration {
    pub name: String,
    pub run: RunReport,
    /// Throughput over the embedded configuration's.
    pub vs_embedded: f64,
    /// Throughput over the bare tonic server's.
    pub vs_bare: f64,
    pub cpu_cores: CpuUse,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplicasReport {
    pub command: String,
    pub git_revision: String,
    pub machine: String,
    pub clients: usize,
    pub replicas: u32,
    pub configurations: Vec<Configuration>,
}

/// CPU seconds so far of: this process, the gateways, PostgreSQL, Redis.
fn cpu_now(gateways: &[u32]) -> [f64; 4] {
    [
        cpu_seconds(std::process::id()).unwrap_or(0.0),
        group_cpu_seconds(gateways),
        group_cpu_seconds(&pids_named("postgres")),
        group_cpu_seconds(&pids_named("redis-server")),
    ]
}

/// Runs the load against `target` and reads what every part's CPU did.
async fn measure(
    label: &str,
    target: &Target,
    gateways: &[u32],
    workload: &WorkloadSpec,
    args: &ReplicasArgs,
) -> Result<(RunReport, CpuUse), BenchError> {
    let arrival = Arrival::Closed {
        clients: args.clients,
    };
    let (started, before) = (Instant::now(), cpu_now(gateways));
    let run = measured_run(
        label,
        target,
        None,
        workload,
        arrival,
        args.warmup,
        args.duration,
    )
    .await?;
    let (wall, after) = (started.elapsed().as_secs_f64(), cpu_now(gateways));
    let cores = |i: usize| round((after[i] - before[i]).max(0.0) / wall, 2);
    eprintln!("{}", run.markdown_row());
    Ok((
        run,
        CpuUse {
            load_generator: cores(0),
            gateways: cores(1),
            postgres: cores(2),
            redis: cores(3),
        },
    ))
}

/// Starts `count` gateway processes (on `--database-url` and `--redis-url`
/// when `shared_backends`, else each on its embedded default), provisions
/// tenants on them, and measures the load spread over all of them.
async fn gateways(
    name: &str,
    count: u32,
    shared_backends: bool,
    config: &std::path::Path,
    workload: &WorkloadSpec,
    args: &ReplicasArgs,
) -> Result<(RunReport, CpuUse), BenchError> {
    let (database_url, redis_url) = match shared_backends {
        true => (
            Some(args.database_url.as_str()),
            Some(args.redis_url.as_str()),
        ),
        false => (None, None),
    };
    let admin_token = uuid::Uuid::new_v4().simple().to_string();
    let spec = ProcessSpec {
        binary: args.gateway_binary.as_deref(),
        config,
        admin_token: &admin_token,
        database_url,
        redis_url,
        replicas: count,
    };
    let mut processes = Vec::new();
    for _ in 0..count {
        match GatewayProcess::start(&spec) {
            Ok(process) => processes.push(process),
            Err(e) => {
                processes.into_iter().for_each(GatewayProcess::stop);
                return Err(e);
            }
        }
    }
    let result = async {
        let run_tag = uuid::Uuid::now_v7().simple().to_string();
        let tenants: Vec<TenantSpec> = (0..TENANTS)
            .map(|i| TenantSpec {
                slug: format!("replicas-{}-{i}", &run_tag[20..]),
                weight: 1,
                limits: limits(),
            })
            .collect();
        // One database: tenants made through one replica serve on all.
        let keys = provision(&processes[0].endpoint, &admin_token, &tenants).await?;
        let mut channels = Vec::new();
        for _ in 0..args.connections_per_replica {
            for process in &processes {
                channels.extend(connect(&process.endpoint, 1).await?);
            }
        }
        let target = Target::grpc(channels, keys);
        let pids: Vec<u32> = processes.iter().map(GatewayProcess::pid).collect();
        measure(name, &target, &pids, workload, args).await
    }
    .await;
    processes.into_iter().for_each(GatewayProcess::stop);
    result
}

pub async fn replicas_suite(
    args: &ReplicasArgs,
    command: &str,
) -> Result<(ReplicasReport, String), BenchError> {
    if args.replicas == 0 {
        return Err(BenchError::Usage {
            flag: "--replicas",
            message: "at least 1".to_owned(),
        });
    }
    let workload = echo_workload();
    let config = std::env::temp_dir().join(format!(
        "agw-bench-replicas-{}.toml",
        uuid::Uuid::now_v7().simple()
    ));
    let prefix = format!("agwbench:{}:", uuid::Uuid::now_v7().simple());
    let toml = format!(
        "[limits]\nredis_prefix = {prefix:?}\n\n[[models]]\nid = \"echo\"\ndir = {:?}\n\
         init_preset = \"small\"\nengine = \"echo\"\nworkers = 2\nmax_queue_requests = 100000\n",
        args.model_dir
    );
    std::fs::write(&config, toml).map_err(|e| BenchError::Write {
        path: config.clone(),
        message: e.to_string(),
    })?;

    let bare = BareServer::start().await?;
    let bare_target = Target::grpc(
        connect(
            &bare.endpoint(),
            args.connections_per_replica * args.replicas as usize,
        )
        .await?,
        vec!["none".to_owned()],
    );
    let bare_run = measure("bare tonic echo", &bare_target, &[], &workload, args).await;
    bare.stop().await;
    // (name, processes, on the shared PostgreSQL and Redis)
    let topologies = [
        ("embedded (SQLite, local limits) x1".to_owned(), 1, false),
        ("PostgreSQL + Redis x1".to_owned(), 1, true),
        (
            format!("PostgreSQL + Redis x{}", args.replicas),
            args.replicas,
            true,
        ),
    ];
    let runs = async {
        let mut runs = vec![("bare tonic echo".to_owned(), bare_run?)];
        for (name, count, shared) in topologies {
            let run = gateways(&name, count, shared, &config, &workload, args).await?;
            runs.push((name, run));
        }
        Ok::<_, BenchError>(runs)
    }
    .await;
    let _ = std::fs::remove_file(&config);
    let runs = runs?;
    let embedded_rps = runs[1].1.0.requests_per_s.max(f64::MIN_POSITIVE);
    let bare_rps = runs[0].1.0.requests_per_s.max(f64::MIN_POSITIVE);
    let configurations = runs
        .into_iter()
        .map(|(name, (run, cpu_cores))| Configuration {
            name,
            vs_embedded: round(run.requests_per_s / embedded_rps, 3),
            vs_bare: round(run.requests_per_s / bare_rps, 3),
            run,
            cpu_cores,
        })
        .collect();
    let report = ReplicasReport {
        command: command.to_owned(),
        git_revision: git_revision(),
        machine: machine(),
        clients: args.clients,
        replicas: args.replicas,
        configurations,
    };
    let markdown = markdown(&report);
    write_results(&args.out_dir, &report, &markdown)?;
    Ok((report, markdown))
}

fn markdown(r: &ReplicasReport) -> String {
    let mut out = format!(
        "# Replicas on shared PostgreSQL and Redis\n\n\
         Command: `{}`  \nRevision: `{}`  \nMachine: {}  \n\
         Closed loop of {} clients, echo engine, {TENANTS} tenants with every limit set (none \
         binding), authentication and metering on. Gateways are separate processes; load \
         generator, gateways, PostgreSQL and Redis share the machine. CPU is cores kept busy \
         (CPU seconds over wall seconds, from /proc) during the run, warm-up included.\n\n\
         | configuration | req/s | vs embedded | vs bare | errors | p50 / p99 ms | CPU cores: gateways / load / PostgreSQL / Redis |\n\
         |---|---:|---:|---:|---|---:|---:|\n",
        r.command, r.git_revision, r.machine, r.clients
    );
    for c in &r.configurations {
        let errors = if c.run.errors.is_empty() {
            "none".to_owned()
        } else {
            c.run
                .errors
                .iter()
                .map(|(code, n)| format!("{code} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!(
            "| {} | {:.0} | {:.2} | {:.2} | {} | {:.2} / {:.2} | {:.2} / {:.2} / {:.2} / {:.2} |\n",
            c.name,
            c.run.requests_per_s,
            c.vs_embedded,
            c.vs_bare,
            errors,
            c.run.e2e_ms.p50,
            c.run.e2e_ms.p99,
            c.cpu_cores.gateways,
            c.cpu_cores.load_generator,
            c.cpu_cores.postgres,
            c.cpu_cores.redis,
        ));
    }
    out
}
