//! ProxyModel → iptables [`Ruleset`]: a pure function of the model and the node settings.
//! Spec §4.5 (static rules) and §4.6–§4.9 (per service port); the rule text is kube-proxy's.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use smallvec::smallvec;

use super::ruleset::{
    Addr, AddrType, Chain, ChainName, Match, Matches, RecentCheck, Rule, Ruleset, Table, TableName,
    Target,
};
use super::{
    KUBE_EXTERNAL_SERVICES, KUBE_FIREWALL, KUBE_FORWARD, KUBE_MARK_MASQ, KUBE_NODEPORTS,
    KUBE_POSTROUTING, KUBE_PROXY_FIREWALL, KUBE_SERVICES,
};
use crate::config::NodeConfig;
use crate::family::IpFamily;
use crate::model::{Endpoint, NoEndpointVerdict, ProxyModel, ServicePort};
use crate::names::IptablesPortNames;

pub(super) const NFACCT_INVALID_DROPPED: &str = "ct_state_invalid_dropped_pkts";
pub(super) const NFACCT_LOCALHOST_NODEPORTS: &str = "localhost_nps_accepted_pkts";
const NODEPORTS_TAIL_COMMENT: &str =
    "kubernetes service nodeports; NOTE: this must be the last rule in this chain";

/// Builds the complete ruleset of one family. Service ports are translated in parallel chunks
/// and merged in model order, so the result does not depend on the number of threads.
pub fn translate(model: &ProxyModel, config: &NodeConfig) -> Ruleset {
    let mut translator = Translator::new(model, config);
    translator.static_rules();
    let parts = crate::parallel::map_chunks(&model.ports, |ports| {
        let mut part = translator.empty_copy();
        for port in ports {
            part.service_port(port);
        }
        part
    });
    for part in parts {
        translator.filter.append(&part.filter);
        translator.nat.append(&part.nat);
    }
    translator.forward_rules();
    translator.nodeports_tail();
    Ruleset {
        family: translator.family,
        filter: translator.filter.finish(),
        nat: translator.nat.finish(),
    }
}

/// Each service port's rules, kept between translations of one family (see
/// [`crate::port_cache`]).
pub type PortCache = crate::port_cache::PortCache<PortRules>;

/// What one service port added to each table.
pub struct PortRules {
    filter: TableBuilder,
    nat: TableBuilder,
}

/// [`translate`], reusing the translation of every port found unchanged in `cache`, and
/// keeping the new ones there. The result is the same as [`translate`]'s.
pub fn translate_cached(model: &ProxyModel, config: &NodeConfig, cache: &mut PortCache) -> Ruleset {
    let mut translator = Translator::new(model, config);
    translator.static_rules();
    // Large-cluster mode (no endpoint comments) changes every port's rules.
    let settings = format!("{:?} {} {config:?}", model.family, translator.large_cluster);
    let parts = cache.update(settings, &model.ports, |port| {
        let mut part = translator.empty_copy();
        part.service_port(port);
        PortRules {
            filter: part.filter,
            nat: part.nat,
        }
    });
    for part in parts {
        translator.filter.append(&part.filter);
        translator.nat.append(&part.nat);
    }
    translator.forward_rules();
    translator.nodeports_tail();
    Ruleset {
        family: translator.family,
        filter: translator.filter.finish(),
        nat: translator.nat.finish(),
    }
}

#[derive(Clone)]
struct Translator<'a> {
    config: &'a NodeConfig,
    family: IpFamily,
    mark: Arc<str>,
    /// Omit per-endpoint comments (kube-proxy's large-cluster mode).
    large_cluster: bool,
    localhost_nodeports: bool,
    /// `None`: NodePorts on every local address.
    nodeport_ips: Option<Vec<IpAddr>>,
    mark_masq: ChainName,
    filter: TableBuilder,
    nat: TableBuilder,
}

/// The names of one service port's chains (§4.3).
struct PortChains {
    cluster: ChainName,
    local: ChainName,
    external: ChainName,
    firewall: ChainName,
    names: IptablesPortNames,
}

