//! Throwaway network namespaces for tests that talk to the real kernel.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Set by `.ci/run`: kernel tests must run, and fail when they cannot.
pub const REQUIRE_ENV: &str = "KPROXY_REQUIRE_KERNEL_TESTS";

/// Whether kernel tests can run here (root and the named tools). When they cannot: panics if
/// `KPROXY_REQUIRE_KERNEL_TESTS=1`, else prints why and returns false so the caller returns.
pub fn kernel_tests_possible(tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root".to_string());
    }
    for tool in std::iter::once(&"ip").chain(tools) {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            missing.push(tool.to_string());
        }
    }
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "kernel test cannot run here: missing {}",
        missing.join(", ")
    );
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{why} (and {REQUIRE_ENV}=1 requires it)");
    }
    eprintln!("NOT RUN: {why}; set {REQUIRE_ENV}=1 to make this a failure");
    false
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A network namespace that is deleted when dropped.
pub struct Netns {
    pub name: String,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Netns {
    pub fn new(purpose: &str) -> Netns {
        let name = format!(
            "kp-{purpose}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip runs");
        assert!(status.success(), "ip netns add {name} failed");
        let ns = Netns { name };
        ns.run(&["ip", "link", "set", "lo", "up"], None);
        ns
    }

    /// Runs a command inside the namespace, optionally feeding `stdin`.
    pub fn run(&self, argv: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ip netns exec runs");
        if let Some(text) = stdin {
            let mut pipe = child.stdin.take().expect("stdin is piped");
            pipe.write_all(text.as_bytes()).expect("write stdin");
        }
        child.wait_with_output().expect("command finishes")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

impl Netns {
    /// Runs `f` on a thread that has entered this namespace, so that the library's own child
    /// processes (`conntrack`, `nft`, …) run inside it.
    pub fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        enter(&self.name, f)
    }
}

/// Runs `f` on a thread inside the named network namespace (sockets it opens live there).
pub fn enter<R: Send>(name: &str, f: impl FnOnce() -> R + Send) -> R {
    let path = format!("/var/run/netns/{name}");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                use std::os::fd::AsRawFd;
                let file = std::fs::File::open(&path).expect("namespace file");
                // SAFETY: setns on a valid namespace fd affects only this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns into {path} failed");
                f()
            })
            .join()
            .expect("thread in namespace")
    })
}
