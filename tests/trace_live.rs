//! `kproxy trace --live` against the real kernel: in a fresh network namespace, `kproxy sync
//! --once` loads examples/my-service.yaml in each mode (iptables with both backends), and the
//! live trace must agree with the trace over the rendered rules; an affinity entry added the
//! kernel's way (`nft add element`, a write to /proc/net/xt_recent) pins its client; a
//! `recent` list filled towards `ip_list_tot` gets its note.
//!
//! Needs root, `ip`, `nft` and the iptables tools. Without them the tests print why and pass,
//! unless `KPROXY_REQUIRE_KERNEL_TESTS=1`, which turns that into a failure.

mod common;

use serde_json::{json, Value as Json};

use common::netns::{kernel_tests_possible, Netns};

const TOOLS: [&str; 5] = [
    "nft",
    "iptables-nft-save",
    "iptables-nft-restore",
    "iptables-legacy-save",
    "iptables-legacy-restore",
];

const NODE_IP: &str = "10.100.0.1";
const CLIENT: &str = "10.0.0.9";
const SERVICE: &str = "172.30.0.41:80";
/// The endpoint the test pins the client to (the second of three).
const PINNED: &str = "10.244.2.7";

fn manifest() -> String {
    common::repo_dir()
        .join("examples/my-service.yaml")
        .to_string_lossy()
        .into_owned()
}

fn kproxy() -> &'static str {
    env!("CARGO_BIN_EXE_kproxy")
}

/// A namespace with the node's address on one end of a veth pair, so that the live trace sees the
/// same own addresses as the rendered one (`--node-ip`).
fn node() -> Netns {
    let ns = Netns::new("trace-live");
    for argv in [
        vec![
            "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1",
        ],
        vec!["ip", "addr", "add", "10.100.0.1/24", "dev", "d0"],
        vec!["ip", "link", "set", "d0", "up"],
        vec!["ip", "link", "set", "d1", "up"],
    ] {
        run(&ns, &argv);
    }
    ns
}

