//! The iptables syncer against the real kernel, with real traffic: a client namespace talks to
//! Services whose rules `kproxy sync --once --mode iptables` (the real binary, in the node
//! namespace) or the library syncer put in place. Covers ClusterIP, ClientIP affinity (TCP and
//! UDP, its timeout, and its survival across syncs), REJECT without endpoints, NodePort,
//! refused transactions, drift repair, cleanup, and the legacy backend.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::netns::kernel_tests_possible;
use common::topology::{Topology, BACKEND_PORT, CLUSTER_CIDR, NODE_IP};
use kproxy::config::NodeConfig;
use kproxy::family::IpFamily;
use kproxy::iptables::Ruleset;
use kproxy::sync::iptables::{
    Applier, BackendChoice, Exit, IptablesSyncer, SpawnError, SystemApplier, Tool,
};
use kproxy::sync::SyncError;

const TOOLS: [&str; 6] = [
    "python3",
    "iptables-nft-restore",
    "iptables-nft-save",
    "iptables-legacy-restore",
    "iptables-legacy-save",
    "ip6tables-nft-save",
];

// ---------------------------------------------------------------------------------------------
// Manifests

struct Svc {
    name: &'static str,
    cluster_ip: &'static str,
    /// (port name, protocol, port, nodePort)
    ports: Vec<(&'static str, &'static str, u16, Option<u16>)>,
    affinity: Option<u32>,
    /// Backend numbers N (10.244.N.2); `None`: no EndpointSlice at all.
    endpoints: Option<Vec<usize>>,
}

impl Svc {
    fn new(name: &'static str, cluster_ip: &'static str, endpoints: &[usize]) -> Svc {
        Svc {
            name,
            cluster_ip,
            ports: vec![("http", "TCP", 80, None)],
            affinity: None,
            endpoints: Some(endpoints.to_vec()),
        }
    }

    fn affinity(mut self, seconds: u32) -> Svc {
        self.affinity = Some(seconds);
        self
    }

    fn udp(mut self) -> Svc {
        self.ports = vec![("dns", "UDP", 53, None)];
        self
    }

    fn node_port(mut self, node_port: u16) -> Svc {
        self.ports[0].3 = Some(node_port);
        self
    }

    fn without_slice(mut self) -> Svc {
        self.endpoints = None;
        self
    }

    fn yaml(&self) -> String {
        let node_port = self.ports.iter().any(|p| p.3.is_some());
        let mut out = format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: default\n\
             spec:\n  type: {}\n  clusterIP: {}\n  selector:\n    app: {}\n  ports:\n",
            self.name,
            if node_port { "NodePort" } else { "ClusterIP" },
            self.cluster_ip,
            self.name
        );
        for (name, protocol, port, node_port) in &self.ports {
            out.push_str(&format!(
                "  - name: {name}\n    protocol: {protocol}\n    port: {port}\n    targetPort: {BACKEND_PORT}\n"
            ));
            if let Some(np) = node_port {
                out.push_str(&format!("    nodePort: {np}\n"));
            }
        }
        if let Some(seconds) = self.affinity {
            out.push_str(&format!(
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: {seconds}\n"
            ));
        }
        if let Some(endpoints) = &self.endpoints {
            out.push_str(&format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {0}-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {0}\naddressType: IPv4\nports:\n",
                self.name
            ));
            for (name, protocol, _, _) in &self.ports {
                out.push_str(&format!(
                    "- name: {name}\n  protocol: {protocol}\n  port: {BACKEND_PORT}\n"
                ));
            }
            if endpoints.is_empty() {
                out.push_str("endpoints: []\n");
            } else {
                out.push_str("endpoints:\n");
            }
            for n in endpoints {
                out.push_str(&format!(
                    "- addresses: [\"10.244.{n}.2\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  nodeName: node-{n}\n"
                ));
            }
        }
        out
    }
}

fn manifest(services: &[Svc]) -> String {
    services.iter().map(Svc::yaml).collect()
}

const SYNC_ARGS: [&str; 10] = [
    "sync",
    "--once",
    "--mode",
    "iptables",
    "--hostname",
    "node-1",
    "--node-ip",
    NODE_IP,
    "--cluster-cidr",
    CLUSTER_CIDR,
];

