//! `kproxy trace` on the bundled example, as the issue states it: the affinity check, three
//! endpoints at 1/3 each and the 10000 s stickiness, in both modes, as text and as JSON.

use std::process::Command;

use serde_json::Value;

fn kproxy(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("kproxy runs")
}

fn json(args: &[&str]) -> Value {
    let mut all = vec!["trace", "--output", "json"];
    all.extend_from_slice(args);
    let out = kproxy(&all);
    assert!(
        out.status.success(),
        "{all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

const EXAMPLE: [&str; 5] = [
    "--src",
    "10.0.0.9",
    "--dst",
    "172.30.0.41:80",
    "examples/my-service.yaml",
];

#[test]
fn the_example_in_json_in_both_modes() {
    for mode in ["iptables", "nftables"] {
        let mut args = vec!["--mode", mode];
        args.extend_from_slice(&EXAMPLE);
        let trace = json(&args);
        assert_eq!(trace["verdict"], "dnat", "{mode}: {trace}");
        assert_eq!(trace["masquerade"], false, "{mode}");
        let endpoints = trace["endpoints"].as_array().expect("endpoints");
        let addresses: Vec<&str> = endpoints
            .iter()
            .map(|e| e["address"].as_str().expect("address"))
            .collect();
        assert_eq!(
            addresses,
            ["10.244.1.5", "10.244.2.7", "10.244.3.9"],
            "{mode}"
        );
        let mut sum = 0.0;
        for endpoint in endpoints {
            assert_eq!(endpoint["port"], 80, "{mode}");
            let p = endpoint["probability"].as_f64().expect("probability");
            assert!((p - 1.0 / 3.0).abs() < 1e-9, "{mode}: {p}");
            sum += p;
        }
        assert!((sum - 1.0).abs() < 1e-12, "{mode}: odds sum to {sum}");
        let affinity = &trace["affinity"];
        assert_eq!(affinity["timeout_seconds"], 10000, "{mode}: {affinity}");
        assert!(
            affinity["sticky_endpoint"].is_null(),
            "{mode}: a new client"
        );
        let next = affinity["next_connection"].as_array().expect("next");
        assert_eq!(next.len(), 3, "{mode}: {affinity}");
        for n in next {
            assert_eq!(n["pinned"], true, "{mode}: {n}");
            assert_eq!(n["next"][0]["address"], n["first"]["address"], "{mode}");
        }
        let path: Vec<&str> = trace["path"]
            .as_array()
            .expect("path")
            .iter()
            .map(|s| s.as_str().expect("a string"))
            .collect();
        let checks = path
            .iter()
            .filter(|s| s.contains("no entry for 10.0.0.9"))
            .count();
        assert_eq!(
            checks, 3,
            "{mode}: one affinity check per endpoint: {path:#?}"
        );
    }
}

#[test]
fn the_example_as_text_shows_the_affinity_check_the_odds_and_the_stickiness() {
    for mode in ["iptables", "nftables"] {
        let mut args = vec!["trace", "--mode", mode];
        args.extend_from_slice(&EXAMPLE);
        let out = kproxy(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        for wanted in [
            "no entry for 10.0.0.9",
            "random choice, 3 ways:",
            "verdict: dnat",
            "endpoint 10.244.1.5:80  probability 0.3333",
            "endpoint 10.244.2.7:80  probability 0.3333",
            "endpoint 10.244.3.9:80  probability 0.3333",
            "affinity: ClientIP, timeout 10000 s",
            "next connection within 10000 s after reaching 10.244.2.7:80: 10.244.2.7:80 (1.0000) (pinned)",
        ] {
            assert!(text.contains(wanted), "{mode}: no {wanted:?} in\n{text}");
        }
    }
}

#[test]
fn a_packet_for_no_service_passes_untouched_and_a_wrong_port_differs_by_mode() {
    let iptables = json(&[
        "--src",
        "10.0.0.9",
        "--dst",
        "172.30.0.99:80",
        "examples/my-service.yaml",
    ]);
    assert_eq!(iptables["verdict"], "no-match");
    assert_eq!(iptables["endpoints"], Value::Array(Vec::new()));
    assert!(iptables["affinity"].is_null());
    // A cluster IP's unused port: nftables rejects it (cluster-ips-check), iptables does not.
    let args = [
        "--src",
        "10.0.0.9",
        "--dst",
        "172.30.0.41:81",
        "examples/my-service.yaml",
    ];
    assert_eq!(json(&args)["verdict"], "no-match");
    let mut nft = vec!["--mode", "nftables"];
    nft.extend_from_slice(&args);
    assert_eq!(json(&nft)["verdict"], "reject");
}

#[test]
fn bad_flags_exit_2_and_name_the_problem() {
    for (args, wanted) in [
        (
            vec![
                "trace",
                "--src",
                "10.0.0.9",
                "--dst",
                "[fd00::1]:80",
                "examples/my-service.yaml",
            ],
            "different IP families",
        ),
        (
            vec![
                "trace",
                "--src",
                "fd00::9",
                "--dst",
                "[fd00::1]:80",
                "examples/my-service.yaml",
            ],
            "--ip-family",
        ),
        (
            vec!["trace", "--src", "10.0.0.9", "--dst", "172.30.0.41"],
            "IP:PORT",
        ),
        (
            vec!["trace", "--src", "10.0.0.9", "--dst", "172.30.0.41:80"],
            "FILE",
        ),
    ] {
        let out = kproxy(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(wanted),
            "{args:?}: no {wanted:?} in {stderr}"
        );
    }
}
