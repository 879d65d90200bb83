//! Times each step of `kproxy render` of a manifest file, as the binary runs them:
//! `cargo run --release --example render_phases -- FILE [maps|kube-proxy|iptables]`.
//! For finding where the end-to-end render time goes (read, validate + model, translate,
//! text, freeing); the wall time of the binary is what the figures report.
use std::time::Instant;

use kproxy::config::{NftablesLayout, NodeConfig};

// The same allocator as the kproxy binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(file) = args.first() else {
        eprintln!("usage: render_phases FILE [maps|kube-proxy|iptables]");
        std::process::exit(2)
    };
    let layout = args.get(1).map_or("maps", String::as_str);
    let mut config = NodeConfig::new("node-1");
    config.node_ips = vec!["10.0.0.1".parse().expect("constant address")];
    config.nftables_layout = match layout {
        "maps" => NftablesLayout::Maps,
        _ => NftablesLayout::KubeProxy,
    };
    let start = Instant::now();
    let mut last = start;
    let mut lap = |what: &str| {
        let now = Instant::now();
        eprintln!(
            "{what:>10}: {:7.3} s (at {:.3} s)",
            (now - last).as_secs_f64(),
            (now - start).as_secs_f64()
        );
        last = now;
    };
    let manifests = kproxy::source::Manifests::read_paths(&[file]).unwrap_or_else(|err| {
        eprintln!("{err}");
        std::process::exit(1)
    });
    lap("read");
    let plan = kproxy::pipeline::plan(&manifests.state, &config);
    lap("plan");
    let text = if layout == "iptables" {
        let ruleset = kproxy::iptables::translate(&plan.models[0], &config);
        lap("translate");
        let text = ruleset.to_restore_text();
        lap("text");
        drop(ruleset);
        lap("drop rules");
        text
    } else {
        let ruleset = kproxy::nftables::translate(&plan.models[0], &config);
        lap("translate");
        let text = ruleset.to_nft_script();
        lap("text");
        drop(ruleset);
        lap("drop rules");
        text
    };
    eprintln!("{} bytes of rules", text.len());
    drop((manifests, plan, text));
    lap("drop rest");
}
