//! `kproxy sync --once --mode nftables --nftables-layout maps` on a real kernel: the `kproxy`
//! table is created, a later full sync keeps the affinity map's live entries, switching layouts
//! replaces one table by the other, and `cleanup` removes both layouts' tables.

mod common;

use std::process::Output;

use common::netns::{kernel_tests_possible, Netns};
use common::nft::nft;

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
    // A second process: a full sync over the existing table.
    sync(&ns, "maps");
    let affinity = nft(&ns, &["list", "map", "ip", "kproxy", "affinity"]);
    assert!(
        affinity.contains("10.0.0.9 . 172.30.0.41 . tcp . 80"),
        "the full sync dropped the live affinity entry:\n{affinity}"
    );
    let endpoints = nft(&ns, &["list", "map", "ip", "kproxy", "cluster-endpoints"]);
    assert_eq!(endpoints.matches(" : 10.244.").count(), 3, "{endpoints}");

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
