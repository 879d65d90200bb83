//! Entry points of the fuzz targets (`fuzz/`), shared with `cargo test`, which replays the
//! checked-in corpora through them (`tests/fuzz_corpus.rs`). Each takes the raw bytes
//! libFuzzer made, runs them through kproxy, and panics only when kproxy breaks a promise —
//! which is what the fuzzer looks for.
//!
//! - [`manifest`]: bytes as a manifest file: read, validate, build, render in both modes.
//! - [`iptables_rules`], [`nft_rules`]: bytes as rule text for the tracer's two readers.
//! - [`iptables_save`], [`nft_json`]: bytes as kernel tool output for the `--live` readers.
//! - [`validation`]: bytes decoded (with `arbitrary`) into Services and EndpointSlices whose
//!   fields are drawn from the values validation cares about — addresses of every class,
//!   colliding names, cluster IPs and node ports, odd protocols and port numbers — so that the
//!   fuzzer explores validation and conflict resolution instead of the YAML grammar.

use std::collections::BTreeMap;
use std::net::IpAddr;

use arbitrary::{Arbitrary, Unstructured};
use k8s_openapi::api::core::v1::{
    ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort,
    ServiceSpec as ApiServiceSpec, ServiceStatus, SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::backend::Mode;
use crate::config::{NodeConfig, NodePortAddresses};
use crate::family::{FamilyMode, IpFamily};
use crate::model::ProxyModel;
use crate::pipeline;
use crate::source::{ClusterState, Manifests};

/// A manifest file's bytes: reading never panics, and what is read renders in both modes
/// without breaking the rule text's line structure.
pub fn manifest(data: &[u8]) {
    let mut manifests = Manifests::default();
    if manifests.add_bytes(data, "fuzz.yaml").is_err() {
        return;
    }
    check_renders(&manifests.state);
}

/// Arbitrary Services and EndpointSlices: validation never panics, and what it lets through
/// renders in both modes without breaking the rule text's line structure.
pub fn validation(data: &[u8]) {
    let mut input = Unstructured::new(data);
    let Ok(cluster) = FuzzCluster::arbitrary(&mut input) else {
        return;
    };
    check_renders(&cluster.into_state());
}

/// Rule text through the iptables reader: reading never panics, and what it reads renders to
/// text that reads back to the same rules.
pub fn iptables_rules(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(ruleset) = crate::iptables::Ruleset::from_restore_text(text, IpFamily::V4) else {
        return;
    };
    let again =
        crate::iptables::Ruleset::from_restore_text(&ruleset.to_restore_text(), ruleset.family);
    assert_eq!(
        again.as_ref(),
        Ok(&ruleset),
        "iptables rules change on a second reading"
    );
}

/// Script text through the nftables reader: reading never panics, and what it reads renders
/// to a script that reads back to the same objects.
pub fn nft_rules(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(ruleset) = crate::nftables::Ruleset::from_nft_script(text) else {
        return;
    };
    let again = crate::nftables::Ruleset::from_nft_script(&ruleset.to_nft_script());
    assert_eq!(
        again.as_ref(),
        Ok(&ruleset),
        "nftables objects change on a second reading"
    );
}

/// `iptables-save` output through the `--live` reader: reading never panics, and every line
/// it interprets is a rule in kproxy's vocabulary — rendered as restore input, it reads back
/// (with kproxy's own reader) to the same rule. Probabilities compare at the 10 decimals
/// kproxy writes; rules whose comment has a quote (which restore input cannot hold) are only
/// read.
pub fn iptables_save(data: &[u8]) {
    use crate::iptables::{write_rule, Match, Rule};
    use crate::trace::live::iptables_save::{parse_save_rule, read_save_text};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let normal = |rule: &Rule| -> Rule {
        let mut rule = rule.clone();
        for m in rule.matches.iter_mut() {
            if let Match::RandomProbability(p) = m {
                *p = format!("{p:.10}").parse().unwrap_or(f64::NAN);
            }
        }
        rule
    };
    for family in [IpFamily::V4, IpFamily::V6] {
        let _ = read_save_text(text, family);
        for line in text.lines().filter(|l| l.starts_with("-A ")) {
            let Ok(rule) = parse_save_rule(line, family, &|_| true) else {
                continue;
            };
            let quoted = rule
                .matches
                .iter()
                .any(|m| matches!(m, Match::Comment(c) if c.is_empty() || c.contains('"')));
            if quoted {
                continue;
            }
            let chain = line.split(' ').nth(1).unwrap_or_default();
            if crate::iptables::ChainName::new(chain).is_none() {
                // Not a name the kernel takes (too long, …): no restore line can carry it.
                continue;
            }
            let mut written = format!("-A {chain}");
            write_rule(&mut written, &rule);
            let again = Rule::from_restore_line(&written);
            assert_eq!(
                again.as_ref().map(|(_, r)| normal(r)),
                Ok(normal(&rule)),
                "{line:?} was read as {written:?}, which reads back otherwise"
            );
        }
    }
}

/// `nft -j list table` output through the `--live` reader: reading never panics, and every
/// rule it interprets is one kproxy can write — rendered as an `add rule` line, it reads back
/// (with kproxy's own script reader) to the same rule. Rules naming chains, sets or comments
/// that a script cannot hold (blanks, quotes) are only read.
pub fn nft_json(data: &[u8]) {
    use crate::nftables::{write_rule, Ruleset};
    use crate::trace::live::nft_json::read_listing;
    use crate::trace::Entry;
    let chains: Vec<String> = serde_json::from_slice::<serde_json::Value>(data)
        .ok()
        .and_then(|json| {
            json.get("nftables")?.as_array().map(|items| {
                items
                    .iter()
                    .filter_map(|i| i.get("chain")?.get("name")?.as_str())
                    .map(str::to_string)
                    .collect()
            })
        })
        .unwrap_or_default();
    for family in [IpFamily::V4, IpFamily::V6] {
        let Ok(listed) = read_listing(data, family) else {
            continue;
        };
        let word = match family {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        };
        for chain in &chains {
            for entry in listed.rules.chain(chain).unwrap_or_default() {
                let Entry::Rule(rule) = entry else {
                    continue;
                };
                let mut text = String::new();
                if write_rule(&mut text, family, rule).is_err() {
                    continue;
                }
                let plain = |s: &str| {
                    !s.is_empty()
                        && !s.chars().any(|c| {
                            c.is_whitespace() || c.is_control() || "\\\"'{}@;#,:.".contains(c)
                        })
                };
                let comment_ok = rule.comment.as_deref().is_none_or(|c| !c.contains('"'));
                if !plain(chain) || !comment_ok || !rule_names(rule).into_iter().all(plain) {
                    continue;
                }
                let script = format!(
                    "add table {word} kube-proxy\nadd chain {word} kube-proxy {chain}\nadd rule {word} kube-proxy {chain} {text}\n"
                );
                let again = Ruleset::from_nft_script(&script);
                let read = again
                    .as_ref()
                    .ok()
                    .and_then(|r| r.chain(chain))
                    .and_then(|c| c.rules.first());
                assert_eq!(
                    read,
                    Some(rule),
                    "{script:?} reads back otherwise: {again:?}"
                );
            }
        }
    }
}

/// The chains, sets and maps a rule names.
fn rule_names(rule: &crate::nftables::Rule) -> Vec<&str> {
    use crate::nftables::{Match, Statement, Verdict};
    fn verdict(v: &Verdict) -> Option<&str> {
        match v {
            Verdict::Jump(name) | Verdict::Goto(name) => Some(name),
            Verdict::Drop | Verdict::Reject => None,
        }
    }
    let mut names = Vec::new();
    for m in &rule.matches {
        if let Match::InSet { set, .. } = m {
            names.push(&**set);
        }
    }
    for statement in &rule.statements {
        match statement {
            Statement::Verdict(v) => names.extend(verdict(v)),
            Statement::VerdictMap { map, .. } => names.push(map),
            Statement::RandomVerdict(verdicts) => names.extend(verdicts.iter().filter_map(verdict)),
            Statement::UpdateSet { set, .. } => names.push(set),
            _ => {}
        }
    }
    names
}

fn check_renders(state: &ClusterState) {
    for family_mode in [FamilyMode::V4, FamilyMode::Dual] {
        let mut config = NodeConfig::new("node-a");
        config.family_mode = family_mode;
        config.node_ips = vec![
            [192, 0, 2, 10].into(),
            "2001:db8::10".parse().expect("IPv6"),
        ];
        config.cluster_cidrs = vec!["10.244.0.0/16".parse().expect("CIDR")];
        config.zone = Some("zone-a".into());
        config.nodeport_addresses = Some(NodePortAddresses::Primary);
        let plan = pipeline::plan(state, &config);
        for model in &plan.models {
            check_model(model);
        }
        for mode in [Mode::Iptables, Mode::Nftables] {
            let text = mode.render(&plan.models, &config);
            check_lines(mode, &text);
        }
    }
}

/// What validation and conflict resolution promise about a model: no address of a class the
/// API server's allocators never hand out (api-validation.md §4.5, §7.1), every frontend
/// (address, protocol, port) programmed once, and every node port (health-check node ports
/// included) held by one Service.
pub fn check_model(model: &ProxyModel) {
    let mut frontends = BTreeMap::new();
    let mut node_ports: BTreeMap<u16, String> = BTreeMap::new();
    for port in &model.ports {
        let service = port.name.service();
        let addresses = std::iter::once(port.cluster_ip)
            .chain(port.external_ips.iter().copied())
            .chain(port.load_balancer_ips.iter().copied());
        for ip in addresses
            .clone()
            .chain(port.endpoints.iter().map(|e| e.ip()))
        {
            assert!(
                is_assignable(ip),
                "{}: address {ip} of a refused class is programmed",
                port.name
            );
        }
        for ip in addresses {
            let key = (ip, port.name.protocol, port.port);
            if let Some(other) = frontends.insert(key, port.name.clone()) {
                assert_eq!(
                    other, port.name,
                    "frontend {ip} {:?} {} is programmed for two service ports",
                    port.name.protocol, port.port
                );
            }
        }
        for number in port.node_port.iter().chain(&port.health_check_node_port) {
            let holder = node_ports.entry(*number).or_insert_with(|| service.clone());
            assert_eq!(
                *holder, service,
                "node port {number} is held by two Services"
            );
        }
    }
}

/// Not loopback, unspecified, link-local, multicast, broadcast or IPv4-mapped IPv6 —
/// written here independently of validation, as the oracle it is checked against.
fn is_assignable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_loopback()
                || v4.is_unspecified()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast())
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6.to_ipv4_mapped().is_some())
        }
    }
}

