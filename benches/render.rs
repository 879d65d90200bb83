//! Render benchmark, both modes: a synthetic cluster of 10,000 Services with 10 endpoints each (one in ten
//! with ClientIP affinity, one in five NodePort), rendered end to end from API objects: validate,
//! build the model, translate, print. Parsing manifests is not included.
//!
//! Run: `cargo bench --bench render` (args: `-- [SERVICES] [ENDPOINTS] [RUNS]`).
//! Reports wall time (min and median of RUNS) and the peak heap in use during one render,
//! measured by a counting global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kproxy::config::NodeConfig;
use kproxy::pipeline::{self, Mode};

struct Counting;

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = IN_USE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            let now = IN_USE.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size
                - layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        } else {
            IN_USE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn render(state: &kproxy::source::ClusterState, config: &NodeConfig, mode: Mode) -> usize {
    let plan = pipeline::plan(state, config);
    match mode {
        Mode::Iptables => pipeline::iptables_rulesets(&plan, config)
            .iter()
            .map(|r| r.to_restore_text().len())
            .sum(),
        Mode::Nftables => pipeline::nftables_rulesets(&plan, config)
            .iter()
            .map(|r| r.to_nft_script().len())
            .sum(),
    }
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let services = args.first().copied().unwrap_or(10_000);
    let endpoints = args.get(1).copied().unwrap_or(10);
    let runs = args.get(2).copied().unwrap_or(10).max(1);

    let state = kproxy::synthetic::cluster(services, endpoints).unwrap_or_else(|err| {
        eprintln!("{err}");
        std::process::exit(2)
    });
    let mut config = NodeConfig::new("node-1");
    config.node_ips = vec!["192.168.0.2".parse().unwrap()];
    config.cluster_cidrs = vec!["10.128.0.0/9".parse().unwrap()];
    config.service_cidrs = vec!["10.96.0.0/12".parse().unwrap()];

    for (mode, name) in [(Mode::Iptables, "iptables"), (Mode::Nftables, "nftables")] {
        let baseline = IN_USE.load(Ordering::Relaxed);
        PEAK.store(baseline, Ordering::Relaxed);
        let bytes = render(&state, &config, mode);
        let peak = PEAK.load(Ordering::Relaxed) - baseline;

        let mut times: Vec<Duration> = (0..runs)
            .map(|_| {
                let start = Instant::now();
                black_box(render(black_box(&state), &config, mode));
                start.elapsed()
            })
            .collect();
        times.sort();
        println!(
            "render {name}: {services} services x {endpoints} endpoints: min {:.1} ms, median {:.1} ms over {runs} runs; peak heap {:.1} MiB; output {:.1} MiB",
            times[0].as_secs_f64() * 1e3,
            times[runs / 2].as_secs_f64() * 1e3,
            peak as f64 / (1024.0 * 1024.0),
            bytes as f64 / (1024.0 * 1024.0),
        );
    }
}
