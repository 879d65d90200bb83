//! The `maps` nftables layout (docs/maps-layout.md) with real traffic: the real binary
//! (`kproxy sync --once --mode nftables --nftables-layout maps`) loads a small cluster into a
//! node namespace, clients in another namespace connect to its Services, and backends answer
//! with their names (tests/common/topology.rs). The affinity state is read from the kernel
//! (`nft -j list map ip kproxy affinity`).
//!
//! Covered: ClientIP affinity (clients stick, and spread), its expiry, UDP, IPv6 (dual-stack,
//! without affinity: nft 1.0.6 cannot write the IPv6 affinity updates, see tests/common/nft.rs),
//! rejection and Local-policy drops (compared with kube-proxy's layout), NodePorts, resyncs that
//! keep affinity, an endpoint's removal, drift repair and cleanup.
//!
//! Needs root, `ip`, `nft` and `python3`. Without them the tests print why and pass, unless
//! `KPROXY_REQUIRE_KERNEL_TESTS=1`, which turns that into a failure.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::cluster::{self, backend_names, backend_number, placement, slice, slice6, Service};
use common::netns::kernel_tests_possible;
use common::nft::nft;
use common::topology::{client_address, Topology, BACKEND_PORT, CLUSTER_CIDR6, NODE_IP, NODE_IP6};

fn possible() -> bool {
    kernel_tests_possible(&["nft", "python3"])
}

const MAPS: [&str; 4] = ["--mode", "nftables", "--nftables-layout", "maps"];
const KUBE_PROXY_LAYOUT: [&str; 2] = ["--mode", "nftables"];
/// Dual-stack: the IPv6 node address and pod network of [`Topology::add_ipv6`].
const DUAL: [&str; 6] = [
    "--ip-family",
    "dual",
    "--node-ip",
    NODE_IP6,
    "--cluster-cidr",
    CLUSTER_CIDR6,
];

const WEB_IP: &str = "10.96.0.10";

/// `kproxy sync --once` of the maps layout, with `extra` flags.
fn sync_maps(topology: &Topology, extra: &[&str], manifests: &str) {
    let mut flags = MAPS.to_vec();
    flags.extend_from_slice(extra);
    cluster::sync_once(topology, &flags, manifests);
}

/// One element of the `affinity` map: `client . frontend . proto . port : endpoint . port`.
#[derive(Debug, Clone)]
struct Pin {
    client: String,
    frontend: String,
    proto: String,
    port: u64,
    /// `address:port`.
    endpoint: String,
    timeout: Option<u64>,
    expires: Option<u64>,
}

/// The elements of `@affinity` in the node namespace.
fn affinity(topology: &Topology) -> Vec<Pin> {
    let listing = nft(
        &topology.node,
        &["-j", "list", "map", "ip", "kproxy", "affinity"],
    );
    let json: serde_json::Value = serde_json::from_str(&listing).expect("nft prints JSON");
    let map = json["nftables"]
        .as_array()
        .and_then(|items| items.iter().find_map(|i| i.get("map")))
        .unwrap_or_else(|| panic!("no map in {listing}"));
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut pins = Vec::new();
    for pair in map["elem"].as_array().into_iter().flatten() {
        let (key, data) = (&pair[0], &pair[1]);
        // With a timeout the key is wrapped: {"elem": {"val": …, "timeout": …, "expires": …}}.
        let (val, timeout, expires) = match key.get("elem") {
            Some(elem) => (
                &elem["val"],
                elem["timeout"].as_u64(),
                elem["expires"].as_u64(),
            ),
            None => (key, None, None),
        };
        let parts: Vec<String> = val["concat"]
            .as_array()
            .unwrap_or_else(|| panic!("affinity key is not a concatenation: {pair}"))
            .iter()
            .map(text)
            .collect();
        let endpoint: Vec<String> = data["concat"]
            .as_array()
            .unwrap_or_else(|| panic!("affinity data is not a concatenation: {pair}"))
            .iter()
            .map(text)
            .collect();
        assert!(
            parts.len() == 4 && endpoint.len() == 2,
            "unexpected affinity element {pair}"
        );
        pins.push(Pin {
            client: parts[0].clone(),
            frontend: parts[1].clone(),
            proto: parts[2].clone(),
            port: parts[3].parse().expect("a port number"),
            endpoint: format!("{}:{}", endpoint[0], endpoint[1]),
            timeout,
            expires,
        });
    }
    pins
}

