//! Both modes route alike (issue 10): random clusters are rendered in iptables and nftables
//! mode, read back, and walked by the tracer for random probe packets. For every probe the two
//! modes must give the same verdict class, the same endpoints with the same odds (within 1e-6)
//! and the same masquerade decision per endpoint — and the one the model intends, computed
//! here from the `ProxyModel` and the spec ([`intent_of`]).
//!
//! Verdict classes: `Accept` and `NoMatch` are one class, "passes untouched": iptables accepts
//! some packets explicitly (the health-check node port in filter `KUBE-NODEPORTS`, marked
//! packets in `KUBE-FORWARD`) where nftables has no rule, and either way kube-proxy lets the
//! packet go on unchanged. `Dnat`, `Reject` and `Drop` are classes of their own.
//!
//! Where kube-proxy's own two modes differ, kproxy's do too (its output is byte-identical to
//! kube-proxy's): those cases are listed once, in `kproxy::trace::ModeDifference`, with the
//! kube-proxy source of each. The oracle names the difference when it predicts one; such a
//! probe is counted, each mode is checked against its own documented behaviour, and the two
//! are not compared with each other. A full-size run fails if it meets no probe of some
//! documented difference (an entry that no longer happens must leave the list).
//!
//! Each documented difference is kept as a named regression test at the end of the file, with
//! its minimal cluster and probes; a translator or walker bug this test finds belongs there too.
//!
//! Three layouts (issue 11): every case is also rendered in nftables mode with
//! `--nftables-layout maps` (docs/maps-layout.md) and traced. That trace must equal the
//! kube-proxy-layout nftables trace — verdict class, endpoints and odds, masquerade per
//! endpoint, affinity timeout and next-connection pinning — and the oracle's nftables intent
//! (where kube-proxy's modes differ, `maps` routes as its nftables mode), except where the
//! `maps` design cannot, listed once in `kproxy::trace::MapsDifference`: the oracle names it,
//! the probe is counted and held to the layout's own behaviour, and a full-size run fails if it
//! meets none. `maps_layout_of_random_clusters_loads` has the kernel check the `maps` layout of
//! generated clusters, which the tracer cannot (what nft or the kernel refuses).

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};
use serde_json::json;

use kproxy::backend::Mode;
use kproxy::config::{MasqueradeMark, NftablesLayout, NodeConfig, NodePortAddresses};
use kproxy::family::{FamilyMode, IpFamily};
use kproxy::model::{Endpoint, NoEndpointVerdict, Protocol, ProxyModel, ServicePort};
use kproxy::pipeline;
use kproxy::source::{ClusterState, Note};
use kproxy::trace::{
    self, AffinityState, Host, MapsDifference, ModeDifference, Origin, Probe, Rules, Trace,
};

/// Clusters per run, each walked with 8 to 24 probes: about 32,000 probes (96,000 traces, three
/// layouts) in some 24 s in a debug build on 2 cores (16 s with two layouts).
/// `PROPTEST_CASES` overrides the count.
const CASES: u32 = 2000;
const PROBES: std::ops::RangeInclusive<usize> = 8..=24;

// ---------------------------------------------------------------------------------------------
// The cluster, as the strategy generates it.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stack {
    V4,
    V6,
    Dual,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodePorts {
    /// `--nodeport-addresses` unset: each mode's default.
    Unset,
    Primary,
    /// The node network of each family.
    NodeNetwork,
    /// The node network and the loopback network of each family.
    NodeNetworkAndLoopback,
    /// The IPv4 node network only: every address for IPv6 (no network of the family).
    NodeNetworkV4Only,
}

#[derive(Debug, Clone)]
struct Node {
    stack: Stack,
    /// A second node IP per family.
    secondary_ip: bool,
    /// `--cluster-cidr` (the local-traffic detector).
    pod_cidr: bool,
    masquerade_all: bool,
    nodeport_addresses: NodePorts,
    localhost_nodeports: bool,
    /// `--service-cidr`.
    service_cidr: bool,
    /// The node's zone is `zone-a` (else none).
    zone: bool,
    /// `PreferSameTrafficDistribution`: node hints are honoured.
    prefer_same_node: bool,
    /// The masquerade bit, and the short mark form (`0x4000`) instead of `%#08x`.
    mark: (u8, bool),
    /// iptables: nfacct counters, `nf_conntrack_tcp_be_liberal`, `--random-fully`, and the
    /// large-cluster mode (no endpoint comments).
    iptables_flags: [bool; 4],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// A `loadBalancerSourceRanges` entry, per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Range {
    /// The network of [`Addrs::near_client`].
    Clients,
    /// [`Addrs::near_client`] alone.
    OneClient,
    /// The pod network.
    Pods,
    /// The node network: holds the primary node IP, so LB IPs are allowed as sources too.
    Nodes,
    /// `0.0.0.0/0`, `::/0`.
    Everything,
    /// A network no probe comes from.
    Elsewhere,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EpHost {
    ThisNode,
    OtherNode,
    /// No `nodeName`.
    Unknown,
    /// A host-network pod on this node: the primary node IP.
    HostNetwork,
}

/// Topology hints of an endpoint (§2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hint {
    ForThisNode,
    ForOtherNode,
    ForZoneA,
    ForZoneB,
}

#[derive(Debug, Clone)]
struct Ep {
    host: EpHost,
    /// Which address of the host's pool (1..=5): Services may share endpoints.
    index: u8,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
    hint: Option<Hint>,
}

#[derive(Debug, Clone)]
struct Svc {
    kind: Kind,
    /// In a dual-stack cluster: 0 both families, 1 IPv4 only, 2 IPv6 only.
    stack: u8,
    ports: Vec<(Protocol, u16)>,
    external_ips: u8,
    lb_ips: u8,
    /// The secondary node address is one more external IP (`Some(false)`) or load-balancer
    /// IP (`Some(true)`): a frontend on a local address when the node has that address.
    on_node: Option<bool>,
    source_ranges: Vec<Range>,
    external_local: bool,
    internal_local: bool,
    affinity: Option<u32>,
    health_check: bool,
    endpoints: Vec<Ep>,
}

#[derive(Debug, Clone)]
struct Cluster {
    node: Node,
    services: Vec<Svc>,
}

// ---------------------------------------------------------------------------------------------
// Probes, as abstract selectors resolved against the built model (so they stay meaningful
// while proptest shrinks the cluster).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeAddr {
    Primary,
    /// The second node IP (an unrelated address when the node has none).
    Secondary,
    Loopback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dst {
    ClusterIp,
    /// The cluster IP on a port no Service defines.
    WrongPort,
    ExternalIp(u8),
    LbIp(u8),
    NodePort(NodeAddr),
    HealthCheck,
    /// An endpoint's own address and port.
    Endpoint(u8),
    /// An address no rule knows.
    Unrelated,
    /// An address in the ServiceCIDR that is no cluster IP.
    Unallocated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    /// Inside [`Range::Clients`] and [`Range::OneClient`].
    NearClient,
    /// Outside every range but [`Range::Everything`].
    FarClient,
    /// A pod on this node that is no endpoint.
    LocalPod,
    /// A pod on another node that is no endpoint.
    RemotePod,
    /// One of the Service port's endpoints (any condition): hairpin.
    Endpoint(u8),
    /// One of the Service's load-balancer IPs.
    LbIp(u8),
    /// The node itself (`Origin::Node`).
    Node(NodeAddr),
}

#[derive(Debug, Clone)]
struct ProbeSel {
    svc: u8,
    port: u8,
    family: u8,
    dst: Dst,
    src: Src,
    other_protocol: bool,
}

#[derive(Debug, Clone)]
struct Case {
    cluster: Cluster,
    probes: Vec<ProbeSel>,
}

// ---------------------------------------------------------------------------------------------
// Addresses.

const HOSTNAME: &str = "node-a";
const OTHER_HOST: &str = "node-b";

fn ip(text: &str) -> IpAddr {
    text.parse().expect("a test address")
}

fn net(text: &str) -> IpNet {
    text.parse().expect("a test network")
}

/// Every address of the test world, per family.
#[derive(Debug, Clone, Copy)]
struct Addrs(IpFamily);

impl Addrs {
    fn v4(&self) -> bool {
        self.0 == IpFamily::V4
    }

    fn node(&self, which: NodeAddr) -> IpAddr {
        match (which, self.v4()) {
            (NodeAddr::Primary, true) => ip("192.168.0.10"),
            (NodeAddr::Secondary, true) => ip("192.168.0.11"),
            (NodeAddr::Loopback, true) => ip("127.0.0.1"),
            (NodeAddr::Primary, false) => ip("fd00:1::10"),
            (NodeAddr::Secondary, false) => ip("fd00:1::11"),
            (NodeAddr::Loopback, false) => ip("::1"),
        }
    }

    fn node_net(&self) -> IpNet {
        net(if self.v4() {
            "192.168.0.0/24"
        } else {
            "fd00:1::/64"
        })
    }

    fn loopback_net(&self) -> IpNet {
        net(if self.v4() { "127.0.0.0/8" } else { "::1/128" })
    }

    fn pod_cidr(&self) -> IpNet {
        net(if self.v4() {
            "10.244.0.0/16"
        } else {
            "fd00:244::/48"
        })
    }

    fn service_cidr(&self) -> IpNet {
        net(if self.v4() {
            "172.30.0.0/16"
        } else {
            "fd00:30::/108"
        })
    }

    fn cluster_ip(&self, svc: usize) -> IpAddr {
        if self.v4() {
            ip(&format!("172.30.0.{}", 10 + svc))
        } else {
            ip(&format!("fd00:30::{:x}", 0x10 + svc))
        }
    }

