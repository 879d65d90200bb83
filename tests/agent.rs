//! `kproxy run`, the node agent, against the real kernel with real traffic, in both modes:
//! fed by the project's fake API server (list+watch over HTTP, running inside the node
//! namespace) or by a directory of manifests. Clients in their own namespace talk to Services
//! through the node namespace; backends answer with their names (tests/common/topology.rs).
//!
//! Needs root, `ip`, `nft`, `iptables` and `python3`; without them the tests print why and
//! pass, unless `KPROXY_REQUIRE_KERNEL_TESTS=1`, which turns that into a failure.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use common::agent::{wait_until, AgentProcess, HEALTHZ, METRICS};
use common::netns::kernel_tests_possible;
use common::topology::{Topology, BACKEND_PORT, CLUSTER_CIDR, NODE_IP};
use kproxy::fake_apiserver::FakeApiServer;

const MODES: [&str; 2] = ["iptables", "nftables"];
const WEB_IP: &str = "10.96.0.10";
const LATE_IP: &str = "10.96.0.20";
const NODE: &str = "node-a";
/// Long enough to outlast every test, short enough to be a real ClientIP timeout.
const AFFINITY_SECONDS: u32 = 300;

fn possible() -> bool {
    kernel_tests_possible(&["nft", "iptables", "python3"])
}

/// A Service with TCP port 80 to the backends' 8080, optionally with ClientIP affinity.
fn service(name: &str, ip: &str, affinity: bool) -> Value {
    let mut spec = json!({
        "clusterIP": ip,
        "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": BACKEND_PORT}],
    });
    if affinity {
        spec["sessionAffinity"] = json!("ClientIP");
        spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": AFFINITY_SECONDS}});
    }
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "test"}, "spec": spec})
}

/// The EndpointSlice of `service` with the backends numbered in `backends` (10.244.N.2:8080).
fn slice(service: &str, backends: &[usize]) -> Value {
    let endpoints: Vec<Value> = backends
        .iter()
        .map(|n| {
            json!({"addresses": [format!("10.244.{n}.2")], "nodeName": format!("node-{n}"),
                        "conditions": {"ready": true}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{service}-1"), "namespace": "test",
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4",
           "ports": [{"name": "http", "protocol": "TCP", "port": BACKEND_PORT}],
           "endpoints": endpoints})
}

fn node_object() -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
           "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}})
}

/// The fake API server, started inside the node namespace so that the agent reaches it on
/// loopback there.
fn api_server(topology: &Topology) -> FakeApiServer {
    topology
        .node
        .enter(|| FakeApiServer::start().expect("fake API server"))
}

fn agent_args<'a>(mode: &'a str, source: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--mode",
        mode,
        "--hostname",
        NODE,
        "--cluster-cidr",
        CLUSTER_CIDR,
        "--min-sync-period",
        "300ms",
        "--sync-period",
        "5s",
    ];
    args.extend_from_slice(source);
    args
}

/// Which backend each client address (10.100.0.2..=9) reaches, checking that `count`
/// connections of each reach the same one.
fn placement(topology: &Topology, count: usize) -> BTreeMap<u8, String> {
    (2..=9)
        .map(|client| {
            let answers = topology.connect("tcp", client, WEB_IP, 80, count);
            let first = answers.first().cloned().unwrap_or_default();
            assert!(
                first.starts_with("backend-"),
                "client {client}: {answers:?}"
            );
            assert!(
                answers.iter().all(|a| *a == first),
                "client 10.100.0.{client} was not kept on one endpoint: {answers:?}"
            );
            (client, first)
        })
        .collect()
}

/// Waits until one connection from client 2 to `ip:80` gets an answer that `accept`s.
fn wait_for_answer(
    topology: &Topology,
    agent: &AgentProcess,
    ip: &str,
    accept: impl Fn(&str) -> bool,
) {
    let last = std::cell::RefCell::new(Vec::new());
    wait_until(
        Duration::from_secs(15),
        || {
            *last.borrow_mut() = topology.connect("tcp", 2, ip, 80, 1);
            last.borrow().first().is_some_and(|a| accept(a))
        },
        || {
            format!(
                "{ip}:80 answered {:?}; agent log:\n{}",
                last.borrow(),
                agent.log_text()
            )
        },
    );
}

