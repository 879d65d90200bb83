//! ProxyModel → nftables [`Ruleset`]: a pure function of the model and the node settings.
//! Spec §5A (the `edca5633` layout); §5.2–§5.6 for what it shares with the older layout. The
//! `maps` layout (docs/maps-layout.md, [`maps`]) shares the table-wide part and writes every
//! service port as elements.

mod delta;
pub(crate) mod maps;

pub use delta::{translate_delta, ElementDelta, TableObjects};

use rustc_hash::{FxHashMap, FxHashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use super::ruleset::{
    BaseChain, Chain, ChainType, DataType, Direction, Element, ElementByKey, ElementValue, Field,
    Hook, Joining, Map, Match, Name, Rule, Ruleset, Set, SetFlag, Statement, Table, Value, Verdict,
    TABLE_NAME,
};
use super::{
    AFFINITY_SET_PREFIX, CLUSTER_IPS, CLUSTER_IPS_CHECK, COMMENT_LENGTH_MAX, ENDPOINT_CHAIN_PREFIX,
    EXTERNAL_CHAIN_PREFIX, FILTER_FORWARD, FILTER_INPUT, FILTER_OUTPUT, FILTER_OUTPUT_PRE_DNAT,
    FILTER_PREROUTING_PRE_DNAT, FIREWALL_CHAIN_PREFIX, FIREWALL_CHECK, FIREWALL_IPS,
    HAIRPIN_CONNECTIONS, LOCAL_CHAIN_PREFIX, MASQUERADING, NAT_OUTPUT, NAT_POSTROUTING,
    NAT_PREROUTING, NODEPORT_ENDPOINTS_CHECK, NODEPORT_IPS, NO_ENDPOINT_NODEPORTS,
    NO_ENDPOINT_SERVICES, REJECT_CHAIN, SERVICES, SERVICE_CHAIN_PREFIX, SERVICE_ENDPOINTS_CHECK,
    SERVICE_IPS, SERVICE_NODEPORTS,
};
use crate::config::{NftablesLayout, NodeConfig, NodePortAddresses};
use crate::family::IpFamily;
use crate::model::{Endpoint, NoEndpointVerdict, ProxyModel, ServicePort};
use crate::names;

/// The base chains in kube-proxy's order, with their numeric priorities (§5.2).
const BASE_CHAINS: [(&str, ChainType, Hook, i32); 8] = [
    (
        FILTER_PREROUTING_PRE_DNAT,
        ChainType::Filter,
        Hook::Prerouting,
        -110,
    ),
    (
        FILTER_OUTPUT_PRE_DNAT,
        ChainType::Filter,
        Hook::Output,
        -110,
    ),
    (FILTER_INPUT, ChainType::Filter, Hook::Input, 0),
    (FILTER_FORWARD, ChainType::Filter, Hook::Forward, 0),
    (FILTER_OUTPUT, ChainType::Filter, Hook::Output, 0),
    (NAT_PREROUTING, ChainType::Nat, Hook::Prerouting, -100),
    (NAT_OUTPUT, ChainType::Nat, Hook::Output, -100),
    (NAT_POSTROUTING, ChainType::Nat, Hook::Postrouting, 100),
];

/// Jumps from base chains into the top-level chains, in order: (target, from, only new
/// connections). §5.3.
const JUMPS: [(&str, &str, bool); 11] = [
    (NODEPORT_ENDPOINTS_CHECK, FILTER_INPUT, true),
    (SERVICE_ENDPOINTS_CHECK, FILTER_INPUT, true),
    (SERVICE_ENDPOINTS_CHECK, FILTER_FORWARD, true),
    (SERVICE_ENDPOINTS_CHECK, FILTER_OUTPUT, true),
    (FIREWALL_CHECK, FILTER_PREROUTING_PRE_DNAT, true),
    (FIREWALL_CHECK, FILTER_OUTPUT_PRE_DNAT, true),
    (SERVICES, NAT_OUTPUT, false),
    (SERVICES, NAT_PREROUTING, false),
    (MASQUERADING, NAT_POSTROUTING, false),
    (CLUSTER_IPS_CHECK, FILTER_FORWARD, true),
    (CLUSTER_IPS_CHECK, FILTER_OUTPUT, true),
];

/// Builds the complete `kube-proxy` table of one family.
///
/// Service ports are translated in parallel chunks and merged in model order with the same
/// rules as sequential insertion, so the result does not depend on the number of threads.
pub fn translate(model: &ProxyModel, config: &NodeConfig) -> Ruleset {
    let mut translator = Translator::new(model, config);
    translator.setup();
    let parts = crate::parallel::map_chunks(&model.ports, |ports| {
        let mut part = translator.empty_copy();
        for port in ports {
            part.service_port(port);
        }
        part.out
    });
    for part in parts {
        translator.out.append(part);
    }
    translator.finish()
}

/// Each service port's objects, kept between translations of one family (see
/// [`crate::port_cache`]).
pub type PortCache = crate::port_cache::PortCache<PortObjects>;

/// [`translate`], reusing the translation of every port found unchanged in `cache`, and
/// keeping the new ones there. The result is the same as [`translate`]'s.
pub fn translate_cached(model: &ProxyModel, config: &NodeConfig, cache: &mut PortCache) -> Ruleset {
    let mut translator = Translator::new(model, config);
    translator.setup();
    let settings = cache_settings(model, config);
    let parts = cache.update(settings, &model.ports, |port| {
        let mut part = translator.empty_copy();
        part.service_port(port);
        part.out.into_part()
    });
    let parts: Vec<&PortObjects> = parts.collect();
    translator.out.append_parts(&parts);
    translator.finish()
}

/// What a kept port's translation depends on besides the port.
fn cache_settings(model: &ProxyModel, config: &NodeConfig) -> String {
    format!("{:?} {config:?}", model.family)
}

struct Translator<'a> {
    config: &'a NodeConfig,
    layout: NftablesLayout,
    family: IpFamily,
    mark: Name,
    /// The pod network: traffic from it is "local" to the cluster (§3 detector).
    pod_cidr: Option<IpNet>,
    /// `None`: NodePorts on every local address (kube-proxy's `MatchAll`).
    nodeport_networks: Option<Vec<IpNet>>,
    reject_verdict: Verdict,
    out: Builder,
}

