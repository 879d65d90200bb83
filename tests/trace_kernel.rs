//! The tracer agrees with the kernel: rendered rules are loaded into a node namespace with
//! `kproxy sync --once`, real connections are made from a client namespace, and every answer
//! must be one the tracer allowed for that packet — an endpoint it listed with non-zero odds,
//! the refusal or the drop it named — in both modes.

mod common;

use std::collections::BTreeSet;

use common::netns::kernel_tests_possible;
use common::topology::{Topology, BACKEND_PORT, CLUSTER_CIDR, NODE_IP};
use serde_json::Value;

/// backend-1 runs on this node (`node-1`); the others elsewhere.
const CLUSTER: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: t}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, protocol: TCP, port: 80}, {name: dns, protocol: UDP, port: 53}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: t}
spec:
  clusterIP: 10.96.0.11
  ports: [{name: http, protocol: TCP, port: 80}]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
---
apiVersion: v1
kind: Service
metadata: {name: np, namespace: t}
spec:
  type: NodePort
  clusterIP: 10.96.0.12
  ports: [{name: http, protocol: TCP, port: 80, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: t}
spec:
  type: NodePort
  clusterIP: 10.96.0.13
  externalTrafficPolicy: Local
  ports: [{name: http, protocol: TCP, port: 80, nodePort: 30081}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: t}
spec:
  clusterIP: 10.96.0.14
  ports: [{name: http, protocol: TCP, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: t}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.15
  loadBalancerSourceRanges: [10.100.0.2/32]
  ports: [{name: http, protocol: TCP, port: 80, nodePort: 30082}]
status:
  loadBalancer:
    ingress: [{ip: 192.0.2.10}]
"#;

/// The EndpointSlice of `service` with backends `10.244.N.2:8080` on `node-N`.
fn slice(service: &str, backends: &[usize]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|n| format!("- {{addresses: [10.244.{n}.2], nodeName: node-{n}}}\n"))
        .collect();
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-1, namespace: t, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports:\n- {{name: http, protocol: TCP, port: {BACKEND_PORT}}}\n- {{name: dns, protocol: UDP, port: {BACKEND_PORT}}}\nendpoints:\n{endpoints}"
    )
}

fn manifests() -> String {
    let mut text = CLUSTER.to_string();
    for (service, backends) in [
        ("web", &[1, 2, 3][..]),
        ("sticky", &[1, 2, 3]),
        ("np", &[2, 3]),
        ("local", &[2, 3]),
        ("lb", &[1, 2]),
    ] {
        text.push_str(&slice(service, backends));
    }
    text
}

const COMMON: [&str; 6] = [
    "--hostname",
    "node-1",
    "--node-ip",
    NODE_IP,
    "--cluster-cidr",
    CLUSTER_CIDR,
];

/// A connection to make: protocol, client address `10.100.0.<client>`, target, port.
struct Probe {
    proto: &'static str,
    client: u8,
    target: &'static str,
    port: u16,
}

const PROBES: [Probe; 11] = [
    probe("tcp", 2, "10.96.0.10", 80),
    probe("udp", 3, "10.96.0.10", 53),
    probe("tcp", 4, "10.96.0.11", 80),
    probe("tcp", 5, "10.96.0.11", 80),
    probe("tcp", 2, NODE_IP, 30080),
    probe("tcp", 2, NODE_IP, 30081),
    probe("tcp", 3, "10.96.0.13", 80),
    probe("tcp", 2, "10.96.0.14", 80),
    probe("tcp", 2, "192.0.2.10", 80),
    probe("tcp", 3, "192.0.2.10", 80),
    probe("tcp", 2, "10.96.0.10", 81),
];

const fn probe(proto: &'static str, client: u8, target: &'static str, port: u16) -> Probe {
    Probe {
        proto,
        client,
        target,
        port,
    }
}