    fn unallocated(&self) -> IpAddr {
        ip(if self.v4() {
            "172.30.200.1"
        } else {
            "fd00:30::f:1"
        })
    }

    fn external_ip(&self, svc: usize, k: usize) -> IpAddr {
        if self.v4() {
            ip(&format!("192.0.2.{}", 10 * svc + k + 1))
        } else {
            ip(&format!("2001:db8:e::{:x}", 0x10 * svc + k + 1))
        }
    }

    fn lb_ip(&self, svc: usize, k: usize) -> IpAddr {
        if self.v4() {
            ip(&format!("198.51.100.{}", 10 * svc + k + 1))
        } else {
            ip(&format!("2001:db8:b::{:x}", 0x10 * svc + k + 1))
        }
    }

    /// Pod addresses: the third octet (group) tells the node; 99 is no endpoint.
    fn pod(&self, host: EpHost, index: u8) -> IpAddr {
        let group = match host {
            EpHost::ThisNode => 1,
            EpHost::OtherNode => 2,
            EpHost::Unknown => 3,
            EpHost::HostNetwork => return self.node(NodeAddr::Primary),
        };
        if self.v4() {
            ip(&format!("10.244.{group}.{index}"))
        } else {
            ip(&format!("fd00:244:{group}::{index:x}"))
        }
    }

    fn near_client(&self) -> IpAddr {
        ip(if self.v4() {
            "203.0.113.200"
        } else {
            "2001:db8:c::200"
        })
    }

    fn far_client(&self) -> IpAddr {
        ip(if self.v4() {
            "100.64.0.1"
        } else {
            "2001:db8:f::1"
        })
    }

    fn unrelated(&self) -> IpAddr {
        ip(if self.v4() {
            "100.64.9.9"
        } else {
            "2001:db8:9::9"
        })
    }

    fn range(&self, range: Range) -> IpNet {
        let v4 = self.v4();
        match range {
            Range::Clients => net(if v4 {
                "203.0.113.0/24"
            } else {
                "2001:db8:c::/64"
            }),
            Range::OneClient => net(if v4 {
                "203.0.113.200/32"
            } else {
                "2001:db8:c::200/128"
            }),
            Range::Pods => self.pod_cidr(),
            Range::Nodes => self.node_net(),
            Range::Everything => net(if v4 { "0.0.0.0/0" } else { "::/0" }),
            Range::Elsewhere => net(if v4 {
                "198.18.0.0/15"
            } else {
                "2001:db8:5::/48"
            }),
        }
    }
}

fn node_families(stack: Stack) -> Vec<IpFamily> {
    match stack {
        Stack::V4 => vec![IpFamily::V4],
        Stack::V6 => vec![IpFamily::V6],
        Stack::Dual => vec![IpFamily::V4, IpFamily::V6],
    }
}

fn service_families(node: Stack, svc: &Svc) -> Vec<IpFamily> {
    match (node, svc.stack % 3) {
        (Stack::Dual, 0) => vec![IpFamily::V4, IpFamily::V6],
        (Stack::Dual, 1) => vec![IpFamily::V4],
        (Stack::Dual, _) => vec![IpFamily::V6],
        (stack, _) => node_families(stack),
    }
}

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

fn other_protocol(protocol: Protocol) -> Protocol {
    match protocol {
        Protocol::Tcp => Protocol::Udp,
        Protocol::Udp => Protocol::Sctp,
        Protocol::Sctp => Protocol::Tcp,
    }
}

fn node_port(svc: usize, port: usize) -> u16 {
    (30000 + 10 * svc + port) as u16
}

fn health_check_port(svc: usize) -> u16 {
    (31000 + svc) as u16
}

// ---------------------------------------------------------------------------------------------
// Building the API objects and the node settings.

impl Cluster {
    fn state(&self) -> ClusterState {
        let mut state = ClusterState::default();
        for (i, svc) in self.services.iter().enumerate() {
            let families = service_families(self.node.stack, svc);
            state.services.push(self.service(i, svc, &families));
            for &family in &families {
                if !svc.endpoints.is_empty() {
                    state.endpoint_slices.push(slice(i, svc, family));
                }
            }
        }
        state
    }

    fn service(&self, i: usize, svc: &Svc, families: &[IpFamily]) -> Service {
        let per_family = |f: &dyn Fn(Addrs) -> Vec<String>| -> Vec<String> {
            families.iter().flat_map(|&fam| f(Addrs(fam))).collect()
        };
        let cluster_ips = per_family(&|a| vec![a.cluster_ip(i).to_string()]);
        let ports: Vec<serde_json::Value> = svc
            .ports
            .iter()
            .enumerate()
            .map(|(k, &(protocol, port))| {
                let mut p = json!({
                    "name": format!("p{k}"),
                    "protocol": protocol_name(protocol),
                    "port": port,
                    "targetPort": 8080 + k,
                });
                if svc.kind != Kind::ClusterIp {
                    p["nodePort"] = json!(node_port(i, k));
                }
                p
            })
            .collect();
        let kind = match svc.kind {
            Kind::ClusterIp => "ClusterIP",
            Kind::NodePort => "NodePort",
            Kind::LoadBalancer => "LoadBalancer",
        };
        let mut spec = json!({
            "type": kind,
            "clusterIP": cluster_ips[0],
            "clusterIPs": cluster_ips,
            "ipFamilies": families.iter().map(|f| f.api_name()).collect::<Vec<_>>(),
            "ipFamilyPolicy": if families.len() > 1 { "RequireDualStack" } else { "SingleStack" },
            "ports": ports,
            "externalIPs": per_family(&|a| (0..svc.external_ips as usize)
                .map(|k| a.external_ip(i, k))
                .chain((svc.on_node == Some(false)).then(|| a.node(NodeAddr::Secondary)))
                .map(|ip| ip.to_string())
                .collect()),
            "externalTrafficPolicy": if svc.external_local { "Local" } else { "Cluster" },
            "internalTrafficPolicy": if svc.internal_local { "Local" } else { "Cluster" },
            "sessionAffinity": if svc.affinity.is_some() { "ClientIP" } else { "None" },
        });
        if let Some(timeout) = svc.affinity {
            spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": timeout}});
        }
        let mut status = json!({});
        if svc.kind == Kind::LoadBalancer {
            spec["loadBalancerSourceRanges"] = json!(per_family(&|a| svc
                .source_ranges
                .iter()
                .map(|&r| a.range(r).to_string())
                .collect()));
            if svc.health_check && svc.external_local {
                spec["healthCheckNodePort"] = json!(health_check_port(i));
            }
            let ingress: Vec<serde_json::Value> = per_family(&|a| {
                (0..svc.lb_ips as usize)
                    .map(|k| a.lb_ip(i, k))
                    .chain((svc.on_node == Some(true)).then(|| a.node(NodeAddr::Secondary)))
                    .map(|ip| ip.to_string())
                    .collect()
            })
            .into_iter()
            .map(|ip| json!({"ip": ip}))
            .collect();
            status = json!({"loadBalancer": {"ingress": ingress}});
        }
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": format!("s{i}"), "namespace": "ns"},
            "spec": spec,
            "status": status,
        }))
        .expect("a valid Service")
    }
}

fn slice(i: usize, svc: &Svc, family: IpFamily) -> EndpointSlice {
    let addrs = Addrs(family);
    let endpoints: Vec<serde_json::Value> = svc
        .endpoints
        .iter()
        .map(|ep| {
            let mut e = json!({"addresses": [addrs.pod(ep.host, ep.index).to_string()]});
            match ep.host {
                EpHost::ThisNode | EpHost::HostNetwork => e["nodeName"] = json!(HOSTNAME),
                EpHost::OtherNode => e["nodeName"] = json!(OTHER_HOST),
                EpHost::Unknown => {}
            }
            match ep.hint {
                None => {}
                Some(Hint::ForThisNode) => e["hints"] = json!({"forNodes": [{"name": HOSTNAME}]}),
                Some(Hint::ForOtherNode) => {
                    e["hints"] = json!({"forNodes": [{"name": OTHER_HOST}]})
                }
                Some(Hint::ForZoneA) => e["hints"] = json!({"forZones": [{"name": "zone-a"}]}),
                Some(Hint::ForZoneB) => e["hints"] = json!({"forZones": [{"name": "zone-b"}]}),
            }
            let mut conditions = serde_json::Map::new();
            for (name, value) in [
                ("ready", ep.ready),
                ("serving", ep.serving),
                ("terminating", ep.terminating),
            ] {
                if let Some(v) = value {
                    conditions.insert(name.into(), json!(v));
                }
            }
            e["conditions"] = serde_json::Value::Object(conditions);
            e
        })
        .collect();
    let ports: Vec<serde_json::Value> = svc
        .ports
        .iter()
        .enumerate()
        .map(|(k, &(protocol, _))| {
            json!({"name": format!("p{k}"), "protocol": protocol_name(protocol), "port": 8080 + k})
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("s{i}-{}", family.api_name().to_lowercase()),
            "namespace": "ns",
            "labels": {"kubernetes.io/service-name": format!("s{i}")},
        },
        "addressType": family.api_name(),
        "endpoints": endpoints,
        "ports": ports,
    }))
    .expect("a valid EndpointSlice")
}

