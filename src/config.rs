//! Node settings: everything about the node (not the cluster) that changes the generated rules.
//! See `shared/spec/kube-proxy-rules.md` §3 for what each setting does in kube-proxy.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::family::{FamilyMode, IpFamily};

/// The node-local settings both translators read. Built once by the CLI (or a test) and passed
/// by reference; the translators never look at the machine themselves.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Node name: endpoints whose `nodeName` equals it are local.
    pub hostname: String,
    /// This node's `topology.kubernetes.io/zone`, for zone hints; `None` disables zone filtering.
    pub zone: Option<String>,
    /// The node's addresses. The first of each family is the primary node IP; all of them count
    /// as local addresses when NodePorts are limited to some CIDRs.
    pub node_ips: Vec<IpAddr>,
    /// Pod networks; the first of each family is the local-traffic detector's range.
    pub cluster_cidrs: Vec<IpNet>,
    pub masquerade_all: bool,
    /// `--nodeport-addresses`; `None` means unset and lets each mode apply its own default.
    pub nodeport_addresses: Option<NodePortAddresses>,
    pub family_mode: FamilyMode,
    pub masquerade_mark: MasqueradeMark,
    /// Honour node hints (kube-proxy's `PreferSameTrafficDistribution` feature gate).
    pub prefer_same_node: bool,
    pub iptables: IptablesOptions,
    /// The cluster's ServiceCIDRs (`--service-cidr`); nftables drops traffic to unallocated
    /// addresses inside them (§5.5). Empty: no such rule.
    pub service_cidrs: Vec<IpNet>,
    /// nftables mode: kube-proxy's layout, or kproxy's fixed-size one (docs/maps-layout.md).
    pub nftables_layout: NftablesLayout,
}

/// The shape of the nftables table (`--nftables-layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NftablesLayout {
    /// kube-proxy's own: chains and sets per service port and endpoint (spec §5A).
    #[default]
    KubeProxy,
    /// A fixed set of chains, sets and maps; every service port, endpoint and affinity entry
    /// an element (table `kproxy`).
    Maps,
}

/// Where NodePorts are accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// The primary node IP of each family.
    Primary,
    /// The local addresses inside these networks.
    Cidrs(Vec<IpNet>),
}

/// iptables-only switches, mostly capabilities kube-proxy detects on the host.
#[derive(Debug, Clone)]
pub struct IptablesOptions {
    /// Accept NodePorts on 127.0.0.0/8 (IPv4 only; kube-proxy's `localhostNodePorts`).
    pub localhost_nodeports: bool,
    /// The installed iptables supports `MASQUERADE --random-fully`.
    pub random_fully: bool,
    /// The nfacct counters `ct_state_invalid_dropped_pkts` and `localhost_nps_accepted_pkts`
    /// exist, so rules count into them.
    pub nfacct_counters: bool,
    /// `net.netfilter.nf_conntrack_tcp_be_liberal` is set: no INVALID drop rule then.
    pub conntrack_tcp_be_liberal: bool,
    /// Above this many endpoints in total, per-endpoint comments are left out.
    pub large_cluster_endpoints_threshold: usize,
}

impl Default for IptablesOptions {
    fn default() -> Self {
        IptablesOptions {
            localhost_nodeports: true,
            random_fully: true,
            nfacct_counters: false,
            conntrack_tcp_be_liberal: false,
            large_cluster_endpoints_threshold: 1000,
        }
    }
}

/// The packet mark that asks `KUBE-POSTROUTING` / `masquerading` to masquerade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasqueradeMark {
    pub value: u32,
    /// The mark as written into rules.
    pub text: String,
}

impl MasqueradeMark {
    /// kube-proxy's form: `1 << bit` printed with Go's `%#08x`, so bit 14 is `0x00004000`.
    pub fn from_bit(bit: u8) -> MasqueradeMark {
        let value = 1u32 << (bit.min(31));
        MasqueradeMark {
            value,
            text: format!("0x{value:08x}"),
        }
    }

    /// The short form `0x4000` that kube-proxy's unit tests inject.
    pub fn short_from_bit(bit: u8) -> MasqueradeMark {
        let value = 1u32 << (bit.min(31));
        MasqueradeMark {
            value,
            text: format!("{value:#x}"),
        }
    }
}

impl NodeConfig {
    /// Defaults like kube-proxy's, for the given node name.
    pub fn new(hostname: impl Into<String>) -> NodeConfig {
        NodeConfig {
            hostname: hostname.into(),
            zone: None,
            node_ips: Vec::new(),
            cluster_cidrs: Vec::new(),
            masquerade_all: false,
            nodeport_addresses: None,
            family_mode: FamilyMode::V4,
            masquerade_mark: MasqueradeMark::from_bit(14),
            prefer_same_node: true,
            iptables: IptablesOptions::default(),
            service_cidrs: Vec::new(),
            nftables_layout: NftablesLayout::KubeProxy,
        }
    }

    /// The pod network used to tell pod traffic from other traffic, if any.
    pub fn local_cidr(&self, family: IpFamily) -> Option<IpNet> {
        self.cluster_cidrs
            .iter()
            .find(|net| IpFamily::of_net(net) == family)
            .copied()
    }

    /// The primary node IP of a family.
    pub fn primary_node_ip(&self, family: IpFamily) -> Option<IpAddr> {
        self.node_ips
            .iter()
            .find(|ip| IpFamily::of(ip) == family)
            .copied()
    }

    /// The ServiceCIDRs of one family, in flag order.
    pub fn service_cidrs_of(&self, family: IpFamily) -> impl Iterator<Item = IpNet> + '_ {
        self.service_cidrs
            .iter()
            .copied()
            .filter(move |net| IpFamily::of_net(net) == family)
    }

    /// The networks whose local addresses accept NodePorts, or `None` for every local address
    /// (kube-proxy's `MatchAll`: no network of the family, or a zero-length prefix). `unset` is
    /// the mode's default when `--nodeport-addresses` was not given (§3): `None` (every
    /// address) for iptables, `primary` for nftables.
    pub fn nodeport_networks(
        &self,
        family: IpFamily,
        unset: Option<&NodePortAddresses>,
    ) -> Option<Vec<IpNet>> {
        let networks: Vec<IpNet> = match self.nodeport_addresses.as_ref().or(unset)? {
            NodePortAddresses::Primary => self
                .primary_node_ip(family)
                .and_then(|ip| IpNet::new(ip, family.host_prefix()).ok())
                .into_iter()
                .collect(),
            NodePortAddresses::Cidrs(cidrs) => cidrs
                .iter()
                .filter(|c| IpFamily::of_net(c) == family)
                .copied()
                .collect(),
        };
        if networks.is_empty() || networks.iter().any(|c| c.prefix_len() == 0) {
            None
        } else {
            Some(networks)
        }
    }

    /// All node addresses of a family, in flag order.
    pub fn node_ips_of(&self, family: IpFamily) -> impl Iterator<Item = IpAddr> + '_ {
        self.node_ips
            .iter()
            .copied()
            .filter(move |ip| IpFamily::of(ip) == family)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_text_follows_go_format() {
        assert_eq!(MasqueradeMark::from_bit(14).text, "0x00004000");
        assert_eq!(MasqueradeMark::short_from_bit(14).text, "0x4000");
        assert_eq!(MasqueradeMark::from_bit(31).text, "0x80000000");
    }
}