/// Client address → `endpoint:port` it is pinned to, for one frontend.
fn pins(topology: &Topology, frontend: &str, proto: &str, port: u16) -> BTreeMap<String, String> {
    let mut pinned = BTreeMap::new();
    for pin in affinity(topology) {
        if pin.frontend == frontend && pin.proto == proto && pin.port == u64::from(port) {
            let before = pinned.insert(pin.client.clone(), pin.endpoint.clone());
            assert!(before.is_none(), "two entries for one client: {pin:?}");
        }
    }
    pinned
}

/// The affinity entries a placement should have left: client address → `10.244.N.2:8080`.
fn expected_pins(placed: &BTreeMap<u8, String>) -> BTreeMap<String, String> {
    placed
        .iter()
        .map(|(client, backend)| (client_address(*client, false), endpoint_of(backend)))
        .collect()
}

/// `backend-N` → its IPv4 endpoint `10.244.N.2:8080`.
fn endpoint_of(backend: &str) -> String {
    let n = backend_number(backend).unwrap_or_else(|| panic!("not a backend: {backend}"));
    format!("10.244.{n}.2:{BACKEND_PORT}")
}

fn distinct(placed: &BTreeMap<u8, String>) -> usize {
    placed.values().collect::<BTreeSet<_>>().len()
}

/// (1) Every connection of a client reaches one backend; the clients spread over several. (TCP;
/// UDP affinity is in [`udp_services_reach_the_backends`].)
#[test]
fn client_ip_affinity_keeps_each_client_on_one_backend_and_spreads_clients() {
    if !possible() {
        return;
    }
    let topology = Topology::new(4);
    let web = Service::new("web", WEB_IP).affinity(600);
    sync_maps(
        &topology,
        &[],
        &[web.yaml(), slice("web", &[1, 2, 3, 4])].concat(),
    );
    let placed = placement(&topology, "tcp", WEB_IP, 80, 8);
    // 8 clients on 4 endpoints all on one: probability 4 × (1/4)^8 ≈ 6e-5.
    assert!(
        distinct(&placed) >= 2,
        "every client on one endpoint: {placed:?}"
    );
    // The kernel's affinity map holds each client, pinned where its connections went.
    assert_eq!(
        pins(&topology, WEB_IP, "tcp", 80),
        expected_pins(&placed),
        "@affinity against the backends the clients reached"
    );
    for pin in affinity(&topology) {
        assert_eq!(pin.timeout, Some(600), "{pin:?}");
    }
}

/// Like [`placement`], with each client's `@affinity` entry read right after its own
/// connections (a short timeout could end it while later clients connect): it must pin the
/// client to the backend it reached, with `timeout` seconds.
fn placement_with_pins(
    topology: &Topology,
    target: &str,
    port: u16,
    timeout: u64,
) -> BTreeMap<u8, String> {
    (2..=9)
        .map(|client| {
            let answers = topology.connect("tcp", client, target, port, 3);
            let first = answers.first().cloned().unwrap_or_default();
            assert!(
                answers.len() == 3
                    && answers.iter().all(|a| *a == first)
                    && first.starts_with("backend-"),
                "client {client}: {answers:?}"
            );
            let address = client_address(client, false);
            let recorded = affinity(topology);
            let pin = recorded
                .iter()
                .find(|p| p.client == address && p.frontend == target && p.port == u64::from(port));
            assert!(
                pin.is_some_and(|p| p.endpoint == endpoint_of(&first)
                    && p.timeout == Some(timeout)
                    && p.expires.is_some_and(|e| e <= timeout)),
                "client {client} reached {first}; @affinity: {recorded:?}"
            );
            (client, first)
        })
        .collect()
}