fn run(ns: &Netns, argv: &[&str]) -> String {
    let out = ns.run(argv, None);
    assert!(
        out.status.success(),
        "{} in {}: {}",
        argv.join(" "),
        ns.name,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sync(ns: &Netns, mode: &str, extra: &[&str]) {
    let manifest = manifest();
    let mut argv = vec![
        kproxy(),
        "sync",
        "--once",
        "--mode",
        mode,
        "--hostname",
        "node-1",
        "--node-ip",
        NODE_IP,
        "--cluster-cidr",
        "10.244.0.0/16",
    ];
    argv.extend_from_slice(extra);
    argv.push(&manifest);
    run(ns, &argv);
}

/// `kproxy trace --live --output json` in the namespace.
fn live(ns: &Netns, mode: &str, extra: &[&str], src: &str) -> Json {
    let mut argv = vec![
        kproxy(),
        "trace",
        "--live",
        "--mode",
        mode,
        "--output",
        "json",
        "--src",
        src,
        "--dst",
        SERVICE,
    ];
    argv.extend_from_slice(extra);
    serde_json::from_str(&run(ns, &argv)).expect("JSON trace")
}

/// `kproxy trace --output json` over the rendered rules (no namespace needed).
fn rendered(mode: &str, src: &str) -> Json {
    let out = std::process::Command::new(kproxy())
        .args([
            "trace",
            "--mode",
            mode,
            "--output",
            "json",
            "--src",
            src,
            "--dst",
            SERVICE,
            "--hostname",
            "node-1",
            "--node-ip",
            NODE_IP,
            "--cluster-cidr",
            "10.244.0.0/16",
        ])
        .arg(manifest())
        .output()
        .expect("kproxy runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON trace")
}

/// Verdict, endpoints (odds to 1e-6: iptables-save prints 11 decimals, kproxy 10),
/// masquerading, affinity and what was not understood.
fn summary(trace: &Json) -> Json {
    let endpoints: Vec<Json> = trace["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let p = e["probability"].as_f64().unwrap_or(f64::NAN);
            json!({"address": e["address"], "port": e["port"], "masquerade": e["masquerade"],
                   "probability": (p * 1e6).round() / 1e6})
        })
        .collect();
    json!({
        "verdict": trace["verdict"],
        "endpoints": endpoints,
        "masquerade": trace["masquerade"],
        "timeout": trace["affinity"]["timeout_seconds"],
        "sticky": trace["affinity"]["sticky_endpoint"],
        "uninterpreted": trace["uninterpreted"],
    })
}

fn assert_pinned(trace: &Json) {
    assert_eq!(
        trace["affinity"]["sticky_endpoint"],
        json!({"address": PINNED, "port": 80}),
        "{trace:#}"
    );
    let endpoints = trace["endpoints"].as_array().expect("endpoints");
    assert_eq!(endpoints.len(), 1, "{trace:#}");
    assert_eq!(endpoints[0]["address"], PINNED);
    assert_eq!(endpoints[0]["probability"], 1.0);
}

/// The `recent` list of the endpoint chain that DNATs to `ip`, from the saved nat table.
fn recent_list(ns: &Netns, save: &str, ip: &str) -> String {
    let target = format!("--to-destination {ip}:80");
    run(ns, &[save, "-t", "nat"])
        .lines()
        .find(|l| l.contains(&target) && l.contains("--set"))
        .and_then(|l| l.split("--name ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("no recent --set rule for {ip}"))
        .to_string()
}

/// Adds entries to a `recent` list: xt_recent takes one command per write, so one `echo` per
/// line.
fn write_recent(ns: &Netns, list: &str, lines: &str) {
    let script = format!(
        "while read -r line; do echo \"$line\" > /proc/net/xt_recent/{list} || exit 1; done"
    );
    let out = ns.run(&["sh", "-c", &script], Some(lines));
    assert!(
        out.status.success(),
        "writing to {list}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn iptables_live_trace_matches_the_rendered_one_and_sees_affinity() {
    if !kernel_tests_possible(&TOOLS) {
        return;
    }
    for (backend, save) in [
        ("nft", "iptables-nft-save"),
        ("legacy", "iptables-legacy-save"),
    ] {
        let ns = node();
        let flags = ["--iptables-backend", backend];
        sync(&ns, "iptables", &flags);
        for client in [CLIENT, "10.244.1.5"] {
            let live = live(&ns, "iptables", &flags, client);
            assert_eq!(
                summary(&live),
                summary(&rendered("iptables", client)),
                "{backend} backend, client {client}"
            );
            let notes = live["notes"].as_array().expect("notes");
            assert!(
                notes.iter().any(|n| n
                    .as_str()
                    .is_some_and(|n| n.starts_with("recent lists: 3 lists"))),
                "{notes:?}"
            );
        }
        let list = recent_list(&ns, save, PINNED);
        write_recent(&ns, &list, &format!("+{CLIENT}\n"));
        assert_pinned(&live(&ns, "iptables", &flags, CLIENT));
        // Another client still has the random choice.
        let other = live(&ns, "iptables", &flags, "10.0.0.7");
        assert_eq!(
            other["endpoints"].as_array().map(Vec::len),
            Some(3),
            "{other:#}"
        );
    }
}

#[test]
fn a_real_packet_leaves_an_entry_the_live_trace_sees() {
    if !kernel_tests_possible(&TOOLS) {
        return;
    }
    let ns = node();
    sync(&ns, "iptables", &[]);
    // A packet sent from the node (OUTPUT) to the Service records the node's address in the
    // list of the endpoint it was sent to; no endpoint needs to answer.
    run(&ns, &["ip", "route", "add", "default", "dev", "d0"]);
    let _ = ns.run(
        &[
            "sh",
            "-c",
            "timeout 2 bash -c 'exec 3<>/dev/tcp/172.30.0.41/80' 2>/dev/null; true",
        ],
        None,
    );
    let live = live(&ns, "iptables", &["--from-node"], NODE_IP);
    let sticky = &live["affinity"]["sticky_endpoint"];
    assert!(
        sticky.is_object(),
        "the node's packet left no entry: {live:#}"
    );
    assert_eq!(
        live["endpoints"].as_array().map(Vec::len),
        Some(1),
        "{live:#}"
    );
    assert_eq!(live["endpoints"][0]["address"], sticky["address"]);
}

#[test]
fn nftables_live_trace_matches_the_rendered_one_and_sees_affinity() {
    if !kernel_tests_possible(&TOOLS) {
        return;
    }
    let ns = node();
    sync(&ns, "nftables", &[]);
    for client in [CLIENT, "10.244.1.5"] {
        let live = live(&ns, "nftables", &[], client);
        assert_eq!(
            summary(&live),
            summary(&rendered("nftables", client)),
            "client {client}"
        );
        assert_eq!(live["notes"], json!([]));
    }
    let listing: Json = serde_json::from_str(&run(
        &ns,
        &["nft", "-j", "list", "table", "ip", "kube-proxy"],
    ))
    .expect("nft JSON");
    let set = listing["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["set"]["name"].as_str())
        .find(|name| name.starts_with("affinity-") && name.contains(PINNED))
        .expect("the pinned endpoint's affinity set")
        .to_string();
    run(
        &ns,
        &[
            "nft",
            "add",
            "element",
            "ip",
            "kube-proxy",
            &set,
            &format!("{{ {CLIENT} }}"),
        ],
    );
    assert_pinned(&live(&ns, "nftables", &[], CLIENT));
    let other = live(&ns, "nftables", &[], "10.0.0.7");
    assert_eq!(
        other["endpoints"].as_array().map(Vec::len),
        Some(3),
        "{other:#}"
    );
}

#[test]
fn nftables_live_without_the_table_says_so() {
    if !kernel_tests_possible(&TOOLS) {
        return;
    }
    let ns = Netns::new("trace-live-empty");
    let out = ns.run(
        &[
            kproxy(),
            "trace",
            "--live",
            "--mode",
            "nftables",
            "--src",
            CLIENT,
            "--dst",
            SERVICE,
        ],
        None,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no kube-proxy table") && stderr.contains("nftables mode"),
        "{stderr}"
    );
}

#[test]
fn a_recent_list_near_ip_list_tot_gets_a_note() {
    if !kernel_tests_possible(&TOOLS) {
        return;
    }
    let ns = node();
    sync(&ns, "iptables", &[]);
    let limit: usize = std::fs::read_to_string("/sys/module/xt_recent/parameters/ip_list_tot")
        .expect("xt_recent is loaded once recent rules exist")
        .trim()
        .parse()
        .expect("a number");
    assert!(
        limit <= 65_536,
        "ip_list_tot {limit} is too large to fill in a test"
    );
    let list = recent_list(&ns, "iptables-save", PINNED);
    let fill = (limit * 4).div_ceil(5);
    let lines: String = (0..fill)
        .map(|i| format!("+10.1.{}.{}\n", i / 250, i % 250 + 1))
        .collect();
    write_recent(&ns, &list, &lines);
    let listed = run(&ns, &["cat", &format!("/proc/net/xt_recent/{list}")]);
    assert_eq!(listed.lines().count(), fill);
    let trace = live(&ns, "iptables", &[], CLIENT);
    let notes: Vec<&str> = trace["notes"]
        .as_array()
        .expect("notes")
        .iter()
        .filter_map(Json::as_str)
        .collect();
    let full: Vec<&&str> = notes
        .iter()
        .filter(|n| n.contains("ip_list_tot=N"))
        .collect();
    assert_eq!(full.len(), 1, "{notes:#?}");
    for part in [
        list.as_str(),
        &format!("{fill} of {limit} addresses"),
        "silently loses its session affinity",
        "modprobe xt_recent ip_list_tot=N",
    ] {
        assert!(full[0].contains(part), "{part:?} missing from {}", full[0]);
    }
    assert!(
        notes[0].starts_with(&format!("recent lists: 3 lists with {fill} entries in all")),
        "{notes:#?}"
    );
    // The text output carries the same notes.
    let text = run(
        &ns,
        &[
            kproxy(),
            "trace",
            "--live",
            "--src",
            CLIENT,
            "--dst",
            SERVICE,
        ],
    );
    assert!(
        text.contains(&format!("note: recent list {list} holds {fill} of {limit}")),
        "{text}"
    );
}