#[test]
fn agent_follows_the_api_server_through_changes_and_watch_trouble() {
    if !possible() {
        return;
    }
    for mode in MODES {
        let topology = Topology::new(3);
        topology.add_node_default_route();
        let api = api_server(&topology);
        api.apply(node_object());
        api.apply(service("web", WEB_IP, true));
        api.apply(slice("web", &[1, 2]));
        let url = api.url();
        let agent = AgentProcess::start(&topology.node, &agent_args(mode, &["--master", &url]));
        agent.wait_for_syncs(1, Duration::from_secs(20));

        // The node's address came from the Node object.
        assert!(
            agent.log_text().contains(&format!("node IPs [{NODE_IP}]")),
            "{mode}: {}",
            agent.log_text()
        );
        let before = placement(&topology, 4);
        assert!(
            before
                .values()
                .all(|b| b == "backend-1" || b == "backend-2"),
            "{before:?}"
        );

        // A new Service becomes reachable.
        api.apply(service("late", LATE_IP, false));
        api.apply(slice("late", &[3]));
        wait_for_answer(&topology, &agent, LATE_IP, |a| a == "backend-3");

        // A removed endpoint moves only its own clients.
        api.apply(slice("web", &[1, 3]));
        let syncs = agent.syncs();
        agent.wait_for_syncs(syncs + 1, Duration::from_secs(10));
        wait_until(
            Duration::from_secs(10),
            || {
                topology
                    .connect("tcp", 2, WEB_IP, 80, 1)
                    .first()
                    .is_some_and(|a| a != "backend-2")
            },
            || "backend-2 still reached".into(),
        );
        let after = placement(&topology, 3);
        for (client, backend) in &before {
            if backend == "backend-1" {
                assert_eq!(
                    &after[client], backend,
                    "{mode}: client {client} moved off a kept endpoint"
                );
            } else {
                assert_ne!(
                    after[client], "backend-2",
                    "{mode}: client {client} still on the removed endpoint"
                );
            }
        }

        // A deleted Service stops answering.
        api.delete("Service", "test", "late");
        wait_for_answer(&topology, &agent, LATE_IP, |a| a.starts_with("ERR:"));

        // An expired history and dropped watches: the agent relists and loses nothing made
        // meanwhile.
        let lists = api.list_requests(kproxy::fake_apiserver::ResourceKind::Service);
        api.compact();
        api.drop_watches();
        api.apply(service("late", LATE_IP, false));
        wait_for_answer(&topology, &agent, LATE_IP, |a| a == "backend-3");
        assert!(
            api.list_requests(kproxy::fake_apiserver::ResourceKind::Service) > lists,
            "{mode}: no relist after 410 Gone"
        );

        // A stalled API server: the rules stay; changes made meanwhile arrive afterwards.
        // First every watcher (Services, slices, Node) must be back from its relist, so that
        // no list answered during the stall carries the change.
        wait_until(
            Duration::from_secs(10),
            || api.open_watches() >= 3,
            || format!("{} watches open", api.open_watches()),
        );
        api.set_stalled(true);
        api.apply(slice("late", &[2]));
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(
            topology.connect("tcp", 2, LATE_IP, 80, 1),
            vec!["backend-3"],
            "{mode}"
        );
        api.set_stalled(false);
        api.drop_watches();
        wait_for_answer(&topology, &agent, LATE_IP, |a| a == "backend-2");

        // A burst of 300 updates leads to a handful of syncs.
        let before_burst = agent.syncs();
        for i in 0..300 {
            // The last one (i = 299) leaves only backend-1.
            let backends: &[usize] = if i % 2 == 1 { &[1] } else { &[1, 3] };
            api.apply(slice("web", backends));
        }
        let end = agent.syncs();
        wait_until(
            Duration::from_secs(10),
            || {
                topology
                    .connect("tcp", 9, WEB_IP, 80, 1)
                    .first()
                    .is_some_and(|a| a == "backend-1")
                    && topology
                        .connect("tcp", 8, WEB_IP, 80, 1)
                        .first()
                        .is_some_and(|a| a == "backend-1")
            },
            || "the burst's last state was not programmed".into(),
        );
        std::thread::sleep(Duration::from_millis(800));
        let burst_syncs = agent.syncs() - before_burst;
        assert!(
            (1..=10).contains(&burst_syncs),
            "{mode}: 300 updates led to {burst_syncs} syncs ({end} at the end of the burst)"
        );
        let metrics = agent.metrics();
        assert!(
            common::agent::metric_value(
                &metrics,
                "kubeproxy_sync_proxy_rules_endpoint_changes_total"
            )
            .is_some_and(|v| v >= 300.0),
            "{mode}: endpoint changes not counted:\n{metrics}"
        );
        // The Node's address changes: the agent exits (status 1) to restart with it, as
        // kube-proxy does; its rules stay.
        let mut node = node_object();
        node["status"]["addresses"][0]["address"] = json!("10.100.0.77");
        api.apply(node);
        let mut agent = agent;
        wait_until(
            Duration::from_secs(10),
            || !agent.is_running(),
            || "the agent did not exit after its node's address changed".into(),
        );
        assert!(
            agent.log_text().contains("changed its addresses"),
            "{mode}: {}",
            agent.log_text()
        );
        assert_eq!(agent.stop().code(), Some(1), "{mode}");
        assert_eq!(
            topology.connect("tcp", 9, WEB_IP, 80, 2),
            vec!["backend-1"; 2],
            "{mode}"
        );
    }
}

