//! The production topology on hosts of the test's own (issue #16): three
//! gateway replicas, each in a network namespace of its own, share a private
//! PostgreSQL and a private Redis on a fourth, over a private Linux bridge;
//! the test is the client, from the root namespace. Under more than 30 s of
//! load from four tenants with different limits, one replica is killed with
//! SIGKILL and restarted, Redis is down for 10 s, PostgreSQL for 20 s, and
//! one replica's link is cut for 10 s. Afterwards every answered request is
//! metered exactly once with the tokens its client saw, the rollups equal
//! the events, no tenant got more than its limits allow, and no concurrency
//! lease is left in Redis. Once per Redis failure policy.
//!
//! Needs root for `ip netns`; without it the tests say so and pass.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ascend_gateway::api::pb::v1::inference_client::InferenceClient;
use ascend_gateway::api::pb::v1::{GenerateRequest, TenantLimits};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tempfile::TempDir;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_types::StatusExt;

use crate::common::{ADMIN_TOKEN, authed, tenant_with_limits, tiny_model_dir};
use crate::hosts::{GatewayOnHost, Network, PrivatePostgres, PrivateRedis, in_netns, warnings};

/// The whole test, setup to cleanup, stays within this.
const TEST_BUDGET: Duration = Duration::from_secs(230);
const GRPC_PORT: u16 = 50051;
const METRICS_PORT: u16 = 9464;
const REPLICAS: usize = 3;
const LEASE_TTL: Duration = Duration::from_secs(3);
/// Per request: long enough for a loaded machine, short enough that a cut
/// link costs a client a few seconds, not the run.
const REQUEST_DEADLINE: Duration = Duration::from_secs(3);
const REDIS_PREFIX: &str = "agw:";

const RATE: f64 = 40.0;
const BURST: u32 = 20;
const MAX_CONCURRENT: u32 = 8;
/// Fewer clients than `MAX_CONCURRENT`, each with one request at a time.
const CONCURRENCY_CLIENTS: usize = 6;
const TOKENS_PER_MINUTE: u64 = 3_000;
/// Reached within the first seconds of load, before any fault.
const QUOTA: u64 = 2_000;

/// The fault schedule: a steady start, then each fault with a gap after it.
const WARMUP: Duration = Duration::from_secs(5);
const GAP: Duration = Duration::from_secs(4);
const REPLICA_DOWN: Duration = Duration::from_secs(1);
const REDIS_DOWN: Duration = Duration::from_secs(10);
const POSTGRES_DOWN: Duration = Duration::from_secs(20);
const LINK_DOWN: Duration = Duration::from_secs(10);
const COOLDOWN: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    FailOpen,
    FailClosed,
}