/// (2) With a 2 s timeout the entry is gone after 2.6 s idle, and the next connection picks
/// again and is recorded anew.
#[test]
fn affinity_entries_expire_and_the_next_connection_picks_again() {
    if !possible() {
        return;
    }
    let topology = Topology::new(3);
    let web = Service::new("web", WEB_IP).affinity(2);
    sync_maps(
        &topology,
        &[],
        &[web.yaml(), slice("web", &[1, 2, 3])].concat(),
    );
    let mut placed = placement_with_pins(&topology, WEB_IP, 80, 2);
    // Each round gives all 8 clients a fresh pick among 3 endpoints: no client moving in two
    // rounds has probability (1/3)^16.
    let mut moved = false;
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(2600));
        let left = affinity(&topology);
        assert!(left.is_empty(), "entries outlived their timeout: {left:?}");
        // New picks, recorded anew.
        let again = placement_with_pins(&topology, WEB_IP, 80, 2);
        moved |= again != placed;
        placed = again;
        if moved {
            break;
        }
    }
    assert!(moved, "no client ever changed endpoint after expiry");
}

/// (3) UDP: a Service's UDP port reaches the backends, spread over them, over IPv4 and over
/// IPv6 (dual-stack); with ClientIP affinity each client sticks to one backend, recorded in
/// `@affinity`.
#[test]
fn udp_services_reach_the_backends() {
    if !possible() {
        return;
    }
    let topology = Topology::new(3);
    topology.add_ipv6();
    let manifests = [
        Service::new("dns", "10.96.0.53").also("fd00:96::53").yaml(),
        slice("dns", &[1, 2, 3]),
        slice6("dns", &[1, 2, 3]),
        // IPv4 only: this nft may not write IPv6 affinity updates.
        Service::new("sticky", "10.96.0.54").affinity(600).yaml(),
        slice("sticky", &[1, 2, 3]),
    ]
    .concat();
    sync_maps(&topology, &DUAL, &manifests);
    // For the failure messages: a pick rule the kernel holds as `… tcp dport …` carries an
    // implicit `meta l4proto tcp` (nft 1.0.6 adds it to the first rule of a batch that uses a
    // map whose data is declared `tcp dport`): it never DNATs UDP.
    let tcp_only: Vec<String> = ["ip", "ip6"]
        .iter()
        .flat_map(|family| {
            nft(&topology.node, &["list", "table", family, "kproxy"])
                .lines()
                .filter(|l| l.contains("dnat") && l.contains(" map @") && l.contains("tcp dport"))
                .map(|l| format!("{family}: {}", l.trim()))
                .collect::<Vec<_>>()
        })
        .collect();
    let hint = if tcp_only.is_empty() {
        String::new()
    } else {
        format!("\npick rules the kernel limits to TCP: {tcp_only:#?}")
    };
    let all = backend_names(&[1, 2, 3]);
    for target in ["10.96.0.53", "fd00:96::53"] {
        // One datagram first: a failure shows after one timeout, not twelve.
        let first = topology.connect("udp", 2, target, 53, 1);
        assert!(
            first.len() == 1 && all.contains(&first[0]),
            "udp to [{target}]:53: {first:?}{hint}"
        );
        let answers = topology.connect("udp", 2, target, 53, 12);
        let reached: BTreeSet<String> = answers.iter().cloned().collect();
        assert!(
            answers.len() == 12 && reached.is_subset(&all),
            "udp to [{target}]:53: {answers:?}{hint}"
        );
        // 12 datagrams (new flows) over 3 endpoints all on one: 3 × (1/3)^12 ≈ 6e-6.
        assert!(reached.len() > 1, "udp to [{target}]:53: {answers:?}{hint}");
    }
    let placed = placement(&topology, "udp", "10.96.0.54", 53, 6);
    assert!(
        distinct(&placed) >= 2,
        "every client on one endpoint: {placed:?}"
    );
    assert_eq!(
        pins(&topology, "10.96.0.54", "udp", 53),
        expected_pins(&placed),
        "@affinity against the backends the clients reached"
    );
}