impl Node {
    fn config(&self) -> NodeConfig {
        let families = node_families(self.stack);
        let mut config = NodeConfig::new(HOSTNAME);
        config.family_mode = match self.stack {
            Stack::V4 => FamilyMode::V4,
            Stack::V6 => FamilyMode::V6,
            Stack::Dual => FamilyMode::Dual,
        };
        for &family in &families {
            let a = Addrs(family);
            config.node_ips.push(a.node(NodeAddr::Primary));
            if self.secondary_ip {
                config.node_ips.push(a.node(NodeAddr::Secondary));
            }
            if self.pod_cidr {
                config.cluster_cidrs.push(a.pod_cidr());
            }
            if self.service_cidr {
                config.service_cidrs.push(a.service_cidr());
            }
        }
        config.masquerade_all = self.masquerade_all;
        config.zone = self.zone.then(|| "zone-a".to_string());
        config.masquerade_mark = match self.mark {
            (bit, false) => MasqueradeMark::from_bit(bit),
            (bit, true) => MasqueradeMark::short_from_bit(bit),
        };
        let [nfacct, be_liberal, random_fully, large_cluster] = self.iptables_flags;
        config.iptables.nfacct_counters = nfacct;
        config.iptables.conntrack_tcp_be_liberal = be_liberal;
        config.iptables.random_fully = random_fully;
        if large_cluster {
            config.iptables.large_cluster_endpoints_threshold = 1;
        }
        config.prefer_same_node = self.prefer_same_node;
        config.iptables.localhost_nodeports = self.localhost_nodeports;
        let networks = |loopback: bool| {
            families
                .iter()
                .flat_map(|&f| {
                    let a = Addrs(f);
                    std::iter::once(a.node_net()).chain(loopback.then(|| a.loopback_net()))
                })
                .collect()
        };
        config.nodeport_addresses = match self.nodeport_addresses {
            NodePorts::Unset => None,
            NodePorts::Primary => Some(NodePortAddresses::Primary),
            NodePorts::NodeNetwork => Some(NodePortAddresses::Cidrs(networks(false))),
            NodePorts::NodeNetworkAndLoopback => Some(NodePortAddresses::Cidrs(networks(true))),
            NodePorts::NodeNetworkV4Only => {
                Some(NodePortAddresses::Cidrs(vec![
                    Addrs(IpFamily::V4).node_net()
                ]))
            }
        };
        config
    }
}

/// Where a trace runs: iptables mode, nftables mode in kube-proxy's layout, or nftables mode
/// in kproxy's `maps` layout (docs/maps-layout.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Iptables,
    Nftables,
    Maps,
}

impl Layout {
    const ALL: [Layout; 3] = [Layout::Iptables, Layout::Nftables, Layout::Maps];

    fn name(self) -> &'static str {
        match self {
            Layout::Iptables => "iptables",
            Layout::Nftables => "nftables",
            Layout::Maps => "nftables (maps layout)",
        }
    }
}

/// One case's rendered world: the models, and each layout's rules per family, read back from
/// the rendered text.
struct World {
    config: NodeConfig,
    models: Vec<ProxyModel>,
    host: Host,
    iptables: Vec<Box<dyn Rules>>,
    nftables: Vec<Box<dyn Rules>>,
    maps: Vec<Box<dyn Rules>>,
}

impl World {
    fn build(cluster: &Cluster) -> Result<World, TestCaseError> {
        let config = cluster.node.config();
        let plan = pipeline::plan(&cluster.state(), &config);
        // Services sharing a frontend on the node's address are settled by claims (one
        // holds it); anything else refused is a generator bug.
        let refused: Vec<&Note> = plan
            .notes
            .iter()
            .filter(|note| {
                !matches!(note, Note::PartlyInvalid { reason, .. }
                    if reason.contains("is already offered by"))
            })
            .collect();
        if !refused.is_empty() {
            return Err(TestCaseError::fail(format!(
                "the generator made objects kproxy does not take whole: {refused:?}"
            )));
        }
        let render = |mode, config: &NodeConfig| {
            trace::rendered_rules(mode, &plan.models, config)
                .map_err(|e| TestCaseError::fail(e.to_string()))
        };
        let mut maps_config = config.clone();
        maps_config.nftables_layout = NftablesLayout::Maps;
        Ok(World {
            host: Host::new(config.node_ips.iter().copied()),
            iptables: render(Mode::Iptables, &config)?,
            nftables: render(Mode::Nftables, &config)?,
            maps: render(Mode::Nftables, &maps_config)?,
            models: plan.models,
            config,
        })
    }

    fn family_index(&self, family: IpFamily) -> Option<usize> {
        self.models.iter().position(|m| m.family == family)
    }

    fn rules(&self, layout: Layout, family: IpFamily) -> Option<&dyn Rules> {
        let i = self.family_index(family)?;
        match layout {
            Layout::Iptables => self.iptables.get(i).map(|r| r.as_ref()),
            Layout::Nftables => self.nftables.get(i).map(|r| r.as_ref()),
            Layout::Maps => self.maps.get(i).map(|r| r.as_ref()),
        }
    }

    fn model(&self, family: IpFamily) -> Option<&ProxyModel> {
        self.models.iter().find(|m| m.family == family)
    }
}

// ---------------------------------------------------------------------------------------------
// Resolving a probe selector.

/// The probe, or `None` when the selector names something the cluster does not have.
fn resolve(world: &World, cluster: &Cluster, sel: &ProbeSel) -> Option<Probe> {
    if cluster.services.is_empty() {
        return None;
    }
    let i = sel.svc as usize % cluster.services.len();
    let svc = &cluster.services[i];
    let families = service_families(cluster.node.stack, svc);
    let family = families[sel.family as usize % families.len()];
    let a = Addrs(family);
    let model = world.model(family)?;
    let ports: Vec<&ServicePort> = model
        .ports
        .iter()
        .map(|p| p.as_ref())
        .filter(|p| p.name.name == format!("s{i}"))
        .collect();
    if ports.is_empty() {
        return None;
    }
    let port = ports[sel.port as usize % ports.len()];
    let pick = |list: &[IpAddr], k: u8| -> Option<IpAddr> {
        (!list.is_empty()).then(|| list[k as usize % list.len()])
    };
    let mut protocol = port.name.protocol;
    let mut origin = Origin::Outside;
    // A selector naming what this port lacks falls back to the next kind of address, so that
    // few selectors are wasted.
    let cluster_ip = SocketAddr::new(port.cluster_ip, port.port);
    let external_ip = |k| pick(&port.external_ips, k).map(|ip| SocketAddr::new(ip, port.port));
    let lb_ip = |k| pick(&port.load_balancer_ips, k).map(|ip| SocketAddr::new(ip, port.port));
    let dst = match sel.dst {
        Dst::ClusterIp => cluster_ip,
        Dst::WrongPort => SocketAddr::new(port.cluster_ip, port.port + 1),
        Dst::ExternalIp(k) => external_ip(k).or_else(|| lb_ip(k)).unwrap_or(cluster_ip),
        Dst::LbIp(k) => lb_ip(k).or_else(|| external_ip(k)).unwrap_or(cluster_ip),
        // Without a node port: the node address on the service port (nothing there).
        Dst::NodePort(which) => SocketAddr::new(a.node(which), port.node_port.unwrap_or(port.port)),
        Dst::HealthCheck => match port.health_check_node_port {
            Some(hc) => {
                protocol = Protocol::Tcp;
                SocketAddr::new(a.node(NodeAddr::Primary), hc)
            }
            None => SocketAddr::new(
                a.node(NodeAddr::Primary),
                port.node_port.unwrap_or(port.port),
            ),
        },
        Dst::Endpoint(k) => {
            let endpoints: Vec<&Endpoint> = port.reachable_endpoints().collect();
            if endpoints.is_empty() {
                SocketAddr::new(a.pod(EpHost::OtherNode, 99), 8080)
            } else {
                endpoints[k as usize % endpoints.len()].addr
            }
        }
        Dst::Unrelated => SocketAddr::new(a.unrelated(), port.port),
        Dst::Unallocated => SocketAddr::new(a.unallocated(), port.port),
    };
    if sel.other_protocol {
        protocol = other_protocol(protocol);
    }
    let src = if dst.ip().is_loopback() {
        // Only the node itself reaches its loopback addresses.
        origin = Origin::Node;
        a.node(NodeAddr::Loopback)
    } else {
        match sel.src {
            Src::NearClient => a.near_client(),
            Src::FarClient => a.far_client(),
            Src::LocalPod => a.pod(EpHost::ThisNode, 99),
            Src::RemotePod => a.pod(EpHost::OtherNode, 99),
            Src::Endpoint(k) => {
                let ips: Vec<IpAddr> = port.endpoints.iter().map(|e| e.ip()).collect();
                pick(&ips, k).unwrap_or_else(|| a.pod(EpHost::ThisNode, 99))
            }
            Src::LbIp(k) => pick(&port.load_balancer_ips, k).unwrap_or_else(|| a.near_client()),
            Src::Node(which) => {
                origin = Origin::Node;
                match which {
                    NodeAddr::Secondary if world.host.is_local(a.node(which)) => a.node(which),
                    _ => a.node(NodeAddr::Primary),
                }
            }
        }
    };
    if world.host.is_local(src) {
        // The node's own addresses (a host-network endpoint, a load-balancer IP on the node)
        // send from the node.
        origin = Origin::Node;
    }
    Some(Probe {
        src,
        dst,
        protocol,
        origin,
    })
}

// ---------------------------------------------------------------------------------------------
// What a trace says, in the terms the test compares.

/// A verdict class: `Accept` and `NoMatch` are one, [`Class::Pass`] (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Dnat,
    Reject,
    Drop,
    Pass,
}

impl Class {
    fn of(verdict: trace::Verdict) -> Class {
        match verdict {
            trace::Verdict::Dnat => Class::Dnat,
            trace::Verdict::Reject => Class::Reject,
            trace::Verdict::Drop => Class::Drop,
            trace::Verdict::Accept | trace::Verdict::NoMatch => Class::Pass,
        }
    }
}