impl Policy {
    fn setting(self) -> &'static str {
        match self {
            Policy::FailOpen => "fail_open",
            Policy::FailClosed => "fail_closed",
        }
    }

    /// Full bursts a GCRA limit may hand out over the run beyond its rate.
    /// One at the start. One after the Redis restart: the restarted Redis
    /// has lost the bucket (and under fail_open a bucket Redis kept would
    /// have refilled during an outage that Redis never saw). Under
    /// fail_open one more: the fallback starts every node's own bucket
    /// full (each with burst / replicas), and a third of one for the cut
    /// link, when one node falls back again on its own bucket, refilled
    /// since the Redis outage.
    fn bursts_allowed(self) -> f64 {
        match self {
            Policy::FailOpen => 3.0 + 1.0 / REPLICAS as f64,
            Policy::FailClosed => 2.0,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_their_own_hosts_keep_every_invariant_through_faults_fail_open() {
    run_topology(Policy::FailOpen).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_their_own_hosts_keep_every_invariant_through_faults_fail_closed() {
    run_topology(Policy::FailClosed).await;
}

async fn run_topology(policy: Policy) {
    let hosts = [("db", 2), ("r1", 11), ("r2", 12), ("r3", 13)];
    let network = match Network::create(&hosts) {
        Ok(network) => network,
        Err(reason) => {
            eprintln!(
                "SKIPPED topology test: network namespaces are not available here ({reason}); run as root to test the production topology"
            );
            return;
        }
    };
    eprintln!(
        "[{}] topology {} on {}",
        network.id,
        policy.setting(),
        network.subnet
    );
    let started = Instant::now();
    // Everything the scenario made lives in it: a timeout drops it, and
    // the guards remove what they made.
    tokio::time::timeout(TEST_BUDGET, scenario(network, policy))
        .await
        .unwrap_or_else(|_| panic!("the topology test ran past {TEST_BUDGET:?}"));
    eprintln!(
        "[{}] done in {:.1} s",
        policy.setting(),
        started.elapsed().as_secs_f64()
    );
}

/// The four tenants, each with one kind of limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Role {
    Rate,
    Concurrency,
    TokensPerMinute,
    Quota,
}

impl Role {
    const ALL: [Role; 4] = [
        Role::Rate,
        Role::Concurrency,
        Role::TokensPerMinute,
        Role::Quota,
    ];

    fn slug(self) -> &'static str {
        match self {
            Role::Rate => "topo-rate",
            Role::Concurrency => "topo-concurrency",
            Role::TokensPerMinute => "topo-tpm",
            Role::Quota => "topo-quota",
        }
    }

    fn limits(self) -> TenantLimits {
        let mut limits = TenantLimits::default();
        match self {
            Role::Rate => {
                limits.requests_per_second = Some(RATE);
                limits.burst = Some(BURST);
            }
            Role::Concurrency => limits.max_concurrent_requests = Some(MAX_CONCURRENT),
            Role::TokensPerMinute => limits.tokens_per_minute = Some(TOKENS_PER_MINUTE),
            Role::Quota => limits.monthly_token_quota = Some(QUOTA),
        }
        limits
    }

    fn clients(self) -> usize {
        match self {
            // Demand well above the rate, with the pause after a refusal.
            Role::Rate => 4,
            Role::Concurrency => CONCURRENCY_CLIENTS,
            Role::TokensPerMinute | Role::Quota => 2,
        }
    }

    /// Concurrency clients stay on one replica each (two per replica):
    /// under fail_open each node allows max_concurrent / replicas on its
    /// own, so "never refused" holds only if no node ever has more than
    /// its share in flight. The others go round-robin, request by request.
    fn pinned(self) -> bool {
        self == Role::Concurrency
    }

    fn pause_after_success(self) -> Duration {
        match self {
            Role::Rate | Role::TokensPerMinute => Duration::ZERO,
            Role::Concurrency => Duration::from_millis(20),
            Role::Quota => Duration::from_millis(10),
        }
    }

    fn pause_after_refusal(self) -> Duration {
        match self {
            Role::Rate => Duration::from_millis(25),
            Role::Concurrency | Role::TokensPerMinute => Duration::from_millis(50),
            Role::Quota => Duration::from_millis(100),
        }
    }
}

struct Tenant {
    role: Role,
    id: String,
    key: String,
}

/// What a client saw of one request.
#[derive(Debug, Clone)]
enum Answer {
    Ok {
        prompt: u32,
        completion: u32,
    },
    Refused {
        code: Code,
        limit: Option<String>,
        message: String,
    },
    /// No answer within the client's own deadline (a cut link).
    TimedOut,
}

#[derive(Debug, Clone)]
struct Outcome {
    role: Role,
    request_id: String,
    /// Since the load started.
    sent: Duration,
    /// Until the answer (or the client's own deadline).
    took: Duration,
    answer: Answer,
}

/// One fault, in time since the load started.
struct Fault {
    name: &'static str,
    from: Duration,
    to: Duration,
}

/// How each replica process is started; the same for a restart.
struct Launch {
    config: PathBuf,
    database_url: String,
    redis_url: String,
    policy: Policy,
}

struct Replica {
    // First: the process goes before its data directory.
    process: Option<GatewayOnHost>,
    name: &'static str,
    netns: String,
    ip: Ipv4Addr,
    /// Kept across a restart: the spool of a killed process is replayed.
    data_dir: TempDir,
    /// Logs of processes of this replica that have ended.
    logs: String,
}

impl Replica {
    fn command(&self, launch: &Launch) -> std::process::Command {
        let mut command = in_netns(&self.netns, env!("CARGO_BIN_EXE_ascend-gateway"));
        command
            .args(["serve", "--listen", &format!("{}:{GRPC_PORT}", self.ip)])
            .arg("--config")
            .arg(&launch.config);
        for (var, _) in ascend_gateway::config::ENV_VARS {
            command.env_remove(var);
        }
        command
            .env_remove("RUST_LOG")
            .env_remove("ASCEND_CONFIG")
            .env("ASCEND_ADMIN_TOKEN", ADMIN_TOKEN)
            .env(
                "ASCEND_METRICS_LISTEN",
                format!("{}:{METRICS_PORT}", self.ip),
            )
            .env("ASCEND_HTTP_LISTEN", format!("{}:0", self.ip))
            .env("ASCEND_DATA_DIR", self.data_dir.path())
            .env("ASCEND_DATABASE_URL", &launch.database_url)
            .env("ASCEND_REDIS_URL", &launch.redis_url)
            .env("ASCEND_LIMITS_REPLICAS", REPLICAS.to_string())
            .env("ASCEND_LIMITS_REDIS_FAILURE", launch.policy.setting());
        command
    }

    async fn start(&mut self, launch: &Launch) {
        let command = self.command(launch);
        let process = tokio::task::spawn_blocking(move || GatewayOnHost::spawn(command))
            .await
            .expect("gateway start");
        assert_eq!(
            process.addr,
            format!("{}:{GRPC_PORT}", self.ip),
            "replica {} listens on its host's address",
            self.name
        );
        self.process = Some(process);
    }

    fn kill9(&mut self) {
        let process = self.process.take().expect("a running replica");
        let log = tokio::task::block_in_place(|| process.kill9());
        self.logs.push_str(&log);
    }

    /// SIGTERM and wait; the exit status.
    async fn stop(&mut self) -> std::process::ExitStatus {
        let process = self.process.take().expect("a running replica");
        let (status, log) = process.terminate().await;
        self.logs.push_str(&log);
        status
    }
}

/// Everything running on the hosts. Fields drop in order: gateways, Redis,
/// PostgreSQL, files, then the network under them.
struct Deployment {
    replicas: Vec<Replica>,
    redis: PrivateRedis,
    postgres: PrivatePostgres,
    launch: Launch,
    _config_dir: TempDir,
    network: Network,
}

/// A port of the test's own for a server in its namespace.
fn port_from(seed: u128, base: u16) -> u16 {
    base + u16::try_from(seed % 10_000).expect("below 10000")
}

fn write_config(dir: &std::path::Path) -> PathBuf {
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[limits]\nlease_ttl = \"{}s\"\n\n[auth]\ncache_ttl = \"1s\"\n\n\
             [metering]\nship_interval = \"100ms\"\n\n\
             [[models]]\nid = \"echo\"\ndir = {:?}\nengine = \"echo\"\nworkers = 2\n\
             max_queue_requests = 100000\n",
            LEASE_TTL.as_secs(),
            tiny_model_dir()
        ),
    )
    .expect("config");
    config
}

