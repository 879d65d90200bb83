//! nftables sync benchmark: `cargo run --release --example sync_bench -- [SERVICES ...]`
//! (default 1000 5000 10000; root and `nft` needed; 10,000 services take several minutes, most
//! of it in the kernel).
//!
//! For each size it creates two fresh network namespaces, syncs the synthetic cluster
//! (`kproxy::synthetic::cluster(n, 10)`) into the first through kproxy's library syncer, and
//! feeds the very same transaction text to `nft -f FILE` in the second; then it changes one
//! Service's endpoints and does the same with the incremental transaction, so both namespaces
//! start each step from identical tables. Printed per step: kproxy's sync time (diff, render,
//! drift check, `nft -f -`), the time of `nft -f` alone, kproxy's share, and the objects
//! (commands) sent. Both run nft as `ip netns exec NS nft`.

use std::process::Command as Process;
use std::time::{Duration, Instant};

use kproxy::config::NodeConfig;
use kproxy::family::IpFamily;
use kproxy::nftables::{Command, Ruleset};
use kproxy::pipeline;
use kproxy::sync::nftables::{
    render_transaction, Applier, KernelTable, NftApplier, SyncOptions, Syncer,
};
use kproxy::sync::SyncError;

/// A network namespace deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Netns {
        let status = Process::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip runs");
        assert!(status.success(), "ip netns add {name} failed (root?)");
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Process::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The nft applier, keeping the last transaction's text and timing the parts.
struct Timed {
    inner: NftApplier,
    last_text: String,
    nft_time: Duration,
    check_time: Duration,
}

impl Applier for Timed {
    fn apply(&mut self, family: IpFamily, commands: &[Command<'_>]) -> Result<usize, SyncError> {
        let text = render_transaction(family, commands)?;
        let start = Instant::now();
        self.inner.apply_text(family, &text)?;
        self.nft_time += start.elapsed();
        self.last_text = text;
        Ok(self.last_text.len())
    }
    fn read(&mut self, family: IpFamily) -> Result<Option<KernelTable>, SyncError> {
        self.inner.read(family)
    }
    fn rule_count(&mut self, family: IpFamily, chain: &str) -> Result<Option<usize>, SyncError> {
        let start = Instant::now();
        let count = self.inner.rule_count(family, chain);
        self.check_time += start.elapsed();
        count
    }
    fn table_exists(&mut self, family: IpFamily) -> Result<bool, SyncError> {
        self.inner.table_exists(family)
    }
}

fn rulesets(state: &kproxy::source::ClusterState) -> Vec<Ruleset> {
    let mut config = NodeConfig::new("node-1");
    config.node_ips = vec!["10.100.0.1".parse().expect("constant address")];
    config.cluster_cidrs = vec!["10.128.0.0/9".parse().expect("constant CIDR")];
    let plan = pipeline::plan(state, &config);
    pipeline::nftables_rulesets(&plan, &config)
}

/// `nft -f FILE` in `ns`, timed.
fn nft_alone(ns: &Netns, text: &str) -> Duration {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("transaction.nft");
    std::fs::write(&file, text).expect("write transaction");
    let start = Instant::now();
    let out = Process::new("ip")
        .args(["netns", "exec", &ns.0, "nft", "-f"])
        .arg(&file)
        .output()
        .expect("nft runs");
    let elapsed = start.elapsed();
    assert!(
        out.status.success(),
        "nft -f refused the transaction: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    elapsed
}

fn row(step: &str, n: usize, kproxy: Duration, nft: Duration, inner_nft: Duration, objects: usize) {
    let overhead = kproxy.as_secs_f64() - inner_nft.as_secs_f64();
    println!(
        "| {n:>6} | {step:<11} | {:>10.3} s | {:>10.3} s | {:>+7.1} % | {:>8.3} s | {objects:>8} |",
        kproxy.as_secs_f64(),
        nft.as_secs_f64(),
        (kproxy.as_secs_f64() / nft.as_secs_f64() - 1.0) * 100.0,
        overhead,
    );
}

fn main() {
    let sizes: Vec<usize> = {
        let args: Vec<usize> = std::env::args()
            .skip(1)
            .filter_map(|a| a.parse().ok())
            .collect();
        if args.is_empty() {
            vec![1_000, 5_000, 10_000]
        } else {
            args
        }
    };
    println!("| services | sync | kproxy sync | nft -f alone | kproxy vs nft | kproxy's own time | objects |");
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for n in sizes {
        let mut state = kproxy::synthetic::cluster(n, 10);
        let start = Instant::now();
        let full = rulesets(&state);
        let translate = start.elapsed();
        // One Service's endpoints change: the first endpoint of svc-1 gets another address.
        state.endpoint_slices[1].endpoints[0].addresses = vec!["10.127.255.1".into()];
        let changed = rulesets(&state);

        let pid = std::process::id();
        let ns_kproxy = Netns::new(format!("kp-bench-k-{pid}-{n}"));
        let ns_nft = Netns::new(format!("kp-bench-n-{pid}-{n}"));
        let mut syncer = Syncer::new(
            Timed {
                inner: NftApplier::in_netns(&ns_kproxy.0),
                last_text: String::new(),
                nft_time: Duration::ZERO,
                check_time: Duration::ZERO,
            },
            SyncOptions::default(),
        );

        for (step, desired) in [("full", &full), ("incremental", &changed)] {
            let applier = syncer.applier_mut();
            applier.nft_time = Duration::ZERO;
            applier.check_time = Duration::ZERO;
            let start = Instant::now();
            let reports = syncer.sync(desired).expect("kproxy sync");
            let kproxy = start.elapsed();
            let report = &reports[0];
            assert_eq!(report.full, step == "full");
            let text = syncer.applier().last_text.clone();
            let nft = nft_alone(&ns_nft, &text);
            let applier = syncer.applier();
            row(step, n, kproxy, nft, applier.nft_time, report.objects);
            if step == "incremental" {
                eprintln!(
                    "  n={n}: translate {:.3} s (not part of the sync); drift check {:.3} s; incremental transaction:\n{}",
                    translate.as_secs_f64(),
                    applier.check_time.as_secs_f64(),
                    text.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
                );
            }
        }
    }
}