/// The names of one service port's chains (§5.6).
struct PortChains {
    cluster: Name,
    local: Name,
    external: Name,
    firewall: Name,
}

impl PortChains {
    fn new(port: &ServicePort) -> PortChains {
        let base = names::nftables_port_base(&port.name);
        PortChains {
            cluster: format!("{SERVICE_CHAIN_PREFIX}{base}").into(),
            local: format!("{LOCAL_CHAIN_PREFIX}{base}").into(),
            external: format!("{EXTERNAL_CHAIN_PREFIX}{base}").into(),
            firewall: format!("{FIREWALL_CHAIN_PREFIX}{base}").into(),
        }
    }
}

/// The per-endpoint objects, used only with ClientIP affinity (§5A.9).
struct EndpointObjects {
    chain: Name,
    affinity_set: Name,
}

impl EndpointObjects {
    fn new(port: &ServicePort, endpoint: &Endpoint) -> EndpointObjects {
        let base = names::nftables_endpoint_base(&port.name, endpoint);
        EndpointObjects {
            chain: format!("{ENDPOINT_CHAIN_PREFIX}{base}").into(),
            affinity_set: format!("{AFFINITY_SET_PREFIX}{base}").into(),
        }
    }
}

impl<'a> Translator<'a> {
    fn new(model: &'a ProxyModel, config: &'a NodeConfig) -> Self {
        let family = model.family;
        Translator {
            config,
            layout: config.nftables_layout,
            family,
            mark: config.masquerade_mark.text.as_str().into(),
            pod_cidr: config.local_cidr(family),
            // nftables mode accepts NodePorts on the primary node IP unless told otherwise (§3).
            nodeport_networks: config.nodeport_networks(family, Some(&NodePortAddresses::Primary)),
            reject_verdict: Verdict::Goto(REJECT_CHAIN.into()),
            out: Builder::default(),
        }
    }

