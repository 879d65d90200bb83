//! nftables sync benchmark: `cargo run --release --example sync_bench -- [SERVICES ...]`
//! (default 1000 5000 10000; root and `nft` needed; 10,000 services take several minutes, most
//! of it in the kernel).
//!
//! For each size it creates two fresh network namespaces, syncs the synthetic cluster
//! (`kproxy::synthetic::cluster(n, 10)`) into the first through kproxy's library syncer, and
//! feeds the very same transaction text to `nft -f FILE` in the second; then it changes one
//! Service's endpoints and does the same with the incremental transaction, so both namespaces
//! start each step from identical tables. The incremental step is measured 9 times, alternating
//! between the changed and the original endpoints, and nft alone runs first in every other
//! round (a shadow syncer without a kernel knows each transaction beforehand).
//!
//! Printed per step: kproxy's sync time (drift check, diff, render, `nft -f -`; medians for the
//! incremental step), the time of `nft -f FILE` alone, kproxy's own time (its sync time minus
//! the time nft ran inside it; the figure that does not depend on the kernel's run-to-run
//! noise of several milliseconds), and the objects (commands) sent. Both run nft as
//! `ip netns exec NS nft`. Per-round times and the incremental transaction go to stderr.

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

#[path = "common/netns.rs"]
mod netns;
use netns::Netns;

/// The nft applier, keeping the last transaction's text and timing the parts.
struct Timed {
    inner: NftApplier,
    last_text: String,
    nft_time: Duration,
    check_time: Duration,
    /// When the last transaction reached the applier, and when nft had finished with it.
    entered: Option<Instant>,
    left: Option<Instant>,
}