impl PortChains {
    fn new(port: &ServicePort) -> PortChains {
        let names = IptablesPortNames::new(&port.name);
        PortChains {
            cluster: ChainName::fixed(&names.chain("KUBE-SVC")),
            local: ChainName::fixed(&names.chain("KUBE-SVL")),
            external: ChainName::fixed(&names.chain("KUBE-EXT")),
            firewall: ChainName::fixed(&names.chain("KUBE-FW")),
            names,
        }
    }
}

impl<'a> Translator<'a> {
    fn new(model: &'a ProxyModel, config: &'a NodeConfig) -> Self {
        let family = model.family;
        // iptables mode accepts NodePorts on every local address unless told otherwise (§3).
        let nodeport_cidrs = config.nodeport_networks(family, None);
        // kube-proxy turns localhost NodePorts off unless NodePorts are accepted on 127.0.0.0/8.
        let localhost_nodeports = config.iptables.localhost_nodeports
            && family == IpFamily::V4
            && nodeport_cidrs.as_ref().is_none_or(|cidrs| {
                cidrs
                    .iter()
                    .any(|c| c.contains(&IpAddr::from([127, 0, 0, 0])))
            });
        let nodeport_ips = nodeport_cidrs.map(|cidrs| local_addresses_in(config, family, &cidrs));
        let mut filter_chains = vec![
            KUBE_SERVICES,
            KUBE_EXTERNAL_SERVICES,
            KUBE_FORWARD,
            KUBE_NODEPORTS,
            KUBE_PROXY_FIREWALL,
        ];
        if localhost_nodeports {
            filter_chains.push(KUBE_FIREWALL);
        }
        let filter = TableBuilder::new(TableName::Filter, &filter_chains);
        let nat = TableBuilder::new(
            TableName::Nat,
            &[
                KUBE_SERVICES,
                KUBE_NODEPORTS,
                KUBE_POSTROUTING,
                KUBE_MARK_MASQ,
            ],
        );
        Translator {
            config,
            family,
            mark: config.masquerade_mark.text.as_str().into(),
            large_cluster: model.total_endpoints()
                > config.iptables.large_cluster_endpoints_threshold,
            localhost_nodeports,
            nodeport_ips,
            mark_masq: ChainName::fixed(KUBE_MARK_MASQ),
            filter,
            nat,
        }
    }