    /// The same settings with nothing built yet, to translate a share of the service ports.
    fn empty_copy(&self) -> Translator<'a> {
        Translator {
            config: self.config,
            layout: self.layout,
            family: self.family,
            mark: self.mark.clone(),
            pod_cidr: self.pod_cidr,
            nodeport_networks: self.nodeport_networks.clone(),
            reject_verdict: self.reject_verdict.clone(),
            out: self.out.empty_copy(),
        }
    }

    /// The table, once every service port is in: the `maps` layout's shared chains get their
    /// rules here (service ports only declare the ones they use).
    fn finish(mut self) -> Ruleset {
        let (name, comment) = match self.layout {
            NftablesLayout::KubeProxy => (TABLE_NAME, "rules for kube-proxy"),
            NftablesLayout::Maps => {
                self.maps_shadowed_nodeports();
                self.maps_shared_chain_rules();
                self.maps_container_sizes();
                (super::MAPS_TABLE_NAME, "rules for kproxy (maps layout)")
            }
        };
        self.out.finish(Table {
            family: self.family,
            name: name.into(),
            comment: Some(comment.into()),
        })
    }

    fn addr_type(&self) -> DataType {
        DataType::addr(self.family)
    }

    /// The "not localhost" destination match: `ip daddr != 127.0.0.0/8` / `ip6 daddr != ::1`.
    fn not_localhost(&self) -> Match {
        let value = match self.family {
            IpFamily::V4 => Value::Net(self.family.loopback_net()),
            IpFamily::V6 => Value::Addr(self.family.loopback_net().addr()),
        };
        compare(Field::DestinationAddr, true, value)
    }

    /// Table-wide chains, sets, maps and rules, in kube-proxy's setup order (§5A.11).
    fn setup(&mut self) {
        let addr = self.addr_type();
        for (name, kind, hook, priority) in BASE_CHAINS {
            self.out.chain(
                name,
                Some(BaseChain {
                    kind,
                    hook,
                    priority,
                }),
                None,
            );
        }
        for (target, from, new_only) in JUMPS {
            self.out.chain(target, None, None);
            let matches = if new_only {
                vec![Match::CtStateNew]
            } else {
                vec![]
            };
            self.out.rule(
                from,
                Rule::new(matches, vec![verdict(Verdict::Jump(target.into()))]),
            );
        }

        // Masquerading: marked packets, then hairpin connections (§5A.5, §5A.6).
        self.out.set(Set::plain(
            HAIRPIN_CONNECTIONS,
            vec![addr, addr, DataType::InetProto, DataType::InetService],
            "service hairpin connections",
        ));
        self.out.rule(
            MASQUERADING,
            Rule::new(
                vec![Match::MarkBitSet(self.mark.clone())],
                vec![
                    Statement::MarkXor(self.mark.clone()),
                    Statement::MasqueradeFullyRandom,
                ],
            ),
        );
        self.out.rule(
            MASQUERADING,
            Rule::new(
                vec![
                    Match::CtStatusDnat,
                    Match::InSet {
                        negated: false,
                        key: vec![
                            Field::SourceAddr,
                            Field::DestinationAddr,
                            Field::L4Proto,
                            Field::DestinationPort,
                        ],
                        set: HAIRPIN_CONNECTIONS.into(),
                    },
                ],
                vec![Statement::MasqueradeFullyRandom],
            ),
        );

        // Cluster IPs: reject unknown ports, drop unallocated addresses (§5.5).
        self.out
            .set(Set::plain(CLUSTER_IPS, vec![addr], "Active ClusterIPs"));
        self.out.rule(
            CLUSTER_IPS_CHECK,
            Rule::new(
                vec![in_set(Field::DestinationAddr, CLUSTER_IPS)],
                vec![verdict(Verdict::Reject)],
            )
            .with_comment("Reject traffic to invalid ports of ClusterIPs"),
        );
        let service_cidrs: Vec<Value> = self
            .config
            .service_cidrs_of(self.family)
            .map(Value::Net)
            .collect();
        if !service_cidrs.is_empty() {
            self.out.rule(
                CLUSTER_IPS_CHECK,
                Rule::new(
                    vec![compare(
                        Field::DestinationAddr,
                        false,
                        Value::Set {
                            members: service_cidrs.into(),
                            joining: Joining::Tight,
                        },
                    )],
                    vec![verdict(Verdict::Drop)],
                )
                .with_comment("Drop traffic to unallocated ClusterIPs"),
            );
        }

        // NodePort addresses: a set of node IPs, or every local address (§5.4).
        if let Some(networks) = &self.nodeport_networks {
            self.out.set(Set::plain(
                NODEPORT_IPS,
                vec![addr],
                "IPs that accept NodePort traffic",
            ));
            let mut ips: Vec<IpAddr> = Vec::new();
            for ip in self.config.node_ips_of(self.family) {
                if !ip.is_loopback()
                    && networks.iter().any(|n| n.contains(&ip))
                    && !ips.contains(&ip)
                {
                    ips.push(ip);
                }
            }
            for ip in ips {
                self.out
                    .element(NODEPORT_IPS, vec![Value::Addr(ip)], None, None);
            }
        }

        // Services and NodePorts without (usable) endpoints.
        let service_key = vec![addr, DataType::InetProto, DataType::InetService];
        let nodeport_key = vec![DataType::InetProto, DataType::InetService];
        self.out.map(Map::verdict_map(
            NO_ENDPOINT_SERVICES,
            service_key.clone(),
            "vmap to drop or reject packets to services with no endpoints",
        ));
        self.out.map(Map::verdict_map(
            NO_ENDPOINT_NODEPORTS,
            nodeport_key.clone(),
            "vmap to drop or reject packets to service nodeports with no endpoints",
        ));
        self.out.chain(
            REJECT_CHAIN,
            None,
            Some("helper for @no-endpoint-services / @no-endpoint-nodeports"),
        );
        self.out.rule(
            REJECT_CHAIN,
            Rule::new(vec![], vec![verdict(Verdict::Reject)]),
        );
        self.out.rule(
            SERVICE_ENDPOINTS_CHECK,
            Rule::new(vec![], vec![vmap(&SERVICE_TUPLE, NO_ENDPOINT_SERVICES)]),
        );
        let nodeport_destination = match self.nodeport_networks {
            None => vec![self.not_localhost()],
            Some(_) => vec![in_set(Field::DestinationAddr, NODEPORT_IPS)],
        };
        self.out.rule(
            NODEPORT_ENDPOINTS_CHECK,
            Rule::new(
                nodeport_destination.clone(),
                vec![vmap(&NODEPORT_TUPLE, NO_ENDPOINT_NODEPORTS)],
            ),
        );

        // loadBalancerSourceRanges, checked before DNAT.
        if self.layout == NftablesLayout::Maps {
            self.maps_firewall_setup(&service_key);
        } else {
            self.out.map(Map::verdict_map(
                FIREWALL_IPS,
                service_key.clone(),
                "destinations that are subject to LoadBalancerSourceRanges",
            ));
            self.out.rule(
                FIREWALL_CHECK,
                Rule::new(vec![], vec![vmap(&SERVICE_TUPLE, FIREWALL_IPS)]),
            );
        }

        // Service dispatch.
        self.out.map(Map::verdict_map(
            SERVICE_IPS,
            service_key.clone(),
            "ClusterIP, ExternalIP and LoadBalancer IP traffic",
        ));
        self.out.map(Map::verdict_map(
            SERVICE_NODEPORTS,
            nodeport_key.clone(),
            "NodePort traffic",
        ));
        let to_cluster_ip = in_set(Field::DestinationAddr, CLUSTER_IPS);
        if self.config.masquerade_all {
            self.out.rule(
                SERVICES,
                Rule::new(
                    vec![to_cluster_ip],
                    vec![Statement::MarkOr(self.mark.clone())],
                )
                .with_comment("masquerade all clusterIP traffic"),
            );
        } else if let Some(cidr) = self.pod_cidr {
            self.out.rule(
                SERVICES,
                Rule::new(
                    vec![
                        to_cluster_ip,
                        compare(Field::SourceAddr, true, Value::Net(cidr)),
                    ],
                    vec![Statement::MarkOr(self.mark.clone())],
                )
                .with_comment("masquerade clusterIP traffic from outside cluster"),
            );
        }
        self.out.rule(
            SERVICES,
            Rule::new(vec![], vec![vmap(&SERVICE_TUPLE, SERVICE_IPS)]),
        );
        let mut nodeport_dispatch = nodeport_destination;
        if self.nodeport_networks.is_none() {
            nodeport_dispatch.insert(0, Match::FibLocal(Direction::Destination));
        }
        self.out.rule(
            SERVICES,
            Rule::new(
                nodeport_dispatch,
                vec![vmap(&NODEPORT_TUPLE, SERVICE_NODEPORTS)],
            ),
        );
        if self.layout == NftablesLayout::Maps {
            self.maps_setup(service_key, nodeport_key);
        }
        self.out.share_container_names();
    }

    /// One service port's chains, sets, rules and elements, in kube-proxy's order (§5A.10).
    fn service_port(&mut self, port: &ServicePort) {
        if self.layout == NftablesLayout::Maps {
            return self.maps_service_port(port);
        }
        let chains = PortChains::new(port);
        let protocol = port.name.protocol;
        let affinity = port.affinity_timeout;

        // The endpoint chain and affinity set names (affinity only), computed once per endpoint
        // and indexed like `port.endpoints`.
        let mut endpoint_objects: Vec<Option<EndpointObjects>> = Vec::new();
        if affinity.is_some() {
            endpoint_objects.resize_with(port.endpoints.len(), || None);
            for &i in &port.selection.reachable {
                endpoint_objects[i] = Some(EndpointObjects::new(port, &port.endpoints[i]));
            }
        }

        // 1. Endpoint chains (affinity only) and hairpin elements of local endpoints.
        for &i in &port.selection.reachable {
            let endpoint = &port.endpoints[i];
            if let Some(Some(objects)) = endpoint_objects.get(i) {
                self.out.chain(&objects.chain, None, None);
            }
            if endpoint.local {
                let ip = Value::Addr(endpoint.ip());
                self.out.element(
                    HAIRPIN_CONNECTIONS,
                    vec![
                        ip.clone(),
                        ip,
                        Value::Protocol(protocol),
                        Value::Port(endpoint.addr.port()),
                    ],
                    None,
                    None,
                );
            }
        }

        // 2. Policy and external chains.
        if port.uses_cluster_chain() {
            self.out.chain(&chains.cluster, None, None);
        }
        if port.uses_local_chain() {
            self.out.chain(&chains.local, None, None);
        }
        if port.uses_external_chain() {
            self.out.chain(&chains.external, None, None);
        }

        // 3. Elements: where each of the service's addresses goes, or why it is refused.
        self.elements(port, &chains);

        // 4. Rules of the service's chains.
        if port.uses_external_chain() {
            self.external_chain(port, &chains);
        }
        if uses_firewall(port) {
            self.firewall_chain(port, &chains);
        }
        match affinity {
            None => {
                if port.uses_cluster_chain() {
                    self.dnat_rule(port, &chains.cluster, port.cluster_endpoints());
                }
                if port.uses_local_chain() {
                    self.dnat_rule(port, &chains.local, port.local_endpoints());
                }
            }
            Some(timeout) => {
                let reachable = || {
                    port.selection
                        .reachable
                        .iter()
                        .filter_map(|&i| Some((&port.endpoints[i], endpoint_objects[i].as_ref()?)))
                };
                for (_, objects) in reachable() {
                    self.out.set(Set {
                        name: objects.affinity_set.clone(),
                        key_type: vec![self.addr_type()],
                        // `dynamic` always: some kernels add it implicitly, and re-adding the
                        // set without it would then fail as a flag change (§5.9).
                        flags: vec![SetFlag::Dynamic, SetFlag::Timeout],
                        timeout: Some(timeout),
                        size: None,
                        comment: None,
                    });
                }
                if port.uses_cluster_chain() {
                    let objects = pick(&endpoint_objects, &port.selection.cluster);
                    self.affinity_dispatch(&chains.cluster, objects);
                }
                if port.uses_local_chain() {
                    let objects = pick(&endpoint_objects, &port.selection.local);
                    self.affinity_dispatch(&chains.local, objects);
                }
                for (endpoint, objects) in reachable() {
                    self.out.rule(
                        &objects.chain,
                        Rule::new(
                            vec![],
                            vec![Statement::UpdateSet {
                                set: objects.affinity_set.clone(),
                                field: Field::SourceAddr,
                            }],
                        ),
                    );
                    self.out.rule(
                        &objects.chain,
                        Rule::new(vec![l4proto(port)], vec![Statement::Dnat(endpoint.addr)]),
                    );
                }
            }
        }
    }

    /// §5.7 items 1–6: map and set elements of one service port.
    fn elements(&mut self, port: &ServicePort, chains: &PortChains) {
        let protocol = Value::Protocol(port.name.protocol);
        let service_key =
            |ip: IpAddr| vec![Value::Addr(ip), protocol.clone(), Value::Port(port.port)];
        let comment: Name = truncate_comment(&port.name.to_string()).into();
        let has_any = port.has_any_endpoints();
        let goto_external = Verdict::Goto(chains.external.clone());
        let external_refusal = port.external_refusal().map(|v| self.refusal(v));

        self.out
            .element(CLUSTER_IPS, vec![Value::Addr(port.cluster_ip)], None, None);
        match port.internal_refusal() {
            None => {
                let internal_chain = if port.internal_policy_local {
                    &chains.local
                } else {
                    &chains.cluster
                };
                self.out.element(
                    SERVICE_IPS,
                    service_key(port.cluster_ip),
                    Some(Verdict::Goto(internal_chain.clone())),
                    None,
                );
            }
            Some(refusal) => {
                let refusal = self.refusal(refusal);
                self.out.element(
                    NO_ENDPOINT_SERVICES,
                    service_key(port.cluster_ip),
                    Some(refusal),
                    Some(comment.clone()),
                );
            }
        }

        for &ip in &port.external_ips {
            if has_any {
                self.out.element(
                    SERVICE_IPS,
                    service_key(ip),
                    Some(goto_external.clone()),
                    None,
                );
            }
            if let Some(refusal) = &external_refusal {
                self.out.element(
                    NO_ENDPOINT_SERVICES,
                    service_key(ip),
                    Some(refusal.clone()),
                    Some(comment.clone()),
                );
            }
        }

        // The firewall chain exists whenever source ranges apply, endpoints or not (§2.7).
        let firewall = uses_firewall(port);
        if firewall {
            self.out.chain(&chains.firewall, None, None);
        }
        for &ip in &port.load_balancer_ips {
            if has_any {
                self.out.element(
                    SERVICE_IPS,
                    service_key(ip),
                    Some(goto_external.clone()),
                    None,
                );
            }
            if firewall {
                self.out.element(
                    FIREWALL_IPS,
                    service_key(ip),
                    Some(Verdict::Goto(chains.firewall.clone())),
                    None,
                );
            }
        }
        if let Some(refusal) = &external_refusal {
            for &ip in &port.load_balancer_ips {
                self.out.element(
                    NO_ENDPOINT_SERVICES,
                    service_key(ip),
                    Some(refusal.clone()),
                    Some(comment.clone()),
                );
            }
        }

        // NodePorts are never subject to source ranges.
        if let Some(node_port) = port.node_port {
            let key = vec![protocol.clone(), Value::Port(node_port)];
            if has_any {
                self.out.element(
                    SERVICE_NODEPORTS,
                    key.clone(),
                    Some(goto_external.clone()),
                    None,
                );
            }
            if let Some(refusal) = external_refusal {
                self.out
                    .element(NO_ENDPOINT_NODEPORTS, key, Some(refusal), Some(comment));
            }
        }
    }

    fn refusal(&self, refusal: NoEndpointVerdict) -> Verdict {
        match refusal {
            NoEndpointVerdict::Reject => self.reject_verdict.clone(),
            NoEndpointVerdict::Drop => Verdict::Drop,
        }
    }

    /// The external chain: masquerade and short-circuit rules, then the policy chain (§5A.10).
    fn external_chain(&mut self, port: &ServicePort, chains: &PortChains) {
        let ext = &chains.external;
        let mark_or = || Statement::MarkOr(self.mark.clone());
        let goto_cluster = || verdict(Verdict::Goto(chains.cluster.clone()));
        let mut rules = Vec::new();
        if !port.external_policy_local {
            rules.push(Rule::new(vec![], vec![mark_or()]).with_comment("masquerade"));
        } else {
            if let Some(cidr) = self.pod_cidr {
                rules.push(
                    Rule::new(
                        vec![compare(Field::SourceAddr, false, Value::Net(cidr))],
                        vec![goto_cluster()],
                    )
                    .with_comment("short-circuit pod traffic"),
                );
            }
            rules.push(
                Rule::new(vec![Match::FibLocal(Direction::Source)], vec![mark_or()])
                    .with_comment("masquerade local traffic"),
            );
            rules.push(
                Rule::new(
                    vec![Match::FibLocal(Direction::Source)],
                    vec![goto_cluster()],
                )
                .with_comment("short-circuit local traffic"),
            );
        }
        if port.has_external_endpoints() {
            let policy_chain = if port.external_policy_local {
                &chains.local
            } else {
                &chains.cluster
            };
            rules.push(Rule::new(
                vec![],
                vec![verdict(Verdict::Goto(policy_chain.clone()))],
            ));
        }
        for rule in rules {
            self.out.rule(ext, rule);
        }
    }

    /// Drops sources outside loadBalancerSourceRanges. The node's own LB IPs are allowed too when
    /// a range contains the node IP: a VIP-like LB address loops back with itself as source.
    fn firewall_chain(&mut self, port: &ServicePort, chains: &PortChains) {
        let node_ip = self.config.primary_node_ip(self.family);
        let mut sources: Vec<Value> = port.source_ranges.iter().copied().map(Value::Net).collect();
        if node_ip.is_some_and(|ip| port.source_ranges.iter().any(|r| r.contains(&ip))) {
            sources.extend(port.load_balancer_ips.iter().copied().map(Value::Addr));
        }
        self.out.rule(
            &chains.firewall,
            Rule::new(
                vec![compare(
                    Field::SourceAddr,
                    true,
                    Value::Set {
                        members: sources.into(),
                        joining: Joining::Spaced,
                    },
                )],
                vec![verdict(Verdict::Drop)],
            ),
        );
    }

    /// Without affinity: one DNAT rule through a `numgen`-indexed anonymous map (§5A.7, §5A.8).
    fn dnat_rule<'e>(
        &mut self,
        port: &ServicePort,
        chain: &Name,
        endpoints: impl Iterator<Item = &'e Endpoint>,
    ) {
        let targets: Vec<SocketAddr> = endpoints.map(|e| e.addr).collect();
        self.out.rule(
            chain,
            Rule::new(vec![l4proto(port)], vec![Statement::RandomDnat(targets)]),
        );
    }

    /// With affinity: a lookup per endpoint in sorted order, then a random choice (§5A.9).
    fn affinity_dispatch(&mut self, chain: &Name, endpoints: Vec<&EndpointObjects>) {
        let mut choices = Vec::new();
        for objects in endpoints {
            self.out.rule(
                chain,
                Rule::new(
                    vec![Match::InSet {
                        negated: false,
                        key: vec![Field::SourceAddr],
                        set: objects.affinity_set.clone(),
                    }],
                    vec![verdict(Verdict::Goto(objects.chain.clone()))],
                ),
            );
            choices.push(Verdict::Goto(objects.chain.clone()));
        }
        self.out.rule(
            chain,
            Rule::new(vec![], vec![Statement::RandomVerdict(choices)]),
        );
    }
}