async fn deploy(network: Network, policy: Policy) -> Deployment {
    let seed = uuid::Uuid::new_v4().as_u128();
    let (postgres, redis) = tokio::task::block_in_place(|| {
        let db = network.host("db");
        (
            PrivatePostgres::start(db, port_from(seed, 20_000)),
            PrivateRedis::start(db, port_from(seed >> 16, 30_000)),
        )
    });
    let config_dir = tempfile::Builder::new()
        .prefix("agw-topology-config")
        .tempdir()
        .expect("temp dir");
    let launch = Launch {
        config: write_config(config_dir.path()),
        database_url: postgres.url(),
        redis_url: redis.url(),
        policy,
    };
    let mut replicas = Vec::new();
    for name in ["r1", "r2", "r3"] {
        let host = network.host(name);
        replicas.push(Replica {
            process: None,
            name,
            netns: host.netns.clone(),
            ip: host.ip,
            data_dir: tempfile::Builder::new()
                .prefix("agw-topology-replica")
                .tempdir()
                .expect("temp dir"),
            logs: String::new(),
        });
    }
    let mut deployment = Deployment {
        replicas,
        redis,
        postgres,
        launch,
        _config_dir: config_dir,
        network,
    };
    // One at a time: the first migrates the fresh database.
    for replica in &mut deployment.replicas {
        replica.start(&deployment.launch).await;
    }
    deployment
}

