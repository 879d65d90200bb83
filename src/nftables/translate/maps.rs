//! The `maps` layout (docs/maps-layout.md): the table-wide chains of kube-proxy's layout, a
//! fixed set of handler chains, and shared "pick N" and "remember T" chains; every service
//! port, endpoint and affinity entry is an element. Routes as kube-proxy's nftables mode
//! (§5A) does, with the differences the design notes list.

use super::*;

/// The chain every pick jumps to first: a client pinned to an endpoint of the frontend (an
/// `@affinity` element) goes there.
const PINNED: &str = "pinned";
/// The words in the names of a pick's chain (`cluster-pick-3`) and endpoint map
/// (`cluster-endpoints-3`).
const PICK: &str = "pick";
const ENDPOINTS: &str = "endpoints";
/// The smallest size declared for a set or map the syncer fills (nft's default for a set
/// without one is 65535 elements).
pub(crate) const MIN_CONTAINER_SIZE: u32 = 1 << 16;

/// The size declared for a container of `elements`: twice as many, rounded up to a power of
/// two, at least [`MIN_CONTAINER_SIZE`].
pub(crate) fn container_size(elements: u32) -> u32 {
    elements
        .saturating_mul(2)
        .checked_next_power_of_two()
        .unwrap_or(u32::MAX)
        .max(MIN_CONTAINER_SIZE)
}

/// Client . frontend → the endpoint it is pinned to; elements added from the packet path.
pub(crate) const AFFINITY: &str = "affinity";
/// Most clients pinned at once, over all services (nft's default, 65535, is sized for one
/// endpoint's set in kube-proxy's layout).
const AFFINITY_SIZE: u32 = 1 << 20;
/// Frontend → `goto remember-T`, for frontends with ClientIP affinity of timeout T.
pub(crate) const AFFINITY_TIMEOUTS: &str = "affinity-timeouts";
pub(crate) const NODEPORT_AFFINITY_TIMEOUTS: &str = "nodeport-affinity-timeouts";
/// LB frontend . allowed source range.
const FIREWALL_ALLOW: &str = "firewall-allow";
/// Handlers: what external traffic of each policy does before the pick.
const EXTERNAL: &str = "external";
const EXTERNAL_LOCAL: &str = "external-local";
const NODEPORT_EXTERNAL: &str = "nodeport-external";
const NODEPORT_EXTERNAL_LOCAL: &str = "nodeport-external-local";
/// Right after DNAT (priority -99), where `ct original` still has the frontend.
const REMEMBER_PREROUTING: &str = "remember-prerouting";
const REMEMBER_OUTPUT: &str = "remember-output";
const REMEMBER: &str = "remember";
const REMEMBER_PREFIX: &str = "remember-";
/// An empty chain: `affinity-timeouts` sends a frontend without affinity here, so that the
/// NodePort rules of `remember` do not record it (see [`Translator::maps_shadowed_nodeports`]).
pub(crate) const REMEMBER_NOTHING: &str = "remember-nothing";
const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

use crate::model::Protocol;
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::{BTreeMap, BTreeSet};

/// How a frontend is keyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Frontend {
    /// `daddr . proto . port`: cluster, external and load-balancer IPs.
    Address,
    /// `proto . port` on a node address.
    NodePort,
}

impl Frontend {
    fn fields(self) -> &'static [Field] {
        match self {
            Frontend::Address => &SERVICE_TUPLE,
            Frontend::NodePort => &NODEPORT_TUPLE,
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Frontend::Address => "",
            Frontend::NodePort => "nodeport-",
        }
    }
}

/// Which of a service port's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum EndpointSet {
    Cluster,
    Local,
}

/// The endpoints of one frontend kind and endpoint set: its pick chain (`cluster-pick`)
/// tries the client's pin, then each pick of a size in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Endpoints {
    frontend: Frontend,
    set: EndpointSet,
}

