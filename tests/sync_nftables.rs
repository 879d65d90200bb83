//! The nftables syncer against the real kernel, with real traffic: a client namespace talks to
//! Services through a node namespace holding kproxy's rules, and backends answer with their
//! names (tests/common/topology.rs). Most tests run the real binary (`kproxy sync --once`) in
//! the node namespace; the failure and drift tests drive the library's `Syncer` with nft
//! running in that namespace.
//!
//! Needs root, `ip`, `nft` and `python3`. Without them the tests print why and pass, unless
//! `KPROXY_REQUIRE_KERNEL_TESTS=1`, which turns that into a failure.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::cluster::{self, backend_names, placement, slice, Service};
use common::netns::kernel_tests_possible;
use common::nft::nft;
use common::topology::{Topology, CLUSTER_CIDR, NODE_IP};

use kproxy::config::NodeConfig;
use kproxy::family::IpFamily;
use kproxy::nftables::{Command, ObjectId, Ruleset};
use kproxy::pipeline;
use kproxy::source::Manifests;
use kproxy::sync::nftables::{Applier, KernelTable, NftApplier, SyncOptions, Syncer};
use kproxy::sync::SyncError;

fn possible() -> bool {
    kernel_tests_possible(&["nft", "python3"])
}

const WEB_IP: &str = "10.96.0.10";

/// A Service with TCP port 80 and UDP port 53 (both to 8080 on the backends), optionally with
/// ClientIP affinity and a NodePort for the TCP port.
fn service(name: &str, ip: &str, affinity: Option<u32>, node_port: Option<u16>) -> String {
    let mut service = Service::new(name, ip);
    service.affinity = affinity;
    service.node_port = node_port;
    service.yaml()
}

/// `kproxy sync --once --mode nftables …` in the node namespace; panics when it fails.
fn sync_once(topology: &Topology, manifests: &str) {
    cluster::sync_once(topology, &["--mode", "nftables"], manifests);
}

/// The rulesets the binary would build, for driving the library syncer directly.
fn rulesets(manifests: &str) -> Vec<Ruleset> {
    let mut config = NodeConfig::new("node-1");
    config.node_ips = vec![NODE_IP.parse().unwrap()];
    config.cluster_cidrs = vec![CLUSTER_CIDR.parse().unwrap()];
    let mut state = Manifests::default();
    state.add_text(manifests, "test.yaml").expect("manifests");
    let plan = pipeline::plan(&state.state, &config);
    assert!(plan.notes.is_empty(), "{:?}", plan.notes);
    pipeline::nftables_rulesets(&plan, &config)
}

/// Client addresses held in the table's affinity sets.
fn affinity_clients(topology: &Topology) -> BTreeSet<String> {
    let listing = nft(&topology.node, &["-j", "list", "table", "ip", "kube-proxy"]);
    let json: serde_json::Value = serde_json::from_str(&listing).expect("nft JSON");
    let mut clients = BTreeSet::new();
    for item in json["nftables"].as_array().into_iter().flatten() {
        let set = &item["set"];
        if !set["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("affinity-"))
        {
            continue;
        }
        for elem in set["elem"].as_array().into_iter().flatten() {
            let value = elem["elem"]["val"].as_str().or(elem.as_str());
            clients.extend(value.map(str::to_string));
        }
    }
    clients
}

#[test]
fn cluster_ip_nodeport_and_no_endpoints() {
    if !possible() {
        return;
    }
    let topology = Topology::new(2);
    topology.add_node_default_route();
    let manifests = [
        service("web", WEB_IP, None, Some(30080)),
        slice("web", &[1, 2]),
        service("empty", "10.96.0.20", None, None),
    ]
    .concat();
    sync_once(&topology, &manifests);

    let all = backend_names(&[1, 2]);
    for proto in ["tcp", "udp"] {
        let port = if proto == "tcp" { 80 } else { 53 };
        let answers = topology.connect(proto, 2, WEB_IP, port, 6);
        assert_eq!(answers.len(), 6);
        for answer in &answers {
            assert!(
                all.contains(answer),
                "{proto} to the ClusterIP: {answers:?}"
            );
        }
    }
    // NodePort on the node's address.
    let answers = topology.connect("tcp", 3, NODE_IP, 30080, 4);
    for answer in &answers {
        assert!(all.contains(answer), "NodePort: {answers:?}");
    }
    // A Service without endpoints is refused at once (reject, not a silent drop).
    let start = Instant::now();
    let answers = topology.connect("tcp", 2, "10.96.0.20", 80, 1);
    assert_eq!(answers, vec!["ERR:ConnectionRefusedError".to_string()]);
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "refusal took {:?}",
        start.elapsed()
    );
    // Without kproxy's rules nothing answers there (the test above can fail).
    nft(&topology.node, &["delete", "table", "ip", "kube-proxy"]);
    let answers = topology.connect("tcp", 2, WEB_IP, 80, 1);
    assert!(answers[0].starts_with("ERR:"), "{answers:?}");
}

