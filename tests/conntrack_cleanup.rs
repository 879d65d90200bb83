//! UDP conntrack cleanup against the real kernel: a UDP flow that keeps using one source port
//! sticks to its backend through conntrack even after the DNAT rule changes; the cleanup must
//! delete that entry so the next datagram follows the new rules (spec §7).

mod common;

use kproxy::config::NodeConfig;
use kproxy::pipeline;
use kproxy::source::Manifests;
use kproxy::sync::conntrack::cleanup_stale_udp;

use common::netns::kernel_tests_possible;
use common::topology::Topology;

/// Sends one datagram per round from the same source port: one conntrack flow throughout.
const SAME_FLOW: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 45000)); s.settimeout(2)
for i in range(int(sys.argv[4])):
    s.sendto(b"hi", (sys.argv[2], int(sys.argv[3])))
    try: print(s.recvfrom(100)[0].decode().strip(), flush=True)
    except Exception as e: print("ERR:" + type(e).__name__, flush=True)
"#;

fn same_flow(topology: &Topology, count: usize) -> Vec<String> {
    let out = topology.client.run(
        &[
            "python3",
            "-c",
            SAME_FLOW,
            "10.100.0.2",
            "10.96.0.53",
            "53",
            &count.to_string(),
        ],
        None,
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn dnat_to(topology: &Topology, backend_ip: &str) {
    let script = format!(
        "flush ruleset\ntable ip handmade {{\n chain pre {{ type nat hook prerouting priority -100; ip daddr 10.96.0.53 udp dport 53 dnat to {backend_ip}:8080; }}\n}}\n"
    );
    let out = topology.node.run(&["nft", "-f", "-"], Some(&script));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The model of a UDP Service 10.96.0.53:53 whose only serving endpoint is `backend_ip`.
fn model_with_endpoint(backend_ip: &str) -> Vec<kproxy::model::ProxyModel> {
    let manifests = format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: dns, namespace: default}}
spec:
  clusterIP: 10.96.0.53
  ports: [{{name: dns, protocol: UDP, port: 53}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: dns-1, namespace: default, labels: {{kubernetes.io/service-name: dns}}}}
addressType: IPv4
ports: [{{name: dns, protocol: UDP, port: 8080}}]
endpoints: [{{addresses: [{backend_ip}]}}]
"#
    );
    let mut m = Manifests::default();
    m.add_text(&manifests, "test").expect("manifests parse");
    pipeline::plan(&m.state, &NodeConfig::new("node-1")).models
}

#[test]
fn stale_udp_flow_is_deleted_and_follows_the_new_rules() {
    if !kernel_tests_possible(&["python3", "nft", "conntrack"]) {
        return;
    }
    let topology = Topology::new(2);
    let (first, second) = (&topology.backends[0], &topology.backends[1]);

    dnat_to(&topology, &first.ip);
    assert_eq!(same_flow(&topology, 2), vec![first.name.clone(); 2]);

    // The rules now point elsewhere, but the flow's conntrack entry still says backend-1.
    dnat_to(&topology, &second.ip);
    assert_eq!(
        same_flow(&topology, 1),
        vec![first.name.clone()],
        "without cleanup the old flow must stick (else this test proves nothing)"
    );

    // A model in which backend-1 no longer serves: its flow is stale and goes.
    let models = model_with_endpoint(&second.ip);
    let deleted = topology
        .node
        .enter(|| cleanup_stale_udp(&models))
        .expect("conntrack cleanup runs");
    assert_eq!(
        deleted, 1,
        "one stale entry: the client's flow to backend-1"
    );
    // The conntrack tool, an independent reader of the table, no longer sees that entry.
    let listing = topology.node.run(&["conntrack", "-L", "-p", "udp"], None);
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        !listing
            .lines()
            .any(|l| l.contains("dst=10.96.0.53") && l.contains(&format!("src={} ", first.ip))),
        "the stale entry is still listed:\n{listing}"
    );
    assert_eq!(same_flow(&topology, 2), vec![second.name.clone(); 2]);

    // Nothing is stale now: no deletion, and the flow stays where it is.
    let deleted = topology
        .node
        .enter(|| cleanup_stale_udp(&models))
        .expect("runs");
    assert_eq!(deleted, 0);
    assert_eq!(same_flow(&topology, 1), vec![second.name.clone()]);
}