#[test]
fn sigterm_leaves_the_rules_and_a_restart_keeps_every_client_on_its_endpoint() {
    if !possible() {
        return;
    }
    for mode in MODES {
        let topology = Topology::new(3);
        let dir = tempfile::tempdir().expect("temp dir");
        let write = |name: &str, value: &Value| {
            std::fs::write(
                dir.path().join(name),
                serde_json::to_string_pretty(value).unwrap(),
            )
            .expect("write manifest")
        };
        write("web.json", &service("web", WEB_IP, true));
        write("web-slice.json", &slice("web", &[1, 2, 3]));
        let dir_arg = dir.path().to_string_lossy().to_string();
        let args = agent_args(mode, &["--from-dir", &dir_arg, "--node-ip", NODE_IP]);

        let agent = AgentProcess::start(&topology.node, &args);
        agent.wait_for_syncs(1, Duration::from_secs(20));
        let before = placement(&topology, 3);
        let spread: std::collections::BTreeSet<&String> = before.values().collect();
        assert!(
            spread.len() > 1,
            "{mode}: all clients on one endpoint: {before:?}"
        );

        assert_eq!(agent.stop().code(), Some(0), "{mode}: SIGTERM exits 0");
        // Down: rules and affinity still work.
        assert_eq!(
            placement(&topology, 2),
            before,
            "{mode}: affinity lost while the agent is down"
        );

        // A restarted agent adopts the rules: every client stays on its endpoint.
        let agent = AgentProcess::start(&topology.node, &args);
        agent.wait_for_syncs(1, Duration::from_secs(20));
        assert_eq!(
            placement(&topology, 2),
            before,
            "{mode}: affinity lost by the restart"
        );
        // … and then follows new changes.
        write("late.json", &service("late", LATE_IP, false));
        write("late-slice.json", &slice("late", &[3]));
        wait_for_answer(&topology, &agent, LATE_IP, |a| a == "backend-3");
        assert_eq!(
            placement(&topology, 2),
            before,
            "{mode}: an unrelated change moved clients"
        );
        assert_eq!(agent.stop().code(), Some(0));
    }
}