impl Applier for Timed {
    fn apply(&mut self, family: IpFamily, commands: &[Command<'_>]) -> Result<usize, SyncError> {
        self.entered = Some(Instant::now());
        let text = render_transaction(family, kproxy::nftables::TABLE_NAME, commands)?;
        let start = Instant::now();
        self.inner.apply_text(family, &text)?;
        self.nft_time += start.elapsed();
        self.left = Some(Instant::now());
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

/// An applier that only renders (and keeps the last text): kproxy's own work with no kernel
/// behind it, and a shadow of the measured syncer that knows each transaction beforehand.
#[derive(Default)]
struct Null {
    last_text: String,
}

impl Applier for Null {
    fn apply(&mut self, family: IpFamily, commands: &[Command<'_>]) -> Result<usize, SyncError> {
        self.last_text = render_transaction(family, kproxy::nftables::TABLE_NAME, commands)?;
        Ok(self.last_text.len())
    }
    fn read(&mut self, _: IpFamily) -> Result<Option<KernelTable>, SyncError> {
        Ok(None)
    }
    fn rule_count(&mut self, _: IpFamily, _: &str) -> Result<Option<usize>, SyncError> {
        Ok(Some(3))
    }
    fn table_exists(&mut self, _: IpFamily) -> Result<bool, SyncError> {
        Ok(false)
    }
}

/// Median time of `runs` incremental syncs (alternating between the two states) with [`Null`].
fn cpu_only(full: &[Ruleset], changed: &[Ruleset], runs: usize) -> Duration {
    let mut syncer = Syncer::new(Null::default(), SyncOptions::default());
    syncer.sync(full).expect("null sync");
    let mut times: Vec<Duration> = (0..runs)
        .map(|i| {
            let desired = if i % 2 == 0 { changed } else { full };
            let start = Instant::now();
            syncer.sync(desired).expect("null sync");
            start.elapsed()
        })
        .collect();
    times.sort();
    times[runs / 2]
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
        .args(["netns", "exec", &ns.name, "nft", "-f"])
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

/// One measured sync: kproxy's time, nft's time inside it, nft alone, objects, and kproxy's
/// time before the transaction reached the applier.
struct Sample {
    kproxy: Duration,
    inner_nft: Duration,
    alone: Duration,
    objects: usize,
    before_apply: Duration,
}

fn row(step: &str, n: usize, samples: &mut [Sample]) {
    // The median by kproxy's time, and the median of nft alone, taken separately.
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let kproxy = median(samples.iter().map(|s| s.kproxy).collect());
    let alone = median(samples.iter().map(|s| s.alone).collect());
    let own = median(samples.iter().map(|s| s.kproxy - s.inner_nft).collect());
    let before = median(samples.iter().map(|s| s.before_apply).collect());
    let objects = samples[0].objects;
    println!(
        "| {n:>6} | {step:<11} | {:>3} | {:>9.4} s | {:>9.4} s | {:>+6.1} % | {:>8.4} s | {:>8.4} s | {objects:>6} |",
        samples.len(),
        kproxy.as_secs_f64(),
        alone.as_secs_f64(),
        (kproxy.as_secs_f64() / alone.as_secs_f64() - 1.0) * 100.0,
        own.as_secs_f64(),
        before.as_secs_f64(),
    );
}

/// Incremental syncs measured per size: alternately the changed state and back.
const ROUNDS: usize = 9;

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
    println!("| services | sync | runs | kproxy sync (median) | nft -f alone (median) | kproxy vs nft | kproxy's own time | of which before nft | objects |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for n in sizes {
        let mut state = kproxy::synthetic::cluster(n, 10).unwrap_or_else(|err| {
            eprintln!("{err}");
            std::process::exit(2)
        });
        let start = Instant::now();
        let full = rulesets(&state);
        let translate = start.elapsed();
        // One Service's endpoints change: the first endpoint of svc-1 gets another address.
        state.endpoint_slices[1].endpoints[0].addresses = vec!["10.127.255.1".into()];
        let changed = rulesets(&state);

        let ns_kproxy = Netns::new(&format!("bench-k-{n}"));
        let ns_nft = Netns::new(&format!("bench-n-{n}"));
        let mut syncer = Syncer::new(
            Timed {
                inner: NftApplier::in_netns(&ns_kproxy.name),
                last_text: String::new(),
                nft_time: Duration::ZERO,
                check_time: Duration::ZERO,
                entered: None,
                left: None,
            },
            SyncOptions::default(),
        );

        // The shadow computes each transaction first, so that nft alone can run before
        // kproxy in every other round: neither side always goes first.
        let mut shadow = Syncer::new(Null::default(), SyncOptions::default());
        let mut round = 0;
        let mut measure = |desired: &[Ruleset], full: bool| -> Sample {
            shadow.sync(desired).expect("shadow sync");
            let text = shadow.applier().last_text.clone();
            round += 1;
            let alone_first = round % 2 == 0;
            let mut alone = if alone_first {
                nft_alone(&ns_nft, &text)
            } else {
                Duration::ZERO
            };
            let applier = syncer.applier_mut();
            applier.nft_time = Duration::ZERO;
            applier.check_time = Duration::ZERO;
            let start = Instant::now();
            let reports = syncer.sync(desired).expect("kproxy sync");
            let kproxy = start.elapsed();
            assert_eq!(reports[0].full, full);
            let applier = syncer.applier();
            assert!(
                applier.last_text == text,
                "the shadow syncer predicted another transaction"
            );
            if !alone_first {
                alone = nft_alone(&ns_nft, &text);
            }
            Sample {
                kproxy,
                inner_nft: applier.nft_time,
                alone,
                objects: reports[0].objects,
                before_apply: applier
                    .entered
                    .map_or(Duration::ZERO, |e| e.duration_since(start)),
            }
        };
        row("full", n, &mut [measure(&full, true)]);
        let mut samples: Vec<Sample> = (0..ROUNDS)
            .map(|i| measure(if i % 2 == 0 { &changed } else { &full }, false))
            .collect();
        let check = syncer.applier().check_time;
        row("incremental", n, &mut samples);
        for (i, sample) in samples.iter().enumerate() {
            eprintln!(
                "  round {}{}: kproxy {:.4} s (nft inside {:.4} s), nft alone {:.4} s",
                i + 1,
                // Rounds are counted from the full sync, which was round 1.
                if (i + 2) % 2 == 0 {
                    " (nft alone first)"
                } else {
                    ""
                },
                sample.kproxy.as_secs_f64(),
                sample.inner_nft.as_secs_f64(),
                sample.alone.as_secs_f64()
            );
        }
        eprintln!(
            "  n={n}: translate {:.3} s (not part of the sync); last drift check {:.4} s; diff+render without a kernel (median of 9) {:.4} s; incremental transaction:\n{}",
            translate.as_secs_f64(),
            check.as_secs_f64(),
            cpu_only(&full, &changed, 9).as_secs_f64(),
            syncer
                .applier()
                .last_text
                .lines()
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