impl Endpoints {
    const ALL: [Endpoints; 4] = [
        Endpoints::new(Frontend::Address, EndpointSet::Cluster),
        Endpoints::new(Frontend::Address, EndpointSet::Local),
        Endpoints::new(Frontend::NodePort, EndpointSet::Cluster),
        Endpoints::new(Frontend::NodePort, EndpointSet::Local),
    ];

    const fn new(frontend: Frontend, set: EndpointSet) -> Endpoints {
        Endpoints { frontend, set }
    }

    /// `cluster`, `local`, `nodeport-cluster`, `nodeport-local`.
    fn kind(&self) -> String {
        let set = match self.set {
            EndpointSet::Cluster => "cluster",
            EndpointSet::Local => "local",
        };
        format!("{}{set}", self.frontend.prefix())
    }

    /// The chain a handler sends a frontend to.
    fn pick_chain(&self) -> String {
        format!("{}-{PICK}", self.kind())
    }

    /// The pick chain's rules with picks of `ways` endpoints in use: the client's pin first
    /// (a miss falls through), then each pick by size (a frontend is in the endpoint map of
    /// one size; a miss returns here for the next).
    fn pick_rules(&self, ways: &BTreeSet<u32>) -> Vec<Rule> {
        std::iter::once(PINNED.to_string())
            .chain(ways.iter().map(|&ways| {
                Pick {
                    endpoints: *self,
                    ways,
                }
                .name()
            }))
            .map(|chain| Rule::new(vec![], vec![verdict(Verdict::Jump(chain.into()))]))
            .collect()
    }
}

/// A shared chain that picks one of `ways` endpoints of the frontends in its endpoint map
/// (`cluster-pick-3` and `cluster-endpoints-3`). One map per size: a frontend whose endpoint
/// count changes moves from one map to another (data elements alone; a changed verdict
/// element would make the kernel validate every verdict map of the table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Pick {
    endpoints: Endpoints,
    ways: u32,
}

impl Pick {
    /// `{kind}-{word}-{ways}`: the pick's chain and endpoint map are named alike.
    fn named(&self, word: &str) -> String {
        format!("{}-{word}-{}", self.endpoints.kind(), self.ways)
    }

    /// The inverse of [`Pick::named`].
    fn from_name(name: &str, word: &str) -> Option<Pick> {
        let (frontend, rest) = match name.strip_prefix("nodeport-") {
            Some(rest) => (Frontend::NodePort, rest),
            None => (Frontend::Address, name),
        };
        let (set, rest) = if let Some(rest) = rest.strip_prefix("cluster-") {
            (EndpointSet::Cluster, rest)
        } else {
            (EndpointSet::Local, rest.strip_prefix("local-")?)
        };
        let ways = rest.strip_prefix(word)?.strip_prefix('-')?.parse().ok()?;
        Some(Pick {
            endpoints: Endpoints::new(frontend, set),
            ways,
        })
    }

    fn name(&self) -> String {
        self.named(PICK)
    }

    /// The inverse of [`Pick::name`].
    fn parse(name: &str) -> Option<Pick> {
        Pick::from_name(name, PICK)
    }

    /// Frontend . slot → endpoint, for frontends with this many endpoints.
    fn endpoint_map(&self) -> String {
        self.named(ENDPOINTS)
    }

    /// One rule per protocol, TCP first: nft 1.0.6 checks a map's `typeof` data (`ip daddr .
    /// tcp dport`) against the first rule of each run that uses the map, and adds `meta l4proto
    /// tcp` to that rule (a rule for every protocol would then take TCP only); with a protocol
    /// match of its own on every rule, the first is a TCP rule and gains nothing. Found by
    /// tests/maps_traffic.rs (UDP never DNATed).
    fn rules(&self) -> Vec<Rule> {
        let mut key = self.endpoints.frontend.fields().to_vec();
        key.push(Field::RandomNumber(self.ways));
        dnat_per_protocol(key, &self.endpoint_map())
    }
}

