//! iptables mode: the translator from [`crate::model::ProxyModel`] to a typed [`Ruleset`] and
//! its rendering as `iptables-restore` input. Spec §4.

mod render;
mod ruleset;
mod translate;

pub use render::write_rule;
pub use ruleset::{
    Addr, AddrType, Chain, ChainName, Match, Matches, RecentCheck, Rule, Ruleset, Table, TableName,
    Target,
};
pub use translate::translate;

// Top-level chains (§4.2).
pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
pub const KUBE_FIREWALL: &str = "KUBE-FIREWALL";
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