#[test]
fn from_dir_follows_edits_and_keeps_the_last_good_rules() {
    if !possible() {
        return;
    }
    for mode in MODES {
        let topology = Topology::new(2);
        let dir = tempfile::tempdir().expect("temp dir");
        let web = dir.path().join("web.json");
        let web_slice = dir.path().join("web-slice.json");
        std::fs::write(&web, service("web", WEB_IP, false).to_string()).unwrap();
        std::fs::write(&web_slice, slice("web", &[1]).to_string()).unwrap();
        let dir_arg = dir.path().to_string_lossy().to_string();
        let agent = AgentProcess::start(
            &topology.node,
            &agent_args(mode, &["--from-dir", &dir_arg, "--node-ip", NODE_IP]),
        );
        agent.wait_for_syncs(1, Duration::from_secs(20));
        assert_eq!(topology.connect("tcp", 2, WEB_IP, 80, 1), vec!["backend-1"]);

        // An edit is followed within the minimum sync period and a little.
        std::fs::write(&web_slice, slice("web", &[2]).to_string()).unwrap();
        let edited = std::time::Instant::now();
        wait_for_answer(&topology, &agent, WEB_IP, |a| a == "backend-2");
        assert!(
            edited.elapsed() < Duration::from_secs(3),
            "{mode}: the edit took {:?}",
            edited.elapsed()
        );

        // The slice's trigger time feeds the network-programming latency.
        let mut annotated = slice("web", &[2]);
        annotated["metadata"]["annotations"] = json!({
            "endpoints.kubernetes.io/last-change-trigger-time":
                k8s_openapi::jiff::Timestamp::now().to_string()
        });
        // Only a change of the endpoints counts (§7.2): here, the endpoint's node.
        annotated["endpoints"][0]["nodeName"] = json!("node-x");
        std::fs::write(&web_slice, annotated.to_string()).unwrap();
        let series = "kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"}";
        wait_until(
            Duration::from_secs(5),
            || agent.metric(series).is_some_and(|v| v >= 1.0),
            || {
                format!(
                    "{mode}: no network programming observation:\n{}",
                    agent.metrics()
                )
            },
        );

        // A malformed file, new or replacing a good one, keeps the last good rules.
        std::fs::write(
            dir.path().join("broken.yaml"),
            "kind: Service\nmetadata: [\n",
        )
        .unwrap();
        std::fs::write(&web_slice, "{\"apiVersion\": \"discovery.k8s.io/v1\", ").unwrap();
        wait_until(
            Duration::from_secs(10),
            || {
                agent
                    .log_text()
                    .contains("web-slice.json: malformed YAML/JSON")
            },
            || format!("the broken file was not reported:\n{}", agent.log_text()),
        );
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(
            topology.connect("tcp", 2, WEB_IP, 80, 3),
            vec!["backend-2"; 3],
            "{mode}"
        );

        // Health and metrics answer with kube-proxy's names.
        let (status, body) = agent.get(HEALTHZ, "/healthz").expect("/healthz answers");
        assert_eq!(status, 200, "{body}");
        let health: Value = serde_json::from_str(&body).expect("JSON health");
        assert_eq!(health["healthy"], true);
        assert!(
            health["lastUpdated"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z')),
            "{body}"
        );
        assert!(
            health["status"]["IPv4"]["lastUpdated"].is_string(),
            "{body}"
        );
        assert_eq!(agent.get(HEALTHZ, "/livez").map(|r| r.0), Some(200));
        assert_eq!(agent.get(HEALTHZ, "/other").map(|r| r.0), Some(404));
        assert_eq!(
            agent.get(METRICS, "/proxyMode").map(|r| r.1),
            Some(mode.to_string())
        );
        // An invalid Service is skipped and counted (when the metrics are read).
        let invalid = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "bad", "namespace": "default"},
            "spec": {"clusterIP": "300.1.1.1", "ports": [{"port": 80, "protocol": "TCP"}]}
        });
        std::fs::write(dir.path().join("bad.json"), invalid.to_string()).unwrap();
        wait_until(
            Duration::from_secs(5),
            || agent.metric("kproxy_invalid_objects{kind=\"Service\"}") == Some(1.0),
            || {
                format!(
                    "{mode}: the invalid Service is not counted:\n{}",
                    agent.metrics()
                )
            },
        );
        let metrics = agent.metrics();
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}",
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family=\"IPv4\"}",
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "kubeproxy_proxy_healthz_total{code=\"200\"}",
        ] {
            assert!(metrics.contains(name), "{mode}: no {name} in\n{metrics}");
        }
        let failures = match mode {
            "iptables" => "kubeproxy_sync_proxy_rules_iptables_restore_failures",
            _ => "kubeproxy_sync_proxy_rules_nftables_sync_failures",
        };
        let series = format!("{failures}_total{{ip_family=\"IPv4\"}}");
        assert_eq!(
            common::agent::metric_value(&metrics, &series),
            Some(0.0),
            "{mode}: no sync should have failed:\n{metrics}"
        );
        let programmed = match mode {
            "iptables" => {
                "kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\",ip_family=\"IPv4\"}"
            }
            _ => "kproxy_sync_proxy_rules_nftables_objects{ip_family=\"IPv4\"}",
        };
        assert!(
            common::agent::metric_value(&metrics, programmed).is_some_and(|v| v >= 4.0),
            "{mode}: {programmed} missing:\n{metrics}"
        );
        assert_eq!(agent.stop().code(), Some(0));

        // `run --cleanup` removes kproxy's rules and nothing else: the Service stops answering.
        let out = topology.kproxy(&["run", "--cleanup", "--mode", mode, "--from-dir", &dir_arg]);
        assert!(
            out.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tables = topology.node.run(&["nft", "list", "tables"], None);
        let tables = String::from_utf8_lossy(&tables.stdout).to_string();
        assert!(!tables.contains("kube-proxy"), "{mode}: {tables}");
        let saved = topology.node.run(&["iptables-save"], None);
        let saved = String::from_utf8_lossy(&saved.stdout).to_string();
        assert!(!saved.contains("KUBE-SERVICES"), "{mode}: {saved}");
        let answers = topology.connect("tcp", 2, WEB_IP, 80, 1);
        assert!(
            answers.iter().all(|a| a.starts_with("ERR:")),
            "{mode}: {answers:?}"
        );
    }
}

