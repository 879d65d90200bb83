//! Where kube-proxy's own two modes route a packet differently, so kproxy's two modes (which
//! stay byte-identical to kube-proxy's) do too. The one list of such cases: the equivalence
//! test (`tests/trace_equivalence.rs`) expects iptables and nftables traces to agree
//! everywhere else, and for these cases checks each mode against its own behaviour below.
//!
//! Every entry names the kube-proxy source that shows the behaviour of each mode
//! (`kubernetes/kubernetes`, the revisions of the spec's §0 and §5A.1).
//!
//! A second list, [`MapsDifference`], holds where kproxy's own `maps` nftables layout cannot
//! route as kube-proxy's nftables layout does (docs/maps-layout.md), each with the reason.

use std::fmt;

/// One documented difference between kube-proxy's iptables and nftables modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ModeDifference {
    /// A new connection to a cluster IP on a port or protocol none of its Services defines.
    ClusterIpUnknownPort,
    /// A new connection to an address inside a ServiceCIDR that is no Service's cluster IP
    /// (only with `--service-cidr` known).
    UnallocatedClusterIp,
    /// A load-balancer IP of a Service without any endpoint, with source ranges, from a
    /// source they do not allow.
    FirewallWithoutEndpoints,
    /// A connection from the node itself to an external or load-balancer IP of a Service
    /// without any endpoint.
    NodeToExternalWithoutEndpoints,
    /// A NodePort on a local address that only one mode takes NodePorts on.
    NodePortAddresses,
    /// A client that is itself a remote endpoint (not on this node) of the Service, sent to
    /// itself.
    RemoteEndpointHairpin,
}

impl ModeDifference {
    pub const ALL: [ModeDifference; 6] = [
        ModeDifference::ClusterIpUnknownPort,
        ModeDifference::UnallocatedClusterIp,
        ModeDifference::FirewallWithoutEndpoints,
        ModeDifference::NodeToExternalWithoutEndpoints,
        ModeDifference::NodePortAddresses,
        ModeDifference::RemoteEndpointHairpin,
    ];