#[test]
fn client_ip_affinity_keeps_clients_and_spreads_them() {
    if !possible() {
        return;
    }
    let topology = Topology::new(4);
    let manifests = [
        service("web", WEB_IP, Some(600), None),
        slice("web", &[1, 2, 3, 4]),
    ]
    .concat();
    sync_once(&topology, &manifests);
    for (proto, port) in [("tcp", 80), ("udp", 53)] {
        let placed = placement(&topology, proto, WEB_IP, port, 8);
        let used: BTreeSet<&String> = placed.values().collect();
        // 8 clients on 4 endpoints all on one: probability 4 × (1/4)^8 ≈ 6e-5.
        assert!(
            used.len() >= 2,
            "{proto}: every client on one endpoint: {placed:?}"
        );
    }
    let clients = affinity_clients(&topology);
    assert!(clients.contains("10.100.0.2"), "{clients:?}");
}

#[test]
fn affinity_ends_after_its_timeout() {
    if !possible() {
        return;
    }
    let topology = Topology::new(3);
    let manifests = [
        service("web", WEB_IP, Some(2), None),
        slice("web", &[1, 2, 3]),
    ]
    .concat();
    sync_once(&topology, &manifests);
    // Some client must land elsewhere once its affinity has expired; each round gives all 8
    // clients a fresh choice among 3 endpoints, so 3 rounds without any move has probability
    // (1/3)^24.
    let mut moved = false;
    for _ in 0..3 {
        let before = placement(&topology, "tcp", WEB_IP, 80, 3);
        assert!(affinity_clients(&topology).contains("10.100.0.9"));
        std::thread::sleep(Duration::from_millis(3000));
        let clients = affinity_clients(&topology);
        assert!(
            clients.is_empty(),
            "expired entries still listed: {clients:?}"
        );
        let after = placement(&topology, "tcp", WEB_IP, 80, 3);
        if before != after {
            moved = true;
            break;
        }
    }
    assert!(
        moved,
        "no client ever changed endpoint after its affinity expired"
    );
}

#[test]
fn later_syncs_keep_clients_and_a_removed_endpoint_moves_only_its_clients() {
    if !possible() {
        return;
    }
    let topology = Topology::new(3);
    let web = service("web", WEB_IP, Some(600), None);
    sync_once(&topology, &[web.clone(), slice("web", &[1, 2, 3])].concat());
    let first = placement(&topology, "tcp", WEB_IP, 80, 4);
    let first_udp = placement(&topology, "udp", WEB_IP, 53, 4);

    // An unrelated change: every client keeps its endpoint.
    let other = [
        service("other", "10.96.0.30", None, None),
        slice("other", &[1]),
    ]
    .concat();
    sync_once(
        &topology,
        &[web.clone(), slice("web", &[1, 2, 3]), other.clone()].concat(),
    );
    assert_eq!(placement(&topology, "tcp", WEB_IP, 80, 4), first);
    assert_eq!(placement(&topology, "udp", WEB_IP, 53, 4), first_udp);

    // Remove the endpoint client 2 uses: its clients move, everyone else stays.
    let gone: usize = first[&2]
        .trim_start_matches("backend-")
        .parse()
        .expect("backend number");
    let rest: Vec<usize> = (1..=3).filter(|n| *n != gone).collect();
    sync_once(&topology, &[web, slice("web", &rest), other].concat());
    let after = placement(&topology, "tcp", WEB_IP, 80, 4);
    for (client, before) in &first {
        if *before == first[&2] {
            assert_ne!(
                after[client], *before,
                "client {client} still on the removed endpoint"
            );
        } else {
            assert_eq!(after[client], *before, "client {client} moved needlessly");
        }
    }
}

/// An applier that makes every transaction fail at its end, after all of kproxy's commands,
/// by deleting a chain that does not exist.
struct Sabotaged {
    inner: NftApplier,
    on: bool,
    missing: ObjectId,
}