#[test]
fn health_check_node_port_reports_local_endpoints() {
    if !possible() {
        return;
    }
    let topology = Topology::new(2);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut lb = service("lb", WEB_IP, false);
    lb["spec"]["type"] = json!("LoadBalancer");
    lb["spec"]["externalTrafficPolicy"] = json!("Local");
    lb["spec"]["healthCheckNodePort"] = json!(30500);
    lb["spec"]["ports"][0]["nodePort"] = json!(30080);
    let lb_slice = dir.path().join("lb-slice.json");
    std::fs::write(dir.path().join("lb.json"), lb.to_string()).unwrap();
    std::fs::write(&lb_slice, slice("lb", &[1, 2]).to_string()).unwrap();
    let dir_arg = dir.path().to_string_lossy().to_string();
    // node-1 runs backend-1: one local endpoint.
    let mut args = agent_args("nftables", &["--from-dir", &dir_arg, "--node-ip", NODE_IP]);
    args[3] = "node-1";
    let agent = AgentProcess::start(&topology.node, &args);
    agent.wait_for_syncs(1, Duration::from_secs(20));
    let probe = || agent.get(&format!("{NODE_IP}:30500"), "/");
    wait_until(
        Duration::from_secs(5),
        || probe().is_some(),
        || "port 30500 never opened".into(),
    );
    let (status, body) = probe().expect("health check answers");
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body["localEndpoints"], 1);
    assert_eq!(body["service"]["name"], "lb");
    assert_eq!(body["serviceProxyHealthy"], true);

    // No local endpoint any more: 503.
    std::fs::write(&lb_slice, slice("lb", &[2]).to_string()).unwrap();
    wait_until(
        Duration::from_secs(5),
        || probe().is_some_and(|(s, _)| s == 503),
        || format!("still {:?}", probe()),
    );
    // The Service gone: the port closes.
    std::fs::remove_file(dir.path().join("lb.json")).unwrap();
    wait_until(
        Duration::from_secs(5),
        || probe().is_none(),
        || "port 30500 still open".into(),
    );
}