/// The per-endpoint objects of the endpoints at `indices`, in that order.
fn pick<'o>(objects: &'o [Option<EndpointObjects>], indices: &[usize]) -> Vec<&'o EndpointObjects> {
    indices
        .iter()
        .filter_map(|&i| objects.get(i).and_then(Option::as_ref))
        .collect()
}

/// nftables creates the firewall chain whenever LB IPs and source ranges exist (§2.7).
fn uses_firewall(port: &ServicePort) -> bool {
    !port.load_balancer_ips.is_empty() && !port.source_ranges.is_empty()
}

/// `ip daddr . meta l4proto . th dport`
const SERVICE_TUPLE: [Field; 3] = [
    Field::DestinationAddr,
    Field::L4Proto,
    Field::DestinationPort,
];
/// `meta l4proto . th dport`
const NODEPORT_TUPLE: [Field; 2] = [Field::L4Proto, Field::DestinationPort];

fn verdict(v: Verdict) -> Statement {
    Statement::Verdict(v)
}

fn vmap(key: &[Field], map: &str) -> Statement {
    Statement::VerdictMap {
        key: key.to_vec(),
        map: map.into(),
    }
}

fn compare(field: Field, negated: bool, value: Value) -> Match {
    Match::Compare {
        field,
        negated,
        value,
    }
}