/// `meta l4proto P dnat … to KEY map @MAP` for each protocol, TCP first (see [`Pick::rules`]).
fn dnat_per_protocol(key: Vec<Field>, map: &str) -> Vec<Rule> {
    PROTOCOLS
        .iter()
        .map(|&protocol| {
            Rule::new(
                vec![compare(Field::L4Proto, false, Value::Protocol(protocol))],
                vec![Statement::DnatMap {
                    key: key.clone(),
                    map: map.into(),
                }],
            )
        })
        .collect()
}

/// Whether `map` is an endpoint map of the layout, and for which frontend kind.
pub(crate) fn endpoint_map_frontend(map: &str) -> Option<Frontend> {
    Pick::from_name(map, ENDPOINTS).map(|pick| pick.endpoints.frontend)
}

/// The rules of a shared chain a service port declares, from its name: `…pick-N` (a pick of
/// N endpoints) or `remember-T` (record affinity for T seconds); `None` for any other name.
pub(super) fn shared_chain_rules(name: &str) -> Option<Vec<Rule>> {
    if let Some(pick) = Pick::parse(name) {
        return Some(pick.rules());
    }
    let timeout = name.strip_prefix(REMEMBER_PREFIX)?.parse::<u32>().ok()?;
    Some(
        PROTOCOLS
            .iter()
            .map(|&protocol| {
                Rule::new(
                    vec![compare(Field::L4Proto, false, Value::Protocol(protocol))],
                    vec![Statement::UpdateMap {
                        map: AFFINITY.into(),
                        key: vec![
                            Field::SourceAddr,
                            Field::OriginalDestinationAddr,
                            Field::L4Proto,
                            Field::OriginalDestinationPort,
                        ],
                        timeout,
                        value: vec![Field::DestinationAddr, Field::DestinationPort],
                    }],
                )
            })
            .collect(),
    )
}

/// The pick chains (`cluster-pick`, …) whose rules change when the table's pick chains
/// `existing` gain `added`: each with all its rules.
pub(super) fn pick_chains_gaining<'a>(
    existing: impl Iterator<Item = &'a str>,
    added: &[Name],
) -> Vec<Chain> {
    let added: Vec<Pick> = added.iter().filter_map(|name| Pick::parse(name)).collect();
    let mut ways: BTreeMap<Endpoints, BTreeSet<u32>> = BTreeMap::new();
    for pick in existing
        .filter_map(Pick::parse)
        .chain(added.iter().copied())
    {
        ways.entry(pick.endpoints).or_default().insert(pick.ways);
    }
    let gaining: BTreeSet<Endpoints> = added.iter().map(|pick| pick.endpoints).collect();
    gaining
        .into_iter()
        .map(|endpoints| Chain {
            name: endpoints.pick_chain().into(),
            base: None,
            comment: None,
            rules: Arc::new(
                endpoints.pick_rules(&ways.get(&endpoints).cloned().unwrap_or_default()),
            ),
        })
        .collect()
}