/// A lazily connecting channel to a replica that gives up on a dead or cut
/// peer within seconds and reconnects when it is back.
fn channel_to(ip: Ipv4Addr) -> Channel {
    Endpoint::from_shared(format!("http://{ip}:{GRPC_PORT}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(1))
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .connect_lazy()
}

async fn scenario(network: Network, policy: Policy) {
    let tag = policy.setting();
    let mut deployment = deploy(network, policy).await;
    let channels: Arc<Vec<Channel>> = Arc::new(
        deployment
            .replicas
            .iter()
            .map(|replica| channel_to(replica.ip))
            .collect(),
    );
    let mut tenants = Vec::new();
    for role in Role::ALL {
        let (id, key) = tenant_with_limits(&channels[0], role.slug(), role.limits()).await;
        tenants.push(Tenant { role, id, key });
    }

    let load_started = Instant::now();
    let load_started_us = ascend_gateway::store::now_us();
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for tenant in &tenants {
        for client in 0..tenant.role.clients() {
            clients.push(tokio::spawn(run_client(
                tenant.role,
                client,
                tenant.key.clone(),
                channels.clone(),
                load_started,
                stop.clone(),
            )));
        }
    }
    let faults = inject_faults(&mut deployment, load_started).await;
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for client in clients {
        outcomes.extend(client.await.expect("client task"));
    }
    let load_secs = load_started.elapsed().as_secs_f64();
    eprintln!(
        "[{tag}] load: {} requests in {load_secs:.1} s",
        outcomes.len()
    );
    report_by_fault(tag, &outcomes, &faults);

    let mut violations = Vec::new();
    let mut redis = redis_connection(&deployment.redis.url()).await;
    // While the replicas still run (and renew what they hold), a lease
    // lifetime after the load: a lease still live now was leaked into a
    // replica's renewal set.
    tokio::time::sleep(LEASE_TTL + Duration::from_millis(1500)).await;
    let live = live_leases(&mut redis).await;
    eprintln!("[{tag}] live leases a lease lifetime after the load: {live:?}");
    if live.values().any(|n| *n > 0) {
        violations.push(format!(
            "live leases a lease lifetime after the load, replicas running: {live:?}"
        ));
    }

    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&deployment.postgres.url())
        .await
        .expect("the private PostgreSQL");
    let answered: Vec<String> = outcomes
        .iter()
        .filter(|o| matches!(o.answer, Answer::Ok { .. }))
        .map(|o| o.request_id.clone())
        .collect();
    wait_for_usage(&pool, Some(&answered), Duration::from_secs(40)).await;
    for replica in &mut deployment.replicas {
        let status = replica.stop().await;
        if !status.success() {
            violations.push(format!(
                "replica {} did not stop cleanly on SIGTERM: {status}",
                replica.name
            ));
        }
    }
    let stopped = Instant::now();
    wait_for_usage(&pool, None, Duration::from_secs(20)).await;

    let tenant_ids: HashMap<String, Role> =
        tenants.iter().map(|t| (t.id.clone(), t.role)).collect();
    let events = metered_events(&pool).await;
    check_exactly_once(&outcomes, &events, &tenant_ids, &mut violations);
    check_rollups(&pool, &mut violations).await;
    check_limits(
        policy,
        &outcomes,
        &events,
        &tenant_ids,
        load_secs,
        load_started_us,
        &faults,
        &mut violations,
    );
    pool.close().await;

    // Every replica is gone: what they held was released or has expired.
    tokio::time::sleep((LEASE_TTL + Duration::from_millis(1500)).saturating_sub(stopped.elapsed()))
        .await;
    let left = all_leases(&mut redis).await;
    if left.values().any(|n| *n > 0) {
        violations.push(format!(
            "leases left in Redis a lease lifetime after every replica stopped: {left:?}"
        ));
    }
    eprintln!("[{tag}] lease keys after the stop: {left:?}");
    report_warnings(tag, &deployment);
    assert!(
        violations.is_empty(),
        "[{tag}] {} invariant(s) broken:\n- {}",
        violations.len(),
        violations.join("\n- ")
    );
}

/// One client: requests back to back until `stop`, each with an id of its
/// own, noting what it saw; errors are expected and only slow it a little.
async fn run_client(
    role: Role,
    client: usize,
    key: String,
    channels: Arc<Vec<Channel>>,
    load_started: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    for n in 0.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let replica = if role.pinned() {
            client % REPLICAS
        } else {
            (client + n) % REPLICAS
        };
        let request_id = format!("{}-{client}-{n}", role.slug());
        let mut request = authed(
            GenerateRequest {
                model: "echo".to_owned(),
                prompt: format!("{} client {client} request {n}", role.slug()),
                max_tokens: Some(8),
                ignore_eos: true,
                request_id: request_id.clone(),
                ..Default::default()
            },
            &key,
        );
        request.set_timeout(REQUEST_DEADLINE);
        let mut inference = InferenceClient::new(channels[replica].clone());
        let sent = load_started.elapsed();
        // The client's own deadline too: a cut link never answers at all.
        let answer = match tokio::time::timeout(
            REQUEST_DEADLINE + Duration::from_millis(500),
            inference.generate(request),
        )
        .await
        {
            Ok(Ok(response)) => {
                let usage = response.into_inner().usage.expect("a response has usage");
                Answer::Ok {
                    prompt: usage.prompt_tokens,
                    completion: usage.completion_tokens,
                }
            }
            Ok(Err(status)) => Answer::Refused {
                code: status.code(),
                limit: status
                    .get_details_quota_failure()
                    .and_then(|quota| quota.violations.first().map(|v| v.subject.clone())),
                message: status.message().to_owned(),
            },
            Err(_) => Answer::TimedOut,
        };
        let pause = match &answer {
            Answer::Ok { .. } => role.pause_after_success(),
            Answer::Refused {
                code: Code::ResourceExhausted,
                ..
            } => role.pause_after_refusal(),
            // A replica down or unreachable: do not spin on it.
            _ => Duration::from_millis(50),
        };
        outcomes.push(Outcome {
            role,
            request_id,
            sent,
            took: load_started.elapsed() - sent,
            answer,
        });
        tokio::time::sleep(pause).await;
    }
    outcomes
}

/// The faults, one after another with gaps; what happened when.
async fn inject_faults(deployment: &mut Deployment, load_started: Instant) -> Vec<Fault> {
    let mut faults = Vec::new();
    let tag = deployment.launch.policy.setting();
    let mut note = |name: &'static str, from: Duration| {
        let to = load_started.elapsed();
        eprintln!(
            "[{tag}] fault {name}: {:.1} s .. {:.1} s",
            from.as_secs_f64(),
            to.as_secs_f64()
        );
        faults.push(Fault { name, from, to });
    };
    tokio::time::sleep(WARMUP).await;

    let from = load_started.elapsed();
    deployment.replicas[1].kill9();
    tokio::time::sleep(REPLICA_DOWN).await;
    deployment.replicas[1].start(&deployment.launch).await;
    note("kill -9 r2, restart", from);
    tokio::time::sleep(GAP).await;

    let from = load_started.elapsed();
    deployment.redis.kill();
    tokio::time::sleep(REDIS_DOWN).await;
    tokio::task::block_in_place(|| deployment.redis.start_again());
    note("Redis down", from);
    tokio::time::sleep(GAP).await;

    let from = load_started.elapsed();
    tokio::task::block_in_place(|| deployment.postgres.stop_immediately());
    tokio::time::sleep(POSTGRES_DOWN).await;
    tokio::task::block_in_place(|| deployment.postgres.start_again());
    note("PostgreSQL down", from);
    tokio::time::sleep(GAP).await;

    let from = load_started.elapsed();
    let cut = deployment.network.host("r3");
    tokio::task::block_in_place(|| cut.set_link(false));
    tokio::time::sleep(LINK_DOWN).await;
    tokio::task::block_in_place(|| cut.set_link(true));
    note("r3 link cut", from);
    tokio::time::sleep(COOLDOWN).await;
    faults
}