/// Runs `kproxy sync --once` in the node namespace with these Services; panics on failure.
fn sync(topology: &Topology, services: &[Svc], extra: &[&str]) -> String {
    let out = try_sync(topology, services, extra);
    assert!(
        out.status.success(),
        "kproxy sync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn try_sync(topology: &Topology, services: &[Svc], extra: &[&str]) -> std::process::Output {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), manifest(services)).expect("write manifest");
    let path = file.path().to_str().expect("utf-8 path").to_string();
    let mut args: Vec<&str> = SYNC_ARGS.to_vec();
    args.extend_from_slice(extra);
    args.push(&path);
    topology.kproxy(&args)
}

/// The rulesets the binary would build, for driving the library syncer.
fn rulesets(services: &[Svc]) -> Vec<Ruleset> {
    let mut manifests = kproxy::source::Manifests::default();
    manifests
        .add_text(&manifest(services), "test")
        .expect("manifest parses");
    let mut config = NodeConfig::new("node-1");
    config.node_ips = vec![NODE_IP.parse().expect("ip")];
    config.cluster_cidrs = vec![CLUSTER_CIDR.parse().expect("cidr")];
    let plan = kproxy::pipeline::plan(&manifests.state, &config);
    kproxy::pipeline::iptables_rulesets(&plan, &config)
}

fn node_applier(topology: &Topology, backend: BackendChoice) -> SystemApplier {
    SystemApplier::with_command_prefix(
        backend,
        &["ip", "netns", "exec", topology.node.name.as_str()],
    )
}

// ---------------------------------------------------------------------------------------------
// Looking at traffic and at the kernel

fn run(topology: &Topology, argv: &[&str]) -> String {
    let out = topology.node.run(argv, None);
    assert!(
        out.status.success(),
        "{}: {}",
        argv.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The backend each client 2..=9 reaches with one connection.
fn placement(topology: &Topology, proto: &str, ip: &str, port: u16) -> BTreeMap<u8, String> {
    (2..10u8)
        .map(|client| {
            let answers = topology.connect(proto, client, ip, port, 1);
            let answer = answers.first().cloned().unwrap_or_default();
            assert!(
                answer.starts_with("backend-"),
                "client {client} to {ip}:{port}: {answers:?}"
            );
            (client, answer)
        })
        .collect()
}

/// `iptables-save` of one table in the node namespace, without comments and counters, for
/// comparing states.
fn save(topology: &Topology, tool: &str, table: Option<&str>) -> Vec<String> {
    let mut argv = vec![tool];
    if let Some(table) = table {
        argv.extend(["-t", table]);
    }
    run(topology, &argv)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.find(" [") {
            Some(i) if l.starts_with(':') => l[..i].to_string(),
            _ => l.to_string(),
        })
        .collect()
}

/// Chains and rules, leaving out tables that hold nothing but empty built-in chains: such a
/// table does nothing, and the tools create one on first look.
fn meaningful(lines: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut table: Vec<String> = Vec::new();
    for line in lines {
        table.push(line.clone());
        if line == "COMMIT" {
            let builtin_only = table.iter().all(|l| {
                l.starts_with('*')
                    || l == "COMMIT"
                    || (l.starts_with(':') && l.ends_with(" ACCEPT"))
            });
            if !builtin_only {
                out.append(&mut table);
            }
            table.clear();
        }
    }
    out
}

/// The `recent` list of the endpoint chain that DNATs to `ip`.
fn recent_list(topology: &Topology, tool: &str, ip: &str) -> String {
    let target = format!("--to-destination {ip}:{BACKEND_PORT}");
    save(topology, tool, Some("nat"))
        .iter()
        .find(|l| l.contains(&target) && l.contains("--set"))
        .and_then(|l| l.split("--name ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("no recent --set rule for {ip}"))
        .to_string()
}

/// Source addresses in a `recent` list.
fn recent_sources(topology: &Topology, list: &str) -> BTreeSet<String> {
    run(topology, &["cat", &format!("/proc/net/xt_recent/{list}")])
        .lines()
        .filter_map(|l| l.strip_prefix("src="))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect()
}

/// Every `recent` list of the node and its source addresses.
fn all_recent(topology: &Topology) -> BTreeMap<String, BTreeSet<String>> {
    run(topology, &["ls", "/proc/net/xt_recent"])
        .split_whitespace()
        .map(|list| (list.to_string(), recent_sources(topology, list)))
        .collect()
}

fn clear_recent_lists(topology: &Topology) {
    let lists = run(topology, &["ls", "/proc/net/xt_recent"]);
    for list in lists.split_whitespace() {
        run(
            topology,
            &["sh", "-c", &format!("echo / > /proc/net/xt_recent/{list}")],
        );
    }
}

/// Two dumps are equal; the failure shows a diff.
#[track_caller]
fn assert_same(expected: &[String], actual: &[String], what: &str) {
    if expected != actual {
        panic!(
            "{what}:\n{}",
            common::diff(&(expected.join("\n") + "\n"), &(actual.join("\n") + "\n"))
        );
    }
}

/// The node's `iptables-nft-save` equals `expected`; the failure shows a diff.
#[track_caller]
fn assert_nft_save_is(topology: &Topology, expected: &[String], what: &str) {
    assert_same(expected, &save(topology, "iptables-nft-save", None), what);
}

fn distinct(placement: &BTreeMap<u8, String>) -> usize {
    placement.values().collect::<BTreeSet<_>>().len()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn traffic_follows_the_synced_rules() {
    if !kernel_tests_possible(&TOOLS) {
        return;
    }
    let topology = Topology::new(3);
    // Like a real node: traffic to a cluster IP without a rule is routed on (and the filter
    // rules of the FORWARD chain see it), not refused by the routing table.
    topology.add_node_default_route();
    let services = vec![
        Svc::new("web", "10.96.0.10", &[1, 2, 3]),
        Svc::new("sticky", "10.96.0.11", &[1, 2, 3]).affinity(10800),
        Svc::new("sticky-udp", "10.96.0.12", &[1, 2, 3])
            .udp()
            .affinity(10800),
        Svc::new("short", "10.96.0.13", &[1, 2, 3]).affinity(2),
        Svc::new("empty", "10.96.0.14", &[]).without_slice(),
        Svc::new("nodeport", "10.96.0.15", &[2]).node_port(30080),
    ];
    let stderr = sync(&topology, &services, &[]);
    assert!(stderr.contains("full sync"), "{stderr}");

    // ClusterIP: reaches the endpoints, spread over them.
    let answers = topology.connect("tcp", 2, "10.96.0.10", 80, 30);
    assert!(
        answers.iter().all(|a| a.starts_with("backend-")),
        "{answers:?}"
    );
    let spread: BTreeSet<&String> = answers.iter().collect();
    assert!(spread.len() >= 2, "30 connections all went to {spread:?}");

    // ClientIP affinity, TCP and UDP: each client stays on one endpoint over many
    // connections; different clients spread (retried with fresh lists: chance of a false
    // failure per try is 3^-7).
    for (proto, ip, port) in [("tcp", "10.96.0.11", 80), ("udp", "10.96.0.12", 53)] {
        let mut spread = 0;
        for _ in 0..3 {
            let first = placement(&topology, proto, ip, port);
            for (client, backend) in &first {
                let again = topology.connect(proto, *client, ip, port, 10);
                assert_eq!(
                    again,
                    vec![backend.clone(); 10],
                    "{proto} client {client} moved"
                );
            }
            spread = distinct(&first);
            if spread > 1 {
                break;
            }
            clear_recent_lists(&topology);
        }
        assert!(
            spread > 1,
            "{proto}: every client on one endpoint, three times"
        );
    }

    // Affinity ends after timeoutSeconds (2 s): the recent entries age out, and clients are
    // balanced afresh (at least one of 8 moves; each round fails falsely with chance 3^-8).
    let short_lists: BTreeSet<String> = save(&topology, "iptables-nft-save", Some("nat"))
        .iter()
        .filter(|l| l.contains("--seconds 2 "))
        .filter_map(|l| l.split("--name ").nth(1))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();
    assert_eq!(
        short_lists.len(),
        3,
        "the short service checks its three lists"
    );
    let mut moved = false;
    for _ in 0..3 {
        let before = placement(&topology, "tcp", "10.96.0.13", 80);
        let within = placement(&topology, "tcp", "10.96.0.13", 80);
        assert_eq!(before, within, "within the timeout every client stays");
        std::thread::sleep(Duration::from_millis(3000));
        let after = placement(&topology, "tcp", "10.96.0.13", 80);
        if before != after {
            moved = true;
            break;
        }
    }
    assert!(
        moved,
        "no client ever changed endpoint after its affinity expired"
    );

    // No endpoints: REJECT, the client is refused at once (no 2 s timeout).
    let start = Instant::now();
    let answers = topology.connect("tcp", 2, "10.96.0.14", 80, 1);
    assert_eq!(answers, vec!["ERR:ConnectionRefusedError".to_string()]);
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );

    // NodePort on the node's address, from the client link.
    let answers = topology.connect("tcp", 3, NODE_IP, 30080, 3);
    assert_eq!(answers, vec!["backend-2".to_string(); 3]);

    // A second sync of the same state (a fresh process: a full sync) changes nothing in the
    // kernel: no duplicate jump rules, same chains.
    let first = save(&topology, "iptables-nft-save", None);
    sync(&topology, &services, &[]);
    assert_nft_save_is(&topology, &first, "a second sync changed the kernel");
}

#[test]
fn later_syncs_keep_affinity_and_move_only_the_removed_endpoints_clients() {
    if !kernel_tests_possible(&TOOLS) {
        return;
    }
    let topology = Topology::new(3);
    let services = |sticky: &[usize]| {
        vec![
            Svc::new("sticky", "10.96.0.11", sticky).affinity(10800),
            Svc::new("sticky-udp", "10.96.0.12", sticky)
                .udp()
                .affinity(10800),
        ]
    };
    sync(&topology, &services(&[1, 2, 3]), &[]);
    let tcp = placement(&topology, "tcp", "10.96.0.11", 80);
    let udp = placement(&topology, "udp", "10.96.0.12", 53);
    let lists = all_recent(&topology);
    assert_eq!(lists.len(), 6, "one list per endpoint chain: {lists:?}");
    assert_eq!(
        lists.values().map(BTreeSet::len).sum::<usize>(),
        16,
        "each of 8 clients in one TCP and one UDP list: {lists:?}"
    );

    // An unrelated change: a new Service. The new process does a full sync, rewriting every
    // chain with identical rules; the recent lists keep their entries and every client its
    // endpoint.
    let mut more = services(&[1, 2, 3]);
    more.push(Svc::new("other", "10.96.0.20", &[1]));
    let stderr = sync(&topology, &more, &[]);
    assert!(stderr.contains("full sync"), "{stderr}");
    let now = all_recent(&topology);
    for (list, sources) in &lists {
        let kept = now.get(list).cloned().unwrap_or_default();
        assert!(
            kept.is_superset(sources),
            "{list}: {sources:?} became {kept:?}"
        );
    }
    assert_eq!(placement(&topology, "tcp", "10.96.0.11", 80), tcp);
    assert_eq!(placement(&topology, "udp", "10.96.0.12", 53), udp);
    assert_eq!(
        topology.connect("tcp", 2, "10.96.0.20", 80, 1),
        vec!["backend-1"]
    );

    // Removing the endpoint with the most TCP clients moves exactly those clients.
    let count = |n: usize| {
        tcp.values()
            .filter(|b| **b == format!("backend-{n}"))
            .count()
    };
    let gone = (1..=3).max_by_key(|&n| count(n)).expect("three backends");
    let kept: Vec<usize> = (1..=3).filter(|&n| n != gone).collect();
    let mut fewer = services(&kept);
    fewer.push(Svc::new("other", "10.96.0.20", &[1]));
    sync(&topology, &fewer, &[]);
    let gone_name = format!("backend-{gone}");
    for (proto, ip, port, before) in [
        ("tcp", "10.96.0.11", 80, &tcp),
        ("udp", "10.96.0.12", 53, &udp),
    ] {
        let after = placement(&topology, proto, ip, port);
        for (client, backend) in before {
            if *backend == gone_name {
                assert_ne!(after[client], gone_name, "{proto} client {client}");
            } else {
                assert_eq!(&after[client], backend, "{proto} client {client} moved");
            }
        }
    }
}

/// Delegates to the real tools; when armed, adds a line the kernel refuses to the last section
/// of the next restore of both tables (after the earlier ones were committed).
struct Saboteur {
    inner: SystemApplier,
    armed: bool,
}

const BAD_LINE: &str = "-A KUBE-SERVICES -j KUBE-SVC-NOSUCHCHAIN";

impl Applier for Saboteur {
    fn program(&self, family: IpFamily, tool: Tool) -> String {
        self.inner.program(family, tool)
    }

    fn restore(&mut self, family: IpFamily, payload: &str) -> Result<Exit, SpawnError> {
        if !self.armed || !payload.contains("*nat\n") {
            return self.inner.restore(family, payload);
        }
        self.armed = false;
        // Replace the last line before the last COMMIT, so that line numbers stay those of the
        // syncer's payload.
        let commit = payload.rfind("COMMIT\n").expect("a COMMIT");
        let last = payload[..commit - 1].rfind('\n').expect("a line before") + 1;
        let bad = format!("{}{BAD_LINE}\n{}", &payload[..last], &payload[commit..]);
        self.inner.restore(family, &bad)
    }

    fn save(&mut self, family: IpFamily, table: Option<&str>) -> Result<Exit, SpawnError> {
        self.inner.save(family, table)
    }

    fn iptables(&mut self, family: IpFamily, args: &[&str]) -> Result<Exit, SpawnError> {
        self.inner.iptables(family, args)
    }
}

#[test]
fn a_refused_transaction_leaves_the_old_rules_working() {
    if !kernel_tests_possible(&TOOLS) {
        return;
    }
    let topology = Topology::new(2);
    topology.add_node_default_route();
    let before = vec![
        Svc::new("web", "10.96.0.10", &[1]),
        Svc::new("api", "10.96.0.11", &[2]),
    ];
    // `api` loses its endpoints (filter gets a REJECT), and a new Service appears.
    let after = vec![
        Svc::new("web", "10.96.0.10", &[1]),
        Svc::new("api", "10.96.0.11", &[]),
        Svc::new("new", "10.96.0.12", &[2]),
    ];
    let mut syncer = IptablesSyncer::new(Saboteur {
        inner: node_applier(&topology, BackendChoice::Auto),
        armed: false,
    });
    assert!(syncer.sync(rulesets(&before)).expect("first sync")[0].full);
    assert_eq!(
        topology.connect("tcp", 2, "10.96.0.11", 80, 1),
        vec!["backend-2"]
    );
    let kernel_before = save(&topology, "iptables-nft-save", None);

    // A partial sync whose last commit is refused. `api` only gains a REJECT, so nat is
    // committed first and filter last (src/sync/iptables/staging.rs): filter is refused after
    // nat was committed.
    syncer.applier_mut().armed = true;
    let err = syncer
        .sync(rulesets(&after))
        .expect_err("the kernel refuses it");
    let text = err.to_string();
    let SyncError::Refused { object, .. } = &err else {
        panic!("not a refusal: {text}");
    };
    // nft names the COMMIT of the table, legacy the line itself; the tool's message names
    // the chain either way.
    let object = object.as_deref().unwrap_or_default();
    assert!(object.contains("table filter"), "{text}");
    assert!(text.contains("KUBE-SVC-NOSUCHCHAIN"), "{text}");
    assert!(
        text.contains("table nat had been committed and was put back"),
        "{text}"
    );
    // Nothing of it stayed: the kernel holds exactly what it held, and traffic flows by the
    // old rules.
    assert_nft_save_is(&topology, &kernel_before, "the refused sync left changes");
    assert_eq!(
        topology.connect("tcp", 3, "10.96.0.11", 80, 1),
        vec!["backend-2"]
    );
    assert_eq!(
        topology.connect("tcp", 3, "10.96.0.10", 80, 1),
        vec!["backend-1"]
    );
    assert!(topology.connect("tcp", 3, "10.96.0.12", 80, 1)[0].starts_with("ERR:"));

    // The next sync is a full one, and applies the change.
    let reports = syncer.sync(rulesets(&after)).expect("retry");
    assert!(reports[0].full);
    assert_eq!(
        topology.connect("tcp", 3, "10.96.0.11", 80, 1),
        vec!["ERR:ConnectionRefusedError"]
    );
    assert_eq!(
        topology.connect("tcp", 3, "10.96.0.12", 80, 1),
        vec!["backend-2"]
    );

    // Refused during a full sync (previous state read back from the kernel) as well: `api`
    // loses its REJECT, so filter goes first, nat is refused, filter is put back.
    let kernel_before = save(&topology, "iptables-nft-save", None);
    syncer.request_full_sync();
    syncer.applier_mut().armed = true;
    syncer.sync(rulesets(&before)).expect_err("refused again");
    assert_nft_save_is(&topology, &kernel_before, "the refused sync left changes");
    assert_eq!(
        topology.connect("tcp", 3, "10.96.0.12", 80, 1),
        vec!["backend-2"]
    );
}

/// Counts the `iptables` commands a syncer runs and notes the tables it saves; everything
/// is passed through.
struct CountingIptables {
    inner: SystemApplier,
    commands: usize,
    saved_tables: Vec<String>,
}

impl Applier for CountingIptables {
    fn program(&self, family: IpFamily, tool: Tool) -> String {
        self.inner.program(family, tool)
    }

    fn restore(&mut self, family: IpFamily, payload: &str) -> Result<Exit, SpawnError> {
        self.inner.restore(family, payload)
    }

    fn save(&mut self, family: IpFamily, table: Option<&str>) -> Result<Exit, SpawnError> {
        self.saved_tables.push(table.unwrap_or("all").to_string());
        self.inner.save(family, table)
    }

    fn iptables(&mut self, family: IpFamily, args: &[&str]) -> Result<Exit, SpawnError> {
        self.commands += 1;
        self.inner.iptables(family, args)
    }

    fn nf_tables_socket(
        &mut self,
    ) -> Option<std::io::Result<kproxy::sync::netlink::NetfilterSocket>> {
        self.inner.nf_tables_socket()
    }
}

#[test]
fn with_the_nft_backend_drift_is_noticed_over_netlink() {
    if !kernel_tests_possible(&TOOLS) {
        return;
    }
    let topology = Topology::new(1);
    let services = vec![Svc::new("web", "10.96.0.10", &[1])];
    let mut syncer = IptablesSyncer::new(CountingIptables {
        inner: node_applier(&topology, BackendChoice::Nft),
        commands: 0,
        saved_tables: Vec::new(),
    });
    syncer.sync(rulesets(&services)).expect("first sync");
    let good = save(&topology, "iptables-nft-save", None);

    // Nothing drifted: a partial sync, and the check started no `iptables` process.
    syncer.applier_mut().commands = 0;
    assert!(!syncer.sync(rulesets(&services)).expect("partial")[0].full);
    assert_eq!(syncer.applier().commands, 0, "the drift check ran iptables");

    // Each kind of drift the check looks for is noticed, and the full sync repairs it.
    let drifts: [&[&str]; 3] = [
        &["iptables", "-t", "nat", "-F"],
        &["iptables", "-t", "mangle", "-X", "KUBE-PROXY-CANARY"],
        &["iptables", "-t", "filter", "-F", "INPUT"],
    ];
    for drift in drifts {
        run(&topology, drift);
        assert!(
            syncer.sync(rulesets(&services)).expect("repair")[0].full,
            "`{}` went unnoticed",
            drift.join(" ")
        );
        assert_nft_save_is(
            &topology,
            &good,
            &format!("not repaired after `{}`", drift.join(" ")),
        );
        syncer.applier_mut().commands = 0;
        assert!(!syncer.sync(rulesets(&services)).expect("partial")[0].full);
        assert_eq!(syncer.applier().commands, 0);
    }
    assert_eq!(
        topology.connect("tcp", 2, "10.96.0.10", 80, 1),
        vec!["backend-1"]
    );
}

#[test]
fn with_the_nft_backend_a_restarted_syncer_reads_nat_over_netlink() {
    if !kernel_tests_possible(&TOOLS) {
        return;
    }
    let topology = Topology::new(2);
    let two = vec![
        Svc::new("web", "10.96.0.10", &[1]),
        Svc::new("api", "10.96.0.11", &[2]),
    ];
    let nft_syncer = || {
        IptablesSyncer::new(CountingIptables {
            inner: node_applier(&topology, BackendChoice::Nft),
            commands: 0,
            saved_tables: Vec::new(),
        })
    };
    nft_syncer().sync(rulesets(&two)).expect("first sync");

    // kproxy's chain names over netlink are exactly those iptables-nft-save declares. (The
    // save also declares built-in chains that nf_tables does not hold until a rule needs them.)
    let mut socket = kproxy::sync::netlink::NetfilterSocket::open_in(Some(&topology.node.name))
        .expect("netlink socket");
    let mut listed = socket.chain_names(IpFamily::V4, "nat").expect("chain dump");
    listed.retain(|c| c.starts_with("KUBE-"));
    listed.sort();
    let mut saved: Vec<String> = save(&topology, "iptables-nft-save", Some("nat"))
        .iter()
        .filter_map(|l| l.strip_prefix(':'))
        .map(|l| l.split(' ').next().unwrap_or_default().to_string())
        .filter(|c| c.starts_with("KUBE-"))
        .collect();
    saved.sort();
    assert_eq!(listed, saved);
    assert!(listed.iter().any(|c| c.starts_with("KUBE-SVC-")));

    // A restarted syncer (a full sync that reads nat over netlink) without api: api's chains
    // go, the jump rules are found and not duplicated, web keeps working.
    let one = vec![Svc::new("web", "10.96.0.10", &[1])];
    let mut restarted = nft_syncer();
    assert!(restarted.sync(rulesets(&one)).expect("restart")[0].full);
    assert_eq!(
        restarted.applier().saved_tables,
        vec!["filter"],
        "nat is read over netlink, not with iptables-save"
    );
    let nat = save(&topology, "iptables-nft-save", Some("nat"));
    let declared = |prefix: &str| nat.iter().filter(|l| l.starts_with(prefix)).count();
    assert_eq!(
        declared(":KUBE-SVC-"),
        1,
        "api's service chain stayed:\n{nat:#?}"
    );
    assert_eq!(
        declared(":KUBE-SEP-"),
        1,
        "api's endpoint chain stayed:\n{nat:#?}"
    );
    assert!(!nat.iter().any(|l| l.contains("10.96.0.11")));
    for chain in ["PREROUTING", "OUTPUT"] {
        let jumps = nat
            .iter()
            .filter(|l| l.starts_with(&format!("-A {chain} ")) && l.ends_with("-j KUBE-SERVICES"))
            .count();
        assert_eq!(jumps, 1, "{chain} jumps to KUBE-SERVICES {jumps} times");
    }
    assert_eq!(
        topology.connect("tcp", 2, "10.96.0.10", 80, 1),
        vec!["backend-1"]
    );
}

#[test]
fn flushed_or_deleted_chains_are_restored_by_the_next_sync() {
    if !kernel_tests_possible(&TOOLS) {
        return;
    }
    let topology = Topology::new(1);
    let services = vec![Svc::new("web", "10.96.0.10", &[1])];
    let mut syncer = IptablesSyncer::new(node_applier(&topology, BackendChoice::Auto));
    syncer.sync(rulesets(&services)).expect("first sync");
    assert!(!syncer.sync(rulesets(&services)).expect("partial")[0].full);
    assert_eq!(
        topology.connect("tcp", 2, "10.96.0.10", 80, 1),
        vec!["backend-1"]
    );
    let good = save(&topology, "iptables-nft-save", None);

    // Someone flushes nat: the service is gone...
    run(&topology, &["iptables", "-t", "nat", "-F"]);
    assert!(topology.connect("tcp", 2, "10.96.0.10", 80, 1)[0].starts_with("ERR:"));
    // ...and the library's next sync notices and does a full one.
    assert!(syncer.sync(rulesets(&services)).expect("repair")[0].full);
    assert_nft_save_is(&topology, &good, "not repaired");
    assert_eq!(
        topology.connect("tcp", 2, "10.96.0.10", 80, 1),
        vec!["backend-1"]
    );

    // Someone deletes KUBE-SERVICES (unhooking it first, as the kernel demands).
    for chain in ["PREROUTING", "OUTPUT"] {
        run(
            &topology,
            &[
                "iptables",
                "-t",
                "nat",
                "-D",
                chain,
                "-m",
                "comment",
                "--comment",
                "kubernetes service portals",
                "-j",
                "KUBE-SERVICES",
            ],
        );
    }
    run(&topology, &["iptables", "-t", "nat", "-F", "KUBE-SERVICES"]);
    run(&topology, &["iptables", "-t", "nat", "-X", "KUBE-SERVICES"]);
    assert!(syncer.sync(rulesets(&services)).expect("repair")[0].full);
    assert_nft_save_is(&topology, &good, "not repaired");
    assert_eq!(
        topology.connect("tcp", 2, "10.96.0.10", 80, 1),
        vec!["backend-1"]
    );

    // The binary (a fresh process, always a full sync) repairs a flushed filter table too.
    run(&topology, &["iptables", "-t", "filter", "-F"]);
    run(&topology, &["iptables", "-t", "nat", "-F"]);
    sync(&topology, &services, &[]);
    assert_nft_save_is(&topology, &good, "not repaired");
}

#[test]
fn cleanup_leaves_nothing_behind_and_spares_user_rules() {
    if !kernel_tests_possible(&TOOLS) {
        return;
    }
    let topology = Topology::new(1);
    // The user's own rules, in filter and nat.
    for argv in [
        &["iptables", "-t", "filter", "-N", "USER-CHAIN"][..],
        &[
            "iptables",
            "-t",
            "filter",
            "-A",
            "USER-CHAIN",
            "-s",
            "192.0.2.1",
            "-j",
            "DROP",
        ],
        &[
            "iptables",
            "-t",
            "filter",
            "-A",
            "INPUT",
            "-s",
            "192.0.2.2",
            "-j",
            "USER-CHAIN",
        ],
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "192.0.2.3",
            "-j",
            "RETURN",
        ],
    ] {
        run(&topology, argv);
    }
    let user_state = meaningful(&save(&topology, "iptables-nft-save", None));
    assert!(user_state.iter().any(|l| l.contains("USER-CHAIN")));

    let services = vec![
        Svc::new("web", "10.96.0.10", &[1]).affinity(100),
        Svc::new("nodeport", "10.96.0.15", &[1]).node_port(30080),
        Svc::new("empty", "10.96.0.14", &[]).without_slice(),
    ];
    sync(&topology, &services, &[]);
    assert_eq!(
        topology.connect("tcp", 2, "10.96.0.10", 80, 1),
        vec!["backend-1"]
    );
    let synced = save(&topology, "iptables-nft-save", None);
    for line in &user_state {
        assert!(synced.contains(line), "sync lost the user's {line:?}");
    }

    let out = topology.kproxy(&["cleanup", "--mode", "iptables"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same(
        &user_state,
        &meaningful(&save(&topology, "iptables-nft-save", None)),
        "cleanup left something behind or took something of the user's",
    );
    assert!(meaningful(&save(&topology, "iptables-legacy-save", None)).is_empty());
    assert!(meaningful(&save(&topology, "ip6tables-nft-save", None)).is_empty());
    assert!(topology.connect("tcp", 2, "10.96.0.10", 80, 1)[0].starts_with("ERR:"));
    // Cleaning up again finds nothing to do.
    let out = topology.kproxy(&["cleanup", "--mode", "iptables"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same(
        &user_state,
        &meaningful(&save(&topology, "iptables-nft-save", None)),
        "cleanup left something behind or took something of the user's",
    );
}

#[test]
fn legacy_backend_syncs_is_detected_and_cleans_up() {
    if !kernel_tests_possible(&TOOLS) {
        return;
    }
    let topology = Topology::new(2);
    let services = vec![Svc::new("sticky", "10.96.0.11", &[1, 2]).affinity(10800)];
    sync(&topology, &services, &["--iptables-backend", "legacy"]);
    let legacy = save(&topology, "iptables-legacy-save", None);
    assert!(
        legacy.iter().any(|l| l.starts_with(":KUBE-SERVICES")),
        "{legacy:?}"
    );
    assert!(
        !save(&topology, "iptables-nft-save", None)
            .iter()
            .any(|l| l.contains("KUBE-")),
        "nothing went to nft"
    );
    let first = placement(&topology, "tcp", "10.96.0.11", 80);
    for (client, backend) in &first {
        assert_eq!(
            topology.connect("tcp", *client, "10.96.0.11", 80, 5),
            vec![backend.clone(); 5]
        );
    }
    // Without the flag the backend is found by kproxy's canary in legacy's mangle table; the
    // full sync keeps the affinity and adds nothing to nft.
    let list = recent_list(&topology, "iptables-legacy-save", "10.244.1.2");
    let sources = recent_sources(&topology, &list);
    sync(&topology, &services, &[]);
    assert_same(
        &legacy,
        &save(&topology, "iptables-legacy-save", None),
        "the auto-detected sync changed legacy rules",
    );
    assert!(recent_sources(&topology, &list).is_superset(&sources));
    assert_eq!(placement(&topology, "tcp", "10.96.0.11", 80), first);
    assert!(!save(&topology, "iptables-nft-save", None)
        .iter()
        .any(|l| l.contains("KUBE-")));

    let out = topology.kproxy(&["cleanup", "--mode", "iptables"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !save(&topology, "iptables-legacy-save", None)
            .iter()
            .any(|l| l.contains("KUBE-")),
        "legacy rules left behind"
    );
}

/// The rules of the built-in chains (`-A INPUT …`) of a save that jump to kproxy's chains.
fn builtin_jumps(lines: &[String]) -> Vec<(String, String)> {
    let mut table = String::new();
    let mut out = Vec::new();
    for line in lines {
        if let Some(name) = line.strip_prefix('*') {
            table = name.to_string();
        }
        let builtin = ["INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"]
            .iter()
            .any(|c| line.starts_with(&format!("-A {c} ")));
        if builtin && line.contains(" -j KUBE-") {
            out.push((table.clone(), line.clone()));
        }
    }
    out
}

#[test]
fn a_full_sync_leaves_one_copy_of_each_jump_rule_and_spares_other_rules() {
    if !kernel_tests_possible(&TOOLS) {
        return;
    }
    for (backend, iptables, save_tool) in [
        ("nft", "iptables-nft", "iptables-nft-save"),
        ("legacy", "iptables-legacy", "iptables-legacy-save"),
    ] {
        let topology = Topology::new(1);
        let services = vec![Svc::new("web", "10.96.0.10", &[1]).node_port(30080)];
        let flags = ["--iptables-backend", backend];
        sync(&topology, &services, &flags);
        // A user's rule at the top of INPUT, after kproxy's jumps were put in.
        run(
            &topology,
            &[iptables, "-I", "INPUT", "-s", "192.0.2.8", "-j", "ACCEPT"],
        );
        let expected = save(&topology, save_tool, None);
        let jumps = builtin_jumps(&expected);
        assert_eq!(jumps.len(), 14, "{backend}: {jumps:#?}");
        // Two more copies of every jump rule at the top of its chain, as two writers at once
        // used to leave them.
        for _ in 0..2 {
            for (table, line) in &jumps {
                let insert = format!("{iptables} -t {table} {}", line.replacen("-A ", "-I ", 1));
                run(&topology, &["sh", "-c", &insert]);
            }
        }
        assert_eq!(
            builtin_jumps(&save(&topology, save_tool, None)).len(),
            42,
            "{backend}"
        );
        sync(&topology, &services, &flags);
        assert_same(
            &expected,
            &save(&topology, save_tool, None),
            &format!("{backend}: the full sync did not leave exactly one copy of each jump"),
        );
        assert_eq!(
            topology.connect("tcp", 2, "10.96.0.10", 80, 1),
            vec!["backend-1"],
            "{backend}"
        );
    }
}

/// Passes everything through to the real tools, except the next restore of both tables: of
/// that only the first `keep` commits are applied, and the tool "dies" after them, as under a
/// `kill -9` between two commits.
struct Interrupter {
    inner: SystemApplier,
    keep: Option<usize>,
    /// The number of commits of the interrupted restore.
    commits: usize,
}

impl Applier for Interrupter {
    fn program(&self, family: IpFamily, tool: Tool) -> String {
        self.inner.program(family, tool)
    }

    fn restore(&mut self, family: IpFamily, payload: &str) -> Result<Exit, SpawnError> {
        let sections = kproxy::sync::iptables::commit_sections(payload);
        let both = payload.contains("*nat\n") && payload.contains("*filter\n");
        let Some(keep) = self.keep.filter(|_| both) else {
            return self.inner.restore(family, payload);
        };
        self.keep = None;
        self.commits = sections.len();
        let applied: String = sections.iter().take(keep).copied().collect();
        let exit = self.inner.restore(family, &applied)?;
        assert!(exit.success(), "the first {keep} commits: {}", exit.stderr);
        Ok(Exit {
            code: None,
            ..Exit::default()
        })
    }

    fn save(&mut self, family: IpFamily, table: Option<&str>) -> Result<Exit, SpawnError> {
        self.inner.save(family, table)
    }

    fn iptables(&mut self, family: IpFamily, args: &[&str]) -> Result<Exit, SpawnError> {
        self.inner.iptables(family, args)
    }

    fn nf_tables_socket(
        &mut self,
    ) -> Option<std::io::Result<kproxy::sync::netlink::NetfilterSocket>> {
        self.inner.nf_tables_socket()
    }
}

/// [`rulesets`] with another masquerade bit.
fn rulesets_with_bit(services: &[Svc], bit: u8) -> Vec<Ruleset> {
    let mut manifests = kproxy::source::Manifests::default();
    manifests
        .add_text(&manifest(services), "test")
        .expect("manifest parses");
    let mut config = NodeConfig::new("node-1");
    config.node_ips = vec![NODE_IP.parse().expect("ip")];
    config.cluster_cidrs = vec![CLUSTER_CIDR.parse().expect("cidr")];
    config.masquerade_mark = kproxy::config::MasqueradeMark::from_bit(bit);
    let plan = kproxy::pipeline::plan(&manifests.state, &config);
    kproxy::pipeline::iptables_rulesets(&plan, &config)
}

#[test]
fn a_sync_interrupted_between_commits_drops_nothing_either_rules_carry() {
    if !kernel_tests_possible(&TOOLS) {
        return;
    }
    // Before and after, with the masquerade bit moving from 14 to 15 (filter's KUBE-FORWARD
    // accepts what nat marks: under a FORWARD policy of DROP, as on many nodes, a mismatch
    // drops the traffic).
    let old = || {
        vec![
            Svc::new("keep", "10.96.0.10", &[1]),
            Svc::new("gain", "10.96.0.11", &[]),
            Svc::new("lose", "10.96.0.12", &[2]),
            Svc::new("gone", "10.96.0.13", &[1]),
        ]
    };
    let new = || {
        vec![
            Svc::new("keep", "10.96.0.10", &[1]),
            Svc::new("gain", "10.96.0.11", &[2]),
            Svc::new("lose", "10.96.0.12", &[]),
            Svc::new("fresh", "10.96.0.14", &[1]),
        ]
    };
    // Each Service's backend under the old and under the new rules (None: not carried).
    let carried: [(&str, &str, Option<&str>, Option<&str>); 5] = [
        ("keep", "10.96.0.10", Some("backend-1"), Some("backend-1")),
        ("gain", "10.96.0.11", None, Some("backend-2")),
        ("lose", "10.96.0.12", Some("backend-2"), None),
        ("gone", "10.96.0.13", Some("backend-1"), None),
        ("fresh", "10.96.0.14", None, Some("backend-1")),
    ];
    let topology = Topology::new(2);
    topology.add_node_default_route();
    run(&topology, &["iptables", "-P", "FORWARD", "DROP"]);

    // The clean result, to compare the repaired one with.
    IptablesSyncer::new(node_applier(&topology, BackendChoice::Nft))
        .sync(rulesets_with_bit(&new(), 15))
        .expect("clean sync");
    let clean = save(&topology, "iptables-nft-save", None);
    run_kproxy_cleanup(&topology);

    let mut half_states = 0;
    for keep in 1.. {
        IptablesSyncer::new(node_applier(&topology, BackendChoice::Nft))
            .sync(rulesets_with_bit(&old(), 14))
            .expect("old rules");
        for (name, ip, before, _) in carried {
            let answer = topology.connect("tcp", 2, ip, 80, 1);
            match before {
                Some(backend) => assert_eq!(answer, vec![backend], "old rules, {name}"),
                None => assert!(
                    answer[0].starts_with("ERR:"),
                    "old rules, {name}: {answer:?}"
                ),
            }
        }
        // The new rules, interrupted after `keep` commits (a fresh process: a full sync).
        let mut syncer = IptablesSyncer::new(Interrupter {
            inner: node_applier(&topology, BackendChoice::Nft),
            keep: Some(keep),
            commits: 0,
        });
        syncer
            .sync(rulesets_with_bit(&new(), 15))
            .expect_err("interrupted");
        let commits = syncer.applier().commits;
        assert!(
            commits > keep,
            "{keep} of {commits} commits is no half state"
        );
        half_states += 1;
        for (name, ip, before, after) in carried {
            let answer = topology.connect("tcp", 3, ip, 80, 1);
            let answer = answer.first().cloned().unwrap_or_default();
            assert_ne!(
                answer, "ERR:ConnectionRefusedError",
                "after {keep} commit(s): {name} is rejected, though the old or the new rules carry it"
            );
            if before.is_some() && before == after {
                assert_eq!(
                    Some(answer.as_str()),
                    before,
                    "after {keep} commit(s): {name}, carried by the old and the new rules, is not"
                );
            } else if answer.starts_with("backend-") {
                assert!(
                    [before, after].contains(&Some(answer.as_str())),
                    "after {keep} commit(s): {name} reached {answer}"
                );
            }
        }
        // The next sync repairs it: the result is that of a clean sync.
        IptablesSyncer::new(node_applier(&topology, BackendChoice::Nft))
            .sync(rulesets_with_bit(&new(), 15))
            .expect("repair");
        assert_nft_save_is(
            &topology,
            &clean,
            &format!("after {keep} commit(s), the next sync did not repair"),
        );
        for (name, ip, _, after) in carried {
            let answer = topology.connect("tcp", 2, ip, 80, 1);
            match after {
                Some(backend) => assert_eq!(answer, vec![backend], "repaired, {name}"),
                None => assert!(
                    answer[0].starts_with("ERR:"),
                    "repaired, {name}: {answer:?}"
                ),
            }
        }
        run_kproxy_cleanup(&topology);
        if keep + 1 == commits {
            break;
        }
    }
    // This change removes a REJECT, adds one and moves an ACCEPT: three commits.
    assert_eq!(half_states, 2);
}

fn run_kproxy_cleanup(topology: &Topology) {
    let out = topology.kproxy(&["cleanup", "--mode", "iptables"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