    /// What iptables mode does there.
    pub fn iptables(self) -> &'static str {
        match self {
            ModeDifference::ClusterIpUnknownPort => {
                "passes untouched: only defined (address, protocol, port) triples have rules"
            }
            ModeDifference::UnallocatedClusterIp => {
                "passes untouched: iptables mode has no ServiceCIDR rule"
            }
            ModeDifference::FirewallWithoutEndpoints => {
                "rejects every source: without endpoints there is no KUBE-FW chain, only the \
                 REJECT rule in filter KUBE-EXTERNAL-SERVICES"
            }
            ModeDifference::NodeToExternalWithoutEndpoints => {
                "passes untouched: KUBE-EXTERNAL-SERVICES, which holds the REJECT rule, is \
                 jumped to from INPUT and FORWARD only, not from OUTPUT"
            }
            ModeDifference::NodePortAddresses => {
                "takes NodePorts on every local address when --nodeport-addresses is unset, \
                 and on 127.0.0.1 with localhost NodePorts (IPv4); its no-endpoint REJECT/DROP \
                 rules match every local address (-m addrtype --dst-type LOCAL), loopback included"
            }
            ModeDifference::RemoteEndpointHairpin => {
                "masquerades: every endpoint chain starts with `-s <endpoint IP> -j \
                 KUBE-MARK-MASQ`, local endpoint or not"
            }
        }
    }

    /// What nftables mode does there.
    pub fn nftables(self) -> &'static str {
        match self {
            ModeDifference::ClusterIpUnknownPort => {
                "rejects: cluster-ips-check (from filter-forward and filter-output) rejects \
                 new connections to @cluster-ips that were not DNATed"
            }
            ModeDifference::UnallocatedClusterIp => {
                "drops: cluster-ips-check drops new connections to the ServiceCIDRs \
                 (\"Drop traffic to unallocated ClusterIPs\")"
            }
            ModeDifference::FirewallWithoutEndpoints => {
                "drops disallowed sources: the firewall chain exists whatever the endpoints, \
                 and firewall-check runs before DNAT (priority dstnat-10), ahead of the \
                 no-endpoint check in the filter hooks"
            }
            ModeDifference::NodeToExternalWithoutEndpoints => {
                "rejects (or drops, where source ranges leave the node out): \
                 service-endpoints-check is jumped to from filter-output too"
            }
            ModeDifference::NodePortAddresses => {
                "takes NodePorts on the primary node IP when --nodeport-addresses is unset, \
                 never on loopback; its no-endpoint check covers exactly those addresses"
            }
            ModeDifference::RemoteEndpointHairpin => {
                "does not masquerade: hairpin-connections holds local endpoints only"
            }
        }
    }

    /// The kube-proxy source that shows both behaviours, and the spec sections that state it.
    pub fn kube_proxy_source(self) -> &'static str {
        match self {
            ModeDifference::ClusterIpUnknownPort => {
                "pkg/proxy/nftables/proxier.go: setupNFTables adds `ip daddr @cluster-ips \
                 reject` (\"Reject traffic to invalid ports of ClusterIPs\") to \
                 clusterIPsCheckChain, which nftablesJumpChains jumps to from the forward and \
                 output filter chains; pkg/proxy/iptables/proxier.go syncProxyRules matches \
                 cluster IPs only as `-d <clusterIP> --dport <port>` (spec §5.3, §5.5, §10)"
            }
            ModeDifference::UnallocatedClusterIp => {
                "pkg/proxy/nftables/proxier.go setupNFTables: `ip daddr { <service CIDRs> } \
                 drop` (\"Drop traffic to unallocated ClusterIPs\") in clusterIPsCheckChain \
                 when ServiceCIDRs are known; iptables mode has no counterpart (spec §5.5, §10)"
            }
            ModeDifference::FirewallWithoutEndpoints => {
                "pkg/proxy/iptables/proxier.go syncProxyRules: `usesFWChain := hasEndpoints && \
                 len(svcInfo.LoadBalancerVIPs()) > 0 && \
                 len(svcInfo.LoadBalancerSourceRanges()) > 0`; pkg/proxy/nftables/proxier.go \
                 syncProxyRules: `usesFWChain := len(svcInfo.LoadBalancerVIPs()) > 0 && \
                 len(svcInfo.LoadBalancerSourceRanges()) > 0`, checked by firewallCheckChain \
                 from the pre-DNAT filter chains (spec §2.7, §5.13, §11)"
            }
            ModeDifference::NodeToExternalWithoutEndpoints => {
                "pkg/proxy/iptables/proxier.go iptablesJumpChains: kubeExternalServicesChain \
                 from ChainInput and ChainForward only; pkg/proxy/nftables/proxier.go \
                 nftablesJumpChains: serviceEndpointsCheckChain from the input, forward and \
                 output filter chains (spec §4.2, §5.3)"
            }
            ModeDifference::NodePortAddresses => {
                "cmd/kube-proxy/app/server_linux.go platformApplyDefaults: nftables mode \
                 defaults an empty nodePortAddresses to `primary`; \
                 pkg/proxy/iptables/proxier.go: NewProxier keeps localhostNodePorts only when \
                 the node-port addresses hold 127.0.0.1, and syncProxyRules writes the \
                 no-endpoint NodePort rule with `-m addrtype --dst-type LOCAL`; \
                 pkg/proxy/nftables/proxier.go setupNFTables: nodeport-ips without loopback, \
                 `ip daddr != 127.0.0.0/8` when matching all (spec §3, §4.5, §4.6.1 item 5, §5.5)"
            }
            ModeDifference::RemoteEndpointHairpin => {
                "pkg/proxy/iptables/proxier.go syncProxyRules: the `-s <endpoint IP> -j \
                 KUBE-MARK-MASQ` rule of every KUBE-SEP chain, local endpoint or not; \
                 pkg/proxy/nftables/proxier.go at edca5633: hairpin-connections elements \
                 only for local endpoints (spec §4.6.2 item 12, §5A.4, §5A.6 item 4)"
            }
        }
    }
}