/// Every line of the output is one the format allows: an object's name or address can never
/// start a line of its own (rule injection) or carry a control character.
pub fn check_lines(mode: Mode, text: &str) {
    for line in text.lines() {
        assert!(
            !line.chars().any(|c| c.is_control() && c != '\t'),
            "{mode:?}: control character in {line:?}"
        );
        if mode == Mode::Iptables {
            let allowed = ["*", ":", "-A ", "-X ", "COMMIT", "#"];
            assert!(
                line.is_empty() || allowed.iter().any(|p| line.starts_with(p)),
                "iptables: a line that is no restore command: {line:?}"
            );
        }
    }
}

/// Values that validation treats differently, so that random bytes hit them often.
const ADDRESSES: &[&str] = &[
    "10.96.0.10",
    "10.96.0.11",
    "172.30.0.41",
    "10.244.1.5",
    "10.244.2.7",
    "192.0.2.10",
    "203.0.113.5",
    "127.0.0.1",
    "127.0.0.53",
    "0.0.0.0",
    "255.255.255.255",
    "169.254.169.254",
    "224.0.0.5",
    "010.096.000.010",
    "fd00::10",
    "fd00:10:244::5",
    "::1",
    "::",
    "fe80::1",
    "ff02::1",
    "::ffff:10.96.0.10",
    "2001:db8::10",
    "None",
    "",
];
const NAMES: &[&str] = &["a", "b", "web", "db", "x-1"];
const NAMESPACES: &[&str] = &["default", "ns"];
const PROTOCOLS: &[&str] = &["TCP", "UDP", "SCTP", "tcp", "ICMP"];
const TYPES: &[&str] = &[
    "ClusterIP",
    "NodePort",
    "LoadBalancer",
    "ExternalName",
    "Bogus",
];
const POLICIES: &[&str] = &["Cluster", "Local", "local"];
const SOURCE_RANGES: &[&str] = &[
    "203.0.113.0/24",
    "0.0.0.0/0",
    " 10.0.0.0/8 ",
    "1.2.3.4",
    "fd00::/64",
];

