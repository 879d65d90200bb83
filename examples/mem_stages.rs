//! Where the agent's memory goes: `cargo run --release --example mem_stages -- [SERVICES]`
//! (default 100000; no root needed). Builds, in this process, what `kproxy run` holds for the
//! synthetic cluster (`kproxy::synthetic::cluster(n, 10)`, the `maps` layout): the store, the
//! node model, and the nftables translation cache; and prints after each stage the heap bytes
//! and blocks it added (counted by a global allocator around mimalloc, the agent's) and VmRSS.
//! The syncer's record of the table (hash sets over the same shared elements) is not included.
use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::SystemTime;

use kproxy::agent::node_model::NodeModel;
use kproxy::agent::store::ClusterStore;
use kproxy::config::{NftablesLayout, NodeConfig};
use kproxy::source::Kind;

struct Counting;
static BYTES: AtomicIsize = AtomicIsize::new(0);
static BLOCKS: AtomicIsize = AtomicIsize::new(0);
static MI: mimalloc::MiMalloc = mimalloc::MiMalloc;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        BYTES.fetch_add(l.size() as isize, Ordering::Relaxed);
        BLOCKS.fetch_add(1, Ordering::Relaxed);
        MI.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        BYTES.fetch_sub(l.size() as isize, Ordering::Relaxed);
        BLOCKS.fetch_sub(1, Ordering::Relaxed);
        MI.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        BYTES.fetch_add(n as isize - l.size() as isize, Ordering::Relaxed);
        MI.realloc(p, l, n)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("VmRSS") || l.starts_with("VmHWM"))
        .collect::<Vec<_>>()
        .join(" ")
}

struct Stage(isize, isize);
fn now() -> Stage {
    Stage(
        BYTES.load(Ordering::Relaxed),
        BLOCKS.load(Ordering::Relaxed),
    )
}
fn report(name: &str, since: &Stage) -> Stage {
    let n = now();
    eprintln!(
        "{name:<30} {:>8.1} MiB in {:>9} blocks (total {:>8.1} MiB) {}",
        (n.0 - since.0) as f64 / 1048576.0,
        n.1 - since.1,
        n.0 as f64 / 1048576.0,
        rss()
    );
    n
}

fn main() {
    let services: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let s = now();
    let cluster = kproxy::synthetic::cluster(services, 10).unwrap();
    let s = report("raw API objects", &s);
    let mut config = NodeConfig::new("bench-node");
    config.node_ips = vec!["10.0.0.1".parse().unwrap()];
    config.cluster_cidrs = vec!["10.128.0.0/9".parse().unwrap()];
    config.nftables_layout = NftablesLayout::Maps;
    let mut store = ClusterStore::new(SystemTime::now());
    store.replace_services(&cluster.services);
    store.set_listed(Kind::Service);
    let s = report("store: services", &s);
    store.replace_slices(&cluster.endpoint_slices);
    store.set_listed(Kind::EndpointSlice);
    let (changes, notes) = store.take_changes();
    eprintln!("notes {}", notes.len());
    drop(changes);
    let s = report("store: slices", &s);
    drop(cluster);
    let s = report("drop raw", &s);
    let mut model = NodeModel::default();
    model.update(&store, None, &config);
    let s = report("model", &s);
    let mut cache = kproxy::nftables::PortCache::default();
    let ruleset = kproxy::nftables::translate_cached(&model.models()[0], &config, &mut cache);
    eprintln!("elements {}", ruleset.elements.len());
    let mut hist = std::collections::BTreeMap::<String, usize>::new();
    for e in &ruleset.elements {
        let data = match &e.value {
            None => "none".to_string(),
            Some(kproxy::nftables::ElementValue::Verdict(_)) => "verdict".to_string(),
            Some(kproxy::nftables::ElementValue::Data(d)) => format!("data{}", d.len()),
        };
        let k = format!(
            "{} key{} {} comment={}",
            e.container,
            e.key.len(),
            data,
            e.comment.is_some()
        );
        *hist.entry(k).or_default() += 1;
    }
    for (k, n) in hist {
        eprintln!("  {n:>8} {k}");
    }
    eprintln!("size_of Element {} Value {} ElementValue {} Verdict {} Endpoint {} SliceEndpoint {} ServicePort {}",
        std::mem::size_of::<kproxy::nftables::Element>(),
        std::mem::size_of::<kproxy::nftables::Value>(),
        std::mem::size_of::<kproxy::nftables::ElementValue>(),
        std::mem::size_of::<kproxy::nftables::Verdict>(),
        std::mem::size_of::<kproxy::model::Endpoint>(),
        std::mem::size_of::<kproxy::model::SliceEndpoint>(),
        std::mem::size_of::<kproxy::model::ServicePort>());
    let s = report("translation cache + ruleset", &s);
    drop(ruleset);
    let _s = report("drop ruleset", &s);
}
