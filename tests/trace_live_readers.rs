//! The `--live` readers on real tool output (tests/data/trace_live/, see its README): rules
//! that `kproxy sync --once` loaded, as `iptables-save` and `nft -j list table` print them,
//! must trace exactly like the rules `kproxy trace` renders for the same manifests and flags
//! — same verdict, endpoints and odds, masquerading, affinity — with nothing uninterpreted.
//! Affinity entries read from the kernel's forms pin the client.

mod common;

use std::net::{IpAddr, SocketAddr};

use serde_json::Value as Json;

use kproxy::family::IpFamily;
use kproxy::model::Protocol;
use kproxy::trace::live::{iptables_save, nft_json, xt_recent};
use kproxy::trace::{self, AffinityState, Host, Origin, Probe, Rules};

const V4_FLAGS: [&str; 6] = [
    "--hostname",
    "node-1",
    "--node-ip",
    "10.100.0.1",
    "--cluster-cidr",
    "10.244.0.0/16",
];
const V6_FLAGS: [&str; 8] = [
    "--hostname",
    "node-1",
    "--node-ip",
    "fd00:100::1",
    "--cluster-cidr",
    "fd00:244::/64",
    "--ip-family",
    "ipv6",
];

fn data(name: &str) -> String {
    let path = common::repo_dir().join("tests/data/trace_live").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn probe(src: &str, dst: &str, protocol: Protocol, origin: Origin) -> Probe {
    Probe {
        src: src.parse().expect("src"),
        dst: dst.parse().expect("dst"),
        protocol,
        origin,
    }
}

/// The probes of `cluster.yaml`: every Service, port and kind of address, from outside, from
/// a pod and from the node.
fn v4_probes() -> Vec<Probe> {
    use Origin::*;
    use Protocol::*;
    vec![
        probe("10.0.0.9", "172.30.0.41:80", Tcp, Outside),
        probe("10.244.1.5", "172.30.0.41:80", Tcp, Outside),
        probe("10.0.0.9", "172.30.0.41:81", Tcp, Outside),
        probe("10.0.0.9", "172.30.0.50:80", Tcp, Outside),
        probe("10.0.0.9", "172.30.0.50:53", Udp, Outside),
        probe("10.0.0.9", "172.30.0.60:80", Tcp, Outside),
        probe("10.0.0.9", "172.30.0.70:443", Tcp, Outside),
        probe("10.0.0.9", "192.0.2.80:443", Tcp, Outside),
        probe("10.0.0.9", "198.51.100.9:443", Tcp, Outside),
        probe("203.0.113.5", "198.51.100.9:443", Tcp, Outside),
        probe("10.0.0.9", "10.100.0.1:30080", Tcp, Outside),
        probe("10.0.0.9", "10.100.0.1:30443", Tcp, Outside),
        probe("10.100.0.1", "172.30.0.50:80", Tcp, Node),
        probe("10.100.0.1", "10.100.0.1:30080", Tcp, Node),
        probe("10.0.0.9", "10.9.9.9:80", Tcp, Outside),
    ]
}

fn v6_probes() -> Vec<Probe> {
    use Origin::*;
    use Protocol::*;
    vec![
        probe("fd00:1::9", "[fd00:30::41]:80", Tcp, Outside),
        probe("fd00:244::5", "[fd00:30::41]:80", Tcp, Outside),
        probe("fd00:100::1", "[fd00:30::41]:80", Tcp, Node),
        probe("fd00:1::9", "[fd00:30::41]:81", Tcp, Outside),
    ]
}

/// `kproxy trace --output json` over the rendered rules of `manifest`.
fn rendered_trace(mode: &str, manifest: &str, flags: &[&str], probe: &Probe) -> Json {
    let path = common::repo_dir()
        .join("tests/data/trace_live")
        .join(manifest);
    let mut args: Vec<String> = vec![
        "trace".into(),
        "--mode".into(),
        mode.into(),
        "--output".into(),
        "json".into(),
        "--src".into(),
        probe.src.to_string(),
        "--dst".into(),
        probe.dst.to_string(),
        "--proto".into(),
        probe.protocol.lower().into(),
    ];
    if probe.origin == Origin::Node {
        args.push("--from-node".into());
    }
    args.extend(flags.iter().map(|f| f.to_string()));
    args.push(path.to_string_lossy().into_owned());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .args(&args)
        .output()
        .expect("kproxy runs");
    assert!(
        out.status.success(),
        "kproxy {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON trace")
}

/// What must agree between two traces: the probabilities to 1e-6 (iptables-save prints them
/// with 11 decimals, kproxy with 10).
fn summary(trace: &Json) -> Json {
    let round = |v: &Json| -> Json {
        let mut v = v.clone();
        fn walk(v: &mut Json) {
            match v {
                Json::Object(o) => {
                    for (k, x) in o.iter_mut() {
                        if k == "probability" {
                            let p = x.as_f64().unwrap_or(f64::NAN);
                            *x = Json::from((p * 1e6).round() / 1e6);
                        } else {
                            walk(x);
                        }
                    }
                }
                Json::Array(a) => a.iter_mut().for_each(walk),
                _ => {}
            }
        }
        walk(&mut v);
        v
    };
    let verdicts: Vec<Json> = trace["branches"]
        .as_array()
        .map(|b| b.iter().map(|b| b["verdict"].clone()).collect())
        .unwrap_or_default();
    round(&serde_json::json!({
        "verdict": trace["verdict"],
        "endpoints": trace["endpoints"],
        "masquerade": trace["masquerade"],
        "affinity": trace["affinity"],
        "branch_verdicts": verdicts,
        "uninterpreted": trace["uninterpreted"],
    }))
}

fn live_trace(rules: &dyn Rules, probe: &Probe, host: &Host, affinity: &AffinityState) -> Json {
    trace::trace(rules, probe, host, affinity).to_json()
}

fn assert_same_traces(
    mode: &str,
    manifest: &str,
    flags: &[&str],
    rules: &dyn Rules,
    host: &Host,
    probes: &[Probe],
) {
    for probe in probes {
        let rendered = summary(&rendered_trace(mode, manifest, flags, probe));
        let live = summary(&live_trace(rules, probe, host, &AffinityState::default()));
        assert_eq!(
            live, rendered,
            "{mode} {probe:?}: the live rules trace differently from the rendered ones"
        );
        assert_eq!(live["uninterpreted"], Json::Array(vec![]), "{probe:?}");
    }
}

fn node(ip: &str) -> Host {
    Host::new([ip.parse::<IpAddr>().expect("ip")])
}

#[test]
fn saved_iptables_rules_trace_like_the_rendered_ones() {
    let text = data("iptables-save-nat.txt") + &data("iptables-save-filter.txt");
    let saved = iptables_save::read_save_text(&text, IpFamily::V4);
    assert!(saved.notes.is_empty(), "{:?}", saved.notes);
    assert_same_traces(
        "iptables",
        "cluster.yaml",
        &V4_FLAGS,
        &saved.rules,
        &node("10.100.0.1"),
        &v4_probes(),
    );
}

#[test]
fn saved_legacy_ip6tables_rules_trace_like_the_rendered_ones() {
    let text = data("ip6tables-legacy-save-nat.txt") + &data("ip6tables-legacy-save-filter.txt");
    let saved = iptables_save::read_save_text(&text, IpFamily::V6);
    assert!(saved.notes.is_empty(), "{:?}", saved.notes);
    assert_eq!(
        saved.recent_seconds.values().collect::<Vec<_>>(),
        [&10800, &10800]
    );
    assert_same_traces(
        "iptables",
        "cluster-v6.yaml",
        &V6_FLAGS,
        &saved.rules,
        &node("fd00:100::1"),
        &v6_probes(),
    );
}

#[test]
fn listed_nftables_rules_trace_like_the_rendered_ones() {
    let listed = nft_json::read_listing(data("nft-list-table.json").as_bytes(), IpFamily::V4)
        .expect("listing reads");
    assert!(listed.notes.is_empty(), "{:?}", listed.notes);
    assert_same_traces(
        "nftables",
        "cluster.yaml",
        &V4_FLAGS,
        &listed.rules,
        &node("10.100.0.1"),
        &v4_probes(),
    );
    let listed = nft_json::read_listing(data("nft-list-table-ip6.json").as_bytes(), IpFamily::V6)
        .expect("listing reads");
    assert!(listed.notes.is_empty(), "{:?}", listed.notes);
    assert_same_traces(
        "nftables",
        "cluster-v6.yaml",
        &V6_FLAGS,
        &listed.rules,
        &node("fd00:100::1"),
        &v6_probes(),
    );
}

fn sticky(trace: &Json) -> (Json, Json) {
    (
        trace["affinity"]["sticky_endpoint"].clone(),
        trace["endpoints"].clone(),
    )
}

#[test]
fn an_affinity_sets_element_pins_its_client() {
    let listed = nft_json::read_listing(
        data("nft-list-table-affinity.json").as_bytes(),
        IpFamily::V4,
    )
    .expect("listing reads");
    let host = node("10.100.0.1");
    let client = probe("10.0.0.9", "172.30.0.41:80", Protocol::Tcp, Origin::Outside);
    let trace = live_trace(&listed.rules, &client, &host, &listed.affinity);
    assert_eq!(
        sticky(&trace),
        (
            serde_json::json!({"address": "10.244.1.5", "port": 80}),
            serde_json::json!([{"address": "10.244.1.5", "port": 80, "probability": 1.0, "masquerade": true}])
        )
    );
    // Another client has no entry: as rendered.
    let other = probe("10.0.0.7", "172.30.0.41:80", Protocol::Tcp, Origin::Outside);
    assert_eq!(
        summary(&live_trace(&listed.rules, &other, &host, &listed.affinity)),
        summary(&rendered_trace(
            "nftables",
            "../../../examples/my-service.yaml",
            &V4_FLAGS,
            &other
        ))
    );
}

#[test]
fn a_recent_lists_entry_pins_its_client() {
    let text = data("iptables-save-nat.txt") + &data("iptables-save-filter.txt");
    let saved = iptables_save::read_save_text(&text, IpFamily::V4);
    // The list of the endpoint 10.244.2.7:80 of default/my-service, as /proc prints it.
    let list = "KUBE-SEP-RSNVYYY6S75AZ3QJ";
    let (entries, unreadable) = xt_recent::parse_list(
        "src=10.0.0.9 ttl: 64 last_seen: 4297593293 oldest_pkt: 1 4297593293\n",
    );
    assert_eq!(unreadable, 0);
    let files: Vec<xt_recent::ListFile> = saved
        .rules
        .recent_lists()
        .into_iter()
        .map(|name| xt_recent::ListFile {
            entries: Some(if name == list {
                entries.clone()
            } else {
                vec![]
            }),
            name,
            unreadable_lines: 0,
        })
        .collect();
    let clock = xt_recent::Clock {
        now: 4297593293 + 250 * 60,
        hz: 250,
    };
    let state = xt_recent::assess(&files, &saved.recent_seconds, Some(clock), Some(100));
    let client = probe("10.0.0.9", "172.30.0.41:80", Protocol::Tcp, Origin::Outside);
    let trace = live_trace(&saved.rules, &client, &node("10.100.0.1"), &state.affinity);
    assert_eq!(
        sticky(&trace).0,
        serde_json::json!({"address": "10.244.2.7", "port": 80})
    );
    assert_eq!(trace["endpoints"].as_array().map(Vec::len), Some(1));
    assert_eq!(trace["endpoints"][0]["probability"], 1.0);
    // Past the list's 10000 s the entry is stale: no longer sticky.
    let late = xt_recent::Clock {
        now: 4297593293 + 250 * 10_001,
        hz: 250,
    };
    let state = xt_recent::assess(&files, &saved.recent_seconds, Some(late), Some(100));
    let trace = live_trace(&saved.rules, &client, &node("10.100.0.1"), &state.affinity);
    assert_eq!(trace["affinity"]["sticky_endpoint"], Json::Null);
    assert!(
        state.notes.iter().any(|n| n.contains(list)),
        "{:?}",
        state.notes
    );
}

/// Sanity of the probes: they reach every kind of outcome, so the comparisons above mean
/// something.
#[test]
fn the_probes_cover_every_verdict() {
    let text = data("iptables-save-nat.txt") + &data("iptables-save-filter.txt");
    let saved = iptables_save::read_save_text(&text, IpFamily::V4);
    let mut verdicts: Vec<String> = v4_probes()
        .iter()
        .map(|p| {
            live_trace(
                &saved.rules,
                p,
                &node("10.100.0.1"),
                &AffinityState::default(),
            )["verdict"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    verdicts.sort();
    verdicts.dedup();
    assert_eq!(verdicts, ["dnat", "drop", "no-match", "reject"]);
    let _: SocketAddr = "10.244.1.5:80".parse().expect("address");
}