fn in_set(field: Field, set: &str) -> Match {
    Match::InSet {
        negated: false,
        key: vec![field],
        set: set.into(),
    }
}

/// `meta l4proto <P>` of the service port.
fn l4proto(port: &ServicePort) -> Match {
    compare(Field::L4Proto, false, Value::Protocol(port.name.protocol))
}

/// Adds an element to `elements`, or replaces the one with the same container and key.
fn insert_element(
    elements: &mut Vec<Arc<Element>>,
    index: &mut ElementIndex,
    element: Arc<Element>,
) {
    let by_key = match index.get_mut(&element.container) {
        Some(by_key) => by_key,
        None => index.entry(element.container.clone()).or_default(),
    };
    match by_key.remove(element.key.as_slice()) {
        Some(i) => {
            by_key.insert(ElementByKey(element.clone()), i);
            elements[i] = element;
        }
        None => {
            by_key.insert(ElementByKey(element.clone()), elements.len());
            elements.push(element);
        }
    }
}

/// Where each element is in a list of elements, by container and key.
type ElementIndex = FxHashMap<Name, FxHashMap<ElementByKey, usize>>;

/// A comment cut to knftables' limit, on a character boundary.
fn truncate_comment(text: &str) -> &str {
    if text.len() <= COMMENT_LENGTH_MAX {
        return text;
    }
    let mut cut = COMMENT_LENGTH_MAX;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    &text[..cut]
}