/// IPv6 without affinity: a dual-stack Service's cluster IPs of both families reach the
/// backends over TCP, spread over them, through the `ip` and `ip6` `kproxy` tables.
#[test]
fn dual_stack_cluster_ips_reach_the_backends() {
    if !possible() {
        return;
    }
    let topology = Topology::new(3);
    topology.add_ipv6();
    let manifests = [
        Service::new("web", WEB_IP).also("fd00:96::10").yaml(),
        slice("web", &[1, 2, 3]),
        slice6("web", &[1, 2, 3]),
    ]
    .concat();
    sync_maps(&topology, &DUAL, &manifests);
    let tables = nft(&topology.node, &["list", "tables"]);
    assert!(
        tables.contains("table ip kproxy") && tables.contains("table ip6 kproxy"),
        "{tables}"
    );
    let all = backend_names(&[1, 2, 3]);
    for target in [WEB_IP, "fd00:96::10"] {
        let answers = topology.connect("tcp", 2, target, 80, 12);
        let reached: BTreeSet<String> = answers.iter().cloned().collect();
        assert!(
            answers.len() == 12 && reached.is_subset(&all),
            "tcp to [{target}]:80: {answers:?}"
        );
        // 12 connections over 3 endpoints all on one: 3 × (1/3)^12 ≈ 6e-6.
        assert!(reached.len() > 1, "tcp to [{target}]:80: {answers:?}");
    }
}

/// What the refusal probes of [`refusals_and_drops_as_the_kube_proxy_layout`] saw.
fn refusal_probes(topology: &Topology) -> BTreeMap<&'static str, Vec<String>> {
    // (name, proto, client, target, port, connections)
    let probes: [(&str, &str, u8, &str, u16, usize); 6] = [
        ("no endpoints, tcp", "tcp", 2, "10.96.0.20", 80, 1),
        ("no endpoints, udp", "udp", 3, "10.96.0.20", 53, 1),
        (
            "external Local, no local endpoint",
            "tcp",
            4,
            NODE_IP,
            30081,
            1,
        ),
        (
            "internal Local, no local endpoint",
            "tcp",
            5,
            "10.96.0.22",
            80,
            1,
        ),
        (
            "its cluster IP (Cluster policy)",
            "tcp",
            6,
            "10.96.0.21",
            80,
            20,
        ),
        (
            "external Local, a local endpoint",
            "tcp",
            7,
            NODE_IP,
            30082,
            20,
        ),
    ];
    // Drops wait for the client's timeout: all probes at once.
    std::thread::scope(|scope| {
        let running: Vec<_> = probes
            .iter()
            .map(|&(name, proto, client, target, port, count)| {
                scope.spawn(move || (name, topology.connect(proto, client, target, port, count)))
            })
            .collect();
        running
            .into_iter()
            .map(|probe| probe.join().expect("probe thread"))
            .collect()
    })
}