impl fmt::Display for ModeDifference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ModeDifference::ClusterIpUnknownPort => "cluster IP, unknown port",
            ModeDifference::UnallocatedClusterIp => "unallocated cluster IP",
            ModeDifference::FirewallWithoutEndpoints => "source ranges without endpoints",
            ModeDifference::NodeToExternalWithoutEndpoints => {
                "from the node to an external address without endpoints"
            }
            ModeDifference::NodePortAddresses => "NodePort addresses",
            ModeDifference::RemoteEndpointHairpin => "hairpin of a remote endpoint",
        };
        f.write_str(name)
    }
}

/// One documented difference between kproxy's `maps` nftables layout (docs/maps-layout.md) and
/// kube-proxy's nftables layout, inherent to the design: the `maps` layout keeps a fixed number
/// of chains and sets, so what kube-proxy keys by service port it can only key by what a
/// packet carries. The equivalence test expects the two nftables layouts to agree everywhere
/// else (and `maps` to route as kube-proxy's nftables mode where kube-proxy's two modes
/// differ, [`ModeDifference`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapsDifference {
    /// A client with ClientIP affinity that reaches one service port through a second frontend
    /// (its cluster IP after an external IP, load-balancer IP or NodePort, or a NodePort on
    /// another node address) within the timeout.
    AffinityPerFrontend,
}

impl MapsDifference {
    pub const ALL: [MapsDifference; 1] = [MapsDifference::AffinityPerFrontend];

    /// What kube-proxy's nftables layout does there.
    pub fn kube_proxy(self) -> &'static str {
        match self {
            MapsDifference::AffinityPerFrontend => {
                "pins the second connection to the endpoint of the first: one affinity set per \
                 endpoint (`affinity-<endpoint>`, keyed by the client address), checked by the \
                 service port's cluster and local chains whatever frontend led there"
            }
        }
    }

    /// What the `maps` layout does there.
    pub fn maps(self) -> &'static str {
        match self {
            MapsDifference::AffinityPerFrontend => {
                "picks the second connection's endpoint at random (and pins the client anew): \
                 the affinity map is keyed by client . frontend (`ip saddr . ip daddr . meta \
                 l4proto . th dport`), so each frontend of a service port has its own entry"
            }
        }
    }

    /// Why the layout cannot do as kube-proxy does (docs/maps-layout.md, "Where it cannot
    /// match kube-proxy exactly").
    pub fn reason(self) -> &'static str {
        match self {
            MapsDifference::AffinityPerFrontend => {
                "no service-port id is derivable from every frontend within the fixed chains: \
                 nft refuses a map lookup inside a concatenation and as the data of `update`, \
                 and marks and conntrack marks are not kproxy's to clobber; a per-service-port \
                 remember chain would bring back a chain per service port"
            }
        }
    }
}

impl fmt::Display for MapsDifference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            MapsDifference::AffinityPerFrontend => "affinity per frontend",
        };
        f.write_str(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_difference_is_documented_once() {
        let mut names: Vec<String> = ModeDifference::ALL.iter().map(|d| d.to_string()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ModeDifference::ALL.len());
        for difference in ModeDifference::ALL {
            assert!(!difference.iptables().is_empty());
            assert!(!difference.nftables().is_empty());
            let source = difference.kube_proxy_source();
            assert!(
                source.contains("pkg/proxy/") && source.contains("spec §"),
                "{source}"
            );
        }
    }

    #[test]
    fn every_maps_difference_is_documented_once() {
        let mut names: Vec<String> = MapsDifference::ALL.iter().map(|d| d.to_string()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), MapsDifference::ALL.len());
        for difference in MapsDifference::ALL {
            assert!(!difference.kube_proxy().is_empty());
            assert!(!difference.maps().is_empty());
            assert!(!difference.reason().is_empty());
        }
    }
}
