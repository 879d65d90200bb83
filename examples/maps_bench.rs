//! The `maps` nftables layout at scale (issue 11):
//! `cargo run --release --example maps_bench -- [SERVICES ...]` (default 10000 100000; root and
//! `nft` needed).
//!
//! For each size, in a fresh network namespace, through the same backend the agent uses
//! (`NftablesBackend`: cached translation, the syncer, `nft -f` for the fixed chains and one
//! netlink batch for the elements), on the synthetic cluster (`kproxy::synthetic::cluster(n,
//! 10)`: 10 endpoints per Service, one in ten with ClientIP affinity, one in five NodePort while
//! the node-port range lasts, one in twenty with a second, UDP, port):
//!
//! - **full load**: the first sync into an empty namespace;
//! - **one EndpointSlice change**: one endpoint of one Service gets another address, 9 times
//!   (back and forth); the median of the backend's time (translate + sync), of the translation
//!   alone, and of the syncer alone (diff, netlink batch);
//! - **restart**: a new backend over the loaded table, whose first sync is full and reads the
//!   kernel's table first;
//! - **memory**: this process's peak RSS (`VmHWM`) after the full load (the cluster objects,
//!   the model, the backend's kept translations and record of the table, and what the first
//!   sync built) and at the end, and the kernel's slab growth (`Slab` in /proc/meminfo) from
//!   before the namespace was made to after the full load.
//!
//! The process enters the namespace, as the agent runs in the node's. The model is built outside the timed part, and shares the ports of unchanged Services with
//! the previous one, as the agent's does (it rebuilds only changed Services).

use std::time::{Duration, Instant};

use kproxy::backend::{Backend, NftablesBackend};
use kproxy::config::{NftablesLayout, NodeConfig};
use kproxy::model::ProxyModel;
use kproxy::nftables::{MAPS_TABLE_NAME, TABLE_NAME};
use kproxy::pipeline;
use kproxy::sync::nftables::{NftApplier, SyncOptions};

#[path = "common/netns.rs"]
mod netns;
use netns::Netns;

/// A `kB` line of a /proc file, in MiB.
fn proc_mib(file: &str, field: &str) -> f64 {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .map_or(f64::NAN, |kb: f64| kb / 1024.0)
}

fn config() -> NodeConfig {
    let mut config = NodeConfig::new("node-1");
    config.node_ips = vec!["10.100.0.1".parse().expect("constant address")];
    config.cluster_cidrs = vec!["10.128.0.0/9".parse().expect("constant CIDR")];
    config.nftables_layout = NftablesLayout::Maps;
    config
}

fn models(state: &kproxy::source::ClusterState, config: &NodeConfig) -> Vec<ProxyModel> {
    pipeline::plan(state, config).models
}

/// `new`, sharing the ports of every Service but `changed` with `old`, as the agent's model
/// does (it rebuilds only changed Services), so that the translation cache keeps them.
fn share_unchanged(old: &[ProxyModel], mut new: Vec<ProxyModel>, changed: &str) -> Vec<ProxyModel> {
    for (old, new) in old.iter().zip(new.iter_mut()) {
        let kept: std::collections::HashMap<_, _> =
            old.ports.iter().map(|p| (p.name.clone(), p)).collect();
        for port in new.ports.iter_mut() {
            if port.name.name != changed {
                if let Some(&same) = kept.get(&port.name) {
                    *port = same.clone();
                }
            }
        }
    }
    new
}

fn backend() -> NftablesBackend<NftApplier> {
    let applier = NftApplier::new()
        .with_table(MAPS_TABLE_NAME, Some(TABLE_NAME))
        .with_netlink_elements();
    NftablesBackend::new(applier, SyncOptions::default())
}