/// (4) A Service without endpoints refuses (ECONNREFUSED, TCP and UDP); a Local traffic policy
/// without a local endpoint drops, externally (NodePort) and internally (cluster IP) — as
/// kube-proxy's layout does: both layouts are held to the same answers on the same node,
/// kube-proxy's first.
#[test]
fn refusals_and_drops_as_the_kube_proxy_layout() {
    if !possible() {
        return;
    }
    let topology = Topology::new(3);
    // Packets that no rule takes are forwarded to nowhere (a timeout, not a refusal).
    topology.add_node_default_route();
    let manifests = [
        Service::new("empty", "10.96.0.20").yaml(),
        slice("empty", &[]),
        Service::new("ext-local", "10.96.0.21")
            .node_port(30081)
            .external_policy_local()
            .yaml(),
        slice("ext-local", &[2, 3]),
        Service::new("int-local", "10.96.0.22")
            .internal_policy_local()
            .yaml(),
        slice("int-local", &[2, 3]),
        Service::new("ext-local-here", "10.96.0.23")
            .node_port(30082)
            .external_policy_local()
            .yaml(),
        slice("ext-local-here", &[1, 2]),
    ]
    .concat();
    let refused = vec!["ERR:ConnectionRefusedError".to_string()];
    let dropped = vec!["ERR:TimeoutError".to_string()];
    for (layout, flags, table) in [
        ("kube-proxy", &KUBE_PROXY_LAYOUT[..], "table ip kube-proxy"),
        ("maps", &MAPS[..], "table ip kproxy"),
    ] {
        cluster::sync_once(&topology, flags, &manifests);
        // The layout switch replaced the other table: this layout alone answers.
        let tables = nft(&topology.node, &["list", "tables"]);
        assert_eq!(tables.trim(), table, "{layout}");
        let start = Instant::now();
        let answers = refusal_probes(&topology);
        let elapsed = start.elapsed();
        let of = |name: &str| answers.get(name).cloned().unwrap_or_default();
        assert_eq!(of("no endpoints, tcp"), refused, "{layout}: {answers:?}");
        assert_eq!(of("no endpoints, udp"), refused, "{layout}: {answers:?}");
        assert_eq!(
            of("external Local, no local endpoint"),
            dropped,
            "{layout}: {answers:?}"
        );
        assert_eq!(
            of("internal Local, no local endpoint"),
            dropped,
            "{layout}: {answers:?}"
        );
        let cluster: BTreeSet<String> = of("its cluster IP (Cluster policy)").into_iter().collect();
        assert_eq!(cluster, backend_names(&[2, 3]), "{layout}: {answers:?}");
        let local: BTreeSet<String> = of("external Local, a local endpoint").into_iter().collect();
        assert_eq!(local, backend_names(&[1]), "{layout}: {answers:?}");
        assert!(
            elapsed < Duration::from_secs(5),
            "{layout}: probes took {elapsed:?}"
        );
    }
}

/// (5) A NodePort reached from a client outside the node: spread without affinity; with
/// affinity every client sticks to one backend, recorded against the node address and port.
#[test]
fn nodeports_from_outside_reach_the_backends_and_stick_with_affinity() {
    if !possible() {
        return;
    }
    let topology = Topology::new(4);
    let manifests = [
        Service::new("np", "10.96.0.30").node_port(30080).yaml(),
        slice("np", &[1, 2, 3, 4]),
        Service::new("np-sticky", "10.96.0.31")
            .node_port(30090)
            .affinity(600)
            .yaml(),
        slice("np-sticky", &[1, 2, 3, 4]),
    ]
    .concat();
    sync_maps(&topology, &[], &manifests);

    let answers = topology.connect("tcp", 2, NODE_IP, 30080, 16);
    let reached: BTreeSet<String> = answers.iter().cloned().collect();
    assert!(
        answers.len() == 16 && reached.is_subset(&backend_names(&[1, 2, 3, 4])),
        "{answers:?}"
    );
    // 16 connections over 4 endpoints all on one: 4 × (1/4)^16 ≈ 1e-9.
    assert!(reached.len() > 1, "no spread without affinity: {answers:?}");

    let placed = placement(&topology, "tcp", NODE_IP, 30090, 6);
    // 8 clients on 4 endpoints all on one: ≈ 6e-5.
    assert!(
        distinct(&placed) >= 2,
        "every client on one endpoint: {placed:?}"
    );
    assert_eq!(
        pins(&topology, NODE_IP, "tcp", 30090),
        expected_pins(&placed),
        "NodePort affinity entries"
    );
    // Only the NodePort with affinity is recorded.
    let others: Vec<Pin> = affinity(&topology)
        .into_iter()
        .filter(|p| p.port != 30090)
        .collect();
    assert!(others.is_empty(), "{others:?}");
}