/// One of a list of interesting values, or arbitrary text.
#[derive(Debug)]
struct Pick<const LIST: usize>(String);

impl<'a, const LIST: usize> Arbitrary<'a> for Pick<LIST> {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let list: &[&str] = match LIST {
            0 => ADDRESSES,
            1 => NAMES,
            2 => NAMESPACES,
            3 => PROTOCOLS,
            4 => TYPES,
            5 => POLICIES,
            _ => SOURCE_RANGES,
        };
        if u.ratio(1, 16)? {
            return Ok(Pick(String::arbitrary(u)?));
        }
        Ok(Pick(u.choose(list)?.to_string()))
    }
}

type Address = Pick<0>;
type Name = Pick<1>;
type Namespace = Pick<2>;
type ProtocolText = Pick<3>;
type TypeText = Pick<4>;
type Policy = Pick<5>;
type SourceRange = Pick<6>;

/// A port number: mostly valid, sometimes 0, negative or too large.
#[derive(Debug)]
struct PortNumber(i32);

impl<'a> Arbitrary<'a> for PortNumber {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(PortNumber(match u.int_in_range(0..=7)? {
            0 => i32::arbitrary(u)?,
            1 => 0,
            2 => 65536,
            3 => 30000 + i32::from(u.int_in_range(0u16..=3)?),
            _ => i32::from(u.int_in_range(1u16..=4)?) * 80,
        }))
    }
}

