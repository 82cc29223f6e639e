//! Test hosts of a test's own: Linux network namespaces joined by a private
//! bridge in the root namespace, and the servers that run on them (a
//! private PostgreSQL, a private Redis, gateway processes). Every guard
//! here removes what it made when dropped, so a failing or panicking test
//! leaves no namespace, link, process or directory behind.
//!
//! Needs root (`ip netns add`); [`Network::create`] says so instead of
//! panicking where that is not permitted.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Runs a command to completion: its stdout, or an error naming the
/// command, its exit status and its stderr.
fn run(command: &mut Command) -> Result<String, String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{command:?}: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{command:?}: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn ip(args: &[&str]) -> Result<String, String> {
    run(Command::new("ip").args(args))
}

fn must_ip(args: &[&str]) -> String {
    ip(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Whether an `ip` failure means "this machine does not let us", as
/// opposed to a fault worth failing the test for.
fn is_not_permitted(error: &str) -> bool {
    [
        "Operation not permitted",
        "Permission denied",
        "No such file or directory",
    ]
    .iter()
    .any(|sign| error.contains(sign))
}

/// One namespace with one veth into the bridge.
pub struct Host {
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The root namespace's end of the veth pair.
    veth: String,
}

/// `program` run inside namespace `netns`. `ip netns exec` replaces itself
/// with the program (no fork), so the child's pid is the program's own and
/// signals reach it.
pub fn in_netns(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", netns]).arg(program);
    command
}

impl Host {
    /// Cuts (or restores) this host's only link, from the root namespace's
    /// side: the host keeps its address and its processes, and loses every
    /// peer.
    pub fn set_link(&self, up: bool) {
        must_ip(&["link", "set", &self.veth, if up { "up" } else { "down" }]);
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Deleting the namespace destroys its end of the pair, and with it
        // ours; deleting ours first covers a namespace that is already gone.
        let _ = ip(&["link", "del", &self.veth]);
        let _ = ip(&["netns", "del", &self.netns]);
    }
}

struct Bridge {
    name: String,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.name]);
    }
}

/// Namespaces on one bridge, with addresses in a /24 of 10.231.0.0/16 that
/// nothing else on the machine routes.
pub struct Network {
    // Dropped in this order: the hosts (with their veths), then the bridge.
    hosts: Vec<(String, Host)>,
    _bridge: Bridge,
    pub id: String,
    pub subnet: String,
}

/// Tests in this process choose subnets one at a time, so two of them never
/// take the same one.
static SUBNET_CHOICE: Mutex<()> = Mutex::new(());

impl Network {
    /// Namespaces `agw<id>-<role>` with addresses `10.231.<n>.<octet>`.
    /// `Err` says why this machine does not allow it (not root); any other
    /// failure panics.
    pub fn create(hosts: &[(&str, u8)]) -> Result<Network, String> {
        let uuid = uuid::Uuid::new_v4();
        let id = uuid.simple().to_string()[..6].to_owned();
        let mut made = Vec::new();
        for (role, octet) in hosts {
            let netns = format!("agw{id}-{role}");
            match ip(&["netns", "add", &netns]) {
                Ok(_) => {}
                Err(error) if made.is_empty() && is_not_permitted(&error) => return Err(error),
                Err(error) => panic!("{error}"),
            }
            made.push((
                (*role).to_owned(),
                Host {
                    netns,
                    ip: Ipv4Addr::UNSPECIFIED,
                    veth: format!("agw{id}{role}"),
                },
                *octet,
            ));
        }
        let bridge = Bridge {
            name: format!("agw{id}br"),
        };
        let mut hosts: Vec<(String, Host)> = Vec::new();
        let subnet = {
            let _choosing = SUBNET_CHOICE.lock().unwrap_or_else(|e| e.into_inner());
            let third = free_third_octet(uuid.as_bytes()[7]);
            must_ip(&["link", "add", &bridge.name, "type", "bridge"]);
            must_ip(&[
                "addr",
                "add",
                &format!("10.231.{third}.1/24"),
                "dev",
                &bridge.name,
            ]);
            third
        };
        must_ip(&["link", "set", &bridge.name, "up"]);
        for (role, mut host, octet) in made {
            host.ip = Ipv4Addr::new(10, 231, subnet, octet);
            let (veth, netns) = (host.veth.clone(), host.netns.clone());
            hosts.push((role, host));
            must_ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ]);
            must_ip(&["link", "set", &veth, "master", &bridge.name, "up"]);
            let address = format!("10.231.{subnet}.{octet}/24");
            must_ip(&["-n", &netns, "addr", "add", &address, "dev", "eth0"]);
            must_ip(&["-n", &netns, "link", "set", "eth0", "up"]);
            must_ip(&["-n", &netns, "link", "set", "lo", "up"]);
        }
        Ok(Network {
            hosts,
            _bridge: bridge,
            id,
            subnet: format!("10.231.{subnet}.0/24"),
        })
    }

    pub fn host(&self, role: &str) -> &Host {
        self.hosts
            .iter()
            .find(|(r, _)| r == role)
            .map(|(_, host)| host)
            .unwrap_or_else(|| panic!("no host {role}"))
    }
}