/// (6) A second `sync --once` of the same cluster, and one with an unrelated Service changed
/// and another added, keep every `@affinity` entry and every client on its backend.
#[test]
fn resyncs_keep_affinity() {
    if !possible() {
        return;
    }
    let topology = Topology::new(3);
    let web = [
        Service::new("web", WEB_IP).affinity(600).yaml(),
        slice("web", &[1, 2, 3]),
    ]
    .concat();
    let other = Service::new("other", "10.96.0.40").yaml();
    let first = [web.clone(), other.clone(), slice("other", &[1, 2])].concat();
    sync_maps(&topology, &[], &first);
    let placed = placement(&topology, "tcp", WEB_IP, 80, 4);
    let pinned = pins(&topology, WEB_IP, "tcp", 80);
    assert_eq!(pinned, expected_pins(&placed));

    let changed = [
        web,
        other,
        slice("other", &[3]),
        Service::new("added", "10.96.0.41").affinity(60).yaml(),
        slice("added", &[2]),
    ]
    .concat();
    for (what, manifests) in [
        ("the same cluster", &first),
        ("other services changed", &changed),
    ] {
        sync_maps(&topology, &[], manifests);
        // Read before any new connection could record the entries again.
        assert_eq!(
            pins(&topology, WEB_IP, "tcp", 80),
            pinned,
            "{what}: the affinity entries after the sync"
        );
        assert_eq!(
            placement(&topology, "tcp", WEB_IP, 80, 4),
            placed,
            "{what}: clients moved"
        );
    }
    let added = topology.connect("tcp", 2, "10.96.0.41", 80, 2);
    assert_eq!(added, ["backend-2", "backend-2"], "the added service");
}

/// (7) Removing one endpoint from the EndpointSlice moves only the clients pinned to it: after
/// the sync no `@affinity` entry maps a client to the removed endpoint, its clients reach a
/// remaining backend, and everyone else stays put. (The removed backend keeps serving here,
/// so a stale entry would keep its clients there.)
#[test]
fn a_removed_endpoint_moves_only_its_clients() {
    if !possible() {
        return;
    }
    let topology = Topology::new(4);
    let web = Service::new("web", WEB_IP).affinity(600).yaml();
    sync_maps(
        &topology,
        &[],
        &[web.clone(), slice("web", &[1, 2, 3, 4])].concat(),
    );
    let before = placement(&topology, "tcp", WEB_IP, 80, 4);
    // 8 clients on 4 endpoints all on one: ≈ 6e-5.
    assert!(distinct(&before) >= 2, "{before:?}");
    assert_eq!(pins(&topology, WEB_IP, "tcp", 80), expected_pins(&before));

    // Remove the endpoint client 2 is pinned to.
    let removed = before.get(&2).expect("client 2 was placed").clone();
    let gone = backend_number(&removed).expect("a backend number");
    let rest: Vec<usize> = (1..=4).filter(|n| *n != gone).collect();
    sync_maps(&topology, &[], &[web, slice("web", &rest)].concat());

    let removed_endpoint = endpoint_of(&removed);
    let mut problems = Vec::new();
    let stale: Vec<Pin> = affinity(&topology)
        .into_iter()
        .filter(|p| p.endpoint == removed_endpoint)
        .collect();
    if !stale.is_empty() {
        problems.push(format!(
            "after the sync, @affinity still pins clients to the removed endpoint {removed_endpoint}: {stale:?}"
        ));
    }
    let after = placement(&topology, "tcp", WEB_IP, 80, 4);
    for (client, was) in &before {
        let now = after.get(client).expect("every client is placed again");
        if *was == removed {
            if !backend_names(&rest).contains(now) {
                problems.push(format!(
                    "client {} was on the removed {removed}, now reaches {now}",
                    client_address(*client, false)
                ));
            }
        } else if now != was {
            problems.push(format!(
                "client {} moved needlessly from {was} to {now}",
                client_address(*client, false)
            ));
        }
    }
    let left: Vec<Pin> = affinity(&topology)
        .into_iter()
        .filter(|p| p.endpoint == removed_endpoint)
        .collect();
    if !left.is_empty() {
        problems.push(format!(
            "after new connections, @affinity pins clients to the removed endpoint: {left:?}"
        ));
    }
    assert!(
        problems.is_empty(),
        "removing {removed} ({removed_endpoint}):\n{}\nbefore: {before:?}\nafter: {after:?}",
        problems.join("\n")
    );
}

