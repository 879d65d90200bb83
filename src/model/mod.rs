//! The node-local view of the cluster that both translators read: one [`ProxyModel`] per IP
//! family, holding every proxied service port with its endpoints as kube-proxy sees them from
//! this node. Built by a pure function of the validated objects and the node settings.
//!
//! Spec: `shared/spec/kube-proxy-rules.md` §2.

mod build;
pub mod claims;
mod endpoints;
mod validate;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

pub use build::{service_ports, ProxyModel};
pub use endpoints::EndpointSelection;
pub use validate::{
    object_ref, validate, validate_service, validate_slice, validate_with, ClusterSettings,
    PortSpec, ServiceKey, ServiceSpec, SliceEndpoint, SlicePort, SliceSpec, ValidCluster, Verdict,
    SERVICE_NAME_LABEL,
};

/// A transport protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the API spelling (`TCP`, `UDP`, `SCTP`).
    pub fn from_api(text: &str) -> Option<Protocol> {
        match text {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The lower-case name used in rules and name hashes.
    pub fn lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// Parses the lower-case name the kernel tools print (`tcp`, `udp`, `sctp`).
    pub fn from_lower(text: &str) -> Option<Protocol> {
        [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
            .into_iter()
            .find(|p| p.lower() == text)
    }

    /// The IANA protocol number (what `meta l4proto` and nft's `inet_proto` hold).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// The protocol of an IANA number, if it is one a Service can have.
    pub fn from_number(number: u8) -> Option<Protocol> {
        [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
            .into_iter()
            .find(|p| p.number() == number)
    }
}

/// Identifies a service port: namespace, Service name, port name and protocol.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    pub port: String,
    pub protocol: Protocol,
}

impl ServicePortName {
    /// `namespace/name`, the service part of the name.
    pub fn service(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// `namespace/name:port`, or `namespace/name` for an unnamed port; the protocol is not part of
/// it (kube-proxy's `ServicePortName.String()`).
impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}/{}", self.namespace, self.name)
        } else {
            write!(f, "{}/{}:{}", self.namespace, self.name, self.port)
        }
    }
}

/// One backend of a service port, with its conditions as seen from this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The endpoint runs on this node.
    pub local: bool,
    /// Its slice endpoint's hints, shared with it.
    pub hints: Option<Arc<TopologyHints>>,
}

/// An endpoint's topology hints (`hints.forZones`, `hints.forNodes`), shared by the slice's
/// endpoint and the model's. Most endpoints have none: they hold no allocation for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyHints {
    pub zones: Vec<String>,
    pub nodes: Vec<String>,
}

impl TopologyHints {
    /// The hints, or `None` when there are none.
    pub fn new(zones: Vec<String>, nodes: Vec<String>) -> Option<Arc<TopologyHints>> {
        (!zones.is_empty() || !nodes.is_empty()).then(|| Arc::new(TopologyHints { zones, nodes }))
    }
}

impl Endpoint {
    /// The zones the endpoint is meant for (empty without hints).
    pub fn zone_hints(&self) -> &[String] {
        self.hints.as_deref().map_or(&[], |h| &h.zones)
    }

    /// The nodes the endpoint is meant for (empty without hints).
    pub fn node_hints(&self) -> &[String] {
        self.hints.as_deref().map_or(&[], |h| &h.nodes)
    }

    pub fn ip(&self) -> IpAddr {
        self.addr.ip()
    }

    /// `ip:port`, with brackets around IPv6 (Go's `net.JoinHostPort`).
    pub fn endpoint_string(&self) -> String {
        crate::text::socket_string(self.addr)
    }

    pub fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
}

/// What to do with traffic that has no endpoint to go to (§2.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoEndpointVerdict {
    /// The service has no usable endpoints at all.
    Reject,
    /// A Local traffic policy and no endpoint on this node.
    Drop,
}

/// One proxied service port of one IP family, with the endpoint sets that decide its rules.
#[derive(Debug, Clone)]
pub struct ServicePort {
    pub name: ServicePortName,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    pub source_ranges: Vec<IpNet>,
    /// ClientIP affinity timeout in seconds; `None` without session affinity.
    pub affinity_timeout: Option<u32>,
    pub external_policy_local: bool,
    pub internal_policy_local: bool,
    pub health_check_node_port: Option<u16>,
    /// All endpoints, deduplicated and sorted by endpoint string.
    pub endpoints: Vec<Endpoint>,
    pub selection: EndpointSelection,
}

impl ServicePort {
    /// Reachable by something other than the cluster IP.
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.load_balancer_ips.is_empty()
            || !self.external_ips.is_empty()
    }

    /// Cluster endpoints are needed: Cluster internal policy, or any external access (for the
    /// short-circuit of locally originated traffic under an external Local policy).
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local || self.externally_accessible()
    }

    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local || (self.external_policy_local && self.externally_accessible())
    }

    pub fn cluster_endpoints(&self) -> impl ExactSizeIterator<Item = &Endpoint> + Clone {
        self.selection.cluster.iter().map(|&i| &self.endpoints[i])
    }

    pub fn local_endpoints(&self) -> impl ExactSizeIterator<Item = &Endpoint> + Clone {
        self.selection.local.iter().map(|&i| &self.endpoints[i])
    }

    /// The endpoints any rule may send traffic to (per-endpoint chains exist for these).
    pub fn reachable_endpoints(&self) -> impl ExactSizeIterator<Item = &Endpoint> + Clone {
        self.selection.reachable.iter().map(|&i| &self.endpoints[i])
    }

    pub fn has_any_endpoints(&self) -> bool {
        self.selection.has_any
    }

    pub fn uses_cluster_chain(&self) -> bool {
        !self.selection.cluster.is_empty() && self.uses_cluster_endpoints()
    }

    pub fn uses_local_chain(&self) -> bool {
        !self.selection.local.is_empty() && self.uses_local_endpoints()
    }

    /// Cluster-IP traffic has somewhere to go.
    pub fn has_internal_endpoints(&self) -> bool {
        self.has_any_endpoints() && !(self.internal_policy_local && self.selection.local.is_empty())
    }

    /// External traffic (external IPs, load-balancer IPs, NodePort) has somewhere to go.
    pub fn has_external_endpoints(&self) -> bool {
        self.has_any_endpoints() && !(self.external_policy_local && self.selection.local.is_empty())
    }

    /// The external chain exists even without external endpoints, for the short-circuit rules.
    pub fn uses_external_chain(&self) -> bool {
        self.has_any_endpoints() && self.externally_accessible()
    }

    /// Why cluster-IP traffic is refused, when it is.
    pub fn internal_refusal(&self) -> Option<NoEndpointVerdict> {
        self.refusal(self.has_internal_endpoints())
    }

    /// Why external traffic is refused, when it is.
    pub fn external_refusal(&self) -> Option<NoEndpointVerdict> {
        self.refusal(self.has_external_endpoints())
    }

    fn refusal(&self, has_endpoints: bool) -> Option<NoEndpointVerdict> {
        if !self.has_any_endpoints() {
            Some(NoEndpointVerdict::Reject)
        } else if !has_endpoints {
            Some(NoEndpointVerdict::Drop)
        } else {
            None
        }
    }

    /// The comment kube-proxy gives a refusal: `<SPN> has no endpoints` / `has no local endpoints`.
    pub fn refusal_comment(&self, verdict: NoEndpointVerdict) -> String {
        match verdict {
            NoEndpointVerdict::Reject => format!("{} has no endpoints", self.name),
            NoEndpointVerdict::Drop => format!("{} has no local endpoints", self.name),
        }
    }
}
