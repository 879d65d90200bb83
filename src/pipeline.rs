//! The pure path from read objects to rules: validate, build one model per family, translate.

use crate::config::NodeConfig;
use crate::iptables;
use crate::model::{validate_with, ClusterSettings, ProxyModel};
use crate::nftables;
use crate::source::{ClusterState, Note};

pub use crate::backend::Mode;

/// The models of every family the node proxies, plus what was skipped on the way.
#[derive(Debug, Clone)]
pub struct Plan {
    pub models: Vec<ProxyModel>,
    pub notes: Vec<Note>,
}

/// Validates the objects and builds the per-family models.
pub fn plan(state: &ClusterState, config: &NodeConfig) -> Plan {
    let (cluster, notes) = validate_with(state, &ClusterSettings::of(config));
    let models = config
        .family_mode
        .families()
        .iter()
        .map(|&family| ProxyModel::build(&cluster, config, family))
        .collect();
    Plan { models, notes }
}

/// iptables mode: one `iptables-restore` / `ip6tables-restore` input per family.
pub fn iptables_rulesets(plan: &Plan, config: &NodeConfig) -> Vec<iptables::Ruleset> {
    plan.models
        .iter()
        .map(|model| iptables::translate(model, config))
        .collect()
}

/// nftables mode: one `kube-proxy` table per family (`ip`, then `ip6` for dual-stack).
pub fn nftables_rulesets(plan: &Plan, config: &NodeConfig) -> Vec<nftables::Ruleset> {
    plan.models
        .iter()
        .map(|model| nftables::translate(model, config))
        .collect()
}