    /// The same settings with empty tables, to translate a share of the service ports.
    fn empty_copy(&self) -> Translator<'a> {
        Translator {
            filter: self.filter.empty_copy(),
            nat: self.nat.empty_copy(),
            ..self.clone()
        }
    }

    /// §4.5: masquerading, and the anti-martian copy for localhost NodePorts.
    fn static_rules(&mut self) {
        let mark = &self.mark;
        if self.localhost_nodeports {
            self.filter.add(
                KUBE_FIREWALL,
                Rule::new(
                    smallvec![
                        comment("block incoming localnet connections"),
                        dst(Addr::Net(IpFamily::V4.loopback_net())),
                        Match::Source {
                            addr: Addr::Net(IpFamily::V4.loopback_net()),
                            negated: true,
                        },
                        Match::ConntrackState {
                            states: "RELATED,ESTABLISHED,DNAT",
                            negated: true,
                        },
                    ],
                    Target::Drop,
                ),
            );
        }
        let postrouting = [
            Rule::new(
                smallvec![Match::Mark {
                    mark: mark.clone(),
                    negated: true,
                }],
                Target::Return,
            ),
            Rule::new(smallvec![], Target::MarkXor(mark.clone())),
            Rule::new(
                smallvec![comment("kubernetes service traffic requiring SNAT")],
                Target::Masquerade {
                    random_fully: self.config.iptables.random_fully,
                },
            ),
        ];
        for rule in postrouting {
            self.nat.add(KUBE_POSTROUTING, rule);
        }
        self.nat.add(
            KUBE_MARK_MASQ,
            Rule::new(smallvec![], Target::MarkOr(mark.clone())),
        );
    }

    /// §4.5: filter `KUBE-FORWARD`, written after all services.
    fn forward_rules(&mut self) {
        if !self.config.iptables.conntrack_tcp_be_liberal {
            let mut matches = smallvec![Match::ConntrackState {
                states: "INVALID",
                negated: false,
            }];
            if self.config.iptables.nfacct_counters {
                matches.push(Match::Nfacct(NFACCT_INVALID_DROPPED));
            }
            self.filter
                .add(KUBE_FORWARD, Rule::new(matches, Target::Drop));
        }
        self.filter.add(
            KUBE_FORWARD,
            Rule::new(
                smallvec![
                    comment("kubernetes forwarding rules"),
                    Match::Mark {
                        mark: self.mark.clone(),
                        negated: false,
                    },
                ],
                Target::Accept,
            ),
        );
        self.filter.add(
            KUBE_FORWARD,
            Rule::new(
                smallvec![
                    comment("kubernetes forwarding conntrack rule"),
                    Match::ConntrackState {
                        states: "RELATED,ESTABLISHED",
                        negated: false,
                    },
                ],
                Target::Accept,
            ),
        );
    }

    /// §4.5: the jump to `KUBE-NODEPORTS`, which must be the last rule of nat `KUBE-SERVICES`.
    fn nodeports_tail(&mut self) {
        let jump = Target::Jump(ChainName::fixed(KUBE_NODEPORTS));
        match &self.nodeport_ips {
            None => {
                let mut matches = smallvec![
                    comment(NODEPORTS_TAIL_COMMENT),
                    Match::AddrType(AddrType::DestinationLocal),
                ];
                if self.family == IpFamily::V6 || !self.localhost_nodeports {
                    matches.push(Match::Destination {
                        addr: Addr::Net(self.family.loopback_net()),
                        negated: true,
                    });
                }
                self.nat.add(KUBE_SERVICES, Rule::new(matches, jump));
            }
            Some(ips) => {
                for ip in ips {
                    if ip.is_loopback() && !self.localhost_nodeports {
                        continue; // never on IPv6, and only when enabled on IPv4
                    }
                    self.nat.add(
                        KUBE_SERVICES,
                        Rule::new(
                            smallvec![comment(NODEPORTS_TAIL_COMMENT), dst(Addr::Host(*ip))],
                            jump.clone(),
                        ),
                    );
                }
            }
        }
    }

    fn service_port(&mut self, port: &ServicePort) {
        let chains = PortChains::new(port);
        self.capture_rules(port, &chains);
        self.service_chains(port, &chains);
    }

    /// §4.6.1: where traffic for the service's addresses goes, or why it is refused.
    fn capture_rules(&mut self, port: &ServicePort, chains: &PortChains) {
        let spn = &port.name;
        let proto = Match::Protocol(spn.protocol);
        let dport = Match::DestinationPort(port.port);
        let to = |ip: IpAddr| dst(Addr::Host(ip));
        let has_any = port.has_any_endpoints();
        let uses_firewall =
            has_any && !port.load_balancer_ips.is_empty() && !port.source_ranges.is_empty();
        let internal_chain = if port.internal_policy_local {
            &chains.local
        } else {
            &chains.cluster
        };
        let external_refusal = port.external_refusal();
        let refuse = |verdict: NoEndpointVerdict| match verdict {
            NoEndpointVerdict::Reject => Target::Reject,
            NoEndpointVerdict::Drop => Target::Drop,
        };

        // 1. The cluster IP.
        match port.internal_refusal() {
            None => self.nat.add(
                KUBE_SERVICES,
                Rule::new(
                    smallvec![
                        comment(&format!("{spn} cluster IP")),
                        proto.clone(),
                        to(port.cluster_ip),
                        dport.clone(),
                    ],
                    Target::Jump(*internal_chain),
                ),
            ),
            Some(verdict) => self.filter.add(
                KUBE_SERVICES,
                Rule::new(
                    smallvec![
                        comment(&port.refusal_comment(verdict)),
                        proto.clone(),
                        to(port.cluster_ip),
                        dport.clone(),
                    ],
                    refuse(verdict),
                ),
            ),
        }

        // 2. External IPs.
        for &ip in &port.external_ips {
            if has_any {
                self.nat.add(
                    KUBE_SERVICES,
                    Rule::new(
                        smallvec![
                            comment(&format!("{spn} external IP")),
                            proto.clone(),
                            to(ip),
                            dport.clone(),
                        ],
                        Target::Jump(chains.external),
                    ),
                );
            }
            if let Some(verdict) = external_refusal {
                self.filter.add(
                    KUBE_EXTERNAL_SERVICES,
                    Rule::new(
                        smallvec![
                            comment(&port.refusal_comment(verdict)),
                            proto.clone(),
                            to(ip),
                            dport.clone(),
                        ],
                        refuse(verdict),
                    ),
                );
            }
        }

        // 3. Load-balancer IPs, through the firewall chain when source ranges apply.
        for &ip in &port.load_balancer_ips {
            if has_any {
                let next = if uses_firewall {
                    &chains.firewall
                } else {
                    &chains.external
                };
                self.nat.add(
                    KUBE_SERVICES,
                    Rule::new(
                        smallvec![
                            comment(&format!("{spn} loadbalancer IP")),
                            proto.clone(),
                            to(ip),
                            dport.clone(),
                        ],
                        Target::Jump(*next),
                    ),
                );
            }
            if uses_firewall {
                self.filter.add(
                    KUBE_PROXY_FIREWALL,
                    Rule::new(
                        smallvec![
                            comment(&format!(
                                "{spn} traffic not accepted by KUBE-FW-{}",
                                chains.names.hash
                            )),
                            proto.clone(),
                            to(ip),
                            dport.clone(),
                        ],
                        Target::Drop,
                    ),
                );
            }
        }
        // 4. Load-balancer IPs without endpoints for external traffic.
        if let Some(verdict) = external_refusal {
            for &ip in &port.load_balancer_ips {
                self.filter.add(
                    KUBE_EXTERNAL_SERVICES,
                    Rule::new(
                        smallvec![
                            comment(&port.refusal_comment(verdict)),
                            proto.clone(),
                            to(ip),
                            dport.clone(),
                        ],
                        refuse(verdict),
                    ),
                );
            }
        }

        // 5. NodePort (never subject to source ranges).
        if let Some(node_port) = port.node_port {
            let spn_comment = comment(&spn.to_string());
            if has_any {
                if self.localhost_nodeports && self.config.iptables.nfacct_counters {
                    self.nat.add(
                        KUBE_NODEPORTS,
                        Rule::new(
                            smallvec![
                                spn_comment.clone(),
                                proto.clone(),
                                dst(Addr::Net(IpFamily::V4.loopback_net())),
                                Match::DestinationPort(node_port),
                                Match::Nfacct(NFACCT_LOCALHOST_NODEPORTS),
                            ],
                            Target::Jump(chains.external),
                        ),
                    );
                }
                self.nat.add(
                    KUBE_NODEPORTS,
                    Rule::new(
                        smallvec![
                            spn_comment,
                            proto.clone(),
                            Match::DestinationPort(node_port),
                        ],
                        Target::Jump(chains.external),
                    ),
                );
            }
            if let Some(verdict) = external_refusal {
                self.filter.add(
                    KUBE_EXTERNAL_SERVICES,
                    Rule::new(
                        smallvec![
                            comment(&port.refusal_comment(verdict)),
                            Match::AddrType(AddrType::DestinationLocal),
                            proto.clone(),
                            Match::DestinationPort(node_port),
                        ],
                        refuse(verdict),
                    ),
                );
            }
        }

        // 6. The health-check node port (always TCP).
        if let Some(hc_port) = port.health_check_node_port {
            self.filter.add(
                KUBE_NODEPORTS,
                Rule::new(
                    smallvec![
                        comment(&format!("{spn} health check node port")),
                        Match::Protocol(crate::model::Protocol::Tcp),
                        Match::DestinationPort(hc_port),
                    ],
                    Target::Accept,
                ),
            );
        }
    }

    /// §4.6.2: the service's own chains, built locally and handed to the nat table at once.
    fn service_chains(&mut self, port: &ServicePort, chains: &PortChains) {
        let spn = &port.name;
        let mark_masq = || Target::Jump(self.mark_masq);
        let local_cidr = self.config.local_cidr(self.family);
        let mut cluster = Chain::new(chains.cluster, 0);
        let mut local = Chain::new(chains.local, 0);

        // 7. Masquerade cluster-IP traffic from outside the pod network.
        if port.has_internal_endpoints() && (self.config.masquerade_all || local_cidr.is_some()) {
            let mut matches: Matches = smallvec![
                comment(&format!("{spn} cluster IP")),
                Match::Protocol(spn.protocol),
                dst(Addr::Host(port.cluster_ip)),
                Match::DestinationPort(port.port),
            ];
            if let (false, Some(cidr)) = (self.config.masquerade_all, local_cidr) {
                matches.push(Match::Source {
                    addr: Addr::Net(cidr),
                    negated: true,
                });
            }
            let internal = if port.internal_policy_local {
                &mut local
            } else {
                &mut cluster
            };
            internal.push(Rule::new(matches, mark_masq()));
        }

        // 8. The external chain.
        if port.uses_external_chain() {
            let mut ext = Chain::new(chains.external, 4);
            if !port.external_policy_local {
                ext.push(Rule::new(
                    smallvec![comment(&format!(
                        "masquerade traffic for {spn} external destinations"
                    ))],
                    mark_masq(),
                ));
            } else {
                if let Some(cidr) = local_cidr {
                    ext.push(Rule::new(
                        smallvec![
                            comment(&format!("pod traffic for {spn} external destinations")),
                            Match::Source {
                                addr: Addr::Net(cidr),
                                negated: false,
                            },
                        ],
                        Target::Jump(chains.cluster),
                    ));
                }
                ext.push(Rule::new(
                    smallvec![
                        comment(&format!(
                            "masquerade LOCAL traffic for {spn} external destinations"
                        )),
                        Match::AddrType(AddrType::SourceLocal),
                    ],
                    mark_masq(),
                ));
                ext.push(Rule::new(
                    smallvec![
                        comment(&format!(
                            "route LOCAL traffic for {spn} external destinations"
                        )),
                        Match::AddrType(AddrType::SourceLocal),
                    ],
                    Target::Jump(chains.cluster),
                ));
            }
            if port.has_external_endpoints() {
                let policy_chain = if port.external_policy_local {
                    &chains.local
                } else {
                    &chains.cluster
                };
                ext.push(Rule::new(smallvec![], Target::Jump(*policy_chain)));
            }
            self.nat.push_chain(ext);
        }

        // 9. The firewall chain for loadBalancerSourceRanges.
        if port.has_any_endpoints()
            && !port.load_balancer_ips.is_empty()
            && !port.source_ranges.is_empty()
        {
            let mut fw = Chain::new(chains.firewall, port.source_ranges.len() + 1);
            let lb_comment = comment(&format!("{spn} loadbalancer IP"));
            let to_external = || Target::Jump(chains.external);
            let from = |addr| Match::Source {
                addr,
                negated: false,
            };
            for range in &port.source_ranges {
                fw.push(Rule::new(
                    smallvec![lb_comment.clone(), from(Addr::Net(*range))],
                    to_external(),
                ));
            }
            // A node reaching a VIP-like LB IP that is also local loops back with the VIP as
            // source; let that through when the node itself is allowed.
            let node_ip = self.config.primary_node_ip(self.family);
            if port
                .source_ranges
                .iter()
                .any(|range| node_ip.is_some_and(|ip| range.contains(&ip)))
            {
                for &ip in &port.load_balancer_ips {
                    fw.push(Rule::new(
                        smallvec![lb_comment.clone(), from(Addr::Host(ip))],
                        to_external(),
                    ));
                }
            }
            fw.push(Rule {
                matches: smallvec![comment(&format!(
                    "other traffic to {spn} will be dropped by KUBE-PROXY-FIREWALL"
                ))],
                target: None,
            });
            self.nat.push_chain(fw);
        }

        // The endpoint chain names, computed once per endpoint (indexed like `port.endpoints`).
        let mut endpoint_chains: Vec<Option<ChainName>> = vec![None; port.endpoints.len()];
        for &i in &port.selection.reachable {
            endpoint_chains[i] = Some(ChainName::fixed(
                &chains.names.endpoint_chain(&port.endpoints[i]),
            ));
        }

        // 10./11. Endpoint dispatch for each traffic policy in use.
        if port.uses_cluster_chain() {
            self.dispatch_rules(
                port,
                &mut cluster,
                &port.selection.cluster,
                &endpoint_chains,
            );
        }
        if port.uses_local_chain() {
            self.dispatch_rules(port, &mut local, &port.selection.local, &endpoint_chains);
        }
        for (chain, used) in [
            (cluster, port.uses_cluster_chain()),
            (local, port.uses_local_chain()),
        ] {
            if used || !chain.rules.is_empty() {
                self.nat.push_chain(chain);
            }
        }

        // 12. One chain per reachable endpoint: the hairpin masquerade, then the DNAT (which
        // also records the client for session affinity).
        let spn_comment = (!self.large_cluster).then(|| Match::Comment(spn.to_string().into()));
        for &i in &port.selection.reachable {
            let endpoint = &port.endpoints[i];
            let Some(name) = endpoint_chains[i] else {
                continue;
            };
            let mut hairpin: Matches = spn_comment.iter().cloned().collect();
            hairpin.push(Match::Source {
                addr: Addr::Host(endpoint.ip()),
                negated: false,
            });
            let mut dnat: Matches = spn_comment.iter().cloned().collect();
            if port.affinity_timeout.is_some() {
                dnat.push(Match::Recent {
                    list: name,
                    check: RecentCheck::Set,
                });
            }
            dnat.push(Match::Protocol(spn.protocol));
            let mut chain = Chain::new(name, 2);
            chain.push(Rule::new(hairpin, mark_masq()));
            chain.push(Rule::new(dnat, Target::Dnat(endpoint.addr)));
            self.nat.push_chain(chain);
        }
    }

    /// §4.7/§4.8: affinity checks, then a random choice with probability 1/(n-i).
    /// `endpoints` indexes `port.endpoints`; `endpoint_chains` holds their chain names.
    fn dispatch_rules(
        &self,
        port: &ServicePort,
        chain: &mut Chain,
        endpoints: &[usize],
        endpoint_chains: &[Option<ChainName>],
    ) {
        let spn = &port.name;
        let targets: Vec<(&Endpoint, ChainName)> = endpoints
            .iter()
            .filter_map(|&i| Some((&port.endpoints[i], endpoint_chains[i]?)))
            .collect();
        let endpoint_comment = |e: &Endpoint| -> Matches {
            if self.large_cluster {
                Matches::new()
            } else {
                smallvec![comment(&format!("{spn} -> {}", e.endpoint_string()))]
            }
        };
        let affinity_rules = if port.affinity_timeout.is_some() {
            targets.len()
        } else {
            0
        };
        std::sync::Arc::make_mut(&mut chain.rules).reserve_exact(affinity_rules + targets.len());
        if let Some(seconds) = port.affinity_timeout {
            for (endpoint, sep) in &targets {
                let mut matches = endpoint_comment(endpoint);
                matches.push(Match::Recent {
                    list: *sep,
                    check: RecentCheck::SeenWithin(seconds),
                });
                chain.push(Rule::new(matches, Target::Jump(*sep)));
            }
        }
        let n = targets.len();
        for (i, (endpoint, sep)) in targets.iter().enumerate() {
            let mut matches = endpoint_comment(endpoint);
            if i + 1 < n {
                matches.push(Match::RandomProbability(1.0 / (n - i) as f64));
            }
            chain.push(Rule::new(matches, Target::Jump(*sep)));
        }
    }
}

