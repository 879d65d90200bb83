//! `kproxy sync --once --mode nftables --nftables-layout maps` on a real kernel: the `kproxy`
//! table is created, a later full sync keeps the affinity map's live entries, switching layouts
//! replaces one table by the other, and `cleanup` removes both layouts' tables.

mod common;

use std::process::Output;
use std::time::Duration;

use common::netns::{kernel_tests_possible, Netns};
use common::nft::nft;
use kproxy::family::IpFamily;
use kproxy::nftables::MAPS_TABLE_NAME;
use kproxy::sync::nftables::{Applier, KernelTable, NftApplier};

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/my-service.yaml");

fn kproxy(ns: &Netns, args: &[&str]) -> Output {
    let mut argv = vec![env!("CARGO_BIN_EXE_kproxy")];
    argv.extend_from_slice(args);
    ns.run(&argv, None)
}

fn sync(ns: &Netns, layout: &str) {
    let out = kproxy(
        ns,
        &[
            "sync",
            "--once",
            "--mode",
            "nftables",
            "--nftables-layout",
            layout,
            "--node-ip",
            "10.0.0.1",
            EXAMPLE,
        ],
    );
    assert!(
        out.status.success(),
        "sync {layout}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tables(ns: &Netns) -> String {
    let out = ns.run(&["nft", "list", "tables"], None);
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn maps_layout_syncs_keeps_affinity_switches_and_cleans_up() {
    if !kernel_tests_possible(&["nft"]) {
        return;
    }
    let ns = Netns::new("maps");
    sync(&ns, "maps");
    assert_eq!(tables(&ns).trim(), "table ip kproxy");
    // A client pinned by the packet path (as `remember-T` would record it).
    nft(
        &ns,
        &[
            "add",
            "element",
            "ip",
            "kproxy",
            "affinity",
            "{ 10.0.0.9 . 172.30.0.41 . tcp . 80 timeout 600s : 10.244.2.7 . 80 }",
        ],
    );
    // Someone else's element, and one of kproxy's changed: the full sync refills the maps.
    nft(
        &ns,
        &[
            "add",
            "element",
            "ip",
            "kproxy",
            "cluster-endpoints-3",
            "{ 172.30.0.99 . tcp . 80 . 0 : 10.1.1.1 . 80 }",
        ],
    );
    nft(
        &ns,
        &[
            "delete",
            "element",
            "ip",
            "kproxy",
            "cluster-ips",
            "{ 172.30.0.41 }",
        ],
    );
    // A second process: a full sync over the existing table.
    sync(&ns, "maps");
    let cluster_ips = nft(&ns, &["list", "set", "ip", "kproxy", "cluster-ips"]);
    assert!(cluster_ips.contains("172.30.0.41"), "{cluster_ips}");
    let affinity = nft(&ns, &["list", "map", "ip", "kproxy", "affinity"]);
    assert!(
        affinity.contains("10.0.0.9 . 172.30.0.41 . tcp . 80"),
        "the full sync dropped the live affinity entry:\n{affinity}"
    );
    let endpoints = nft(&ns, &["list", "map", "ip", "kproxy", "cluster-endpoints-3"]);
    assert_eq!(endpoints.matches(" : 10.244.").count(), 3, "{endpoints}");
    assert!(!endpoints.contains("10.1.1.1"), "{endpoints}");

    // `trace --live` reads the maps layout's table and its affinity map.
    let live = |client: &str| -> serde_json::Value {
        let out = kproxy(
            &ns,
            &[
                "trace",
                "--live",
                "--mode",
                "nftables",
                "--nftables-layout",
                "maps",
                "--output",
                "json",
                "--src",
                client,
                "--dst",
                "172.30.0.41:80",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    let pinned = live("10.0.0.9");
    assert_eq!(
        pinned["affinity"]["sticky_endpoint"]["address"], "10.244.2.7",
        "{pinned}"
    );
    assert_eq!(
        pinned["endpoints"].as_array().map(Vec::len),
        Some(1),
        "{pinned}"
    );
    assert_eq!(pinned["affinity"]["timeout_seconds"], 10000, "{pinned}");
    let fresh = live("10.0.0.8");
    assert_eq!(
        fresh["endpoints"].as_array().map(Vec::len),
        Some(3),
        "{fresh}"
    );
    assert!(fresh["affinity"]["sticky_endpoint"].is_null(), "{fresh}");
    assert_eq!(fresh["uninterpreted"], serde_json::json!([]), "{fresh}");

    // Switching layouts replaces the table, in both directions.
    sync(&ns, "kube-proxy");
    assert_eq!(tables(&ns).trim(), "table ip kube-proxy");
    sync(&ns, "maps");
    assert_eq!(tables(&ns).trim(), "table ip kproxy");

    // cleanup removes whichever layout's table is there, and both when both are.
    nft(&ns, &["add", "table", "ip", "kube-proxy"]);
    let out = kproxy(&ns, &["cleanup", "--mode", "nftables"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("table ip kproxy") && said.contains("table ip kube-proxy"),
        "{said}"
    );
    assert_eq!(tables(&ns).trim(), "");
}

/// The agent writes the `maps` layout's fixed chains as `nft -f` text and its elements over
/// netlink (src/sync/nftables/netlink_elements.rs): an `nft` on `PATH` that logs what it is
/// given sees the chains and no element, and an endpoint change that keeps the endpoint count
/// reaches the kernel without running `nft` at all.
#[test]
fn the_agent_sends_elements_over_netlink_and_an_endpoint_change_runs_no_nft() {
    if !kernel_tests_possible(&["nft"]) {
        return;
    }
    let ns = Netns::new("maps-netlink");
    let manifests = tempfile::tempdir().expect("temp dir");
    let manifest = manifests.path().join("my-service.yaml");
    std::fs::copy(EXAMPLE, &manifest).expect("copy the example");

    // `nft` that appends its arguments and its standard input to nft.log, then runs the real
    // one with the same arguments.
    let bin = tempfile::tempdir().expect("temp dir");
    let real = std::process::Command::new("sh")
        .args(["-c", "command -v nft"])
        .output()
        .expect("sh runs");
    let real = String::from_utf8_lossy(&real.stdout).trim().to_string();
    assert!(!real.is_empty(), "nft is not on PATH");
    let log = bin.path().join("nft.log");
    let wrapper = format!(
        "#!/bin/sh\necho \"nft $*\" >> {log}\nif [ \"$1 $2\" = \"-f -\" ]; then\n  tee -a {log} | exec {real} \"$@\"\nelse\n  exec {real} \"$@\"\nfi\n",
        log = log.display()
    );
    let nft_path = bin.path().join("nft");
    std::fs::write(&nft_path, wrapper).expect("write the wrapper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&nft_path, std::fs::Permissions::from_mode(0o755))
        .expect("make the wrapper executable");
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let dir_arg = manifests.path().display().to_string();
    let agent = common::agent::AgentProcess::start_with_env(
        &ns,
        &[
            "--mode",
            "nftables",
            "--nftables-layout",
            "maps",
            "--from-dir",
            &dir_arg,
            "--node-ip",
            "10.0.0.1",
        ],
        &[("PATH", &path)],
    );
    let endpoints = || {
        let out = ns.run(
            &["nft", "list", "map", "ip", "kproxy", "cluster-endpoints-3"],
            None,
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    common::agent::wait_until(
        Duration::from_secs(20),
        || endpoints().contains("10.244.3.9 . 80"),
        || {
            format!(
                "no endpoints in the kernel; agent log:\n{}",
                agent.log_text()
            )
        },
    );
    let first = std::fs::read_to_string(&log).expect("the wrapper ran");
    assert!(
        first.contains("add chain ip kproxy services"),
        "the fixed chains are not nft text:\n{first}"
    );
    assert!(
        !first.contains("element"),
        "elements went to nft as text:\n{first}"
    );
    assert_eq!(
        endpoints().matches(" : 10.244.").count(),
        3,
        "{}",
        endpoints()
    );

    // Two clients pinned by the packet path: one to the endpoint about to go, one to another.
    for (client, endpoint) in [("10.0.0.9", "10.244.3.9"), ("10.0.0.8", "10.244.1.5")] {
        let entry =
            format!("{{ {client} . 172.30.0.41 . tcp . 80 timeout 600s : {endpoint} . 80 }}");
        nft(&ns, &["add", "element", "ip", "kproxy", "affinity", &entry]);
    }
    let affinity = || nft(&ns, &["list", "map", "ip", "kproxy", "affinity"]);

    // One endpoint replaced by another: a delete and an add in the endpoint map.
    let text = std::fs::read_to_string(&manifest).expect("read the manifest");
    std::fs::write(&manifest, text.replace("10.244.3.9", "10.244.3.10")).expect("edit");
    common::agent::wait_until(
        Duration::from_secs(20),
        || {
            let now = endpoints();
            now.contains("10.244.3.10 . 80") && !now.contains("10.244.3.9 . 80")
        },
        || {
            format!(
                "the change did not arrive; agent log:\n{}",
                agent.log_text()
            )
        },
    );
    assert_eq!(
        endpoints().matches(" : 10.244.").count(),
        3,
        "{}",
        endpoints()
    );
    // The agent took the element path (no whole-table comparison).
    common::agent::wait_until(
        Duration::from_secs(5),
        || agent.log_text().contains("synced element changes only"),
        || format!("no element-only sync; agent log:\n{}", agent.log_text()),
    );
    // Only the client pinned to the removed endpoint lost its entry.
    common::agent::wait_until(
        Duration::from_secs(5),
        || !affinity().contains("10.0.0.9 . 172.30.0.41"),
        || format!("the pin to the removed endpoint stayed:\n{}", affinity()),
    );
    assert!(
        affinity().contains("10.0.0.8 . 172.30.0.41 . tcp . 80"),
        "{}",
        affinity()
    );
    let second = std::fs::read_to_string(&log).expect("the wrapper's log");
    assert_eq!(
        second,
        first,
        "the endpoint change ran nft; agent log:\n{}",
        agent.log_text()
    );

    // A fourth endpoint: a pick of four is new to the table (its chain and map go through
    // nft, its elements over netlink); the frontend moves to the map of four.
    let map = |ways: u32| {
        let name = format!("cluster-endpoints-{ways}");
        let out = ns.run(&["nft", "list", "map", "ip", "kproxy", &name], None);
        String::from_utf8_lossy(&out.stdout)
            .matches(" : 10.244.")
            .count()
    };
    let three = std::fs::read_to_string(&manifest).expect("read the manifest");
    let fourth = "- addresses: [\"10.244.4.4\"]\n  conditions: {ready: true}\n";
    std::fs::write(&manifest, format!("{three}{fourth}")).expect("edit");
    common::agent::wait_until(
        Duration::from_secs(20),
        || map(4) == 4 && map(3) == 0,
        || {
            format!(
                "no move to four endpoints; agent log:\n{}",
                agent.log_text()
            )
        },
    );
    // And back to three: element changes alone, no nft.
    let before = std::fs::read_to_string(&log).expect("the wrapper's log");
    std::fs::write(&manifest, three).expect("edit");
    common::agent::wait_until(
        Duration::from_secs(20),
        || map(3) == 3 && map(4) == 0,
        || format!("no move back to three; agent log:\n{}", agent.log_text()),
    );
    assert_eq!(
        std::fs::read_to_string(&log).expect("the wrapper's log"),
        before,
        "an endpoint count change to a pick in use ran nft; agent log:\n{}",
        agent.log_text()
    );

    // A new Service of three endpoints: its elements alone, no nft.
    let other = std::fs::read_to_string(EXAMPLE)
        .expect("read the example")
        .replace("my-service", "other-service")
        .replace("172.30.0.41", "172.30.0.42")
        .replace(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 10000\n",
            "",
        );
    assert!(!other.contains("sessionAffinity: ClientIP"), "{other}");
    std::fs::write(manifests.path().join("other.yaml"), other).expect("write");
    let service_ips = || nft(&ns, &["list", "map", "ip", "kproxy", "service-ips"]);
    common::agent::wait_until(
        Duration::from_secs(20),
        || service_ips().contains("172.30.0.42 . tcp . 80") && map(3) == 6,
        || {
            format!(
                "the new Service did not arrive; agent log:\n{}",
                agent.log_text()
            )
        },
    );
    assert_eq!(
        std::fs::read_to_string(&log).expect("the wrapper's log"),
        before,
        "adding a Service ran nft; agent log:\n{}",
        agent.log_text()
    );
    assert!(agent.stop().success());
}

/// `nft -j list ruleset`, without handles and with every set's and map's elements sorted:
/// the kernel's own listing, comparable between two namespaces whatever order the elements
/// were added in.
fn normalized_ruleset(ns: &Netns) -> serde_json::Value {
    fn normalize(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(object) => {
                object.remove("handle");
                for member in object.values_mut() {
                    normalize(member);
                }
                if let Some(serde_json::Value::Array(elements)) = object.get_mut("elem") {
                    elements.sort_by_key(|e| e.to_string());
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(normalize),
            _ => {}
        }
    }
    let mut listing: serde_json::Value =
        serde_json::from_str(&nft(ns, &["-j", "list", "ruleset"])).expect("nft's JSON");
    normalize(&mut listing);
    listing
}

/// What the syncer writes (declarations and chains as text, elements over netlink) is what
/// `nft -f` makes of the rendered text, for every golden case: the netlink encoding of every
/// key, range, data value, verdict and comment the layout uses is checked by the kernel's own
/// listing. (Cases with IPv6 affinity are left out where this nft cannot write their `update`
/// statements at all: tests/common/nft.rs.)
#[test]
fn sync_writes_what_the_rendered_text_loads_for_every_golden_case() {
    if !kernel_tests_possible(&["nft"]) {
        return;
    }
    let probe = Netns::new("maps-probe");
    let ipv6_updates = common::nft::writes_ipv6_affinity_updates(&probe);
    drop(probe);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rules-golden");
    let mut cases: Vec<_> = std::fs::read_dir(root)
        .expect("rules-golden")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("input.yaml").is_file())
        .collect();
    cases.sort();
    let mut compared = 0;
    for case in &cases {
        let name = case.display().to_string();
        let flags = std::fs::read_to_string(case.join("flags")).unwrap_or_default();
        let flags: Vec<&str> = flags.split_whitespace().collect();
        let input = case.join("input.yaml").display().to_string();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kproxy"))
            .args(["render", "--mode", "nftables", "--nftables-layout", "maps"])
            .args(&flags)
            .arg(&input)
            .output()
            .expect("kproxy runs");
        assert!(out.status.success(), "{name}: render failed");
        let script = String::from_utf8(out.stdout).expect("utf-8");
        if !ipv6_updates && common::nft::without_ipv6_affinity_updates(&script).1 > 0 {
            continue;
        }
        let loaded = Netns::new("maps-text");
        let load = loaded.run(&["nft", "-f", "-"], Some(&script));
        assert!(
            load.status.success(),
            "{name}: nft -f: {}",
            String::from_utf8_lossy(&load.stderr)
        );
        let synced = Netns::new("maps-sync");
        let mut args = vec!["sync", "--once", "--mode", "nftables"];
        args.extend(["--nftables-layout", "maps"]);
        args.extend(&flags);
        args.push(&input);
        let out = kproxy(&synced, &args);
        assert!(
            out.status.success(),
            "{name}: sync: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (want, got) = (normalized_ruleset(&loaded), normalized_ruleset(&synced));
        assert!(
            want == got,
            "{name}: the synced table differs from the loaded text\nloaded: {want:#}\nsynced: {got:#}"
        );
        // The syncer's reader with elements over netlink: chains (with their rule counts) and
        // declarations as nft's JSON listing reads them; elements not read (a full sync refills
        // them), and every chain taken as possibly pointed at by an element.
        for (family, word) in [(IpFamily::V4, "ip"), (IpFamily::V6, "ip6")] {
            let by_json = NftApplier::in_netns(&loaded.name)
                .with_table(MAPS_TABLE_NAME, None)
                .read(family)
                .expect("the JSON read");
            let by_netlink = NftApplier::in_netns(&loaded.name)
                .with_table(MAPS_TABLE_NAME, None)
                .with_netlink_elements()
                .read(family)
                .expect("the netlink read");
            let (Some(by_json), Some(by_netlink)) = (by_json, by_netlink) else {
                assert!(
                    !script.contains(&format!("add table {word} kproxy")),
                    "{name}"
                );
                continue;
            };
            let chains = |table: &KernelTable| -> Vec<(String, String, usize)> {
                table
                    .chains
                    .iter()
                    .map(|c| (c.name.to_string(), format!("{:?}", c.kind), c.rules))
                    .collect()
            };
            assert_eq!(
                chains(&by_netlink),
                chains(&by_json),
                "{name}: {word} chains"
            );
            assert!(by_netlink.chains.iter().all(|c| c.in_element), "{name}");
            assert_eq!(
                by_netlink.containers.len(),
                by_json.containers.len(),
                "{name}: {word} containers"
            );
            for container in &by_netlink.containers {
                let from_json = by_json.container(&container.name).expect("listed by nft");
                assert_eq!(container.decl, from_json.decl, "{name}: {}", container.name);
                assert_eq!(container.elements, None, "{name}: {}", container.name);
            }
        }
        compared += 1;
    }
    assert!(compared >= 10, "only {compared} golden cases compared");
}

/// IPv6 with ClientIP affinity in the `maps` layout: with an nft that can write its affinity
/// updates the table is created; with one that cannot (before 1.0.6.1 / 1.1.0, e.g. Debian
/// 12's) the sync fails, says what to install or use instead, and changes nothing.
#[test]
fn ipv6_affinity_syncs_or_says_which_nft_it_needs() {
    if !kernel_tests_possible(&["nft"]) {
        return;
    }
    let ns = Netns::new("maps-v6");
    let dir = tempfile::tempdir().expect("temp dir");
    let manifest = dir.path().join("web6.yaml");
    std::fs::write(
        &manifest,
        r#"apiVersion: v1
kind: Service
metadata: {name: web6, namespace: default}
spec:
  clusterIP: fd00:96::10
  ipFamilies: [IPv6]
  ports: [{name: http, protocol: TCP, port: 80}]
  sessionAffinity: ClientIP
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web6-1, namespace: default, labels: {kubernetes.io/service-name: web6}}
addressType: IPv6
ports: [{name: http, protocol: TCP, port: 80}]
endpoints:
- addresses: ["fd00:244::5"]
  conditions: {ready: true}
"#,
    )
    .expect("write the manifest");
    let path = manifest.display().to_string();
    let out = kproxy(
        &ns,
        &[
            "sync",
            "--once",
            "--mode",
            "nftables",
            "--nftables-layout",
            "maps",
            "--ip-family",
            "ipv6",
            "--node-ip",
            "fd00::1",
            &path,
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    if common::nft::writes_ipv6_affinity_updates(&ns) {
        assert!(out.status.success(), "{stderr}");
        assert_eq!(tables(&ns).trim(), "table ip6 kproxy");
    } else {
        assert!(!out.status.success());
        assert!(
            stderr.contains("install nft 1.0.6.1 or newer")
                && stderr.contains("--nftables-layout kube-proxy"),
            "{stderr}"
        );
        assert_eq!(tables(&ns).trim(), "", "a refused sync changed the kernel");
    }
}
