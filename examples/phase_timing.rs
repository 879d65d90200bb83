//! Times each step of a render of the synthetic cluster: `cargo run --release --example
//! phase_timing -- [SERVICES] [ENDPOINTS]`. For finding where render time goes; the benchmark
//! that reports the figures is `cargo bench --bench render`.
use std::time::Instant;

// The same allocator as the kproxy binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let services = args.first().copied().unwrap_or(10_000);
    let endpoints = args.get(1).copied().unwrap_or(10);
    let state = kproxy::synthetic::cluster(services, endpoints).unwrap_or_else(|err| {
        eprintln!("{err}");
        std::process::exit(2)
    });
    let mut config = kproxy::config::NodeConfig::new("node-1");
    config.cluster_cidrs = vec!["10.128.0.0/9".parse().expect("constant CIDR")];
    for _ in 0..3 {
        let t = Instant::now();
        let (cluster, _) = kproxy::model::validate(&state);
        let t1 = t.elapsed();
        let model =
            kproxy::model::ProxyModel::build(&cluster, &config, kproxy::family::IpFamily::V4);
        let t2 = t.elapsed();
        let ruleset = kproxy::iptables::translate(&model, &config);
        let t3 = t.elapsed();
        let text = ruleset.to_restore_text();
        let t4 = t.elapsed();
        drop((ruleset, text));
        let t5 = t.elapsed();
        let nft = kproxy::nftables::translate(&model, &config);
        let t6 = t.elapsed();
        let script = nft.to_nft_script();
        let t7 = t.elapsed();
        drop((cluster, model, nft, script));
        let t8 = t.elapsed();
        println!(
            "validate {:?} build {:?} | iptables: translate {:?} render {:?} drop {:?} | nftables: translate {:?} render {:?} drop(all) {:?}",
            t1,
            t2 - t1,
            t3 - t2,
            t4 - t3,
            t5 - t4,
            t6 - t5,
            t7 - t6,
            t8 - t7
        );
    }
    // The agent's case: one port changed since the last translation.
    let (cluster, _) = kproxy::model::validate(&state);
    let model = kproxy::model::ProxyModel::build(&cluster, &config, kproxy::family::IpFamily::V4);
    let mut ipt_cache = kproxy::iptables::PortCache::default();
    let mut nft_cache = kproxy::nftables::PortCache::default();
    kproxy::iptables::translate_cached(&model, &config, &mut ipt_cache);
    kproxy::nftables::translate_cached(&model, &config, &mut nft_cache);
    for round in 0..3 {
        let mut next = model.clone();
        let mut port = (*next.ports[round * 7]).clone();
        port.endpoints.truncate(1);
        port.selection = Default::default();
        next.ports[round * 7] = std::sync::Arc::new(port);
        let t = Instant::now();
        let ipt = kproxy::iptables::translate_cached(&next, &config, &mut ipt_cache);
        let t1 = t.elapsed();
        let nft = kproxy::nftables::translate_cached(&next, &config, &mut nft_cache);
        let t2 = t.elapsed();
        std::thread::spawn(move || drop((ipt, nft)));
        println!(
            "one port changed: iptables translate_cached {:?} | nftables translate_cached {:?}",
            t1,
            t2 - t1
        );
    }
}
