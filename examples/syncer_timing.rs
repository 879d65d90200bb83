//! Times the agent's steady-state work for one changed Service at cluster scale, without a
//! kernel: `cargo run --release --example syncer_timing -- [iptables|nftables] [SERVICES] [ENDPOINTS]
//! [ROUNDS]`.
//! Both backends run over appliers that accept everything (nft: the fake kernel; iptables: an
//! applier whose tools always succeed), so what is timed is kproxy's own part of a sync:
//! the cached translation, the diff and the transaction text. For finding where that time
//! goes (e.g. under `perf record`); `agent_bench` measures the real thing.

use std::sync::Arc;
use std::time::Instant;

use kproxy::backend::{Backend, IptablesBackend, NftablesBackend};
use kproxy::family::IpFamily;
use kproxy::sync::iptables::{Applier, Exit, SpawnError, Tool};
use kproxy::sync::nftables::{FakeKernel, SyncOptions};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// iptables tools that accept every payload and have nothing to show.
struct Accepting;

impl Applier for Accepting {
    fn program(&self, _: IpFamily, _: Tool) -> String {
        "true".into()
    }
    fn restore(&mut self, _: IpFamily, _: &str) -> Result<Exit, SpawnError> {
        Ok(Exit::code(0))
    }
    fn save(&mut self, _: IpFamily, _: Option<&str>) -> Result<Exit, SpawnError> {
        Ok(Exit::code(0))
    }
    fn iptables(&mut self, _: IpFamily, _: &[&str]) -> Result<Exit, SpawnError> {
        Ok(Exit::code(0))
    }
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let services = args.first().copied().unwrap_or(10_000);
    let endpoints = args.get(1).copied().unwrap_or(10);
    let rounds = args.get(2).copied().unwrap_or(20);
    let mut config = kproxy::config::NodeConfig::new("node-1");
    config.cluster_cidrs = vec!["10.128.0.0/9".parse().expect("constant CIDR")];
    config.node_ips = vec!["10.0.0.1".parse().expect("constant IP")];
    let state = kproxy::synthetic::cluster(services, endpoints).unwrap_or_else(|err| {
        eprintln!("{err}");
        std::process::exit(2)
    });
    let model = kproxy::pipeline::plan(&state, &config).models;
    let mut backends: Vec<(&str, Box<dyn Backend>)> = vec![
        ("iptables", Box::new(IptablesBackend::new(Accepting))),
        (
            "nftables",
            Box::new(NftablesBackend::new(
                FakeKernel::new(),
                SyncOptions::default(),
            )),
        ),
    ];
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a == "iptables" || a == "nftables")
        .collect();
    for (name, backend) in &mut backends {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        let t = Instant::now();
        for family in backend.sync(&model, &config) {
            family.result.expect("the first sync");
        }
        println!("{name}: first sync {:?}", t.elapsed());
        let mut times = Vec::new();
        for round in 0..rounds {
            let mut next = model.clone();
            let index = (round * 97) % next[0].ports.len();
            let mut port = (*next[0].ports[index]).clone();
            port.endpoints.truncate(1);
            port.selection = Default::default();
            next[0].ports[index] = Arc::new(port);
            let t = Instant::now();
            for family in backend.sync(&next, &config) {
                let report = family.result.expect("a partial sync");
                assert!(!report.full, "round {round} was a full sync");
            }
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{name}: one changed port, {rounds} rounds: median {:.1} ms, max {:.1} ms",
            times[times.len() / 2],
            times[times.len() - 1]
        );
    }
}
