//! nftables mode: the translator from [`crate::model::ProxyModel`] to a typed [`Ruleset`] (one
//! `kube-proxy` table per family) and its rendering as `nft` commands. Spec §5A, the layout of
//! kube-proxy at commit `edca5633` (service chains DNAT through a `numgen` map, endpoint chains
//! only for session affinity, inline masquerade marks, a `hairpin-connections` set), with the
//! shared facts of §5.

pub mod affinity_pins;
mod parse;
mod render;
mod ruleset;
pub(crate) mod translate;

pub use parse::ParseError;
pub use render::{write_command, write_rule, Command, Object};
pub use ruleset::{
    BaseChain, Chain, ChainType, DataType, Direction, Element, ElementByKey, ElementData,
    ElementKey, ElementValue, Field, Hook, Joining, Map, Match, Name, ObjectId, Rule, Ruleset, Set,
    SetFlag, Statement, Table, Value, Verdict, TABLE_NAME,
};
pub use translate::{
    translate, translate_cached, translate_delta, ElementDelta, PortCache, TableObjects,
};

/// The table of the `maps` layout (docs/maps-layout.md), never kube-proxy's name.
pub const MAPS_TABLE_NAME: &str = "kproxy";

// Base chains (§5.2).
pub const FILTER_PREROUTING_PRE_DNAT: &str = "filter-prerouting-pre-dnat";
pub const FILTER_OUTPUT_PRE_DNAT: &str = "filter-output-pre-dnat";
pub const FILTER_INPUT: &str = "filter-input";
pub const FILTER_FORWARD: &str = "filter-forward";
pub const FILTER_OUTPUT: &str = "filter-output";
pub const NAT_PREROUTING: &str = "nat-prerouting";
pub const NAT_OUTPUT: &str = "nat-output";
pub const NAT_POSTROUTING: &str = "nat-postrouting";

// Regular top-level chains (§5A.3).
pub const NODEPORT_ENDPOINTS_CHECK: &str = "nodeport-endpoints-check";
pub const SERVICE_ENDPOINTS_CHECK: &str = "service-endpoints-check";
pub const FIREWALL_CHECK: &str = "firewall-check";
pub const SERVICES: &str = "services";
pub const MASQUERADING: &str = "masquerading";
pub const CLUSTER_IPS_CHECK: &str = "cluster-ips-check";
pub const REJECT_CHAIN: &str = "reject-chain";

// Sets and maps (§5.4, §5A.4).
pub const CLUSTER_IPS: &str = "cluster-ips";
pub const NODEPORT_IPS: &str = "nodeport-ips";
pub const HAIRPIN_CONNECTIONS: &str = "hairpin-connections";
pub const SERVICE_IPS: &str = "service-ips";
pub const SERVICE_NODEPORTS: &str = "service-nodeports";
pub const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
pub const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
pub const FIREWALL_IPS: &str = "firewall-ips";

// Prefixes of per-service-port and per-endpoint objects (§5.6).
pub const SERVICE_CHAIN_PREFIX: &str = "service-";
pub const LOCAL_CHAIN_PREFIX: &str = "local-";
pub const EXTERNAL_CHAIN_PREFIX: &str = "external-";
pub const FIREWALL_CHAIN_PREFIX: &str = "firewall-";
pub const ENDPOINT_CHAIN_PREFIX: &str = "endpoint-";
pub const AFFINITY_SET_PREFIX: &str = "affinity-";

/// knftables' limit on comment length in bytes; longer comments are cut (§5A.10).
pub const COMMENT_LENGTH_MAX: usize = 128;

/// Per-service and per-endpoint chains are the only ones whose names contain `/` (§5.6); a
/// syncer treats such chains as its own when they are no longer wanted.
pub fn is_service_chain_name(name: &str) -> bool {
    name.contains('/')
}

/// Affinity sets are the sets that a syncer may delete when no longer wanted (§5.6).
pub fn is_affinity_set_name(name: &str) -> bool {
    name.starts_with(AFFINITY_SET_PREFIX)
}