#[derive(Debug, Clone)]
struct Outcome {
    /// Each class with its total probability.
    classes: BTreeMap<Class, f64>,
    /// Each endpoint: probability, masqueraded.
    endpoints: BTreeMap<SocketAddr, (f64, bool)>,
    /// A branch that is not DNATed is masqueraded.
    other_masquerade: bool,
    /// Affinity timeout, and whether every first endpoint pins the next connection.
    affinity: Option<(u32, Vec<(SocketAddr, bool)>)>,
}

impl Outcome {
    fn of(trace: &Trace) -> Outcome {
        let mut classes = BTreeMap::new();
        let mut other_masquerade = false;
        for branch in &trace.branches {
            let class = Class::of(trace::Verdict::of(branch));
            *classes.entry(class).or_insert(0.0) += branch.probability;
            if class != Class::Dnat && branch.masquerade {
                other_masquerade = true;
            }
        }
        let endpoints = trace
            .endpoints
            .iter()
            .map(|e| (e.endpoint, (e.probability, e.masquerade)))
            .collect();
        let affinity = trace.affinity.as_ref().map(|a| {
            (
                a.timeout_seconds,
                a.next_connection
                    .iter()
                    .map(|n| (n.first, n.pinned()))
                    .collect(),
            )
        });
        Outcome {
            classes,
            endpoints,
            other_masquerade,
            affinity,
        }
    }

    /// The same routing: classes and endpoint odds within 1e-6, masquerading, affinity.
    fn same_as(&self, other: &Outcome) -> bool {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        self.classes.len() == other.classes.len()
            && self
                .classes
                .iter()
                .zip(&other.classes)
                .all(|((c1, p1), (c2, p2))| c1 == c2 && close(*p1, *p2))
            && self.endpoints.len() == other.endpoints.len()
            && self
                .endpoints
                .iter()
                .zip(&other.endpoints)
                .all(|((e1, (p1, m1)), (e2, (p2, m2)))| e1 == e2 && close(*p1, *p2) && m1 == m2)
            && self.other_masquerade == other.other_masquerade
            && self.affinity == other.affinity
    }
}

/// What the model intends for a probe in one mode.
#[derive(Debug, Clone, PartialEq)]
enum Expected {
    Pass,
    Reject,
    Drop,
    /// Uniform odds over these endpoints, each with its masquerade decision.
    Dnat {
        endpoints: Vec<(SocketAddr, bool)>,
        affinity: Option<u32>,
    },
}

impl Expected {
    fn outcome(&self) -> Outcome {
        let single = |class| Outcome {
            classes: BTreeMap::from([(class, 1.0)]),
            endpoints: BTreeMap::new(),
            other_masquerade: false,
            affinity: None,
        };
        match self {
            Expected::Pass => single(Class::Pass),
            Expected::Reject => single(Class::Reject),
            Expected::Drop => single(Class::Drop),
            Expected::Dnat {
                endpoints,
                affinity,
            } => {
                let share = 1.0 / endpoints.len() as f64;
                Outcome {
                    classes: BTreeMap::from([(Class::Dnat, 1.0)]),
                    endpoints: endpoints.iter().map(|&(e, m)| (e, (share, m))).collect(),
                    other_masquerade: false,
                    // With affinity, every endpoint pins the client's next connection.
                    affinity: affinity
                        .map(|t| (t, endpoints.iter().map(|&(e, _)| (e, true)).collect())),
                }
            }
        }
    }
}

/// The model's intent in both modes; they differ only where kube-proxy's modes do, and then
/// the difference is named. The `maps` layout routes as nftables mode, but where its design
/// cannot (a named [`MapsDifference`]).
#[derive(Debug, Clone)]
struct Intent {
    iptables: Expected,
    nftables: Expected,
    difference: Option<ModeDifference>,
    maps: Expected,
    maps_difference: Option<MapsDifference>,
}

impl Intent {
    fn same(expected: Expected) -> Intent {
        Intent::modes(expected.clone(), expected, None)
    }

    fn differs(difference: ModeDifference, iptables: Expected, nftables: Expected) -> Intent {
        Intent::modes(iptables, nftables, Some(difference))
    }