/// `kproxy trace --output json` over the manifests.
fn trace(topology: &Topology, mode: &[&str], file: &str, probe: &Probe) -> Value {
    let src = format!("10.100.0.{}", probe.client);
    let dst = format!("{}:{}", probe.target, probe.port);
    let mut args = vec!["trace", "--output", "json"];
    args.extend_from_slice(mode);
    args.extend_from_slice(&COMMON);
    args.extend_from_slice(&["--src", &src, "--dst", &dst, "--proto", probe.proto, file]);
    let out = topology.kproxy(&args);
    assert!(
        out.status.success(),
        "kproxy trace {dst} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("trace prints JSON")
}

fn backend_of(address: &str) -> Option<String> {
    let n = address.strip_prefix("10.244.")?.strip_suffix(".2")?;
    Some(format!("backend-{n}"))
}

/// How the rules get into the node namespace.
enum Load {
    /// `kproxy sync --once`.
    Sync,
    /// `kproxy render | nft -f -` (the maps layout has no syncer yet).
    RenderAndNft,
}

fn agrees(topology: &Topology, mode_flags: &[&str], load: Load) {
    let mode = mode_flags.join(" ");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("cluster.yaml");
    std::fs::write(&file, manifests()).expect("write manifests");
    let file = file.to_str().expect("utf-8 path");
    let verb = match load {
        Load::Sync => vec!["sync", "--once"],
        Load::RenderAndNft => vec!["render"],
    };
    let mut args = verb;
    args.extend_from_slice(mode_flags);
    args.extend_from_slice(&COMMON);
    args.push(file);
    let out = topology.kproxy(&args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if let Load::RenderAndNft = load {
        let script = String::from_utf8_lossy(&out.stdout).to_string();
        let loaded = topology.node.run(&["nft", "-f", "-"], Some(&script));
        assert!(
            loaded.status.success(),
            "nft -f: {}",
            String::from_utf8_lossy(&loaded.stderr)
        );
    }
    let mut verdicts = BTreeSet::new();
    for probe in &PROBES {
        let traced = trace(topology, mode_flags, file, probe);
        let what = format!(
            "{mode}: {} 10.100.0.{} -> {}:{}",
            probe.proto, probe.client, probe.target, probe.port
        );
        let verdict = traced["verdict"].as_str().expect("a verdict").to_string();
        verdicts.insert(verdict.clone());
        // Refusals are ICMP errors the kernel rate-limits per host, and drops wait for a
        // timeout: a couple of connections show those.
        let count = if verdict == "dnat" { 16 } else { 2 };
        let answers = topology.connect(probe.proto, probe.client, probe.target, probe.port, count);
        assert_eq!(answers.len(), count, "{what}: {answers:?}");
        match verdict.as_str() {
            "dnat" => {
                let allowed: BTreeSet<String> = traced["endpoints"]
                    .as_array()
                    .expect("endpoints")
                    .iter()
                    .filter(|e| e["probability"].as_f64().is_some_and(|p| p > 0.0))
                    .filter(|e| e["port"] == BACKEND_PORT)
                    .filter_map(|e| backend_of(e["address"].as_str()?))
                    .collect();
                let reached: BTreeSet<String> = answers.iter().cloned().collect();
                assert!(
                    reached.is_subset(&allowed),
                    "{what}: reached {reached:?}, the tracer allowed {allowed:?}"
                );
                if traced["affinity"].is_object() {
                    assert_eq!(reached.len(), 1, "{what}: affinity, yet {answers:?}");
                    let next = &traced["affinity"]["next_connection"];
                    assert!(
                        next.as_array()
                            .is_some_and(|n| !n.is_empty() && n.iter().all(|n| n["pinned"] == true)),
                        "{what}: the tracer must say the next connection is pinned: {next}"
                    );
                } else if allowed.len() > 1 {
                    // 16 connections over ≥2 endpoints at even odds all on one: p < 1e-4.
                    assert!(reached.len() > 1, "{what}: only {reached:?} over {count}");
                }
            }
            "reject" => assert!(
                answers.iter().all(|a| a == "ERR:ConnectionRefusedError"),
                "{what}: the tracer says reject, the client saw {answers:?}"
            ),
            "drop" => assert!(
                answers
                    .iter()
                    .all(|a| a.starts_with("ERR:") && !a.contains("Refused")),
                "{what}: the tracer says drop, the client saw {answers:?}"
            ),
            // Untouched: forwarded to the node's default gateway, which does not exist.
            "no-match" | "accept" => assert!(
                answers.iter().all(|a| a.starts_with("ERR:")),
                "{what}: the tracer says no kproxy rule takes it, the client saw {answers:?}"
            ),
            other => panic!("{what}: unexpected verdict {other}: {traced}"),
        }
    }
    // A cluster IP's unused port: nftables mode rejects it (`cluster-ips-check`), iptables
    // mode lets it pass (spec §5.5 vs §4.5).
    let mut expected: BTreeSet<String> = ["dnat", "drop", "reject"].map(String::from).into();
    if mode.contains("iptables") {
        expected.insert("no-match".into());
    }
    assert_eq!(
        verdicts, expected,
        "{mode}: the probes must cover every verdict"
    );
}

#[test]
fn the_tracer_agrees_with_real_traffic_in_iptables_mode() {
    if !kernel_tests_possible(&["iptables", "python3"]) {
        return;
    }
    let topology = Topology::new(3);
    topology.add_node_default_route();
    agrees(&topology, &["--mode", "iptables"], Load::Sync);
}

#[test]
fn the_tracer_agrees_with_real_traffic_in_nftables_mode() {
    if !kernel_tests_possible(&["nft", "python3"]) {
        return;
    }
    let topology = Topology::new(3);
    topology.add_node_default_route();
    agrees(&topology, &["--mode", "nftables"], Load::Sync);
}

#[test]
fn the_tracer_agrees_with_real_traffic_in_the_maps_layout() {
    if !kernel_tests_possible(&["nft", "python3"]) {
        return;
    }
    let topology = Topology::new(3);
    topology.add_node_default_route();
    agrees(
        &topology,
        &["--mode", "nftables", "--nftables-layout", "maps"],
        Load::RenderAndNft,
    );
}
