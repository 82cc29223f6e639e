//! Gateways as separate processes (`ascend-gateway serve`, this very
//! binary) for benchmarks of the production topology, and the CPU time each
//! process of a run used, read from `/proc`, to show where the CPU goes.
//!
//! Knows how to start, address and stop a gateway process; nothing of the
//! load or the report.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::BenchError;

/// One `ascend-gateway serve` child process.
pub struct GatewayProcess {
    child: Child,
    pub endpoint: String,
    data_dir: PathBuf,
}

/// What a bench gateway process is started with.
pub struct ProcessSpec<'a> {
    /// `ascend-gateway`; `None`: this process's own binary.
    pub binary: Option<&'a Path>,
    pub config: &'a Path,
    pub admin_token: &'a str,
    pub database_url: Option<&'a str>,
    pub redis_url: Option<&'a str>,
    pub replicas: u32,
}

impl GatewayProcess {
    /// Starts one and waits (up to a minute) until it says where it listens.
    pub fn start(spec: &ProcessSpec<'_>) -> Result<GatewayProcess, BenchError> {
        let failed = |message: String| BenchError::Gateway(message);
        let exe = match spec.binary {
            Some(path) => path.to_owned(),
            None => std::env::current_exe().map_err(|e| failed(e.to_string()))?,
        };
        let data_dir = std::env::temp_dir().join(format!(
            "agw-bench-replica-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        ));
        let mut command = Command::new(exe);
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(spec.config)
            .env("ASCEND_ADMIN_TOKEN", spec.admin_token)
            .env("ASCEND_METRICS_LISTEN", "127.0.0.1:0")
            .env("ASCEND_HTTP_LISTEN", "127.0.0.1:0")
            .env("ASCEND_DATA_DIR", &data_dir)
            .env("ASCEND_LIMITS_REPLICAS", spec.replicas.to_string())
            .env("ASCEND_LOG", "warn,ascend_gateway::app=info")
            .env_remove("RUST_LOG")
            .env_remove("DATABASE_URL")
            .env_remove("REDIS_URL")
            .env_remove("ASCEND_DATABASE_URL")
            .env_remove("ASCEND_REDIS_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(url) = spec.database_url {
            command.env("ASCEND_DATABASE_URL", url);
        }
        if let Some(url) = spec.redis_url {
            command.env("ASCEND_REDIS_URL", url);
        }
        let mut child = command.spawn().map_err(|e| failed(e.to_string()))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| failed("no stderr".to_owned()))?;
        let (address, found) = std::sync::mpsc::channel();
        // Reads the log to its end, so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut last_lines = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("gateway listening")
                    && let Some(addr) = line.split("address=").nth(1)
                {
                    let _ = address.send(Ok(addr.trim().to_owned()));
                }
                last_lines.push(line);
                if last_lines.len() > 20 {
                    last_lines.remove(0);
                }
            }
            let _ = address.send(Err(last_lines.join("\n")));
        });
        match found.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(addr)) => Ok(GatewayProcess {
                child,
                endpoint: format!("http://{addr}"),
                data_dir,
            }),
            Ok(Err(log)) => {
                let _ = child.kill();
                Err(failed(format!("the gateway process exited:\n{log}")))
            }
            Err(_) => {
                let _ = child.kill();
                Err(failed(
                    "the gateway process never reported its address".to_owned(),
                ))
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM (a graceful drain), then waits; removes its data directory.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// CPU seconds (user + system) a process has used, from `/proc/PID/stat`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks_per_second())
}

/// `CLK_TCK`: 100 on every Linux this runs on, unless `getconf` says other.
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Every process whose command name is `name` (e.g. every PostgreSQL
/// backend), for their CPU time together.
pub fn pids_named(name: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == name)
        })
        .collect()
}

/// CPU seconds used so far by a group of processes (those still alive).
pub fn group_cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|pid| cpu_seconds(*pid)).sum()
}