/// (8) Someone flushes a chain, deletes a `service-ips` element, flushes a shared pick chain or
/// deletes the table: traffic stops, and the next `sync --once` restores it (keeping the
/// clients' backends while `@affinity` survived).
#[test]
fn drift_is_repaired_by_the_next_sync() {
    if !possible() {
        return;
    }
    let topology = Topology::new(2);
    topology.add_node_default_route();
    let manifests = [
        Service::new("web", WEB_IP).affinity(600).yaml(),
        slice("web", &[1, 2]),
    ]
    .concat();
    sync_maps(&topology, &[], &manifests);
    let placed = placement(&topology, "tcp", WEB_IP, 80, 2);

    let drifts: [(&str, &[&str]); 4] = [
        (
            "a flushed chain",
            &["flush", "chain", "ip", "kproxy", "services"],
        ),
        (
            "a deleted service-ips element",
            &[
                "delete",
                "element",
                "ip",
                "kproxy",
                "service-ips",
                "{ 10.96.0.10 . tcp . 80 }",
            ],
        ),
        (
            "a flushed pick chain",
            &["flush", "chain", "ip", "kproxy", "cluster-pick"],
        ),
        ("a deleted table", &["delete", "table", "ip", "kproxy"]),
    ];
    for (what, command) in drifts {
        nft(&topology.node, command);
        let broken = topology.connect("tcp", 2, WEB_IP, 80, 1);
        assert!(
            broken.len() == 1 && broken[0].starts_with("ERR:"),
            "{what}: traffic still flows, the drift did not break it: {broken:?}"
        );
        sync_maps(&topology, &[], &manifests);
        if what == "a deleted table" {
            // The affinity entries went with the table: every client reaches some backend.
            let answers = placement(&topology, "tcp", WEB_IP, 80, 2);
            assert!(
                answers.values().all(|b| backend_names(&[1, 2]).contains(b)),
                "{what}: {answers:?}"
            );
        } else {
            assert_eq!(
                placement(&topology, "tcp", WEB_IP, 80, 2),
                placed,
                "{what}: after the repair"
            );
        }
    }
}

/// (9) `kproxy cleanup` removes both families' `kproxy` tables (with a live affinity entry)
/// and leaves other tables exactly as they were.
#[test]
fn cleanup_removes_the_kproxy_tables_and_nothing_else() {
    if !possible() {
        return;
    }
    let topology = Topology::new(1);
    let user = "add table ip user-stuff
add chain ip user-stuff input { type filter hook input priority 0 ; }
add rule ip user-stuff input tcp dport 9999 counter accept
add table ip6 user-stuff6
add chain ip6 user-stuff6 c
add rule ip6 user-stuff6 c udp dport 53 counter
add table inet user-inet
add set inet user-inet s { type ipv4_addr ; elements = { 10.96.0.10 } ; }
";
    let out = topology.node.run(&["nft", "-f", "-"], Some(user));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ruleset = || nft(&topology.node, &["list", "ruleset"]);
    let users_before = ruleset();

    // IPv6 without affinity (this nft may not write IPv6 affinity updates).
    let manifests = [
        Service::new("web", WEB_IP).also("fd00:96::10").yaml(),
        slice("web", &[1]),
        slice6("web", &[1]),
        Service::new("sticky", "10.96.0.11").affinity(600).yaml(),
        slice("sticky", &[1]),
    ]
    .concat();
    sync_maps(&topology, &DUAL, &manifests);
    assert_eq!(
        topology.connect("tcp", 2, "10.96.0.11", 80, 1),
        ["backend-1"]
    );
    assert_eq!(pins(&topology, "10.96.0.11", "tcp", 80).len(), 1);
    let tables = nft(&topology.node, &["list", "tables"]);
    assert!(
        tables.contains("table ip kproxy") && tables.contains("table ip6 kproxy"),
        "{tables}"
    );

    let out = topology.kproxy(&["cleanup", "--mode", "nftables"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("table ip kproxy") && said.contains("table ip6 kproxy"),
        "cleanup should say what it removed: {said}"
    );
    assert_eq!(
        ruleset(),
        users_before,
        "cleanup must leave exactly the other tables"
    );
    let answers = topology.connect("tcp", 2, WEB_IP, 80, 1);
    assert!(answers[0].starts_with("ERR:"), "{answers:?}");

    // A second cleanup finds nothing and changes nothing.
    let out = topology.kproxy(&["cleanup", "--mode", "nftables"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ruleset(), users_before);
}
