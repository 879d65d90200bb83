//! iptables mode: the translator from [`crate::model::ProxyModel`] to a typed [`Ruleset`] and
//! its rendering as `iptables-restore` input. Spec §4.

mod parse;
mod render;
mod ruleset;
mod translate;

pub use parse::ParseError;
pub use render::{restore_payload, write_rule, ChainContent, RestorePayload, TablePatch};
pub use ruleset::{
    Addr, AddrType, Chain, ChainName, Match, Matches, RecentCheck, Rule, Ruleset, Table, TableName,
    Target,
};
pub use translate::{translate, translate_cached, PortCache};

// Top-level chains (§4.2).
pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
pub const KUBE_FIREWALL: &str = "KUBE-FIREWALL";
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
/// Empty chain in mangle, nat and filter whose disappearance tells that someone flushed the
/// tables (§4.2).
pub const KUBE_PROXY_CANARY: &str = "KUBE-PROXY-CANARY";

/// The fixed-name chains kproxy may create, in any table (§4.2), canary included.
pub const TOP_LEVEL_CHAINS: [&str; 9] = [
    KUBE_SERVICES,
    KUBE_EXTERNAL_SERVICES,
    KUBE_FORWARD,
    KUBE_NODEPORTS,
    KUBE_PROXY_FIREWALL,
    KUBE_FIREWALL,
    KUBE_POSTROUTING,
    KUBE_MARK_MASQ,
    KUBE_PROXY_CANARY,
];

/// Prefixes of per-service-port and per-endpoint chains (§4.3): kube-proxy owns every chain
/// named so, and deletes those no sync wrote as stale (§4.11).
pub const SERVICE_CHAIN_PREFIXES: [&str; 5] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
];

/// A per-service-port or per-endpoint chain (§4.3), as opposed to a top-level one.
pub fn is_service_chain(name: &str) -> bool {
    SERVICE_CHAIN_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// A chain kproxy owns: a top-level one or a per-service one.
pub fn is_owned_chain(name: &str) -> bool {
    TOP_LEVEL_CHAINS.contains(&name) || is_service_chain(name)
}
