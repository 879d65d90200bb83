//! Node agent benchmark: `cargo build --release && cargo run --release --example agent_bench --
//! [MODE ...] [--services N] [--endpoints M] [--changes K] [--burst B] [--adds A]` (MODE: `nftables`,
//! `iptables`, or `maps` for nftables mode in the `maps` layout; root, `nft` and/or
//! `iptables`; defaults: both modes, 10,000 services × 10 endpoints, 50 changes, a burst of
//! 1,000). The first full sync of 10,000 services takes about 2 minutes with nft and 8 with
//! `iptables-nft-restore`: that is the kernel tool's time.
//!
//! For each mode, in a fresh network namespace: the project's fake API server (running in that
//! namespace) holds the synthetic cluster (`kproxy::synthetic::cluster`), and the real
//! `target/release/kproxy run --master …` watches it. Once the first sync is done (steady
//! state), it measures:
//! - the agent's resident memory (VmRSS, VmHWM);
//! - change-to-kernel for one EndpointSlice, K times, 2.2 s apart (more than the default
//!   `--min-sync-period` after the stale-chain deletion that follows a removed endpoint by
//!   1 s, so no change waits for the runner): from the watch event reaching
//!   kproxy to the transaction committed, as the agent logs it per sync, with the kernel
//!   tools' time inside it and kproxy's own part (the rest);
//! - a burst of B EndpointSlice updates sent as fast as the API server takes them: the number
//!   of syncs, and the time from the first update to the commit of the sync that took the
//!   last one;
//! - A new Services (default 0), one at a time, each after its EndpointSlice (which alone
//!   changes nothing): change-to-kernel of the Service, as for the slice changes.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kproxy::fake_apiserver::FakeApiServer;
use kproxy::model::SERVICE_NAME_LABEL;

#[path = "common/netns.rs"]
mod netns;
use netns::Netns;

/// One sync line of the agent's log.
#[derive(Debug, Clone)]
struct SyncLine {
    at: SystemTime,
    full: bool,
    kproxy_ms: f64,
    kernel_ms: f64,
    change_to_kernel_ms: Option<f64>,
    endpoint_events: u64,
    /// The log line itself.
    text: String,
}

fn parse_sync_line(line: &str) -> Option<SyncLine> {
    let (stamp, rest) = line.split_once(' ')?;
    let rest = rest.split_once("synced IPv4: ")?.1;
    let at: Timestamp = stamp.parse().ok()?;
    let number_after = |key: &str| -> Option<f64> {
        let tail = rest.split_once(key)?.1;
        let end = tail.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        tail[..end].parse().ok()
    };
    let events_tail = rest.split_once(" Services changed, ")?.1;
    Some(SyncLine {
        at: SystemTime::from(at),
        full: rest.starts_with("full"),
        kproxy_ms: number_after("(kproxy ")?,
        kernel_ms: number_after("kernel tools ")?,
        change_to_kernel_ms: number_after("change to kernel "),
        endpoint_events: events_tail.split_whitespace().next()?.parse().ok()?,
        text: line.to_string(),
    })
}

struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn syncs(&self) -> Vec<SyncLine> {
        let file = std::fs::File::open(&self.log).expect("agent log");
        BufReader::new(file)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| parse_sync_line(&l))
            .collect()
    }

    fn wait_for_syncs(&self, count: usize, timeout: Duration) -> Vec<SyncLine> {
        let start = Instant::now();
        loop {
            let syncs = self.syncs();
            if syncs.len() >= count {
                return syncs;
            }
            assert!(
                start.elapsed() < timeout,
                "no sync {count} after {timeout:?}; log: {}",
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                / 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a pid we own.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(index).copied().unwrap_or(f64::NAN)
}

/// The slice with one endpoint fewer (or, every other time, all of them again).
fn changed(slice: &EndpointSlice, round: usize) -> EndpointSlice {
    let mut slice = slice.clone();
    if round % 2 == 0 {
        slice.endpoints.pop();
    }
    slice
}

/// The agent's flags for a benchmarked mode: `maps` is nftables mode in the `maps` layout
/// (docs/maps-layout.md).
fn mode_flags(mode: &str) -> Vec<&str> {
    match mode {
        "maps" => vec!["--mode", "nftables", "--nftables-layout", "maps"],
        _ => vec!["--mode", mode],
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str, default: usize| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let services = value("--services", 10_000);
    let endpoints = value("--endpoints", 10);
    let changes = value("--changes", 50);
    let burst = value("--burst", 1000);
    let adds = value("--adds", 0);
    let mut modes: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| ["iptables", "nftables", "maps"].contains(a))
        .collect();
    if modes.is_empty() {
        modes = vec!["nftables", "iptables"];
    }
    let kproxy = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("kproxy")))
        .filter(|p| p.exists())
        .expect("build the binary first: cargo build --release");

    println!(
        "cluster: {services} services x {endpoints} endpoints; binary {}",
        kproxy.display()
    );
    // The Services beyond the first N are the ones added later.
    let mut cluster =
        kproxy::synthetic::cluster(services + adds, endpoints).unwrap_or_else(|err| {
            eprintln!("{err}");
            std::process::exit(2)
        });
    let added_services = cluster.services.split_off(services);
    let is_added = |slice: &EndpointSlice| {
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL));
        added_services
            .iter()
            .any(|s| s.metadata.name.as_ref() == service)
    };
    let (added_slices, slices): (Vec<EndpointSlice>, Vec<EndpointSlice>) =
        cluster.endpoint_slices.drain(..).partition(is_added);
    cluster.endpoint_slices = slices;
    for mode in modes {
        let netns = Netns::new(&format!("agent-bench-{mode}"));
        let api = netns.enter(|| FakeApiServer::start().expect("fake API server"));
        let loaded = Instant::now();
        for service in &cluster.services {
            api.apply_typed(service);
        }
        for slice in &cluster.endpoint_slices {
            api.apply_typed(slice);
        }
        eprintln!("{mode}: API server loaded in {:?}", loaded.elapsed());

        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("agent.log");
        let file = std::fs::File::create(&log).expect("log file");
        let started = Instant::now();
        let child = Command::new("ip")
            .args(["netns", "exec", &netns.name])
            .arg(&kproxy)
            .args(["run", "--master", &api.url()])
            .args(mode_flags(mode))
            .args(["--hostname", "bench-node", "--node-ip", "10.0.0.1"])
            .args(["--cluster-cidr", "10.128.0.0/9"])
            .args(["--healthz-bind-address", "127.0.0.1:10256"])
            .args(["--metrics-bind-address", "127.0.0.1:10249"])
            .args(["--node-wait", "0s"])
            .env("KPROXY_LOG", "kproxy=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("kproxy run starts");
        let agent = Agent { child, log };
        let first = agent.wait_for_syncs(1, Duration::from_secs(1800));
        println!(
            "{mode}: first (full) sync done {:.1} s after start (kernel tools {:.1} s, kproxy {:.0} ms)",
            started.elapsed().as_secs_f64(),
            first[0].kernel_ms / 1000.0,
            first[0].kproxy_ms
        );
        std::thread::sleep(Duration::from_secs(3));
        let (rss, hwm) = agent.memory();
        println!("{mode}: steady-state memory: VmRSS {rss} MiB, peak VmHWM {hwm} MiB");

        // One EndpointSlice at a time.
        let (mut total, mut own, mut kernel) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..changes {
            // Past the minimum sync period and the 1 s grace period of a removed endpoint's
            // chain, whose deletion is a sync of its own.
            std::thread::sleep(Duration::from_millis(2200));
            let before = agent.syncs().len();
            let index = (round / 2 * 97) % services;
            api.apply_typed(&changed(&cluster.endpoint_slices[index], round));
            let syncs = agent.wait_for_syncs(before + 1, Duration::from_secs(600));
            let line = &syncs[before];
            let whole = line.change_to_kernel_ms.unwrap_or(f64::NAN);
            eprintln!("{mode}: change {round}: {}", line.text);
            total.push(whole);
            kernel.push(line.kernel_ms);
            own.push(whole - line.kernel_ms);
        }
        println!(
            "{mode}: change-to-kernel over {changes} EndpointSlice changes: p50 {:.1} ms, p99 {:.1} ms; \
             kernel tools p50 {:.1} ms, p99 {:.1} ms; kproxy's own part p50 {:.1} ms, p99 {:.1} ms",
            percentile(&total, 0.5),
            percentile(&total, 0.99),
            percentile(&kernel, 0.5),
            percentile(&kernel, 0.99),
            percentile(&own, 0.5),
            percentile(&own, 0.99),
        );

        // A burst.
        std::thread::sleep(Duration::from_millis(1200));
        let before = agent.syncs().len();
        let burst_start = SystemTime::now();
        let sent = Instant::now();
        for i in 0..burst {
            let index = (i * 7919) % services;
            api.apply_typed(&changed(&cluster.endpoint_slices[index], i / services * 2));
        }
        let send_time = sent.elapsed();
        let deadline = Instant::now() + Duration::from_secs(1800);
        let (syncs, done) = loop {
            let lines: Vec<SyncLine> = agent.syncs().split_off(before);
            let mut events = 0;
            let done = lines.iter().position(|l| {
                events += l.endpoint_events;
                events >= burst as u64
            });
            if let Some(i) = done {
                break (i + 1, lines[i].clone());
            }
            assert!(Instant::now() < deadline, "the burst was not synced");
            std::thread::sleep(Duration::from_millis(50));
        };
        for line in &agent.syncs()[before..] {
            eprintln!("{mode}: burst: {}", line.text);
        }
        let (rss, hwm) = agent.memory();
        println!(
            "{mode}: burst of {burst} EndpointSlice updates (sent in {:.0} ms): {syncs} syncs ({} full); last change in the kernel {:.2} s after the first update; VmRSS {rss} MiB, VmHWM {hwm} MiB",
            send_time.as_secs_f64() * 1000.0,
            usize::from(done.full),
            done.at
                .duration_since(burst_start)
                .unwrap_or_default()
                .as_secs_f64(),
        );

        // New Services, one at a time. The EndpointSlice goes first (the two watches deliver
        // independently, so sent together they may land in one sync or two, in either order):
        // alone it changes nothing; then the Service, whose sync is measured.
        let (mut total, mut fulls) = (Vec::new(), 0);
        for (round, service) in added_services.iter().enumerate() {
            std::thread::sleep(Duration::from_millis(1200));
            let name = service.metadata.name.as_ref();
            let before = agent.syncs().len();
            for slice in added_slices.iter().filter(|slice| {
                slice
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    == name
            }) {
                api.apply_typed(slice);
            }
            agent.wait_for_syncs(before + 1, Duration::from_secs(600));
            std::thread::sleep(Duration::from_millis(1200));
            let before = agent.syncs().len();
            api.apply_typed(service);
            let syncs = agent.wait_for_syncs(before + 1, Duration::from_secs(600));
            let line = &syncs[before];
            eprintln!("{mode}: add {round}: {}", line.text);
            total.push(line.change_to_kernel_ms.unwrap_or(f64::NAN));
            fulls += usize::from(line.full);
        }
        if !total.is_empty() {
            println!(
                "{mode}: change-to-kernel over {} added Services (their EndpointSlices already known): p50 {:.1} ms, p99 {:.1} ms ({fulls} full syncs)",
                total.len(),
                percentile(&total, 0.5),
                percentile(&total, 0.99),
            );
        }
        drop(agent);
        drop(api);
    }
}