impl Translator<'_> {
    /// Source ranges as elements: LB frontends in `firewall-ips`, their allowed sources in
    /// `firewall-allow`; other sources are dropped before DNAT.
    pub(super) fn maps_firewall_setup(&mut self, service_key: &[DataType]) {
        let addr = self.addr_type();
        self.out.set(Set::plain(
            FIREWALL_IPS,
            service_key.to_vec(),
            "destinations that are subject to LoadBalancerSourceRanges",
        ));
        let mut allow_key = service_key.to_vec();
        allow_key.push(addr);
        self.out.set(Set {
            flags: vec![SetFlag::Interval],
            ..Set::plain(FIREWALL_ALLOW, allow_key, "sources allowed to each of them")
        });
        let mut with_source = SERVICE_TUPLE.to_vec();
        with_source.push(Field::SourceAddr);
        self.out.rule(
            FIREWALL_CHECK,
            Rule::new(
                vec![
                    Match::InSet {
                        key: SERVICE_TUPLE.to_vec(),
                        set: FIREWALL_IPS.into(),
                        negated: false,
                    },
                    Match::InSet {
                        key: with_source,
                        set: FIREWALL_ALLOW.into(),
                        negated: true,
                    },
                ],
                vec![verdict(Verdict::Drop)],
            ),
        );
    }

    /// The maps, the handler chains and the affinity bookkeeping.
    pub(super) fn maps_setup(&mut self, service_key: Vec<DataType>, nodeport_key: Vec<DataType>) {
        let addr = self.addr_type();
        let endpoint = vec![addr, DataType::InetService];
        self.out.map(Map {
            name: AFFINITY.into(),
            key_type: vec![addr, addr, DataType::InetProto, DataType::InetService],
            value_type: endpoint,
            flags: vec![SetFlag::Dynamic, SetFlag::Timeout],
            timeout: None,
            size: Some(AFFINITY_SIZE),
            comment: Some("ClientIP affinity: client . frontend : endpoint".into()),
        });
        for (name, key) in [
            (AFFINITY_TIMEOUTS, service_key),
            (NODEPORT_AFFINITY_TIMEOUTS, nodeport_key),
        ] {
            self.out.map(Map {
                name: name.into(),
                key_type: key,
                value_type: vec![DataType::Verdict],
                flags: vec![],
                timeout: None,
                size: None,
                comment: None,
            });
        }

        // The pick chains, declared here and filled once every service port has declared the
        // picks it uses ([`Translator::maps_shared_chain_rules`]), and the pin they try first.
        for endpoints in Endpoints::ALL {
            self.out.chain(&endpoints.pick_chain(), None, None);
        }
        let client_and_frontend = vec![
            Field::SourceAddr,
            Field::DestinationAddr,
            Field::L4Proto,
            Field::DestinationPort,
        ];
        for rule in dnat_per_protocol(client_and_frontend, AFFINITY) {
            self.out.rule(PINNED, rule);
        }

        // External traffic: masquerade and short-circuit as kube-proxy's external chains do.
        for frontend in [Frontend::Address, Frontend::NodePort] {
            let picks = |set| {
                vec![verdict(Verdict::Goto(
                    Endpoints::new(frontend, set).pick_chain().into(),
                ))]
            };
            let (cluster, local) = match frontend {
                Frontend::Address => (EXTERNAL, EXTERNAL_LOCAL),
                Frontend::NodePort => (NODEPORT_EXTERNAL, NODEPORT_EXTERNAL_LOCAL),
            };
            let mark_or = || Statement::MarkOr(self.mark.clone());
            self.out.rule(
                cluster,
                Rule::new(vec![], vec![mark_or()]).with_comment("masquerade"),
            );
            self.out
                .rule(cluster, Rule::new(vec![], picks(EndpointSet::Cluster)));
            if let Some(cidr) = self.pod_cidr {
                self.out.rule(
                    local,
                    Rule::new(
                        vec![compare(Field::SourceAddr, false, Value::Net(cidr))],
                        picks(EndpointSet::Cluster),
                    )
                    .with_comment("short-circuit pod traffic"),
                );
            }
            self.out.rule(
                local,
                Rule::new(vec![Match::FibLocal(Direction::Source)], vec![mark_or()])
                    .with_comment("masquerade local traffic"),
            );
            self.out.rule(
                local,
                Rule::new(
                    vec![Match::FibLocal(Direction::Source)],
                    picks(EndpointSet::Cluster),
                )
                .with_comment("short-circuit local traffic"),
            );
            self.out
                .rule(local, Rule::new(vec![], picks(EndpointSet::Local)));
        }

        // Affinity: record the endpoint a new connection was sent to, right after DNAT.
        for (chain, hook) in [
            (REMEMBER_PREROUTING, Hook::Prerouting),
            (REMEMBER_OUTPUT, Hook::Output),
        ] {
            self.out.chain(
                chain,
                Some(BaseChain {
                    kind: ChainType::Filter,
                    hook,
                    priority: -99,
                }),
                None,
            );
            self.out.rule(
                chain,
                Rule::new(
                    vec![Match::CtStateNew, Match::CtStatusDnat],
                    vec![verdict(Verdict::Jump(REMEMBER.into()))],
                ),
            );
        }
        // `ct original proto-dst` needs the protocol first (nft's type dependency).
        for protocol in PROTOCOLS {
            self.out.rule(
                REMEMBER,
                Rule::new(
                    vec![compare(Field::L4Proto, false, Value::Protocol(protocol))],
                    vec![Statement::VerdictMap {
                        key: vec![
                            Field::OriginalDestinationAddr,
                            Field::L4Proto,
                            Field::OriginalDestinationPort,
                        ],
                        map: AFFINITY_TIMEOUTS.into(),
                    }],
                ),
            );
        }
        for protocol in PROTOCOLS {
            let mut matches = vec![compare(Field::L4Proto, false, Value::Protocol(protocol))];
            if self.nodeport_networks.is_some() {
                matches.push(Match::InSet {
                    key: vec![Field::OriginalDestinationAddr],
                    set: NODEPORT_IPS.into(),
                    negated: false,
                });
            }
            self.out.rule(
                REMEMBER,
                Rule::new(
                    matches,
                    vec![Statement::VerdictMap {
                        key: vec![Field::L4Proto, Field::OriginalDestinationPort],
                        map: NODEPORT_AFFINITY_TIMEOUTS.into(),
                    }],
                ),
            );
        }
    }

    /// `remember` looks a connection's frontend up in `affinity-timeouts`, then its protocol
    /// and port in `nodeport-affinity-timeouts`. A cluster, external or load-balancer IP
    /// without affinity on the protocol and port of a NodePort with affinity would be recorded
    /// by the second lookup (with every local address taking NodePorts nothing else tells them
    /// apart at priority -99): junk entries, and a trace that shows affinity where there is
    /// none. Such a frontend gets an `affinity-timeouts` element of its own that ends the
    /// lookup (`goto remember-nothing`). Across service ports, so done once they are all in.
    pub(super) fn maps_shadowed_nodeports(&mut self) {
        let sticky_nodeports: FxHashSet<Vec<Value>> = self
            .out
            .elements
            .iter()
            .filter(|e| *e.container == *NODEPORT_AFFINITY_TIMEOUTS)
            .map(|e| e.key.to_vec())
            .collect();
        if sticky_nodeports.is_empty() {
            return;
        }
        let remembered: FxHashSet<&[Value]> = self
            .out
            .elements
            .iter()
            .filter(|e| *e.container == *AFFINITY_TIMEOUTS)
            .map(|e| e.key.as_slice())
            .collect();
        let shadowed: Vec<Vec<Value>> = self
            .out
            .elements
            .iter()
            .filter(|e| *e.container == *SERVICE_IPS)
            .filter(|e| !remembered.contains(e.key.as_slice()))
            .filter(|e| {
                e.key
                    .get(1..)
                    .is_some_and(|np| sticky_nodeports.contains(np))
            })
            .map(|e| e.key.to_vec())
            .collect();
        if shadowed.is_empty() {
            return;
        }
        self.out.chain(REMEMBER_NOTHING, None, None);
        for key in shadowed {
            self.out.element(
                AFFINITY_TIMEOUTS,
                key,
                Some(Verdict::Goto(REMEMBER_NOTHING.into())),
                None,
            );
        }
    }

    /// The rules of the shared chains the service ports declared (pick-N and remember-T), and
    /// of the pick chains that try them.
    pub(super) fn maps_shared_chain_rules(&mut self) {
        let names: Vec<Name> = self
            .out
            .chains
            .iter()
            .filter(|c| c.rules.is_empty())
            .map(|c| c.name.clone())
            .collect();
        let mut ways: BTreeMap<Endpoints, BTreeSet<u32>> = BTreeMap::new();
        for name in names {
            if let Some(pick) = Pick::parse(&name) {
                ways.entry(pick.endpoints).or_default().insert(pick.ways);
            }
            for rule in shared_chain_rules(&name).unwrap_or_default() {
                self.out.rule(&name, rule);
            }
        }
        for endpoints in Endpoints::ALL {
            let ways = ways.remove(&endpoints).unwrap_or_default();
            for rule in endpoints.pick_rules(&ways) {
                self.out.rule(&endpoints.pick_chain(), rule);
            }
        }
    }

    /// Declares the size of every set and map the syncer fills (not the interval set, not the
    /// affinity map): twice its elements, in powers of two, at least [`MIN_CONTAINER_SIZE`].
    /// The kernel then allocates a hash table of that size at once, instead of growing one
    /// while a million elements go in (half the kernel's time of a full load at 100,000
    /// services, see docs/maps-layout.md). A container can hold no more than its size: the
    /// syncer recreates one whose size changed, and an element change that would overflow
    /// one takes the whole-table path.
    pub(super) fn maps_container_sizes(&mut self) {
        let mut counts: FxHashMap<&str, u32> = FxHashMap::default();
        for element in &self.out.elements {
            *counts.entry(&element.container).or_default() += 1;
        }
        let size_of = |name: &str| container_size(counts.get(name).copied().unwrap_or(0));
        for map in &mut self.out.maps {
            if map.flags.is_empty() {
                map.size = Some(size_of(&map.name));
            }
        }
        for set in &mut self.out.sets {
            if set.flags.is_empty() {
                set.size = Some(size_of(&set.name));
            }
        }
    }

    /// One service port, as elements (and the shared chains it needs, declared).
    pub(super) fn maps_service_port(&mut self, port: &ServicePort) {
        let protocol = Value::Protocol(port.name.protocol);
        let address_key =
            |ip: IpAddr| vec![Value::Addr(ip), protocol.clone(), Value::Port(port.port)];
        let comment: Name = truncate_comment(&port.name.to_string()).into();
        let has_any = port.has_any_endpoints();
        let external_refusal = port.external_refusal().map(|v| self.refusal(v));
        let cluster: Vec<SocketAddr> = port.cluster_endpoints().map(|e| e.addr).collect();
        let local: Vec<SocketAddr> = port.local_endpoints().map(|e| e.addr).collect();
        let remember = port
            .affinity_timeout
            .map(|timeout| Verdict::Goto(format!("{REMEMBER_PREFIX}{timeout}").into()));

        for endpoint in port.reachable_endpoints().filter(|e| e.local) {
            let ip = Value::Addr(endpoint.ip());
            self.out.element(
                HAIRPIN_CONNECTIONS,
                vec![
                    ip.clone(),
                    ip,
                    protocol.clone(),
                    Value::Port(endpoint.addr.port()),
                ],
                None,
                None,
            );
        }

        // The cluster IP: straight to the pick chain of its policy's endpoints.
        self.out
            .element(CLUSTER_IPS, vec![Value::Addr(port.cluster_ip)], None, None);
        let key = address_key(port.cluster_ip);
        match port.internal_refusal() {
            None => {
                let (set, endpoints) = if port.internal_policy_local {
                    (EndpointSet::Local, &local)
                } else {
                    (EndpointSet::Cluster, &cluster)
                };
                let pick = self.frontend_endpoints(
                    Endpoints::new(Frontend::Address, set),
                    &key,
                    endpoints,
                );
                self.out.element(SERVICE_IPS, key.clone(), Some(pick), None);
                self.remember(AFFINITY_TIMEOUTS, key, &remember);
            }
            Some(refusal) => {
                let refusal = self.refusal(refusal);
                self.out.element(
                    NO_ENDPOINT_SERVICES,
                    key,
                    Some(refusal),
                    Some(comment.clone()),
                );
            }
        }

        // External and load-balancer IPs, and the NodePort: through the handler of the
        // external policy.
        let (handler, nodeport_handler) = if port.external_policy_local {
            (EXTERNAL_LOCAL, NODEPORT_EXTERNAL_LOCAL)
        } else {
            (EXTERNAL, NODEPORT_EXTERNAL)
        };
        let mut frontends: Vec<(Frontend, Vec<Value>)> = port
            .external_ips
            .iter()
            .chain(&port.load_balancer_ips)
            .map(|&ip| (Frontend::Address, address_key(ip)))
            .collect();
        if let Some(node_port) = port.node_port {
            frontends.push((
                Frontend::NodePort,
                vec![protocol.clone(), Value::Port(node_port)],
            ));
        }
        for (frontend, key) in frontends {
            let (dispatch, no_endpoints, timeouts, handler) = match frontend {
                Frontend::Address => (
                    SERVICE_IPS,
                    NO_ENDPOINT_SERVICES,
                    AFFINITY_TIMEOUTS,
                    handler,
                ),
                Frontend::NodePort => (
                    SERVICE_NODEPORTS,
                    NO_ENDPOINT_NODEPORTS,
                    NODEPORT_AFFINITY_TIMEOUTS,
                    nodeport_handler,
                ),
            };
            if has_any {
                self.out.element(
                    dispatch,
                    key.clone(),
                    Some(Verdict::Goto(handler.into())),
                    None,
                );
                // Cluster endpoints: the Cluster policy, and Local's short-circuits.
                self.frontend_endpoints(
                    Endpoints::new(frontend, EndpointSet::Cluster),
                    &key,
                    &cluster,
                );
                if port.external_policy_local && !local.is_empty() {
                    self.frontend_endpoints(
                        Endpoints::new(frontend, EndpointSet::Local),
                        &key,
                        &local,
                    );
                }
                self.remember(timeouts, key.clone(), &remember);
            }
            if let Some(refusal) = &external_refusal {
                self.out.element(
                    no_endpoints,
                    key,
                    Some(refusal.clone()),
                    Some(comment.clone()),
                );
            }
        }

        // Source ranges: checked whenever they apply, endpoints or not.
        if uses_firewall(port) {
            let node_ip = self.config.primary_node_ip(self.family);
            let mut sources: Vec<IpNet> = port.source_ranges.clone();
            if node_ip.is_some_and(|ip| port.source_ranges.iter().any(|r| r.contains(&ip))) {
                sources.extend(port.load_balancer_ips.iter().map(|&ip| IpNet::from(ip)));
            }
            let sources = outermost(&sources);
            for &ip in &port.load_balancer_ips {
                self.out.element(FIREWALL_IPS, address_key(ip), None, None);
                for source in &sources {
                    let mut key = address_key(ip);
                    // As the kernel holds it (and the syncer reads it back): a single address
                    // is no range, and a range starts at its network address.
                    key.push(if source.prefix_len() == source.max_prefix_len() {
                        Value::Addr(source.addr())
                    } else {
                        Value::Net(source.trunc())
                    });
                    self.out.element(FIREWALL_ALLOW, key, None, None);
                }
            }
        }
    }

    /// The endpoint elements of one frontend, in the endpoint map of their number (declared
    /// here, with its pick chain, filled by [`Translator::maps_shared_chain_rules`]); returns
    /// the `goto` of the pick chain that tries it.
    fn frontend_endpoints(
        &mut self,
        of: Endpoints,
        key: &[Value],
        endpoints: &[SocketAddr],
    ) -> Verdict {
        let pick = Pick {
            endpoints: of,
            ways: u32::try_from(endpoints.len()).unwrap_or(u32::MAX),
        };
        let map: Name = pick.endpoint_map().into();
        let mut key_type = match of.frontend {
            Frontend::Address => vec![self.addr_type(), DataType::InetProto, DataType::InetService],
            Frontend::NodePort => vec![DataType::InetProto, DataType::InetService],
        };
        key_type.push(DataType::Slot);
        self.out.map(Map {
            name: map.clone(),
            key_type,
            value_type: vec![self.addr_type(), DataType::InetService],
            flags: vec![],
            timeout: None,
            // As the whole table declares it while it holds few elements (a map new to the
            // table comes with an element change alone).
            size: Some(MIN_CONTAINER_SIZE),
            comment: None,
        });
        for (slot, endpoint) in endpoints.iter().enumerate() {
            let mut slot_key = Vec::with_capacity(key.len() + 1);
            slot_key.extend_from_slice(key);
            slot_key.push(Value::Integer(u32::try_from(slot).unwrap_or(u32::MAX)));
            self.out.insert_element(Element {
                container: map.clone(),
                key: slot_key.into(),
                value: Some(ElementValue::Data(
                    vec![Value::Addr(endpoint.ip()), Value::Port(endpoint.port())].into(),
                )),
                comment: None,
            });
        }
        self.out.chain(&pick.name(), None, None);
        Verdict::Goto(of.pick_chain().into())
    }

    /// With affinity: the frontend's `remember-T` (declared here).
    fn remember(&mut self, timeouts: &str, key: Vec<Value>, remember: &Option<Verdict>) {
        if let Some(verdict) = remember {
            if let Verdict::Goto(chain) = verdict {
                self.out.chain(chain, None, None);
            }
            self.out.element(timeouts, key, Some(verdict.clone()), None);
        }
    }
}