/// What the translation of one service port created, in creation order.
#[derive(Debug, Default)]
pub struct PortObjects {
    chains: Vec<Chain>,
    sets: Vec<Set>,
    maps: Vec<Map>,
    /// Shared with the rulesets built from them (and what the syncer committed).
    elements: Vec<Arc<Element>>,
}

/// Collects objects in creation order; chains, sets, maps and elements are unique by identity.
#[derive(Default)]
struct Builder {
    chains: Vec<Chain>,
    chain_index: FxHashMap<Name, usize>,
    sets: Vec<Set>,
    set_index: FxHashMap<Name, usize>,
    maps: Vec<Map>,
    map_index: FxHashMap<Name, usize>,
    elements: Vec<Arc<Element>>,
    element_index: ElementIndex,
    /// The table-wide sets and maps (declared before the service ports), shared with the
    /// builders of the service ports: their elements name the container with these, not each
    /// with a copy of its own.
    container_names: Arc<FxHashSet<Name>>,
}

impl Builder {
    /// Declares a chain once; later declarations of the same name are ignored, as kube-proxy's
    /// `ensureChain` does.
    fn chain(&mut self, name: &str, base: Option<BaseChain>, comment: Option<&str>) -> usize {
        if let Some(&i) = self.chain_index.get(name) {
            return i;
        }
        let name: Name = Arc::from(name);
        self.chains.push(Chain {
            name: name.clone(),
            base,
            comment: comment.map(Name::from),
            rules: Default::default(),
        });
        self.chain_index.insert(name, self.chains.len() - 1);
        self.chains.len() - 1
    }