    /// Each mode's intent; the `maps` layout as nftables mode.
    fn modes(iptables: Expected, nftables: Expected, difference: Option<ModeDifference>) -> Intent {
        Intent {
            iptables,
            maps: nftables.clone(),
            nftables,
            difference,
            maps_difference: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The oracle: what the model intends, from the spec (§2.7, §4.6, §4.9, §4.10, §5.5, §5.7,
// §5A.5, §5A.6), without looking at any rule.

/// Where a probe's destination lands.
enum Hit<'m> {
    ClusterIp(&'m ServicePort),
    ExternalIp(&'m ServicePort),
    LoadBalancerIp(&'m ServicePort),
    NodePort(&'m ServicePort),
    /// A cluster IP, but no port of it matches protocol and port.
    ClusterIpOtherPort,
    /// Inside the ServiceCIDR, no cluster IP.
    Unallocated,
    Nothing,
}

fn hit<'m>(world: &World, model: &'m ProxyModel, probe: &Probe) -> Hit<'m> {
    let ip = probe.dst.ip();
    let matches = |p: &ServicePort| p.name.protocol == probe.protocol && p.port == probe.dst.port();
    for p in model.ports.iter().map(|p| p.as_ref()) {
        if p.cluster_ip == ip && matches(p) {
            return Hit::ClusterIp(p);
        }
    }
    for p in model.ports.iter().map(|p| p.as_ref()) {
        if p.external_ips.contains(&ip) && matches(p) {
            return Hit::ExternalIp(p);
        }
    }
    for p in model.ports.iter().map(|p| p.as_ref()) {
        if p.load_balancer_ips.contains(&ip) && matches(p) {
            return Hit::LoadBalancerIp(p);
        }
    }
    if world.host.is_local(ip) {
        for p in model.ports.iter().map(|p| p.as_ref()) {
            if p.node_port == Some(probe.dst.port()) && p.name.protocol == probe.protocol {
                return Hit::NodePort(p);
            }
        }
    }
    if model.ports.iter().any(|p| p.cluster_ip == ip) {
        return Hit::ClusterIpOtherPort;
    }
    if world
        .config
        .service_cidrs
        .iter()
        .any(|cidr| cidr.contains(&ip))
    {
        return Hit::Unallocated;
    }
    Hit::Nothing
}

fn intent_of(world: &World, probe: &Probe) -> Intent {
    let family = probe.family();
    let Some(model) = world.model(family) else {
        return Intent::same(Expected::Pass);
    };
    let pod_cidr = world.config.local_cidr(family);
    let from_pod = pod_cidr.is_some_and(|c| c.contains(&probe.src));
    // Sent by the node to an address not its own: OUTPUT and POSTROUTING only, never INPUT.
    let from_node_outwards = probe.origin == Origin::Node && !world.host.is_local(probe.dst.ip());
    match hit(world, model, probe) {
        Hit::Nothing => Intent::same(Expected::Pass),
        Hit::ClusterIpOtherPort => Intent::differs(
            ModeDifference::ClusterIpUnknownPort,
            Expected::Pass,
            Expected::Reject,
        ),
        Hit::Unallocated => Intent::differs(
            ModeDifference::UnallocatedClusterIp,
            Expected::Pass,
            Expected::Drop,
        ),
        Hit::ClusterIp(port) => match port.internal_refusal() {
            Some(refusal) => Intent::same(refused(refusal)),
            None => {
                // §4.10 / §5A.6 item 1: masquerade-all, or a source outside the pod network
                // when one is known.
                let mark = world.config.masquerade_all || (pod_cidr.is_some() && !from_pod);
                let endpoints: Vec<&Endpoint> = if port.internal_policy_local {
                    port.local_endpoints().collect()
                } else {
                    port.cluster_endpoints().collect()
                };
                dnat(world, port, probe, &endpoints, mark)
            }
        },
        Hit::ExternalIp(port) => {
            if from_node_outwards && !port.has_any_endpoints() {
                return Intent::differs(
                    ModeDifference::NodeToExternalWithoutEndpoints,
                    Expected::Pass,
                    Expected::Reject,
                );
            }
            external(world, port, probe, from_pod)
        }
        Hit::LoadBalancerIp(port) => {
            if !allowed_by_source_ranges(world, port, probe.src) {
                return if port.has_any_endpoints() {
                    Intent::same(Expected::Drop)
                } else if from_node_outwards {
                    Intent::differs(
                        ModeDifference::NodeToExternalWithoutEndpoints,
                        Expected::Pass,
                        Expected::Drop,
                    )
                } else {
                    Intent::differs(
                        ModeDifference::FirewallWithoutEndpoints,
                        Expected::Reject,
                        Expected::Drop,
                    )
                };
            }
            if from_node_outwards && !port.has_any_endpoints() {
                return Intent::differs(
                    ModeDifference::NodeToExternalWithoutEndpoints,
                    Expected::Pass,
                    Expected::Reject,
                );
            }
            external(world, port, probe, from_pod)
        }
        Hit::NodePort(port) => {
            // Each mode's NodePort addresses (§3, §4.5, §5.5): whether the address is served
            // (DNAT) and whether the no-endpoint rules cover it.
            let served = external(world, port, probe, from_pod);
            let addresses = |mode| nodeport_address(world, mode, probe.dst.ip());
            let in_mode = |mode: Mode, served: &Expected| {
                let (serves, refuses) = addresses(mode);
                if serves {
                    served.clone()
                } else {
                    match port.external_refusal() {
                        Some(refusal) if refuses => refused(refusal),
                        _ => Expected::Pass,
                    }
                }
            };
            let iptables = in_mode(Mode::Iptables, &served.iptables);
            let nftables = in_mode(Mode::Nftables, &served.nftables);
            let difference = if iptables == nftables {
                None
            } else if addresses(Mode::Iptables) == addresses(Mode::Nftables) {
                served.difference
            } else {
                Some(ModeDifference::NodePortAddresses)
            };
            Intent::modes(iptables, nftables, difference)
        }
    }
}

fn refused(refusal: NoEndpointVerdict) -> Expected {
    match refusal {
        NoEndpointVerdict::Reject => Expected::Reject,
        NoEndpointVerdict::Drop => Expected::Drop,
    }
}

/// §4.6.2 item 8, §4.9, §5A.10: external destinations (external IPs, load-balancer IPs,
/// NodePorts on a served address), once past the source ranges.
fn external(world: &World, port: &ServicePort, probe: &Probe, from_pod: bool) -> Intent {
    if port.external_refusal() == Some(NoEndpointVerdict::Reject) {
        return Intent::same(Expected::Reject);
    }
    if !port.external_policy_local {
        let endpoints: Vec<&Endpoint> = port.cluster_endpoints().collect();
        return dnat(world, port, probe, &endpoints, true);
    }
    // Local policy: pods and the node itself are short-circuited to the cluster endpoints
    // (the node masqueraded); other clients reach local endpoints, or are dropped.
    if from_pod {
        let endpoints: Vec<&Endpoint> = port.cluster_endpoints().collect();
        return dnat(world, port, probe, &endpoints, false);
    }
    if world.host.is_local(probe.src) {
        let endpoints: Vec<&Endpoint> = port.cluster_endpoints().collect();
        return dnat(world, port, probe, &endpoints, true);
    }
    match port.external_refusal() {
        Some(refusal) => Intent::same(refused(refusal)),
        None => {
            let endpoints: Vec<&Endpoint> = port.local_endpoints().collect();
            dnat(world, port, probe, &endpoints, false)
        }
    }
}

/// DNAT to `endpoints` at equal odds. Masqueraded when `mark`, or as a hairpin: the client is
/// the endpoint it reaches (iptables: any endpoint, §4.6.2 item 12; nftables: local ones,
/// §5A.4).
fn dnat(
    world: &World,
    port: &ServicePort,
    probe: &Probe,
    endpoints: &[&Endpoint],
    mark: bool,
) -> Intent {
    assert!(
        !endpoints.is_empty(),
        "the model has no refusal for {} but no endpoint either",
        port.name
    );
    let in_mode = |mode: Mode| Expected::Dnat {
        endpoints: endpoints
            .iter()
            .map(|e| {
                let hairpin = e.ip() == probe.src && (mode == Mode::Iptables || e.local);
                // A packet from outside DNATed to one of the node's own addresses (a
                // host-network endpoint) is delivered without passing POSTROUTING.
                let postrouting = probe.origin == Origin::Node || !world.host.is_local(e.ip());
                (e.addr, (mark || hairpin) && postrouting)
            })
            .collect(),
        affinity: port.affinity_timeout,
    };
    let (iptables, nftables) = (in_mode(Mode::Iptables), in_mode(Mode::Nftables));
    if iptables == nftables {
        Intent::same(iptables)
    } else {
        Intent::differs(ModeDifference::RemoteEndpointHairpin, iptables, nftables)
    }
}

/// §4.6.2 item 9, §5.7: the source ranges, plus the Service's own LB IPs when a range holds the
/// primary node IP.
fn allowed_by_source_ranges(world: &World, port: &ServicePort, src: IpAddr) -> bool {
    if port.source_ranges.is_empty() {
        return true;
    }
    let node_ip = world.config.primary_node_ip(IpFamily::of(&src));
    port.source_ranges.iter().any(|r| r.contains(&src))
        || (node_ip.is_some_and(|n| port.source_ranges.iter().any(|r| r.contains(&n)))
            && port.load_balancer_ips.contains(&src))
}

/// The node-port networks of a mode: `None` for every local address (§3: unset means every
/// address in iptables mode and `primary` in nftables mode; no network of the family, or a
/// /0, means every address).
fn nodeport_networks(config: &NodeConfig, mode: Mode, family: IpFamily) -> Option<Vec<IpNet>> {
    let setting = match (&config.nodeport_addresses, mode) {
        (Some(setting), _) => setting.clone(),
        (None, Mode::Iptables) => return None,
        (None, Mode::Nftables) => NodePortAddresses::Primary,
    };
    let networks: Vec<IpNet> = match setting {
        NodePortAddresses::Primary => config
            .node_ips
            .iter()
            .find(|ip| IpFamily::of(ip) == family)
            .map(|&ip| IpNet::from(ip))
            .into_iter()
            .collect(),
        NodePortAddresses::Cidrs(cidrs) => cidrs
            .into_iter()
            .filter(|c| IpFamily::of(&c.addr()) == family)
            .collect(),
    };
    if networks.is_empty() || networks.iter().any(|n| n.prefix_len() == 0) {
        None
    } else {
        Some(networks)
    }
}

/// Whether a mode takes NodePorts on a local address (DNAT), and whether its no-endpoint
/// rules cover it (§4.5, §4.6.1 item 5, §5.5).
fn nodeport_address(world: &World, mode: Mode, dst: IpAddr) -> (bool, bool) {
    let config = &world.config;
    let family = IpFamily::of(&dst);
    let local = world.host.is_local(dst);
    let networks = nodeport_networks(config, mode, family);
    let is_node_ip = config.node_ips.contains(&dst);
    match mode {
        Mode::Iptables => {
            let localhost = config.iptables.localhost_nodeports
                && family == IpFamily::V4
                && networks
                    .as_ref()
                    .is_none_or(|n| n.iter().any(|c| c.contains(&ip("127.0.0.1"))));
            let serves = match &networks {
                None => local && (localhost || !dst.is_loopback()),
                Some(networks) => {
                    networks.iter().any(|n| n.contains(&dst))
                        && (is_node_ip || (localhost && dst == ip("127.0.0.1")))
                }
            };
            // The REJECT/DROP rules match `-m addrtype --dst-type LOCAL`.
            (serves, local)
        }
        Mode::Nftables => {
            let serves = match &networks {
                None => local && !dst.is_loopback(),
                Some(networks) => is_node_ip && networks.iter().any(|n| n.contains(&dst)),
            };
            (serves, serves)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The check.

#[derive(Debug, Default)]
struct Stats {
    cases: usize,
    probes: usize,
    unresolved: usize,
    /// Second connections checked for affinity across frontends.
    sticky: usize,
    classes: BTreeMap<String, usize>,
    differences: BTreeMap<ModeDifference, usize>,
    maps_differences: BTreeMap<MapsDifference, usize>,
}

fn describe(probe: &Probe) -> String {
    format!(
        "{} {} -> {} ({:?})",
        probe.protocol.lower(),
        probe.src,
        probe.dst,
        probe.origin
    )
}

fn trace_text(trace: &Trace) -> String {
    let mut out = String::new();
    for line in trace.path() {
        let _ = writeln!(out, "    {line}");
    }
    out
}

/// Traces the probe in the three layouts, each with its affinity state, and checks each
/// against the intent, iptables and nftables against each other where kube-proxy's modes agree,
/// and the two nftables layouts against each other where no [`MapsDifference`] applies.
fn check_against(
    world: &World,
    probe: &Probe,
    affinity: [&AffinityState; 3],
    intent: &Intent,
) -> Result<[Trace; 3], TestCaseError> {
    let family = probe.family();
    let traced = |layout, affinity| -> Result<Trace, TestCaseError> {
        let rules = world
            .rules(layout, family)
            .ok_or_else(|| TestCaseError::fail(format!("no {family} rules")))?;
        Ok(trace::trace(rules, probe, &world.host, affinity))
    };
    let traces = [
        traced(Layout::Iptables, affinity[0])?,
        traced(Layout::Nftables, affinity[1])?,
        traced(Layout::Maps, affinity[2])?,
    ];
    for (layout, t) in Layout::ALL.iter().zip(&traces) {
        if !t.uninterpreted.is_empty() {
            return Err(TestCaseError::fail(format!(
                "{}: the {} walker did not understand {:?}",
                describe(probe),
                layout.name(),
                t.uninterpreted
            )));
        }
    }
    let outcomes = traces.each_ref().map(Outcome::of);
    let [o_ipt, o_nft, o_maps] = &outcomes;
    let report = |what: &str| {
        let mut text = format!("{}: {what}\n  intent: {intent:?}\n", describe(probe));
        for ((layout, outcome), trace) in Layout::ALL.iter().zip(&outcomes).zip(&traces) {
            let _ = write!(
                text,
                "  {}: {outcome:?}\n{}",
                layout.name(),
                trace_text(trace)
            );
        }
        text
    };
    if (intent.iptables != intent.nftables) != intent.difference.is_some() {
        return Err(TestCaseError::fail(report(
            "the oracle names a mode difference exactly when it predicts one (oracle bug)",
        )));
    }
    if (intent.maps != intent.nftables) != intent.maps_difference.is_some() {
        return Err(TestCaseError::fail(report(
            "the oracle names a maps-layout difference exactly when it predicts one (oracle bug)",
        )));
    }
    for ((layout, outcome), expected) in
        Layout::ALL
            .iter()
            .zip(&outcomes)
            .zip([&intent.iptables, &intent.nftables, &intent.maps])
    {
        if !outcome.same_as(&expected.outcome()) {
            return Err(TestCaseError::fail(report(&format!(
                "{} does not route as the model intends",
                layout.name()
            ))));
        }
    }
    if intent.difference.is_none() && !o_ipt.same_as(o_nft) {
        return Err(TestCaseError::fail(report(
            "the two modes route differently",
        )));
    }
    if intent.maps_difference.is_none() && !o_maps.same_as(o_nft) {
        return Err(TestCaseError::fail(report(
            "the two nftables layouts route differently",
        )));
    }
    Ok(traces)
}

fn check_probe(world: &World, probe: &Probe, stats: &mut Stats) -> Result<(), TestCaseError> {
    let intent = intent_of(world, probe);
    let none = AffinityState::default();
    let traces = check_against(world, probe, [&none, &none, &none], &intent)?;
    if let Some(difference) = intent.difference {
        *stats.differences.entry(difference).or_default() += 1;
    }
    if let Some(difference) = intent.maps_difference {
        *stats.maps_differences.entry(difference).or_default() += 1;
    }
    let class = format!("{:?}", intent.iptables)
        .split([' ', '{'])
        .next()
        .unwrap_or("")
        .to_string();
    *stats.classes.entry(class).or_default() += 1;
    stats.probes += 1;
    if intent.difference.is_none() {
        check_sticky_across_frontends(world, probe, &intent, &traces, stats)?;
    }
    Ok(())
}

/// §2.3: affinity is keyed on the client address alone, whatever address of the service port
/// the client used. After a first connection through an external address (external IP,
/// load-balancer IP, NodePort) reached an endpoint, the same client's connection to the
/// cluster IP goes to that endpoint too, when the cluster IP's endpoints include it. The
/// `maps` layout keys affinity by frontend ([`MapsDifference::AffinityPerFrontend`]): there
/// the second connection is not pinned.
fn check_sticky_across_frontends(
    world: &World,
    probe: &Probe,
    intent: &Intent,
    traces: &[Trace; 3],
    stats: &mut Stats,
) -> Result<(), TestCaseError> {
    let Expected::Dnat {
        affinity: Some(_), ..
    } = &intent.iptables
    else {
        return Ok(());
    };
    let Some(model) = world.model(probe.family()) else {
        return Ok(());
    };
    let port = match hit(world, model, probe) {
        Hit::ExternalIp(port) | Hit::LoadBalancerIp(port) | Hit::NodePort(port) => port,
        _ => return Ok(()),
    };
    let Some(first) = traces[0].endpoints.first().map(|e| e.endpoint) else {
        return Ok(());
    };
    // Each layout's record of the first connection: the stores its branch to `first` set.
    let recorded = |trace: &Trace| {
        let mut state = AffinityState::default();
        if let Some(branch) = trace.branches.iter().find(|b| b.dnat == Some(first)) {
            for event in &branch.affinity {
                match event {
                    trace::AffinityEvent::Recorded { store } => state.insert(store, probe.src),
                    trace::AffinityEvent::RecordedMapping {
                        store, key, value, ..
                    } => state.insert_mapping(store, key.clone(), value.clone()),
                    trace::AffinityEvent::Checked { .. } => {}
                }
            }
        }
        state
    };
    let states = traces.each_ref().map(recorded);
    let second = Probe {
        dst: SocketAddr::new(port.cluster_ip, port.port),
        ..*probe
    };
    let mut pinned = intent_of(world, &second);
    if pinned.difference.is_some() || pinned.maps_difference.is_some() {
        return Ok(());
    }
    let unpinned = pinned.nftables.clone();
    let pin = |expected: &mut Expected| {
        if let Expected::Dnat { endpoints, .. } = expected {
            if let Some(&entry) = endpoints.iter().find(|(e, _)| *e == first) {
                *endpoints = vec![entry];
            }
        }
    };
    pin(&mut pinned.iptables);
    pin(&mut pinned.nftables);
    pin(&mut pinned.maps);
    if unpinned != pinned.nftables {
        pinned.maps = unpinned;
        pinned.maps_difference = Some(MapsDifference::AffinityPerFrontend);
        *stats
            .maps_differences
            .entry(MapsDifference::AffinityPerFrontend)
            .or_default() += 1;
    }
    let [ipt, nft, maps] = &states;
    check_against(world, &second, [ipt, nft, maps], &pinned).map_err(|err| {
        TestCaseError::fail(format!("after {} reached {first}: {err}", describe(probe)))
    })?;
    stats.sticky += 1;
    Ok(())
}

fn check_case(case: &Case, stats: &mut Stats) -> Result<(), TestCaseError> {
    let world = World::build(&case.cluster)?;
    stats.cases += 1;
    for sel in &case.probes {
        match resolve(&world, &case.cluster, sel) {
            Some(probe) => check_probe(&world, &probe, stats)?,
            None => stats.unresolved += 1,
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Strategies.

fn option_bool() -> impl Strategy<Value = Option<bool>> {
    prop_oneof![Just(None), Just(Some(true)), Just(Some(false))]
}

fn node_strategy() -> impl Strategy<Value = Node> {
    (
        prop_oneof![Just(Stack::V4), Just(Stack::V6), Just(Stack::Dual)],
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![
            Just(NodePorts::Unset),
            Just(NodePorts::Primary),
            Just(NodePorts::NodeNetwork),
            Just(NodePorts::NodeNetworkAndLoopback),
            Just(NodePorts::NodeNetworkV4Only)
        ],
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        (
            prop_oneof![Just(14u8), Just(0), Just(5), Just(31)],
            any::<bool>(),
        ),
        any::<[bool; 4]>(),
    )
        .prop_map(
            |(
                stack,
                secondary_ip,
                pod_cidr,
                masquerade_all,
                nodeport_addresses,
                localhost_nodeports,
                service_cidr,
                zone,
                prefer_same_node,
                mark,
                iptables_flags,
            )| Node {
                stack,
                secondary_ip,
                pod_cidr,
                masquerade_all,
                nodeport_addresses,
                localhost_nodeports,
                service_cidr,
                zone,
                prefer_same_node,
                mark,
                iptables_flags,
            },
        )
}

fn endpoint_strategy() -> impl Strategy<Value = Ep> {
    (
        prop_oneof![
            4 => Just(EpHost::ThisNode),
            4 => Just(EpHost::OtherNode),
            1 => Just(EpHost::Unknown),
            1 => Just(EpHost::HostNetwork),
        ],
        1u8..=5,
        option_bool(),
        option_bool(),
        option_bool(),
        prop_oneof![
            6 => Just(None),
            1 => Just(Some(Hint::ForThisNode)),
            1 => Just(Some(Hint::ForOtherNode)),
            1 => Just(Some(Hint::ForZoneA)),
            1 => Just(Some(Hint::ForZoneB)),
        ],
    )
        .prop_map(|(host, index, ready, serving, terminating, hint)| Ep {
            host,
            index,
            ready,
            serving,
            terminating,
            hint,
        })
}

/// Service ports; the last two ([`NODEPORT_LIKE`]) are NodePorts of other Services
/// ([`node_port`]: the first port of Service 1, the second of Service 0), so that a frontend may
/// share its protocol and port with a NodePort. Such a Service gets no frontend on a node
/// address (`on_node`): there a NodePort of the same protocol and port competes with the
/// frontend, which kube-proxy's two modes settle differently when the frontend's Service has
/// no (local) endpoints, and the oracle does not model that.
const PORTS: [(Protocol, u16); 7] = [
    (Protocol::Tcp, 80),
    (Protocol::Udp, 80),
    (Protocol::Sctp, 80),
    (Protocol::Tcp, 443),
    (Protocol::Udp, 53),
    (Protocol::Tcp, 30010),
    (Protocol::Udp, 30001),
];
const NODEPORT_LIKE: [(Protocol, u16); 2] = [(Protocol::Tcp, 30010), (Protocol::Udp, 30001)];

fn service_strategy() -> impl Strategy<Value = Svc> {
    (
        (
            prop_oneof![
                Just(Kind::ClusterIp),
                Just(Kind::NodePort),
                Just(Kind::LoadBalancer)
            ],
            0u8..3,
            proptest::sample::subsequence(PORTS.to_vec(), 1..=2),
            0u8..=2,
            0u8..=2,
            prop_oneof![
                4 => Just(None),
                1 => Just(Some(false)),
                1 => Just(Some(true)),
            ],
            proptest::collection::vec(
                prop_oneof![
                    Just(Range::Clients),
                    Just(Range::OneClient),
                    Just(Range::Pods),
                    Just(Range::Nodes),
                    Just(Range::Everything),
                    Just(Range::Elsewhere)
                ],
                0..=2,
            ),
        ),
        (
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(1u32..=86400),
            any::<bool>(),
            proptest::collection::vec(endpoint_strategy(), 0..=6),
        ),
    )
        .prop_map(
            |(
                (kind, stack, ports, external_ips, lb_ips, on_node, source_ranges),
                (external_local, internal_local, affinity, health_check, endpoints),
            )| Svc {
                kind,
                stack,
                on_node: on_node.filter(|_| !ports.iter().any(|p| NODEPORT_LIKE.contains(p))),
                ports,
                external_ips,
                lb_ips,
                source_ranges,
                external_local,
                internal_local,
                affinity,
                health_check,
                endpoints,
            },
        )
}

fn node_addr() -> impl Strategy<Value = NodeAddr> {
    prop_oneof![
        3 => Just(NodeAddr::Primary),
        1 => Just(NodeAddr::Secondary),
        1 => Just(NodeAddr::Loopback),
    ]
}

fn probe_strategy() -> impl Strategy<Value = ProbeSel> {
    let dst = prop_oneof![
        4 => Just(Dst::ClusterIp),
        1 => Just(Dst::WrongPort),
        2 => any::<u8>().prop_map(Dst::ExternalIp),
        3 => any::<u8>().prop_map(Dst::LbIp),
        3 => node_addr().prop_map(Dst::NodePort),
        1 => Just(Dst::HealthCheck),
        1 => any::<u8>().prop_map(Dst::Endpoint),
        1 => Just(Dst::Unrelated),
        1 => Just(Dst::Unallocated),
    ];
    let src = prop_oneof![
        2 => Just(Src::NearClient),
        2 => Just(Src::FarClient),
        2 => Just(Src::LocalPod),
        1 => Just(Src::RemotePod),
        3 => any::<u8>().prop_map(Src::Endpoint),
        2 => any::<u8>().prop_map(Src::LbIp),
        2 => node_addr().prop_map(Src::Node),
    ];
    (
        any::<u8>(),
        any::<u8>(),
        any::<u8>(),
        dst,
        src,
        proptest::bool::weighted(0.1),
    )
        .prop_map(|(svc, port, family, dst, src, other_protocol)| ProbeSel {
            svc,
            port,
            family,
            dst,
            src,
            other_protocol,
        })
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        node_strategy(),
        proptest::collection::vec(service_strategy(), 1..=4),
        proptest::collection::vec(probe_strategy(), PROBES),
    )
        .prop_map(|(node, services, probes)| Case {
            cluster: Cluster { node, services },
            probes,
        })
}

#[test]
fn both_modes_route_alike() {
    let started = Instant::now();
    let stats = RefCell::new(Stats::default());
    let mut runner = TestRunner::new(Config {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        source_file: Some(file!()),
        // PROPTEST_CASES overrides the count, as for proptest's own macro.
        ..Config::with_cases(
            std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(CASES),
        )
    });
    let result = runner.run(&case_strategy(), |case| {
        check_case(&case, &mut stats.borrow_mut())
    });
    let stats = stats.into_inner();
    eprintln!(
        "trace equivalence: {} clusters, {} probes ({} selectors named nothing) in {:.1?}",
        stats.cases,
        stats.probes,
        stats.unresolved,
        started.elapsed()
    );
    eprintln!("  intended verdicts (iptables): {:?}", stats.classes);
    eprintln!(
        "  affinity across frontends: {} second connections",
        stats.sticky
    );
    for difference in ModeDifference::ALL {
        eprintln!(
            "  documented mode difference \"{difference}\": {} probes",
            stats.differences.get(&difference).copied().unwrap_or(0)
        );
    }
    for difference in MapsDifference::ALL {
        eprintln!(
            "  documented maps-layout difference \"{difference}\": {} probes",
            stats
                .maps_differences
                .get(&difference)
                .copied()
                .unwrap_or(0)
        );
    }
    if let Err(err) = result {
        panic!("{err}");
    }
    // Each documented difference is real: a full-size run meets every one of them (the rarest
    // about a hundred times in 2000 clusters; a short run set by PROPTEST_CASES may not).
    if stats.cases < CASES as usize {
        return;
    }
    for difference in ModeDifference::ALL {
        assert!(
            stats.differences.contains_key(&difference),
            "no probe met the documented difference \"{difference}\""
        );
    }
    for difference in MapsDifference::ALL {
        assert!(
            stats.maps_differences.contains_key(&difference),
            "no probe met the documented maps-layout difference \"{difference}\""
        );
    }
}

/// Clusters the kernel check loads (`nft -c`): the generator's shapes, from a fixed seed.
const KERNEL_CASES: usize = 150;

/// The kernel takes the `maps` layout of the generator's clusters (the tracer reads rules
/// semantically and cannot see what nft or the kernel would refuse, e.g. overlapping intervals
/// in a concatenated set). Where this nft cannot write the IPv6 affinity updates
/// (tests/common/nft.rs), they are left out and counted.
#[test]
fn maps_layout_of_random_clusters_loads() {
    if !common::netns::kernel_tests_possible(&["nft"]) {
        return;
    }
    let ns = common::netns::Netns::new("maps-random");
    let ipv6_updates = common::nft::writes_ipv6_affinity_updates(&ns);
    let mut runner = TestRunner::deterministic();
    let strategy = case_strategy();
    let (mut loaded, mut without_updates) = (0, 0);
    while loaded < KERNEL_CASES {
        let case = strategy.new_tree(&mut runner).expect("a case").current();
        let mut config = case.cluster.node.config();
        config.nftables_layout = NftablesLayout::Maps;
        let plan = pipeline::plan(&case.cluster.state(), &config);
        let script: String = pipeline::nftables_rulesets(&plan, &config)
            .iter()
            .map(|r| r.to_nft_script())
            .collect();
        let (stripped, updates) = common::nft::without_ipv6_affinity_updates(&script);
        let script = if ipv6_updates || updates == 0 {
            script
        } else {
            without_updates += 1;
            stripped
        };
        let out = ns.run(&["nft", "-c", "-f", "-"], Some(&script));
        assert!(
            out.status.success(),
            "nft refused the maps layout of {:#?}:\n{}\n{script}",
            case.cluster,
            String::from_utf8_lossy(&out.stderr)
        );
        loaded += 1;
    }
    eprintln!(
        "maps layout: {loaded} random clusters checked by the kernel ({without_updates} without \
         their IPv6 affinity updates, which this nft cannot write)"
    );
}

// ---------------------------------------------------------------------------------------------
// Regression cases: each documented mode difference, minimal, with what each mode does.

fn plain_node() -> Node {
    Node {
        stack: Stack::V4,
        secondary_ip: false,
        pod_cidr: true,
        masquerade_all: false,
        nodeport_addresses: NodePorts::Unset,
        localhost_nodeports: true,
        service_cidr: false,
        zone: false,
        prefer_same_node: true,
        mark: (14, false),
        iptables_flags: [false, false, true, false],
    }
}

fn plain_service(kind: Kind, endpoints: Vec<Ep>) -> Svc {
    Svc {
        kind,
        stack: 0,
        ports: vec![(Protocol::Tcp, 80)],
        external_ips: 0,
        lb_ips: 0,
        on_node: None,
        source_ranges: Vec::new(),
        external_local: false,
        internal_local: false,
        affinity: None,
        health_check: false,
        endpoints,
    }
}

fn ready(host: EpHost, index: u8) -> Ep {
    Ep {
        host,
        index,
        ready: None,
        serving: None,
        terminating: None,
        hint: None,
    }
}

fn probe(src: &str, dst: &str, origin: Origin) -> Probe {
    Probe {
        src: ip(src),
        dst: dst.parse().expect("a test socket address"),
        protocol: Protocol::Tcp,
        origin,
    }
}

/// Checks the probe as the property test does (each mode against the model's intent, and
/// against each other where kube-proxy's modes agree) and returns the intent.
fn regression(cluster: Cluster, probe: Probe) -> Intent {
    let world = World::build(&cluster).expect("the cluster builds");
    let mut stats = Stats::default();
    if let Err(err) = check_probe(&world, &probe, &mut stats) {
        panic!("{err}");
    }
    intent_of(&world, &probe)
}

fn assert_difference(intent: &Intent, difference: ModeDifference, iptables: &str, nftables: &str) {
    assert_eq!(intent.difference, Some(difference), "{intent:?}");
    assert!(
        format!("{:?}", intent.iptables).starts_with(iptables),
        "{intent:?}"
    );
    assert!(
        format!("{:?}", intent.nftables).starts_with(nftables),
        "{intent:?}"
    );
}

#[test]
fn difference_cluster_ip_unknown_port() {
    let cluster = Cluster {
        node: plain_node(),
        services: vec![plain_service(
            Kind::ClusterIp,
            vec![ready(EpHost::OtherNode, 1)],
        )],
    };
    for origin in [Origin::Outside, Origin::Node] {
        let src = if origin == Origin::Node {
            "192.168.0.10"
        } else {
            "203.0.113.200"
        };
        let intent = regression(cluster.clone(), probe(src, "172.30.0.10:81", origin));
        assert_difference(
            &intent,
            ModeDifference::ClusterIpUnknownPort,
            "Pass",
            "Reject",
        );
    }
    // The defined port routes alike.
    let intent = regression(
        cluster,
        probe("203.0.113.200", "172.30.0.10:80", Origin::Outside),
    );
    assert_eq!(intent.difference, None);
}

#[test]
fn difference_unallocated_cluster_ip() {
    let mut node = plain_node();
    node.service_cidr = true;
    let cluster = Cluster {
        node,
        services: vec![plain_service(
            Kind::ClusterIp,
            vec![ready(EpHost::OtherNode, 1)],
        )],
    };
    let intent = regression(
        cluster,
        probe("10.244.1.99", "172.30.200.1:80", Origin::Outside),
    );
    assert_difference(
        &intent,
        ModeDifference::UnallocatedClusterIp,
        "Pass",
        "Drop",
    );
}

/// The example: a LoadBalancer without endpoints, with source ranges.
#[test]
fn difference_firewall_without_endpoints() {
    let mut svc = plain_service(Kind::LoadBalancer, Vec::new());
    svc.lb_ips = 1;
    svc.source_ranges = vec![Range::OneClient];
    let cluster = Cluster {
        node: plain_node(),
        services: vec![svc],
    };
    // A source the ranges do not allow: refused in iptables, dropped in nftables.
    let intent = regression(
        cluster.clone(),
        probe("100.64.0.1", "198.51.100.1:80", Origin::Outside),
    );
    assert_difference(
        &intent,
        ModeDifference::FirewallWithoutEndpoints,
        "Reject",
        "Drop",
    );
    // An allowed source is refused in both.
    let intent = regression(
        cluster,
        probe("203.0.113.200", "198.51.100.1:80", Origin::Outside),
    );
    assert_eq!(intent.difference, None);
    assert_eq!(intent.iptables, Expected::Reject);
}

#[test]
fn difference_node_to_external_without_endpoints() {
    let mut svc = plain_service(Kind::ClusterIp, Vec::new());
    svc.external_ips = 1;
    let cluster = Cluster {
        node: plain_node(),
        services: vec![svc],
    };
    let intent = regression(
        cluster.clone(),
        probe("192.168.0.10", "192.0.2.1:80", Origin::Node),
    );
    assert_difference(
        &intent,
        ModeDifference::NodeToExternalWithoutEndpoints,
        "Pass",
        "Reject",
    );
    // From outside, both refuse.
    let intent = regression(
        cluster,
        probe("100.64.0.1", "192.0.2.1:80", Origin::Outside),
    );
    assert_eq!(intent.difference, None);
    assert_eq!(intent.iptables, Expected::Reject);
    // With source ranges that leave the node out, nftables drops instead.
    let mut svc = plain_service(Kind::LoadBalancer, Vec::new());
    svc.lb_ips = 1;
    svc.source_ranges = vec![Range::Clients];
    let cluster = Cluster {
        node: plain_node(),
        services: vec![svc],
    };
    let intent = regression(
        cluster,
        probe("192.168.0.10", "198.51.100.1:80", Origin::Node),
    );
    assert_difference(
        &intent,
        ModeDifference::NodeToExternalWithoutEndpoints,
        "Pass",
        "Drop",
    );
}

#[test]
fn difference_nodeport_addresses() {
    let mut node = plain_node();
    node.secondary_ip = true;
    let served = Cluster {
        node: node.clone(),
        services: vec![plain_service(
            Kind::NodePort,
            vec![ready(EpHost::OtherNode, 1)],
        )],
    };
    // Unset: iptables takes NodePorts on every local address, nftables on the primary one.
    let intent = regression(
        served.clone(),
        probe("203.0.113.200", "192.168.0.11:30000", Origin::Outside),
    );
    assert_difference(&intent, ModeDifference::NodePortAddresses, "Dnat", "Pass");
    let intent = regression(
        served.clone(),
        probe("203.0.113.200", "192.168.0.10:30000", Origin::Outside),
    );
    assert_eq!(intent.difference, None);
    // Localhost NodePorts: iptables only.
    let intent = regression(served, probe("127.0.0.1", "127.0.0.1:30000", Origin::Node));
    assert_difference(&intent, ModeDifference::NodePortAddresses, "Dnat", "Pass");
    // Without endpoints, iptables refuses the NodePort on every local address, even where
    // --nodeport-addresses does not take NodePorts.
    node.nodeport_addresses = NodePorts::Primary;
    let refused = Cluster {
        node,
        services: vec![plain_service(Kind::NodePort, Vec::new())],
    };
    for dst in ["192.168.0.11:30000", "127.0.0.1:30000"] {
        let src = if dst.starts_with("127.") {
            "127.0.0.1"
        } else {
            "192.168.0.10"
        };
        let intent = regression(refused.clone(), probe(src, dst, Origin::Node));
        assert_difference(&intent, ModeDifference::NodePortAddresses, "Reject", "Pass");
    }
    // IPv6: NodePorts never on ::1, but iptables still refuses there.
    let mut node = plain_node();
    node.stack = Stack::V6;
    let refused = Cluster {
        node,
        services: vec![plain_service(Kind::NodePort, Vec::new())],
    };
    let intent = regression(refused, probe("::1", "[::1]:30000", Origin::Node));
    assert_difference(&intent, ModeDifference::NodePortAddresses, "Reject", "Pass");
}

#[test]
fn difference_remote_endpoint_hairpin() {
    let cluster = Cluster {
        node: plain_node(),
        services: vec![plain_service(
            Kind::ClusterIp,
            vec![ready(EpHost::OtherNode, 1)],
        )],
    };
    let intent = regression(
        cluster,
        probe("10.244.2.1", "172.30.0.10:80", Origin::Outside),
    );
    assert_eq!(
        intent.difference,
        Some(ModeDifference::RemoteEndpointHairpin)
    );
    let endpoint: SocketAddr = "10.244.2.1:8080".parse().expect("an address");
    let masquerade = |expected: &Expected| match expected {
        Expected::Dnat { endpoints, .. } => endpoints.clone(),
        other => panic!("not a DNAT: {other:?}"),
    };
    assert_eq!(masquerade(&intent.iptables), vec![(endpoint, true)]);
    assert_eq!(masquerade(&intent.nftables), vec![(endpoint, false)]);
    // A local endpoint reaching itself is masqueraded in both.
    let cluster = Cluster {
        node: plain_node(),
        services: vec![plain_service(
            Kind::ClusterIp,
            vec![ready(EpHost::ThisNode, 1)],
        )],
    };
    let intent = regression(
        cluster,
        probe("10.244.1.1", "172.30.0.10:80", Origin::Outside),
    );
    assert_eq!(intent.difference, None);
    assert_eq!(
        masquerade(&intent.iptables),
        vec![("10.244.1.1:8080".parse().expect("an address"), true)]
    );
}

/// Regression (maps layout): a cluster IP without affinity on the protocol and port of another
/// Service's NodePort with affinity, where every local address takes NodePorts (IPv6 with
/// IPv4-only `--nodeport-addresses`). `remember` found no `affinity-timeouts` element for the
/// cluster IP and went on to `nodeport-affinity-timeouts`, which matched the port: the
/// connection was recorded in `@affinity` and the trace showed affinity (timeout 100) where
/// kube-proxy has none. The frontend now has an element that ends the lookup.
#[test]
fn maps_cluster_ip_port_of_an_affinity_nodeport() {
    let mut node = plain_node();
    node.stack = Stack::V6;
    node.nodeport_addresses = NodePorts::NodeNetworkV4Only;
    let mut plain = plain_service(Kind::ClusterIp, vec![ready(EpHost::OtherNode, 1)]);
    plain.ports = vec![(Protocol::Tcp, 30010)];
    let mut sticky = plain_service(Kind::NodePort, vec![ready(EpHost::OtherNode, 2)]);
    sticky.affinity = Some(100);
    let cluster = Cluster {
        node,
        services: vec![plain, sticky],
    };
    let intent = regression(
        cluster,
        probe("2001:db8:c::200", "[fd00:30::10]:30010", Origin::Outside),
    );
    assert_eq!(intent.maps_difference, None);
    assert!(matches!(intent.maps, Expected::Dnat { affinity: None, .. }));
    // A load-balancer IP on a node address that takes NodePorts (the `nodeport-ips` guard of
    // `remember` lets it through too).
    let mut node = plain_node();
    node.secondary_ip = true;
    node.nodeport_addresses = NodePorts::NodeNetwork;
    let mut plain = plain_service(Kind::LoadBalancer, vec![ready(EpHost::OtherNode, 1)]);
    plain.ports = vec![(Protocol::Tcp, 30010)];
    plain.on_node = Some(true);
    let mut sticky = plain_service(Kind::NodePort, vec![ready(EpHost::OtherNode, 2)]);
    sticky.affinity = Some(100);
    let cluster = Cluster {
        node,
        services: vec![plain, sticky],
    };
    let intent = regression(
        cluster,
        probe("100.64.0.1", "192.168.0.11:30010", Origin::Outside),
    );
    assert_eq!(intent.maps_difference, None);
    assert!(matches!(intent.maps, Expected::Dnat { affinity: None, .. }));
}

/// The documented maps-layout difference: after a first connection through a load-balancer IP,
/// the client's connection to the cluster IP of the same service port is pinned to the same
/// endpoint in kube-proxy's two modes, and picked at random (and pinned anew) in the `maps`
/// layout, whose affinity entries are keyed by frontend.
#[test]
fn maps_difference_affinity_per_frontend() {
    let mut svc = plain_service(
        Kind::LoadBalancer,
        vec![ready(EpHost::OtherNode, 1), ready(EpHost::OtherNode, 2)],
    );
    svc.lb_ips = 1;
    svc.affinity = Some(600);
    let cluster = Cluster {
        node: plain_node(),
        services: vec![svc],
    };
    let world = World::build(&cluster).expect("the cluster builds");
    let mut stats = Stats::default();
    let first = probe("100.64.0.1", "198.51.100.1:80", Origin::Outside);
    if let Err(err) = check_probe(&world, &first, &mut stats) {
        panic!("{err}");
    }
    // Both endpoints can be the first one reached; each second connection differs so.
    assert_eq!(stats.sticky, 1);
    assert_eq!(
        stats
            .maps_differences
            .get(&MapsDifference::AffinityPerFrontend),
        Some(&1)
    );
    // The first connection itself, and the next one through the same frontend, agree.
    assert_eq!(intent_of(&world, &first).maps_difference, None);
    // With one endpoint there is nothing to differ on.
    let mut svc = plain_service(Kind::LoadBalancer, vec![ready(EpHost::OtherNode, 1)]);
    svc.lb_ips = 1;
    svc.affinity = Some(600);
    let world = World::build(&Cluster {
        node: plain_node(),
        services: vec![svc],
    })
    .expect("the cluster builds");
    let mut stats = Stats::default();
    if let Err(err) = check_probe(&world, &first, &mut stats) {
        panic!("{err}");
    }
    assert_eq!(stats.sticky, 1);
    assert!(stats.maps_differences.is_empty());
}