fn comment(text: &str) -> Match {
    Match::Comment(text.into())
}

fn dst(addr: Addr) -> Match {
    Match::Destination {
        addr,
        negated: false,
    }
}

/// The node's local addresses (the loopback address first, then `--node-ip`s) inside `cidrs`.
fn local_addresses_in(config: &NodeConfig, family: IpFamily, cidrs: &[IpNet]) -> Vec<IpAddr> {
    let loopback = family.loopback_net().network();
    let loopback = if family == IpFamily::V4 {
        IpAddr::from([127, 0, 0, 1])
    } else {
        loopback
    };
    let mut ips: Vec<IpAddr> = Vec::new();
    for ip in std::iter::once(loopback).chain(config.node_ips_of(family)) {
        if cidrs.iter().any(|c| c.contains(&ip)) && !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips
}

#[derive(Clone)]
/// Collects one table: the top-level chains (few, looked up by name) and the per-service
/// chains (many, each pushed once complete), then orders them canonically.
struct TableBuilder {
    name: TableName,
    top: Vec<Chain>,
    service_chains: Vec<Chain>,
}

impl TableBuilder {
    fn new(name: TableName, top: &[&str]) -> TableBuilder {
        TableBuilder {
            name,
            top: top
                .iter()
                .map(|&name| Chain::new(ChainName::fixed(name), 0))
                .collect(),
            service_chains: Vec::new(),
        }
    }

    /// Appends a rule to a top-level chain.
    fn add(&mut self, chain: &str, rule: Rule) {
        match self.top.iter_mut().find(|c| &*c.name == chain) {
            Some(c) => c.push(rule),
            None => unreachable!("{chain} is not a top-level chain of this table"),
        }
    }

    fn push_chain(&mut self, chain: Chain) {
        self.service_chains.push(chain);
    }

    /// The same top-level chains, without rules.
    fn empty_copy(&self) -> TableBuilder {
        TableBuilder {
            name: self.name,
            top: self.top.iter().map(|c| Chain::new(c.name, 0)).collect(),
            service_chains: Vec::new(),
        }
    }

    /// Appends another builder's rules after this one's (its top-level chains are the same).
    fn append(&mut self, other: &TableBuilder) {
        for (mine, theirs) in self.top.iter_mut().zip(&other.top) {
            mine.extend_from(theirs);
        }
        self.service_chains
            .extend(other.service_chains.iter().cloned());
    }

    /// Chains in kube-proxy's canonical dump order (`KUBE-NODEPORTS`, `KUBE-SERVICES`, then the
    /// other chains by name): the order its tests compare in, so `render` output can be
    /// diffed against kube-proxy's directly.
    fn finish(self) -> Table {
        let mut chains = self.top;
        chains.extend(self.service_chains);
        chains.sort_by_cached_key(|c| (chain_rank(&c.name), c.name));
        Table {
            name: self.name,
            chains,
        }
    }
}

fn chain_rank(name: &str) -> u8 {
    match name {
        KUBE_NODEPORTS => 0,
        KUBE_SERVICES => 1,
        _ if name.starts_with("KUBE-") => 2,
        _ => 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

        let mut next = model.clone();
        let mut changed = (*next.ports[7]).clone();
        changed.endpoints.truncate(1);
        changed.selection = crate::model::EndpointSelection::default();
        next.ports[7] = Arc::new(changed);
        next.ports.remove(3);
        let first_chain = |cache: &PortCache| {
            cache
                .get(&next.ports[10].name)
                .map(|p| p.nat.service_chains[0].rules.clone())
        };
        let kept = first_chain(&cache).expect("port 10 has chains");
        let cached = translate_cached(&next, &config, &mut cache);
        assert_eq!(cached, translate(&next, &config));
        assert_eq!(cache.len(), next.ports.len());
        let reused = first_chain(&cache).expect("port 10 has chains");
        assert!(
            Arc::ptr_eq(&kept, &reused),
            "an unchanged port was translated again"
        );

        // Large-cluster mode changes every endpoint chain: nothing is reused.
        config.iptables.large_cluster_endpoints_threshold = 10;
        assert_eq!(
            translate_cached(&next, &config, &mut cache),
            translate(&next, &config)
        );
    }
}