impl Applier for Sabotaged {
    fn apply(&mut self, family: IpFamily, commands: &[Command<'_>]) -> Result<usize, SyncError> {
        if !self.on {
            return self.inner.apply(family, commands);
        }
        let mut all = commands.to_vec();
        all.push(Command::Delete(&self.missing));
        self.inner.apply(family, &all)
    }
    fn read(&mut self, family: IpFamily) -> Result<Option<KernelTable>, SyncError> {
        self.inner.read(family)
    }
    fn rule_count(&mut self, family: IpFamily, chain: &str) -> Result<Option<usize>, SyncError> {
        self.inner.rule_count(family, chain)
    }
    fn table_exists(&mut self, family: IpFamily) -> Result<bool, SyncError> {
        self.inner.table_exists(family)
    }
}

/// Which backends `count` TCP connections from client 2 reach. (30 connections over two
/// endpoints all reach one of them with probability 2 × 2^-30.)
fn reached(topology: &Topology, count: usize) -> BTreeSet<String> {
    topology
        .connect("tcp", 2, WEB_IP, 80, count)
        .into_iter()
        .collect()
}

#[test]
fn refused_transaction_leaves_the_old_rules_working() {
    if !possible() {
        return;
    }
    let topology = Topology::new(3);
    let mut syncer = Syncer::new(
        Sabotaged {
            inner: NftApplier::in_netns(&topology.node.name),
            on: false,
            missing: ObjectId::Chain("no-such-chain".into()),
        },
        SyncOptions::default(),
    );
    let old = rulesets(&[service("web", WEB_IP, None, None), slice("web", &[1, 2])].concat());
    syncer.sync(&old).expect("first sync");
    assert_eq!(reached(&topology, 30), backend_names(&[1, 2]));
    let listing = nft(&topology.node, &["list", "table", "ip", "kube-proxy"]);

    let new = rulesets(&[service("web", WEB_IP, None, None), slice("web", &[3])].concat());
    syncer.applier_mut().on = true;
    let err = syncer
        .sync(&new)
        .expect_err("the kernel refuses the transaction");
    let text = err.to_string();
    assert!(
        text.contains("delete chain ip kube-proxy no-such-chain"),
        "the error names the refused command: {text}"
    );
    // Nothing of it was applied: the same table, the old endpoints answer.
    assert_eq!(
        nft(&topology.node, &["list", "table", "ip", "kube-proxy"]),
        listing
    );
    assert_eq!(reached(&topology, 30), backend_names(&[1, 2]));

    // The next sync is a full one and brings the new state.
    syncer.applier_mut().on = false;
    let report = syncer.sync(&new).expect("sync after the failure");
    assert!(report[0].full);
    assert_eq!(reached(&topology, 4), backend_names(&[3]));
}

#[test]
fn flushed_or_deleted_table_is_restored_by_the_next_sync() {
    if !possible() {
        return;
    }
    let topology = Topology::new(2);
    let desired = rulesets(
        &[
            service("web", WEB_IP, Some(600), None),
            slice("web", &[1, 2]),
        ]
        .concat(),
    );
    let mut syncer = Syncer::new(
        NftApplier::in_netns(&topology.node.name),
        SyncOptions::default(),
    );
    syncer.sync(&desired).expect("first sync");
    let placed = placement(&topology, "tcp", WEB_IP, 80, 2);
    assert!(!syncer.sync(&desired).expect("no change")[0].full);

    nft(&topology.node, &["flush", "table", "ip", "kube-proxy"]);
    assert!(topology.connect("tcp", 2, WEB_IP, 80, 1)[0].starts_with("ERR:"));
    let report = syncer.sync(&desired).expect("repair");
    assert!(report[0].full, "the drift check found the flushed table");
    // Rules back; the affinity sets were never emptied, so clients keep their endpoints.
    assert_eq!(placement(&topology, "tcp", WEB_IP, 80, 2), placed);

    nft(&topology.node, &["delete", "table", "ip", "kube-proxy"]);
    assert!(topology.connect("tcp", 2, WEB_IP, 80, 1)[0].starts_with("ERR:"));
    assert!(syncer.sync(&desired).expect("repair")[0].full);
    let answers = topology.connect("tcp", 2, WEB_IP, 80, 2);
    assert!(
        answers.iter().all(|a| a.starts_with("backend-")),
        "{answers:?}"
    );

    // The one-shot binary restores a flushed table too.
    nft(&topology.node, &["flush", "table", "ip", "kube-proxy"]);
    sync_once(
        &topology,
        &[
            service("web", WEB_IP, Some(600), None),
            slice("web", &[1, 2]),
        ]
        .concat(),
    );
    let answers = topology.connect("tcp", 2, WEB_IP, 80, 2);
    assert!(
        answers.iter().all(|a| a.starts_with("backend-")),
        "{answers:?}"
    );
}

#[test]
fn cleanup_removes_kproxys_tables_and_nothing_else() {
    if !possible() {
        return;
    }
    let topology = Topology::new(1);
    let user = "add table ip user-stuff\nadd chain ip user-stuff input { type filter hook input priority 0 ; }\nadd rule ip user-stuff input tcp dport 9999 counter accept\n";
    let out = topology.node.run(&["nft", "-f", "-"], Some(user));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let user_listing = nft(&topology.node, &["list", "table", "ip", "user-stuff"]);

    sync_once(
        &topology,
        &[service("web", WEB_IP, Some(600), None), slice("web", &[1])].concat(),
    );
    assert_eq!(reached(&topology, 2), backend_names(&[1]));
    assert_eq!(
        nft(&topology.node, &["list", "table", "ip", "user-stuff"]),
        user_listing
    );
    // An IPv6 table of kproxy's goes too.
    nft(&topology.node, &["add", "table", "ip6", "kube-proxy"]);

    let out = topology.kproxy(&["cleanup", "--mode", "nftables"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ruleset = nft(&topology.node, &["list", "ruleset"]);
    assert!(!ruleset.contains("kube-proxy"), "{ruleset}");
    assert_eq!(
        nft(&topology.node, &["list", "table", "ip", "user-stuff"]),
        user_listing
    );
    // Cleaning up a clean node is fine.
    let out = topology.kproxy(&["cleanup", "--mode", "nftables"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The drift check's netlink rule count agrees with nft's listing, also for a flushed table
/// and a missing one, in another namespace than the test's.
#[test]
fn drift_check_counts_rules_like_nft() {
    if !possible() {
        return;
    }
    let topology = Topology::new(1);
    let manifests = [service("web", WEB_IP, None, None), slice("web", &[1])].concat();
    sync_once(&topology, &manifests);
    let mut applier = NftApplier::in_netns(&topology.node.name);
    let listed = |topology: &Topology| {
        let args = ["-j", "list", "chain", "ip", "kube-proxy", "services"];
        nft(&topology.node, &args).matches("{\"rule\": ").count()
    };
    let netlink = |family| {
        let ns = Some(topology.node.name.as_str());
        kproxy::sync::netlink::NetfilterSocket::open_in(ns)
            .and_then(|mut socket| socket.rule_count(family, "kube-proxy", "services"))
            .expect("netlink dump")
    };
    let expected = rulesets(&manifests)[0]
        .chain("services")
        .expect("services chain")
        .rules
        .len();
    assert!(expected > 0);
    assert_eq!(listed(&topology), expected);
    assert_eq!(netlink(IpFamily::V4), expected);
    assert_eq!(
        applier.rule_count(IpFamily::V4, "services").ok(),
        Some(Some(expected))
    );
    assert_eq!(
        applier.rule_count(IpFamily::V4, "nat-prerouting").ok(),
        Some(Some(1))
    );

    nft(&topology.node, &["flush", "table", "ip", "kube-proxy"]);
    assert_eq!(listed(&topology), 0);
    assert_eq!(netlink(IpFamily::V4), 0);
    assert_eq!(
        applier.rule_count(IpFamily::V4, "services").ok(),
        Some(Some(0))
    );
    nft(&topology.node, &["delete", "table", "ip", "kube-proxy"]);
    assert_eq!(netlink(IpFamily::V4), 0);
    assert_eq!(netlink(IpFamily::V6), 0);
}

/// Records what an nft applier sends.
struct Recording {
    inner: NftApplier,
    sent: Vec<String>,
}

impl Applier for Recording {
    fn apply(&mut self, family: IpFamily, commands: &[Command<'_>]) -> Result<usize, SyncError> {
        let text = kproxy::sync::nftables::render_transaction(
            family,
            kproxy::nftables::TABLE_NAME,
            commands,
        )?;
        self.sent.extend(text.lines().map(str::to_string));
        self.inner.apply(family, commands)
    }
    fn read(&mut self, family: IpFamily) -> Result<Option<KernelTable>, SyncError> {
        self.inner.read(family)
    }
    fn rule_count(&mut self, family: IpFamily, chain: &str) -> Result<Option<usize>, SyncError> {
        self.inner.rule_count(family, chain)
    }
    fn table_exists(&mut self, family: IpFamily) -> Result<bool, SyncError> {
        self.inner.table_exists(family)
    }
}

/// A one-shot sync over tables kproxy wrote before reads them back from `nft -j` exactly:
/// for both families, every element kind (concatenations, IPv6 addresses, comments, drop and
/// goto verdicts) compares equal, so nothing but the chains' rules and the idempotent set and
/// map declarations is written again.
#[test]
fn resync_reads_both_families_back_exactly() {
    if !possible() {
        return;
    }
    let ns = common::netns::Netns::new("dual");
    let manifests = r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: ns}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  clusterIP: 10.96.0.50
  clusterIPs: [10.96.0.50, fd00:10:96::50]
  ipFamilies: [IPv4, IPv6]
  ports:
  - {name: http, protocol: TCP, port: 80, nodePort: 30080}
  - {name: dns, protocol: UDP, port: 53, nodePort: 30053}
  loadBalancerSourceRanges: [203.0.113.0/24, "2001:db8:1::/64"]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
status:
  loadBalancer:
    ingress: [{ip: 5.6.7.8}, {ip: "2001:db8:2::8"}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports:
- {name: http, protocol: TCP, port: 8080}
- {name: dns, protocol: UDP, port: 5353}
endpoints:
- {addresses: ["fd00:10:244::1"], nodeName: node-1}
- {addresses: ["fd00:10:244::2"], nodeName: other-node}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v4, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {name: http, protocol: TCP, port: 8080}
- {name: dns, protocol: UDP, port: 5353}
endpoints:
- {addresses: [10.244.1.2], nodeName: node-1}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: ns}
spec:
  type: NodePort
  clusterIP: 10.96.0.51
  clusterIPs: [10.96.0.51, fd00:10:96::51]
  ipFamilies: [IPv4, IPv6]
  ports: [{name: p, protocol: TCP, port: 80, nodePort: 30081}]
"#;
    let mut config = NodeConfig::new("node-1");
    config.family_mode = kproxy::family::FamilyMode::Dual;
    config.node_ips = vec![
        "10.100.0.1".parse().unwrap(),
        "2001:db8::1".parse().unwrap(),
    ];
    config.cluster_cidrs = vec![
        "10.244.0.0/16".parse().unwrap(),
        "fd00:10:244::/64".parse().unwrap(),
    ];
    config.service_cidrs = vec![
        "10.96.0.0/16".parse().unwrap(),
        "fd00:10:96::/112".parse().unwrap(),
    ];
    let mut state = Manifests::default();
    state.add_text(manifests, "dual.yaml").expect("manifests");
    let plan = pipeline::plan(&state.state, &config);
    assert!(plan.notes.is_empty(), "{:?}", plan.notes);
    let desired = pipeline::nftables_rulesets(&plan, &config);
    assert_eq!(desired.len(), 2);
    for ruleset in &desired {
        assert!(
            ruleset.elements.iter().any(|e| e.comment.is_some()),
            "no-endpoint elements with comments are part of the check"
        );
    }

    let recording = || Recording {
        inner: NftApplier::in_netns(&ns.name),
        sent: Vec::new(),
    };
    let mut first = Syncer::new(recording(), SyncOptions::one_shot());
    first.sync(&desired).expect("first sync");
    let listing = |ns: &common::netns::Netns| {
        let out = ns.run(&["nft", "list", "ruleset"], None);
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let before = listing(&ns);
    assert!(before.contains("table ip6 kube-proxy") && before.contains("table ip kube-proxy"));

    let mut again = Syncer::new(recording(), SyncOptions::one_shot());
    let reports = again.sync(&desired).expect("second sync");
    assert!(reports.iter().all(|r| r.full));
    let sent = &again.applier().sent;
    let elements: Vec<&String> = sent.iter().filter(|c| c.contains(" element ")).collect();
    assert!(elements.is_empty(), "elements written again: {elements:#?}");
    assert!(!sent.iter().any(|c| c.starts_with("delete ")), "{sent:#?}");
    assert_eq!(listing(&ns), before);
}