/// Counts answers by kind, and their latencies, in each fault's window
/// and outside them.
fn report_by_fault(tag: &str, outcomes: &[Outcome], faults: &[Fault]) {
    let mut windows: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut latencies: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    for outcome in outcomes {
        let window = faults
            .iter()
            .find(|f| outcome.sent >= f.from && outcome.sent < f.to)
            .map_or("no fault", |f| f.name);
        latencies
            .entry(window.to_owned())
            .or_default()
            .push(outcome.took);
        let kind = match &outcome.answer {
            Answer::Ok { .. } => "ok".to_owned(),
            Answer::Refused { code, limit, .. } => match limit {
                Some(limit) => format!("{code:?}({limit})"),
                None => format!("{code:?}"),
            },
            Answer::TimedOut => "no answer".to_owned(),
        };
        *windows
            .entry(window.to_owned())
            .or_default()
            .entry(kind)
            .or_default() += 1;
    }
    let mut samples: BTreeMap<String, &str> = BTreeMap::new();
    for outcome in outcomes {
        if let Answer::Refused {
            code,
            limit: None,
            message,
        } = &outcome.answer
        {
            samples.entry(format!("{code:?}")).or_insert(message);
        }
    }
    eprintln!("[{tag}] a message of each error code: {samples:?}");
    for (window, kinds) in windows {
        let mut took = latencies.remove(&window).unwrap_or_default();
        took.sort_unstable();
        let at = |q: f64| {
            let index = ((took.len() as f64 - 1.0) * q).round() as usize;
            took.get(index).map_or(0, |d| d.as_millis())
        };
        eprintln!(
            "[{tag}]   {window}: {kinds:?}; latency ms p50 {} p90 {} max {}",
            at(0.5),
            at(0.9),
            at(1.0)
        );
    }
}

async fn redis_connection(url: &str) -> redis::aio::ConnectionManager {
    let client = redis::Client::open(url).expect("redis url");
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    redis::aio::ConnectionManager::new_with_config(client, config)
        .await
        .expect("the private Redis")
}

async fn lease_keys(redis: &mut redis::aio::ConnectionManager) -> Vec<String> {
    redis::cmd("KEYS")
        .arg(format!("{REDIS_PREFIX}*leases"))
        .query_async(redis)
        .await
        .expect("KEYS")
}

/// Each lease key with its lease count (expired ones included).
async fn all_leases(redis: &mut redis::aio::ConnectionManager) -> BTreeMap<String, u64> {
    let mut leases = BTreeMap::new();
    for key in lease_keys(redis).await {
        let held: u64 = redis::cmd("ZCARD")
            .arg(&key)
            .query_async(redis)
            .await
            .expect("ZCARD");
        leases.insert(key, held);
    }
    leases
}

/// Each lease key with its leases not yet expired by Redis's clock.
async fn live_leases(redis: &mut redis::aio::ConnectionManager) -> BTreeMap<String, u64> {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(redis).await.expect("TIME");
    let now_us = secs * 1_000_000 + micros;
    let mut leases = BTreeMap::new();
    for key in lease_keys(redis).await {
        let live: u64 = redis::cmd("ZCOUNT")
            .arg(&key)
            .arg(format!("({now_us}"))
            .arg("+inf")
            .query_async(redis)
            .await
            .expect("ZCOUNT");
        leases.insert(key, live);
    }
    leases
}

async fn usage_event_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM usage_events")
        .fetch_one(pool)
        .await
        .unwrap_or(-1)
}