/// A third octet for 10.231.x.0/24 that no route or address on the machine
/// uses yet, starting the search at `seed`.
fn free_third_octet(seed: u8) -> u8 {
    let taken = format!(
        "{}\n{}",
        must_ip(&["-4", "route", "show", "table", "all"]),
        must_ip(&["-4", "-o", "addr", "show"])
    );
    (0..250u16)
        .map(|i| u8::try_from((u16::from(seed) + i) % 250 + 1).expect("1..=250"))
        .find(|n| !taken.contains(&format!("10.231.{n}.")))
        .expect("a free /24 in 10.231.0.0/16")
}

/// Waits until something accepts TCP connections at `addr`.
pub fn wait_until_listening(addr: SocketAddr, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} is not listening on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until process `pid` runs `comm` (its exec is done); a child still
/// named `ip` would mean `ip netns exec` forked, and a kill would miss the
/// server.
fn wait_until_exec(pid: u32, comm: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if now.trim() == comm {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pid {pid} runs {now:?}, not {comm}: `ip netns exec` did not exec"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn kill_and_reap(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// The installed PostgreSQL's server binaries: the newest version under
/// /usr/lib/postgresql (Debian's layout).
fn postgres_bin() -> String {
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .max()
        .expect("PostgreSQL server binaries under /usr/lib/postgresql/<version>/bin");
    format!("/usr/lib/postgresql/{newest}/bin")
}

/// A PostgreSQL server of the test's own in a namespace, run as `postgres`
/// (initdb refuses root), trusting every connection, without fsync.
pub struct PrivatePostgres {
    netns: String,
    ip: Ipv4Addr,
    pub port: u16,
    running: bool,
    // Last: removed after the server is stopped.
    dir: TempDir,
}

impl PrivatePostgres {
    pub fn start(host: &Host, port: u16) -> PrivatePostgres {
        let dir = tempfile::Builder::new()
            .prefix("agw-topology-pg")
            .tempdir()
            .expect("temp dir");
        run(Command::new("chown")
            .arg("postgres:postgres")
            .arg(dir.path()))
        .unwrap_or_else(|e| panic!("{e}"));
        let mut postgres = PrivatePostgres {
            netns: host.netns.clone(),
            ip: host.ip,
            port,
            running: false,
            dir,
        };
        let data = postgres.data_dir();
        run(postgres
            .as_postgres(format!("{}/initdb", postgres_bin()))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            .args(["-E", "UTF8", "--locale=C"]))
        .unwrap_or_else(|e| panic!("initdb: {e}"));
        // initdb trusts only local connections; the clients are the other
        // hosts of this network.
        let [a, b, c, _] = host.ip.octets();
        let mut hba = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("pg_hba.conf"))
            .expect("pg_hba.conf");
        std::io::Write::write_all(
            &mut hba,
            format!("host all all {a}.{b}.{c}.0/24 trust\n").as_bytes(),
        )
        .expect("write pg_hba.conf");
        postgres.start_again();
        postgres
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// `program` as user `postgres` inside the host's namespace.
    fn as_postgres(&self, program: String) -> Command {
        let mut command = in_netns(&self.netns, "runuser");
        command.args(["-u", "postgres", "--", &program]);
        command
    }

    fn pg_ctl(&self) -> Command {
        let mut command = self.as_postgres(format!("{}/pg_ctl", postgres_bin()));
        command.arg("-D").arg(self.data_dir());
        command
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@{}:{}/postgres", self.ip, self.port)
    }

    /// Starts the server (again) on the same data, address and port.
    pub fn start_again(&mut self) {
        let options = format!(
            "-c listen_addresses={} -p {} -c fsync=off -c unix_socket_directories={} -c max_connections=200",
            self.ip,
            self.port,
            self.dir.path().display()
        );
        // Set first: a start that fails half-way is still stopped on drop.
        self.running = true;
        let started = run(self
            .pg_ctl()
            .arg("-l")
            .arg(self.log_file())
            .args(["-w", "-t", "30", "-o", &options, "start"]));
        if let Err(error) = started {
            panic!("pg_ctl start: {error}\n{}", self.log_tail());
        }
        wait_until_listening(
            SocketAddr::from((self.ip, self.port)),
            Duration::from_secs(10),
            "PostgreSQL",
        );
    }

    /// `pg_ctl stop -m immediate`: the server dies without a checkpoint,
    /// as a crashed database host would.
    pub fn stop_immediately(&mut self) {
        run(self.pg_ctl().args(["-m", "immediate", "-w", "stop"]))
            .unwrap_or_else(|e| panic!("pg_ctl stop: {e}"));
        self.running = false;
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_file()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running {
            let _ = run(self.pg_ctl().args(["-m", "immediate", "-w", "stop"]));
        }
    }
}

/// A Redis server of the test's own in a namespace, without persistence:
/// a stop loses every key, as a crashed cache node does.
pub struct PrivateRedis {
    netns: String,
    ip: Ipv4Addr,
    pub port: u16,
    child: Option<Child>,
    dir: TempDir,
}

impl PrivateRedis {
    pub fn start(host: &Host, port: u16) -> PrivateRedis {
        let mut redis = PrivateRedis {
            netns: host.netns.clone(),
            ip: host.ip,
            port,
            child: None,
            dir: tempfile::Builder::new()
                .prefix("agw-topology-redis")
                .tempdir()
                .expect("temp dir"),
        };
        redis.start_again();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://{}:{}", self.ip, self.port)
    }

    /// Starts the server (again) on the same address and port.
    pub fn start_again(&mut self) {
        let child = in_netns(&self.netns, "redis-server")
            .args(["--bind", &self.ip.to_string()])
            .args(["--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ip netns exec redis-server");
        let pid = child.id();
        self.child = Some(child);
        wait_until_exec(pid, "redis-server");
        wait_until_listening(
            SocketAddr::from((self.ip, self.port)),
            Duration::from_secs(10),
            "Redis",
        );
    }

    /// SIGKILL: every key is lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A gateway process (`ascend-gateway serve`) in a namespace, its stderr
/// kept; the same shape as the harness's `GatewayProcess`.
pub struct GatewayOnHost {
    /// Taken when the process has been waited for.
    child: Option<Child>,
    pub addr: String,
    log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl GatewayOnHost {
    /// Starts `command` (an `ip netns exec … ascend-gateway serve …`) and
    /// waits until the gateway reports its address. Blocks: call it off the
    /// async runtime.
    pub fn spawn(mut command: Command) -> GatewayOnHost {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start gateway");
        wait_until_exec(child.id(), "ascend-gateway");
        let log = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("gateway listening")
                        && let Some(addr) = line.split("address=").nth(1)
                    {
                        let _ = addr_tx.send(addr.trim().to_owned());
                    }
                    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                    log.push_str(&line);
                    log.push('\n');
                }
            })
        };
        let addr = match addr_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr,
            Err(_) => {
                kill_and_reap(&mut child);
                panic!(
                    "the gateway never reported its address:\n{}",
                    log.lock().unwrap_or_else(|e| e.into_inner())
                );
            }
        };
        GatewayOnHost {
            child: Some(child),
            addr,
            log,
            reader: Some(reader),
        }
    }

    /// SIGKILL: no drain, no flush, no goodbye. Returns the log.
    pub fn kill9(mut self) -> String {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
        self.finish_log()
    }

    /// SIGTERM, then waits for the exit (off the runtime, which must stay
    /// free for other work) and for the log to be complete.
    pub async fn terminate(mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("a running gateway");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .expect("join")
            .expect("gateway exits");
        (status, self.finish_log())
    }

    fn finish_log(&mut self) -> String {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for GatewayOnHost {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }
}

/// Lines of a gateway log at WARN or ERROR level.
pub fn warnings(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
        .collect()
}
