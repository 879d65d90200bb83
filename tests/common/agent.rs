//! The real `kproxy run` in a topology's node namespace, with its health and metrics read
//! over HTTP from inside that namespace.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::netns::Netns;

pub const HEALTHZ: &str = "127.0.0.1:10256";
pub const METRICS: &str = "127.0.0.1:10249";

pub struct AgentProcess {
    child: Option<Child>,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
    netns: String,
}

impl AgentProcess {
    /// Starts `kproxy run ARGS` in `node`, logging to a file.
    pub fn start(node: &Netns, args: &[&str]) -> AgentProcess {
        AgentProcess::start_with_env(node, args, &[])
    }

    /// [`AgentProcess::start`] with more environment variables (e.g. a `PATH` with a wrapped
    /// `nft`).
    pub fn start_with_env(node: &Netns, args: &[&str], env: &[(&str, &str)]) -> AgentProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("agent.log");
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &node.name,
                env!("CARGO_BIN_EXE_kproxy"),
                "run",
            ])
            .args(["--healthz-bind-address", HEALTHZ])
            .args(["--metrics-bind-address", METRICS])
            .args(args)
            .env("KPROXY_LOG", "kproxy=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("kproxy run starts");
        AgentProcess {
            child: Some(child),
            log,
            _dir: dir,
            netns: node.name.clone(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An HTTP GET inside the node namespace: (status, body).
    pub fn get(&self, address: &str, path: &str) -> Option<(u16, String)> {
        let address = address.to_string();
        let path = path.to_string();
        super::netns::enter(&self.netns, move || http_get(&address, &path))
    }

    pub fn metrics(&self) -> String {
        self.get(METRICS, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// The value of one metric line (name with labels, exactly as exported).
    pub fn metric(&self, series: &str) -> Option<f64> {
        metric_value(&self.metrics(), series)
    }

    /// Syncs of IPv4 so far (successful or not).
    pub fn syncs(&self) -> u64 {
        self.metric("kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}")
            .unwrap_or(0.0) as u64
    }

    /// Waits until at least `count` syncs happened.
    pub fn wait_for_syncs(&self, count: u64, timeout: Duration) {
        let log = || self.log_text();
        wait_until(
            timeout,
            || self.syncs() >= count,
            || format!("fewer than {count} syncs; agent log:\n{}", log()),
        );
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn stop(mut self) -> ExitStatus {
        self.terminate().expect("the agent was running")
    }

    fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) with a pid we own.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Polls `condition` every 50 ms until it holds; panics with `why()` after `timeout`.
pub fn wait_until(
    timeout: Duration,
    mut condition: impl FnMut() -> bool,
    why: impl Fn() -> String,
) {
    let start = Instant::now();
    while !condition() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?}: {}", why());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// A plain HTTP/1.0 GET: (status, body), or `None` when nothing answers.
pub fn http_get(address: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())?;
    Some((status, body))
}