/// One backend sync: (total, translate, syncer, kernel tools, full?).
fn sync(
    backend: &mut NftablesBackend<NftApplier>,
    models: &[ProxyModel],
    config: &NodeConfig,
) -> (Duration, Duration, Duration, Duration, bool) {
    let start = Instant::now();
    let mut results = backend.sync(models, config);
    let total = start.elapsed();
    let family = results.remove(0);
    let report = family.result.expect("the sync succeeds");
    (
        total,
        family.translate,
        total - family.translate,
        report.kernel,
        report.full,
    )
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn main() {
    let sizes: Vec<usize> = {
        let args: Vec<usize> = std::env::args()
            .skip(1)
            .filter_map(|a| a.parse().ok())
            .collect();
        if args.is_empty() {
            vec![10_000, 100_000]
        } else {
            args
        }
    };
    let config = config();
    println!("| services | objects | full load (translate / syncer, of which kernel tools) | one slice change: backend (translate / syncer) | restart (full sync over the loaded table) | kernel slab | peak RSS after the load | peak RSS at the end |");
    println!("|---:|---:|---|---|---|---:|---:|---:|");
    for n in sizes {
        let mut state = kproxy::synthetic::cluster(n, 10).unwrap_or_else(|err| {
            eprintln!("{err}");
            std::process::exit(2)
        });
        let start = Instant::now();
        let full_models = models(&state, &config);
        eprintln!("n={n}: model {}", secs(start.elapsed()));

        let slab_before = proc_mib("/proc/meminfo", "Slab:");
        let ns = Netns::new(&format!("maps-bench-{n}"));
        ns.enter_this_thread();
        let mut loaded = backend();
        let (total, translate, syncer, kernel, full) = sync(&mut loaded, &full_models, &config);
        assert!(full, "the first sync is full");
        let slab_after = proc_mib("/proc/meminfo", "Slab:");
        let objects = loaded.syncer().object_count(kproxy::family::IpFamily::V4);
        let loaded_rss = proc_mib("/proc/self/status", "VmHWM:");
        eprintln!(
            "n={n}: full load {} (translate {}, syncer {}, kernel tools {})",
            secs(total),
            secs(translate),
            secs(syncer),
            secs(kernel)
        );

        // One endpoint of svc-1 moves to another address, and back.
        let original = state.endpoint_slices[1].endpoints[0].addresses.clone();
        let service = state.endpoint_slices[1]
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name").cloned())
            .expect("a synthetic slice names its Service");
        let mut changes = Vec::new();
        for round in 0..9 {
            state.endpoint_slices[1].endpoints[0].addresses = if round % 2 == 0 {
                vec!["10.127.255.1".into()]
            } else {
                original.clone()
            };
            let models = share_unchanged(&full_models, models(&state, &config), &service);
            let (total, translate, syncer, _, full) = sync(&mut loaded, &models, &config);
            assert!(!full, "a one-slice change is a partial sync");
            eprintln!(
                "  change {round}: backend {} (translate {}, syncer {})",
                ms(total),
                ms(translate),
                ms(syncer)
            );
            changes.push((total, translate, syncer));
        }
        let change = (
            median(changes.iter().map(|c| c.0).collect()),
            median(changes.iter().map(|c| c.1).collect()),
            median(changes.iter().map(|c| c.2).collect()),
        );

        drop(loaded);
        let mut restarted = backend();
        let (restart, _, _, restart_kernel, full) = sync(&mut restarted, &full_models, &config);
        assert!(full, "a new backend's first sync is full");

        println!(
            "| {n} | {objects} | {} ({} / {}, {}) | {} ({} / {}) | {} (kernel tools {}) | {:.0} MiB | {:.0} MiB | {:.0} MiB |",
            secs(total),
            secs(translate),
            secs(syncer),
            secs(kernel),
            ms(change.0),
            ms(change.1),
            ms(change.2),
            secs(restart),
            secs(restart_kernel),
            slab_after - slab_before,
            loaded_rss,
            proc_mib("/proc/self/status", "VmHWM:"),
        );
    }
}