/// The networks not inside another one of the list, each once, in list order. The kernel
/// refuses overlapping elements in a concatenated interval set (`firewall-allow`: "File
/// exists"), where kube-proxy's anonymous set merges them; dropping the inner ones (CIDRs
/// either nest or are disjoint) allows the same sources.
fn outermost(nets: &[IpNet]) -> Vec<IpNet> {
    let mut kept: Vec<IpNet> = Vec::new();
    for (i, net) in nets.iter().enumerate() {
        let inside_another = nets
            .iter()
            .enumerate()
            .any(|(j, other)| other.contains(net) && (other != net || j < i));
        if !inside_another {
            kept.push(*net);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outermost_drops_nested_and_repeated_ranges() {
        let nets: Vec<IpNet> = [
            "203.0.113.200/32",
            "203.0.113.0/24",
            "10.0.0.0/8",
            "203.0.113.0/24",
            "198.51.100.0/25",
            "198.51.100.128/25",
        ]
        .iter()
        .map(|n| n.parse().expect("a network"))
        .collect();
        let kept: Vec<String> = outermost(&nets).iter().map(|n| n.to_string()).collect();
        assert_eq!(
            kept,
            [
                "203.0.113.0/24",
                "10.0.0.0/8",
                "198.51.100.0/25",
                "198.51.100.128/25"
            ]
        );
        let everything: Vec<IpNet> = ["::/0", "2001:db8::1/128", "::/0"]
            .iter()
            .map(|n| n.parse().expect("a network"))
            .collect();
        assert_eq!(outermost(&everything), vec![everything[0]]);
    }

    #[test]
    fn container_sizes_are_twice_the_elements_in_powers_of_two() {
        assert_eq!(container_size(0), MIN_CONTAINER_SIZE);
        assert_eq!(container_size(32_768), 65_536);
        assert_eq!(container_size(32_769), 131_072);
        assert_eq!(container_size(1_000_000), 2_097_152);
        assert_eq!(container_size(u32::MAX), u32::MAX);
    }

    #[test]
    fn pick_chain_and_endpoint_map_names_read_back() {
        for endpoints in Endpoints::ALL {
            let pick = Pick { endpoints, ways: 7 };
            assert_eq!(Pick::parse(&pick.name()), Some(pick), "{}", pick.name());
            assert_eq!(
                endpoint_map_frontend(&pick.endpoint_map()),
                Some(endpoints.frontend)
            );
            assert_eq!(Pick::parse(&endpoints.pick_chain()), None);
        }
        assert_eq!(Pick::parse("remember-600"), None);
        assert_eq!(Pick::parse("cluster-pick-x"), None);
        assert_eq!(endpoint_map_frontend("cluster-pick-3"), None);
        assert_eq!(endpoint_map_frontend("affinity"), None);
    }
}