/// Sends one datagram per round from the same source port: one conntrack flow throughout.
const SAME_FLOW: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 45000)); s.settimeout(2)
for i in range(int(sys.argv[4])):
    s.sendto(b"hi", (sys.argv[2], int(sys.argv[3])))
    try: print(s.recvfrom(100)[0].decode().strip(), flush=True)
    except Exception as e: print("ERR:" + type(e).__name__, flush=True)
"#;

#[test]
fn a_udp_flow_follows_its_service_when_the_backend_changes() {
    if !possible() {
        return;
    }
    for mode in MODES {
        let topology = Topology::new(2);
        let dir = tempfile::tempdir().expect("temp dir");
        let mut dns = service("dns", WEB_IP, false);
        dns["spec"]["ports"] = json!([{"name": "dns", "protocol": "UDP", "port": 53}]);
        let dns_slice = |backend: usize| {
            let mut value = slice("dns", &[backend]);
            value["ports"] = json!([{"name": "dns", "protocol": "UDP", "port": BACKEND_PORT}]);
            value
        };
        std::fs::write(dir.path().join("dns.json"), dns.to_string()).unwrap();
        let slice_file = dir.path().join("dns-slice.json");
        std::fs::write(&slice_file, dns_slice(1).to_string()).unwrap();
        let dir_arg = dir.path().to_string_lossy().to_string();
        let agent = AgentProcess::start(
            &topology.node,
            &agent_args(mode, &["--from-dir", &dir_arg, "--node-ip", NODE_IP]),
        );
        agent.wait_for_syncs(1, Duration::from_secs(20));
        let flow = |count: usize| {
            let out = topology.client.run(
                &[
                    "python3",
                    "-c",
                    SAME_FLOW,
                    "10.100.0.2",
                    WEB_IP,
                    "53",
                    &count.to_string(),
                ],
                None,
            );
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(flow(2), vec!["backend-1"; 2], "{mode}");

        // The endpoint changes; backend-1 still answers, so only the deleted conntrack entry
        // lets the same flow reach backend-2.
        let syncs = agent.syncs();
        std::fs::write(&slice_file, dns_slice(2).to_string()).unwrap();
        agent.wait_for_syncs(syncs + 1, Duration::from_secs(10));
        assert_eq!(
            flow(2),
            vec!["backend-2"; 2],
            "{mode}: the UDP flow stuck to its old backend"
        );
        let deleted = "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\"}";
        assert!(
            agent.metric(deleted).is_some_and(|n| n >= 1.0),
            "{mode}: {}",
            agent.metrics()
        );
        assert_eq!(agent.stop().code(), Some(0));
    }
}

#[test]
fn a_changed_config_file_ends_the_agent() {
    if !possible() {
        return;
    }
    let topology = Topology::new(1);
    let dir = tempfile::tempdir().expect("temp dir");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    let config = dir.path().join("config.conf");
    let text = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\n";
    std::fs::write(&config, text).unwrap();
    let (config_arg, dir_arg) = (
        config.to_string_lossy().to_string(),
        manifests.to_string_lossy().to_string(),
    );
    let mut agent = AgentProcess::start(
        &topology.node,
        &[
            "--config",
            &config_arg,
            "--from-dir",
            &dir_arg,
            "--hostname",
            NODE,
            "--node-ip",
            NODE_IP,
        ],
    );
    agent.wait_for_syncs(1, Duration::from_secs(20));
    assert_eq!(
        agent.get(METRICS, "/proxyMode").map(|r| r.1),
        Some("nftables".into())
    );

    // The same content written again is no change.
    std::fs::write(&config, text).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(agent.is_running(), "{}", agent.log_text());

    std::fs::write(&config, format!("{text}nftables:\n  syncPeriod: 10s\n")).unwrap();
    wait_until(
        Duration::from_secs(10),
        || !agent.is_running(),
        || "the agent did not exit after its configuration file changed".into(),
    );
    assert!(
        agent.log_text().contains("configuration file"),
        "{}",
        agent.log_text()
    );
    assert_eq!(agent.stop().code(), Some(1));
}