/// Waits until the writers have shipped: every id in `expected` (if given)
/// is in `usage_events` and the count has not moved for a second, or
/// `within` has passed (the checks then say what is missing).
async fn wait_for_usage(pool: &PgPool, expected: Option<&[String]>, within: Duration) {
    let deadline = Instant::now() + within;
    let (mut last, mut steady_since) = (-1, Instant::now());
    loop {
        let count = usage_event_count(pool).await;
        if count != last {
            (last, steady_since) = (count, Instant::now());
        }
        let all_there = match expected {
            None => true,
            Some(ids) => {
                // An attempt decided while the database was down is
                // metered as "<id> #<attempt>".
                let found: i64 = sqlx::query_scalar(
                    "SELECT COUNT(DISTINCT split_part(request_id, ' #', 1)) FROM usage_events \
                     WHERE split_part(request_id, ' #', 1) = ANY($1)",
                )
                .bind(ids)
                .fetch_one(pool)
                .await
                .unwrap_or(-1);
                found == ids.len() as i64
            }
        };
        if (all_there && steady_since.elapsed() >= Duration::from_secs(1))
            || Instant::now() > deadline
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[derive(Debug, sqlx::FromRow)]
struct Metered {
    tenant_id: String,
    request_id: String,
    prompt_tokens: i64,
    completion_tokens: i64,
    started_at_us: i64,
    finished_at_us: i64,
}

impl Metered {
    fn tokens(&self) -> i64 {
        self.prompt_tokens + self.completion_tokens
    }

    /// The client's id: an attempt decided while the database was down is
    /// metered as `"<id> #<attempt>"`.
    fn client_request_id(&self) -> &str {
        self.request_id
            .split_once(" #")
            .map_or(self.request_id.as_str(), |(id, _)| id)
    }
}

async fn metered_events(pool: &PgPool) -> Vec<Metered> {
    sqlx::query_as(
        "SELECT tenant_id, request_id, prompt_tokens, completion_tokens, started_at_us, \
         finished_at_us FROM usage_events",
    )
    .fetch_all(pool)
    .await
    .expect("usage events")
}

/// Every answered request is metered once with the tokens its client saw;
/// no request, answered or not, is metered twice.
fn check_exactly_once(
    outcomes: &[Outcome],
    events: &[Metered],
    tenant_ids: &HashMap<String, Role>,
    violations: &mut Vec<String>,
) {
    let mut by_request: HashMap<&str, Vec<&Metered>> = HashMap::new();
    let mut stored_keys: HashMap<(&str, &str), usize> = HashMap::new();
    for event in events {
        by_request
            .entry(event.client_request_id())
            .or_default()
            .push(event);
        *stored_keys
            .entry((event.tenant_id.as_str(), event.request_id.as_str()))
            .or_default() += 1;
        if !tenant_ids.contains_key(&event.tenant_id) {
            violations.push(format!("an event of an unknown tenant: {event:?}"));
        }
    }
    let twice: Vec<_> = stored_keys.iter().filter(|(_, n)| **n > 1).collect();
    if !twice.is_empty() {
        violations.push(format!(
            "(tenant_id, request_id) stored more than once: {twice:?}"
        ));
    }
    let executed_twice: Vec<_> = by_request
        .iter()
        .filter(|(_, events)| events.len() > 1)
        .map(|(id, events)| (id, events.iter().map(|e| &e.request_id).collect::<Vec<_>>()))
        .collect();
    if !executed_twice.is_empty() {
        violations.push(format!(
            "{} client requests metered more than once (each id was sent once): {:?}",
            executed_twice.len(),
            &executed_twice[..executed_twice.len().min(10)]
        ));
    }
    let sent: HashMap<&str, &Outcome> = outcomes
        .iter()
        .map(|o| (o.request_id.as_str(), o))
        .collect();
    let strangers: Vec<&&str> = by_request
        .keys()
        .filter(|id| !sent.contains_key(**id))
        .collect();
    if !strangers.is_empty() {
        violations.push(format!(
            "events for requests no client sent: {:?}",
            &strangers[..strangers.len().min(10)]
        ));
    }
    let (mut missing, mut wrong_tokens) = (Vec::new(), Vec::new());
    let (mut client_tokens, mut metered_tokens) = (0i64, 0i64);
    for outcome in outcomes {
        let Answer::Ok { prompt, completion } = outcome.answer else {
            continue;
        };
        client_tokens += i64::from(prompt) + i64::from(completion);
        match by_request.get(outcome.request_id.as_str()) {
            None => missing.push(outcome.request_id.as_str()),
            Some(events) => {
                let event = events[0];
                metered_tokens += event.tokens();
                if (event.prompt_tokens, event.completion_tokens)
                    != (i64::from(prompt), i64::from(completion))
                {
                    wrong_tokens.push((
                        outcome.request_id.as_str(),
                        (prompt, completion),
                        (event.prompt_tokens, event.completion_tokens),
                    ));
                }
            }
        }
    }
    if !missing.is_empty() {
        violations.push(format!(
            "{} answered requests not metered: {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        ));
    }
    if !wrong_tokens.is_empty() {
        violations.push(format!(
            "{} answered requests metered with other tokens than the client saw (id, client, metered): {:?}",
            wrong_tokens.len(),
            &wrong_tokens[..wrong_tokens.len().min(10)]
        ));
    }
    if client_tokens != metered_tokens {
        violations.push(format!(
            "tokens of answered requests: clients saw {client_tokens}, metered {metered_tokens}"
        ));
    }
    let answered = outcomes
        .iter()
        .filter(|o| matches!(o.answer, Answer::Ok { .. }))
        .count();
    eprintln!(
        "metering: {} events, {answered} answered requests ({client_tokens} tokens) all metered once: {}",
        events.len(),
        missing.is_empty() && wrong_tokens.is_empty() && executed_twice.is_empty()
    );
}

/// The hourly rollups equal the sums of the events, per tenant.
async fn check_rollups(pool: &PgPool, violations: &mut Vec<String>) {
    let events: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT tenant_id, COUNT(*), CAST(SUM(prompt_tokens) AS BIGINT), \
         CAST(SUM(completion_tokens) AS BIGINT) FROM usage_events GROUP BY tenant_id \
         ORDER BY tenant_id",
    )
    .fetch_all(pool)
    .await
    .expect("event sums");
    let rollups: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT tenant_id, CAST(SUM(requests) AS BIGINT), CAST(SUM(prompt_tokens) AS BIGINT), \
         CAST(SUM(completion_tokens) AS BIGINT) FROM usage_hourly GROUP BY tenant_id \
         ORDER BY tenant_id",
    )
    .fetch_all(pool)
    .await
    .expect("rollup sums");
    if events != rollups {
        violations.push(format!(
            "usage_hourly differs from usage_events (tenant, requests, prompt, completion): events {events:?}, rollups {rollups:?}"
        ));
    }
}

/// The most requests running at once, from their metered intervals.
fn max_overlap(events: &[&Metered]) -> usize {
    let mut edges: Vec<(i64, i32)> = events
        .iter()
        .flat_map(|e| [(e.started_at_us, 1), (e.finished_at_us, -1)])
        .collect();
    // At the same instant an end comes before a start.
    edges.sort_unstable();
    let (mut running, mut most) = (0i32, 0i32);
    for (_, step) in edges {
        running += step;
        most = most.max(running);
    }
    usize::try_from(most).unwrap_or(0)
}

/// No tenant got more than its limit allows, whatever failed meanwhile.
#[allow(clippy::too_many_arguments)]
fn check_limits(
    policy: Policy,
    outcomes: &[Outcome],
    events: &[Metered],
    tenant_ids: &HashMap<String, Role>,
    load_secs: f64,
    load_started_us: i64,
    faults: &[Fault],
    violations: &mut Vec<String>,
) {
    let tag = policy.setting();
    let events_of = |role: Role| -> Vec<&Metered> {
        events
            .iter()
            .filter(|e| tenant_ids.get(&e.tenant_id) == Some(&role))
            .collect()
    };
    let outcomes_of = |role: Role| outcomes.iter().filter(move |o| o.role == role);
    let refusals_of = |role: Role, limit: &str| {
        outcomes_of(role)
            .filter(|o| {
                matches!(&o.answer, Answer::Refused { code: Code::ResourceExhausted, limit: Some(l), .. } if l == limit)
            })
            .count()
    };
    for role in Role::ALL {
        let answered = outcomes_of(role)
            .filter(|o| matches!(o.answer, Answer::Ok { .. }))
            .count();
        let metered = events_of(role);
        eprintln!(
            "[{tag}] {:?}: {} sent, {answered} answered, {} metered ({} tokens)",
            role,
            outcomes_of(role).count(),
            metered.len(),
            metered.iter().map(|e| e.tokens()).sum::<i64>()
        );
        if answered == 0 {
            violations.push(format!("{role:?}: no request was answered at all"));
        }
    }

    // Requests per second: admissions, whether counted by the clients'
    // answers or by the metered events (which include requests whose
    // answer was lost), within rate x elapsed + the bursts the policy
    // allows, + 1%.
    let allowed = (RATE * load_secs + policy.bursts_allowed() * f64::from(BURST)) * 1.01;
    let rate_answered = outcomes_of(Role::Rate)
        .filter(|o| matches!(o.answer, Answer::Ok { .. }))
        .count() as f64;
    let rate_metered = events_of(Role::Rate).len() as f64;
    eprintln!(
        "[{tag}] rate: answered {rate_answered}, metered {rate_metered}, allowed {allowed:.0} \
         ({RATE}/s x {load_secs:.1} s + {} x burst {BURST}, +1%); {} refusals",
        policy.bursts_allowed(),
        refusals_of(Role::Rate, "requests_per_second")
    );
    if rate_answered.max(rate_metered) > allowed {
        violations.push(format!(
            "requests_per_second: {rate_answered} answered / {rate_metered} metered > {allowed:.0} allowed"
        ));
    }
    // The same in every 10 s of the run, which the outages cannot dilute:
    // one replica that did not share the limit would double it here.
    let (busiest_from, busiest) = most_answered_within(outcomes_of(Role::Rate), RATE_WINDOW);
    let window_allowed =
        (RATE * RATE_WINDOW.as_secs_f64() + policy.bursts_allowed() * f64::from(BURST)) * 1.01;
    eprintln!(
        "[{tag}] rate: at most {busiest} answered within {RATE_WINDOW:?} (from {busiest_from:.1} s), allowed {window_allowed:.0}"
    );
    if busiest as f64 > window_allowed {
        violations.push(format!(
            "requests_per_second: {busiest} answered within {RATE_WINDOW:?} from {busiest_from:.1} s > {window_allowed:.0} allowed"
        ));
    }
    if refusals_of(Role::Rate, "requests_per_second") == 0 {
        violations.push("the rate tenant's demand never exceeded its rate".to_owned());
    }

    // Concurrency: never more than the cap at once, and never refused:
    // its clients are fewer than the cap.
    let overlap = max_overlap(&events_of(Role::Concurrency));
    let refused = refusals_of(Role::Concurrency, "max_concurrent_requests");
    eprintln!(
        "[{tag}] concurrency: at most {overlap} at once (cap {MAX_CONCURRENT}, {CONCURRENCY_CLIENTS} clients), {refused} refused"
    );
    if overlap > MAX_CONCURRENT as usize {
        violations.push(format!(
            "max_concurrent_requests: {overlap} requests ran at once > {MAX_CONCURRENT}"
        ));
    }
    if refused > 0 {
        let when: Vec<f64> = outcomes_of(Role::Concurrency)
            .filter(|o| matches!(&o.answer, Answer::Refused { limit: Some(l), .. } if l == "max_concurrent_requests"))
            .map(|o| (o.sent.as_secs_f64() * 10.0).round() / 10.0)
            .collect();
        violations.push(format!(
            "max_concurrent_requests: {refused} refusals with {CONCURRENCY_CLIENTS} clients under a cap of {MAX_CONCURRENT}, at {:?} s",
            &when[..when.len().min(20)]
        ));
    }

    // Tokens per minute: metered tokens within the refill over the run
    // plus the full buckets the policy allows (as for the rate).
    let tpm_metered: i64 = events_of(Role::TokensPerMinute)
        .iter()
        .map(|e| e.tokens())
        .sum();
    let tpm_allowed = (TOKENS_PER_MINUTE as f64 * load_secs / 60.0
        + policy.bursts_allowed() * TOKENS_PER_MINUTE as f64)
        * 1.01;
    eprintln!(
        "[{tag}] tokens per minute: metered {tpm_metered}, allowed {tpm_allowed:.0}; {} refusals",
        refusals_of(Role::TokensPerMinute, "tokens_per_minute")
    );
    if tpm_metered as f64 > tpm_allowed {
        violations.push(format!(
            "tokens_per_minute: {tpm_metered} tokens metered > {tpm_allowed:.0} allowed"
        ));
    }

    // Monthly quota: a hard cap.
    let quota_events = events_of(Role::Quota);
    let quota_metered: i64 = quota_events.iter().map(|e| e.tokens()).sum();
    let first_refusal = outcomes_of(Role::Quota)
        .filter(|o| matches!(&o.answer, Answer::Refused { limit: Some(l), .. } if l == "monthly_token_quota"))
        .map(|o| o.sent.as_secs_f64())
        .reduce(f64::min);
    let by_window = tokens_by_window(&quota_events, load_started_us, faults);
    eprintln!(
        "[{tag}] quota: metered {quota_metered} of {QUOTA}; first refused at {first_refusal:?} s; metered by when it finished: {by_window:?}"
    );
    // A hard cap, except for what a Redis that lost its counters cannot
    // know when it is seeded again from the metered usage (README, Limits):
    // the requests in flight at that moment, one per quota client here.
    let largest_request = quota_events.iter().map(|e| e.tokens()).max().unwrap_or(0);
    let quota_bound = QUOTA as i64 + Role::Quota.clients() as i64 * largest_request;
    if quota_metered > quota_bound {
        violations.push(format!(
            "monthly_token_quota: {quota_metered} tokens metered > quota {QUOTA} + in-flight {}; by when they finished: {by_window:?}",
            quota_bound - QUOTA as i64
        ));
    }
    if first_refusal.is_none() {
        violations.push("the quota tenant never reached its quota".to_owned());
    }
}

/// The length of the windows the request rate is also checked in.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// The most answered requests admitted within any `window` of the run
/// (those sent and answered inside it, whose admission certainly was),
/// and where that window starts, in seconds.
fn most_answered_within<'a>(
    outcomes: impl Iterator<Item = &'a Outcome>,
    window: Duration,
) -> (f64, usize) {
    let spans: Vec<(Duration, Duration)> = outcomes
        .filter(|o| matches!(o.answer, Answer::Ok { .. }))
        .map(|o| (o.sent, o.sent + o.took))
        .collect();
    let last = spans.iter().map(|(_, end)| *end).max().unwrap_or_default();
    let step = Duration::from_millis(250);
    let mut busiest = (0.0, 0);
    let mut from = Duration::ZERO;
    while from + window <= last + step {
        let inside = spans
            .iter()
            .filter(|(sent, answered)| *sent >= from && *answered <= from + window)
            .count();
        if inside > busiest.1 {
            busiest = (from.as_secs_f64(), inside);
        }
        from += step;
    }
    busiest
}

/// Metered tokens by the fault window each event finished in.
fn tokens_by_window(
    events: &[&Metered],
    load_started_us: i64,
    faults: &[Fault],
) -> Vec<(String, i64)> {
    let us = |d: Duration| load_started_us + i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
    let mut bounds = vec![("before any fault".to_owned(), i64::MIN)];
    for fault in faults {
        bounds.push((format!("during {}", fault.name), us(fault.from)));
        bounds.push((format!("after {}", fault.name), us(fault.to)));
    }
    let mut sums: Vec<(String, i64)> = bounds.iter().map(|(name, _)| (name.clone(), 0)).collect();
    for event in events {
        let index = bounds
            .iter()
            .rposition(|(_, from)| event.finished_at_us >= *from)
            .unwrap_or(0);
        sums[index].1 += event.tokens();
    }
    sums.retain(|(_, tokens)| *tokens > 0);
    sums
}

/// The replicas' warnings and errors, counted and sampled, for the record.
fn report_warnings(tag: &str, deployment: &Deployment) {
    for replica in &deployment.replicas {
        let lines = warnings(&replica.logs);
        let mut by_message: BTreeMap<String, usize> = BTreeMap::new();
        let mut first_lines: BTreeMap<String, &str> = BTreeMap::new();
        for line in &lines {
            // The message without its timestamp and fields.
            let message = line
                .split_once(": ")
                .map_or(*line, |(_, rest)| rest)
                .split(['=', '{'])
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned();
            first_lines.entry(message.clone()).or_insert(line);
            *by_message.entry(message).or_default() += 1;
        }
        eprintln!(
            "[{tag}] {} logged {} warnings/errors: {by_message:?}",
            replica.name,
            lines.len()
        );
        for line in first_lines.values() {
            eprintln!("[{tag}]     {line}");
        }
    }
}
