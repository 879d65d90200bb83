//! One writer per network namespace (src/sync/lock.rs), against the real binary in real
//! network namespaces: a second writer waits for the lock and then fails naming the holder, or
//! proceeds once the holder releases it; a `kill -9`ed holder releases it; `kproxy run` holds
//! it for its lifetime; different namespaces do not block each other.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{kernel_tests_possible, Netns};
use kproxy::sync::lock::NetnsLock;

const TOOLS: [&str; 3] = ["iptables-nft-save", "nft", "iptables-nft-restore"];

const MANIFEST: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints:
- addresses: ["10.244.1.2"]
  conditions: {ready: true}
"#;

fn manifest_file() -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), MANIFEST).expect("write manifest");
    file
}

fn sync_command(ns: &Netns, mode: &str, timeout: &str, manifest: &str) -> Command {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_kproxy")])
        .args(["sync", "--once", "--mode", mode, "--hostname", "node-1"])
        .args(["--lock-timeout", timeout, manifest])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Whether kproxy's rules of `mode` are in the namespace.
fn has_rules(ns: &Netns, mode: &str) -> bool {
    let out = match mode {
        "iptables" => ns.run(&["iptables-nft-save", "-t", "nat"], None),
        _ => ns.run(&["nft", "list", "tables"], None),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    text.contains("KUBE-SERVICES") || text.contains("kube-proxy")
}

/// This process's command line as /proc shows it, arguments joined by spaces.
fn own_command_line() -> String {
    let raw = std::fs::read("/proc/self/cmdline").expect("own cmdline");
    raw.split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `web` with its cluster IP changed, and another Service: a different input.
fn other_manifest() -> String {
    MANIFEST
        .replace("10.96.0.10", "10.96.0.20")
        .replace("web", "api")
}

/// kproxy's part of the namespace's rules, comparable between namespaces: iptables-save
/// without comments and counters, or the nft table listing without empty chains (a one-shot
/// nftables sync leaves a replaced Service's chains flushed, by design: they go on a later
/// sync).
fn kproxy_state(ns: &Netns, mode: &str) -> String {
    let out = match mode {
        "iptables" => ns.run(&["iptables-nft-save"], None),
        _ => ns.run(&["nft", "list", "table", "ip", "kube-proxy"], None),
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| match l.find(" [") {
            Some(i) if l.starts_with(':') => &l[..i],
            _ => l,
        })
        .collect();
    let mut kept = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let empty_chain = lines[i].trim_start().starts_with("chain ")
            && lines.get(i + 1).is_some_and(|l| l.trim() == "}");
        if empty_chain {
            i += 2;
            continue;
        }
        kept.push(lines[i]);
        i += 1;
    }
    kept.join("\n")
}

#[test]
fn concurrent_one_shot_writers_take_turns() {
    if !kernel_tests_possible(&TOOLS) {
        return;
    }
    let first = manifest_file();
    let second = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(second.path(), other_manifest()).expect("write manifest");
    let inputs = [
        first.path().to_str().expect("utf-8 path"),
        second.path().to_str().expect("utf-8 path"),
    ];
    for mode in ["iptables", "nftables"] {
        // What each input alone leaves.
        let clean: Vec<String> = inputs
            .iter()
            .map(|input| {
                let ns = Netns::new("lock-clean");
                let out = sync_command(&ns, mode, "5", input)
                    .output()
                    .expect("kproxy runs");
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                kproxy_state(&ns, mode)
            })
            .collect();
        for round in 0..3 {
            let ns = Netns::new("lock-race");
            let children: Vec<_> = (0..4)
                .map(|i| {
                    sync_command(&ns, mode, "30", inputs[i % 2])
                        .spawn()
                        .expect("kproxy starts")
                })
                .collect();
            for child in children {
                let out = child.wait_with_output().expect("kproxy ends");
                assert!(
                    out.status.success(),
                    "{mode}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let state = kproxy_state(&ns, mode);
            assert!(
                clean.contains(&state),
                "{mode}, round {round}: concurrent syncs left a state no input asked for:\n{state}"
            );
        }
    }
}

#[test]
fn a_second_writer_fails_after_the_timeout_naming_the_holder() {
    if !kernel_tests_possible(&TOOLS) {
        return;
    }
    let ns = Netns::new("lock-held");
    let manifest = manifest_file();
    let path = manifest.path().to_str().expect("utf-8 path");
    // This test process holds the namespace's lock, as another kproxy would.
    let lock = ns
        .enter(|| NetnsLock::acquire(Duration::ZERO, |_| {}))
        .expect("the lock is free");
    for mode in ["iptables", "nftables"] {
        let started = Instant::now();
        let out = sync_command(&ns, mode, "1", path)
            .output()
            .expect("kproxy runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{mode}: {stderr}");
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "{mode}: did not wait"
        );
        assert!(
            stderr.contains(&format!("pid {}", std::process::id())),
            "{mode}: the holder's pid is not named: {stderr}"
        );
        assert!(
            stderr.contains(&own_command_line()),
            "{mode}: the holder's command line is not named: {stderr}"
        );
        assert!(stderr.contains("--lock-timeout"), "{mode}: {stderr}");
        assert!(
            !has_rules(&ns, mode),
            "{mode}: it wrote rules without the lock"
        );
    }
    // cleanup takes the lock as well.
    let out = ns.run(
        &[
            env!("CARGO_BIN_EXE_kproxy"),
            "cleanup",
            "--lock-timeout",
            "0.5",
        ],
        None,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {}", std::process::id())),
        "{stderr}"
    );
    drop(lock);
}

#[test]
fn a_waiting_writer_proceeds_when_the_holder_releases_the_lock() {
    if !kernel_tests_possible(&TOOLS) {
        return;
    }
    let ns = Netns::new("lock-wait");
    let manifest = manifest_file();
    let path = manifest.path().to_str().expect("utf-8 path");
    let lock = ns
        .enter(|| NetnsLock::acquire(Duration::ZERO, |_| {}))
        .expect("the lock is free");
    let mut child = sync_command(&ns, "iptables", "30", path)
        .spawn()
        .expect("kproxy starts");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        matches!(child.try_wait(), Ok(None)),
        "the second writer did not wait for the lock"
    );
    assert!(
        !has_rules(&ns, "iptables"),
        "it wrote while the lock was held"
    );
    drop(lock);
    let out = child.wait_with_output().expect("kproxy ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("waiting up to"),
        "it did not say it waits: {stderr}"
    );
    assert!(has_rules(&ns, "iptables"));
}

#[test]
fn kproxy_run_holds_the_lock_for_its_lifetime_and_a_kill_9_releases_it() {
    if !kernel_tests_possible(&TOOLS) {
        return;
    }
    let ns = Netns::new("lock-run");
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("web.yaml"), MANIFEST).expect("write manifest");
    let dir_arg = dir.path().to_str().expect("utf-8 path").to_string();
    let mut agent = Command::new("ip")
        .args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_kproxy")])
        .args([
            "run",
            "--mode",
            "nftables",
            "--hostname",
            "node-1",
            "--node-ip",
            "192.0.2.10",
        ])
        .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
        .args(["--from-dir", &dir_arg])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kproxy run starts");
    let started = Instant::now();
    while !has_rules(&ns, "nftables") {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "kproxy run never synced"
        );
        assert!(matches!(agent.try_wait(), Ok(None)), "kproxy run ended");
        std::thread::sleep(Duration::from_millis(100));
    }
    // While it runs, a one-shot writer is refused and told who holds the lock.
    let manifest = manifest_file();
    let path = manifest.path().to_str().expect("utf-8 path");
    let out = sync_command(&ns, "nftables", "0.5", path)
        .output()
        .expect("kproxy runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {}", agent.id())),
        "the agent's pid is not named: {stderr}"
    );
    assert!(stderr.contains("run --mode nftables"), "{stderr}");

    // `ip netns exec` execs kproxy, so this is kproxy itself: no chance to clean up.
    agent.kill().expect("SIGKILL");
    agent.wait().expect("reaped");
    let out = sync_command(&ns, "nftables", "0", path)
        .output()
        .expect("kproxy runs");
    assert!(
        out.status.success(),
        "the killed agent's lock stayed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn writers_in_different_namespaces_do_not_block_each_other() {
    if !kernel_tests_possible(&TOOLS) {
        return;
    }
    let held = Netns::new("lock-a");
    let other = Netns::new("lock-b");
    let _lock = held
        .enter(|| NetnsLock::acquire(Duration::ZERO, |_| {}))
        .expect("the lock is free");
    let manifest = manifest_file();
    let path = manifest.path().to_str().expect("utf-8 path");
    let out = sync_command(&other, "iptables", "0", path)
        .output()
        .expect("kproxy runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(has_rules(&other, "iptables"));
    assert!(!has_rules(&held, "iptables"));
}