    fn rule(&mut self, chain: &str, rule: Rule) {
        let i = self.chain(chain, None, None);
        Arc::make_mut(&mut self.chains[i].rules).push(rule);
    }

    /// Adds a set, or replaces an earlier one of the same name.
    fn set(&mut self, set: Set) {
        match self.set_index.get(&set.name) {
            Some(&i) => self.sets[i] = set,
            None => {
                self.set_index.insert(set.name.clone(), self.sets.len());
                self.sets.push(set);
            }
        }
    }

    /// Adds a map, or replaces an earlier one of the same name (the `maps` layout's service
    /// ports each declare the endpoint maps they use).
    fn map(&mut self, map: Map) {
        match self.map_index.get(&map.name) {
            Some(&i) => self.maps[i] = map,
            None => {
                self.map_index.insert(map.name.clone(), self.maps.len());
                self.maps.push(map);
            }
        }
    }

    /// Makes the names of the sets and maps declared so far the ones elements of this builder
    /// and its [`Builder::empty_copy`]s refer to.
    fn share_container_names(&mut self) {
        let sets = self.sets.iter().map(|s| s.name.clone());
        let maps = self.maps.iter().map(|m| m.name.clone());
        self.container_names = Arc::new(sets.chain(maps).collect());
    }

    /// An empty builder sharing this one's container names.
    fn empty_copy(&self) -> Builder {
        Builder {
            container_names: self.container_names.clone(),
            ..Builder::default()
        }
    }

    /// Adds an element; an element with the same container and key replaces the earlier one
    /// (the last writer wins, as with kube-proxy's element bookkeeping). An endpoint backing two
    /// service ports thus yields one hairpin element.
    fn element(
        &mut self,
        container: &str,
        key: Vec<Value>,
        value: Option<Verdict>,
        comment: Option<Name>,
    ) {
        let container = match self.container_names.get(container) {
            Some(shared) => shared.clone(),
            None => container.into(),
        };
        self.insert_element(Element {
            container,
            key: key.into(),
            value: value.map(ElementValue::Verdict),
            comment,
        });
    }

    /// Adds an element as [`Builder::element`] does. Elements are kept (per service port, and
    /// a large table has over a million): each takes no more room than it needs, with the
    /// shared name of its container and no spare capacity in its vectors.
    fn insert_element(&mut self, mut element: Element) {
        if let Some(shared) = self.container_names.get(&*element.container) {
            element.container = shared.clone();
        }
        element.key.shrink_to_fit();
        if let Some(ElementValue::Data(data)) = &mut element.value {
            data.shrink_to_fit();
        }
        insert_element(
            &mut self.elements,
            &mut self.element_index,
            Arc::new(element),
        );
    }