#[derive(Debug, Arbitrary)]
struct FuzzCluster {
    services: Vec<FuzzService>,
    slices: Vec<FuzzSlice>,
}

#[derive(Debug, Arbitrary)]
struct FuzzService {
    namespace: Namespace,
    name: Name,
    /// Seconds after an epoch; `None` leaves the timestamp out.
    created: Option<u8>,
    type_: TypeText,
    cluster_ips: Vec<Address>,
    ports: Vec<FuzzServicePort>,
    external_ips: Vec<Address>,
    ingress_ips: Vec<Address>,
    source_ranges: Vec<SourceRange>,
    affinity_timeout: Option<Option<i32>>,
    external_policy: Option<Policy>,
    internal_policy: Option<Policy>,
    health_check_node_port: Option<PortNumber>,
    ignored_by_label: bool,
}

#[derive(Debug, Arbitrary)]
struct FuzzServicePort {
    name: Option<Name>,
    protocol: Option<ProtocolText>,
    port: PortNumber,
    target_port: PortNumber,
    node_port: Option<PortNumber>,
}

#[derive(Debug, Arbitrary)]
struct FuzzSlice {
    namespace: Namespace,
    name: Name,
    service: Option<Name>,
    ipv6: bool,
    ports: Vec<FuzzSlicePort>,
    endpoints: Vec<FuzzEndpoint>,
}

#[derive(Debug, Arbitrary)]
struct FuzzSlicePort {
    name: Option<Name>,
    protocol: Option<ProtocolText>,
    port: Option<PortNumber>,
}

#[derive(Debug, Arbitrary)]
struct FuzzEndpoint {
    addresses: Vec<Address>,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
    local: bool,
    zone_hint: Option<bool>,
}

impl FuzzCluster {
    fn into_state(self) -> ClusterState {
        ClusterState {
            services: self
                .services
                .into_iter()
                .map(FuzzService::into_api)
                .collect(),
            endpoint_slices: self.slices.into_iter().map(FuzzSlice::into_api).collect(),
        }
    }
}