    /// Adds parts kept for later, in order, as [`Builder::append`] would: their objects are
    /// copied (cheaply: names, rule lists and elements are shared). Chains, sets and maps are
    /// added on this thread and elements on another: they are independent, and the agent's
    /// sync waits for this.
    fn append_parts(&mut self, parts: &[&PortObjects]) {
        self.reserve(parts);
        let (elements, index) = (&mut self.elements, &mut self.element_index);
        let mut objects = Builder {
            chains: std::mem::take(&mut self.chains),
            chain_index: std::mem::take(&mut self.chain_index),
            sets: std::mem::take(&mut self.sets),
            set_index: std::mem::take(&mut self.set_index),
            maps: std::mem::take(&mut self.maps),
            map_index: std::mem::take(&mut self.map_index),
            ..Builder::default()
        };
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for part in parts {
                    for element in &part.elements {
                        insert_element(elements, index, element.clone());
                    }
                }
            });
            for part in parts {
                objects.append_objects(part);
            }
        });
        self.chains = objects.chains;
        self.chain_index = objects.chain_index;
        self.sets = objects.sets;
        self.set_index = objects.set_index;
        self.maps = objects.maps;
        self.map_index = objects.map_index;
    }

    /// Adds what another builder built after this one's objects, exactly as if its calls had
    /// been made on this builder. Its elements are moved, not copied.
    fn append(&mut self, other: Builder) {
        let PortObjects {
            chains,
            sets,
            maps,
            elements,
        } = other.into_part();
        self.append_objects(&PortObjects {
            chains,
            sets,
            maps,
            elements: Vec::new(),
        });
        self.elements.reserve(elements.len());
        for element in elements {
            insert_element(&mut self.elements, &mut self.element_index, element);
        }
    }

    /// The chains, sets and maps of a part (not its elements).
    fn append_objects(&mut self, part: &PortObjects) {
        for chain in &part.chains {
            match self.chain_index.get(&chain.name) {
                Some(&i) => {
                    let rules = &mut self.chains[i].rules;
                    if rules.is_empty() {
                        *rules = chain.rules.clone();
                    } else {
                        Arc::make_mut(rules).extend(chain.rules.iter().cloned());
                    }
                }
                None => {
                    self.chain_index
                        .insert(chain.name.clone(), self.chains.len());
                    self.chains.push(chain.clone());
                }
            }
        }
        for set in &part.sets {
            self.set(set.clone());
        }
        for map in &part.maps {
            self.map(map.clone());
        }
    }

    /// Makes room for `parts` at once, instead of growing (and re-hashing) step by step.
    fn reserve(&mut self, parts: &[&PortObjects]) {
        let chains: usize = parts.iter().map(|p| p.chains.len()).sum();
        let sets: usize = parts.iter().map(|p| p.sets.len()).sum();
        let elements: usize = parts.iter().map(|p| p.elements.len()).sum();
        self.chains.reserve(chains);
        self.chain_index.reserve(chains);
        self.sets.reserve(sets);
        self.set_index.reserve(sets);
        self.elements.reserve(elements);
    }

    /// The objects built, without the indexes.
    fn into_part(self) -> PortObjects {
        PortObjects {
            chains: self.chains,
            sets: self.sets,
            maps: self.maps,
            elements: self.elements,
        }
    }

    fn finish(self, table: Table) -> Ruleset {
        Ruleset {
            table,
            chains: self.chains,
            sets: self.sets,
            maps: self.maps,
            elements: self.elements,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_are_cut_on_a_character_boundary() {
        assert_eq!(truncate_comment("ns/svc:p"), "ns/svc:p");
        let ascii = "a".repeat(200);
        assert_eq!(truncate_comment(&ascii).len(), COMMENT_LENGTH_MAX);
        // 127 ASCII bytes then a two-byte character straddling the limit.
        let straddling = format!("{}é", "a".repeat(127));
        assert_eq!(truncate_comment(&straddling), "a".repeat(127));
    }

    /// The cached translation must equal the full one, before and after changes, and must
    /// translate only the ports that changed.
    #[test]
    fn cached_translation_equals_a_full_one() {
        let mut config = NodeConfig::new("node-1");
        config.cluster_cidrs = vec!["10.128.0.0/9".parse().unwrap()];
        config.node_ips = vec!["10.0.0.1".parse().unwrap()];
        let state = crate::synthetic::cluster(60, 3).expect("fits");
        let model = crate::pipeline::plan(&state, &config).models.remove(0);
        let mut cache = PortCache::default();
        let cached = translate_cached(&model, &config, &mut cache);
        assert_eq!(cached, translate(&model, &config));
        assert_eq!(cache.len(), model.ports.len());

        // One port changed (a new Arc), one removed: the rest is reused as it was.
        let mut next = model.clone();
        let mut changed = (*next.ports[7]).clone();
        changed.endpoints.truncate(1);
        changed.selection = crate::model::EndpointSelection::default();
        next.ports[7] = Arc::new(changed);
        next.ports.remove(3);
        let kept = cache
            .get(&next.ports[10].name)
            .map(|p| p.chains[0].rules.clone());
        let cached = translate_cached(&next, &config, &mut cache);
        assert_eq!(cached, translate(&next, &config));
        assert_eq!(cache.len(), next.ports.len());
        let reused = cache
            .get(&next.ports[10].name)
            .map(|p| p.chains[0].rules.clone());
        assert!(
            Arc::ptr_eq(&kept.unwrap(), &reused.unwrap()),
            "an unchanged port was translated again"
        );

        // Other node settings: nothing is reused.
        config.masquerade_all = true;
        assert_eq!(
            translate_cached(&next, &config, &mut cache),
            translate(&next, &config)
        );
    }

    #[test]
    fn builder_keeps_one_object_per_identity() {
        let mut b = Builder::default();
        b.chain("c", None, Some("first"));
        b.chain("c", None, Some("second"));
        b.rule("c", Rule::new(vec![], vec![verdict(Verdict::Drop)]));
        let key = vec![Value::Port(80)];
        b.element("m", key.clone(), Some(Verdict::Drop), None);
        b.element("m", vec![Value::Port(81)], Some(Verdict::Drop), None);
        b.element("m", key.clone(), Some(Verdict::Reject), None);
        let ruleset = b.finish(Table {
            family: IpFamily::V4,
            name: TABLE_NAME.into(),
            comment: None,
        });
        assert_eq!(ruleset.chains.len(), 1);
        assert_eq!(ruleset.chains[0].comment.as_deref(), Some("first"));
        assert_eq!(ruleset.chains[0].rules.len(), 1);
        // Same key: replaced in place, the last value wins.
        assert_eq!(ruleset.elements.len(), 2);
        assert_eq!(ruleset.elements[0].key.as_slice(), key.as_slice());
        assert_eq!(
            ruleset.elements[0].value,
            Some(ElementValue::Verdict(Verdict::Reject))
        );
    }
}