fn meta(namespace: String, name: String, created: Option<u8>) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(namespace),
        name: Some(name),
        creation_timestamp: created.and_then(|s| {
            k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + i64::from(s))
                .ok()
                .map(Time)
        }),
        ..ObjectMeta::default()
    }
}

impl FuzzService {
    fn into_api(self) -> Service {
        let strings = |list: Vec<Address>| Some(list.into_iter().map(|a| a.0).collect());
        let mut metadata = meta(self.namespace.0, self.name.0, self.created);
        if self.ignored_by_label {
            metadata.labels = Some(BTreeMap::from([(
                "service.kubernetes.io/service-proxy-name".to_string(),
                "other".to_string(),
            )]));
        }
        let cluster_ips: Option<Vec<String>> = strings(self.cluster_ips);
        Service {
            metadata,
            spec: Some(ApiServiceSpec {
                type_: Some(self.type_.0),
                cluster_ip: cluster_ips.as_ref().and_then(|ips| ips.first().cloned()),
                cluster_ips,
                ports: Some(
                    self.ports
                        .into_iter()
                        .map(|p| ServicePort {
                            name: p.name.map(|n| n.0),
                            protocol: p.protocol.map(|p| p.0),
                            port: p.port.0,
                            target_port: Some(IntOrString::Int(p.target_port.0)),
                            node_port: p.node_port.map(|n| n.0),
                            ..ServicePort::default()
                        })
                        .collect(),
                ),
                external_ips: strings(self.external_ips),
                load_balancer_source_ranges: Some(
                    self.source_ranges.into_iter().map(|r| r.0).collect(),
                ),
                session_affinity: self.affinity_timeout.map(|_| "ClientIP".to_string()),
                session_affinity_config: self.affinity_timeout.flatten().map(|t| {
                    SessionAffinityConfig {
                        client_ip: Some(ClientIPConfig {
                            timeout_seconds: Some(t),
                        }),
                    }
                }),
                external_traffic_policy: self.external_policy.map(|p| p.0),
                internal_traffic_policy: self.internal_policy.map(|p| p.0),
                health_check_node_port: self.health_check_node_port.map(|p| p.0),
                ..ApiServiceSpec::default()
            }),
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(
                        self.ingress_ips
                            .into_iter()
                            .map(|ip| LoadBalancerIngress {
                                ip: Some(ip.0),
                                ..LoadBalancerIngress::default()
                            })
                            .collect(),
                    ),
                }),
                ..ServiceStatus::default()
            }),
        }
    }
}

impl FuzzSlice {
    fn into_api(self) -> EndpointSlice {
        let mut metadata = meta(self.namespace.0, self.name.0, None);
        metadata.labels = self
            .service
            .map(|service| BTreeMap::from([("kubernetes.io/service-name".to_string(), service.0)]));
        EndpointSlice {
            metadata,
            address_type: if self.ipv6 { "IPv6" } else { "IPv4" }.to_string(),
            ports: Some(
                self.ports
                    .into_iter()
                    .map(|p| EndpointPort {
                        name: p.name.map(|n| n.0),
                        protocol: p.protocol.map(|p| p.0),
                        port: p.port.map(|p| p.0),
                        ..EndpointPort::default()
                    })
                    .collect(),
            ),
            endpoints: self
                .endpoints
                .into_iter()
                .map(|e| Endpoint {
                    addresses: e.addresses.into_iter().map(|a| a.0).collect(),
                    conditions: Some(EndpointConditions {
                        ready: e.ready,
                        serving: e.serving,
                        terminating: e.terminating,
                    }),
                    node_name: Some(if e.local { "node-a" } else { "node-b" }.to_string()),
                    hints: e
                        .zone_hint
                        .map(|same| k8s_openapi::api::discovery::v1::EndpointHints {
                            for_zones: Some(vec![k8s_openapi::api::discovery::v1::ForZone {
                                name: if same { "zone-a" } else { "zone-b" }.to_string(),
                            }]),
                            ..Default::default()
                        }),
                    ..Endpoint::default()
                })
                .collect(),
        }
    }
}
