//! This node as the agent sees it: its Node object's addresses, pod CIDRs, zone and
//! eligibility (spec kube-proxy-agent.md §2, §6.1), or the host's own addresses when there is
//! no Node object (`--from-dir`); waiting for the Node at start-up and following it after.

use std::net::IpAddr;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{bail, Result};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use tokio::sync::mpsc::UnboundedReceiver;

use super::status::AgentStatus;
use super::sync_loop::Wake;
use super::{AgentConfig, DetectLocal};
use crate::source::{Object, SourceEvent};

use crate::family::{parse_cidr_sloppy, parse_ip_sloppy, IpFamily};

/// The Node label kube-proxy reads for topology (§2.3).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// A Node with this taint is being removed; `/healthz` fails so load balancers drain it.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// What the agent uses of a Node object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Primary IP first, then the first address of the other family (§2.2).
    pub ips: Vec<IpAddr>,
    pub pod_cidrs: Vec<IpNet>,
    pub zone: Option<String>,
    /// Not being deleted and not tainted for deletion.
    pub eligible: bool,
}

impl NodeInfo {
    pub fn of(node: &Node) -> NodeInfo {
        let addresses = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_deref())
            .unwrap_or_default();
        // kube-proxy's GetNodeHostIPs: InternalIPs in order, then ExternalIPs.
        let raw: Vec<IpAddr> = ["InternalIP", "ExternalIP"]
            .iter()
            .flat_map(|kind| {
                addresses
                    .iter()
                    .filter(move |a| a.type_ == *kind)
                    .filter_map(|a| parse_ip_sloppy(&a.address))
            })
            .collect();
        let mut ips = Vec::new();
        if let Some(&primary) = raw.first() {
            ips.push(primary);
            let family = IpFamily::of(&primary);
            if let Some(&secondary) = raw.iter().find(|ip| IpFamily::of(ip) != family) {
                ips.push(secondary);
            }
        }
        let spec = node.spec.as_ref();
        let pod_cidrs = spec
            .and_then(|s| s.pod_cidrs.as_deref())
            .unwrap_or_default()
            .iter()
            .filter_map(|c| parse_cidr_sloppy(c))
            .collect();
        let tainted = spec
            .and_then(|s| s.taints.as_deref())
            .unwrap_or_default()
            .iter()
            .any(|t| t.key == TO_BE_DELETED_TAINT);
        NodeInfo {
            ips,
            pod_cidrs,
            zone: node
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(ZONE_LABEL))
                .cloned(),
            eligible: node.metadata.deletion_timestamp.is_none() && !tainted,
        }
    }
}

/// The Node object, once listed (up to `wait` for it to exist with addresses, §2.2).
pub(super) async fn wait_for_node(
    events: &mut UnboundedReceiver<SourceEvent>,
    name: &str,
    wait: Duration,
) -> Option<NodeInfo> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut node = None;
    loop {
        if node.as_ref().is_some_and(|n: &NodeInfo| !n.ips.is_empty()) {
            return node;
        }
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) => {
                if let Some(seen) = node_of(event) {
                    node = seen;
                }
            }
            Ok(None) => return node,
            Err(_) => {
                tracing::error!(
                    "timed out waiting for node {name:?} to exist with addresses; going on without"
                );
                return node;
            }
        }
    }
}

/// The Node a watch event shows: `Some(None)` when it is gone.
fn node_of(event: SourceEvent) -> Option<Option<NodeInfo>> {
    match event {
        SourceEvent::Applied(Object::Node(node)) => Some(Some(NodeInfo::of(&node))),
        SourceEvent::Listed { objects, .. } => Some(objects.iter().find_map(|o| match o {
            Object::Node(node) => Some(NodeInfo::of(node)),
            _ => None,
        })),
        SourceEvent::Deleted { .. } => Some(None),
        _ => None,
    }
}

/// Fills in what flags left open from the Node (or, without one, the host's addresses).
pub(super) fn adopt_node(config: &mut AgentConfig, node: Option<&NodeInfo>) -> Result<()> {
    if config.node.node_ips.is_empty() {
        config.node.node_ips = match node {
            Some(node) if !node.ips.is_empty() => node.ips.clone(),
            _ => {
                let host = crate::host::addresses();
                tracing::info!(
                    "no node IPs from flags or a Node object; using this host's addresses {host:?}"
                );
                host
            }
        };
    }
    for (family, ip) in crate::host::resolve_primary_node_ips(&mut config.node, None)? {
        tracing::info!("NodePorts are accepted on {ip}, this host's primary {family} address");
    }
    if config.node.zone.is_none() {
        config.node.zone = node.and_then(|n| n.zone.clone());
    }
    if config.detect_local == DetectLocal::NodeCidr {
        match node {
            Some(node) if !node.pod_cidrs.is_empty() => {
                config.node.cluster_cidrs = node.pod_cidrs.clone();
            }
            _ => bail!(
                "--detect-local-mode NodeCIDR needs the Node {:?} with spec.podCIDRs; none found",
                config.node.hostname
            ),
        }
    }
    Ok(())
}

/// Follows the Node after start-up: its eligibility feeds `/healthz`, its zone the topology;
/// a change of its addresses or pod CIDRs (NodeCIDR mode), or its deletion, ends the agent so
/// that it restarts with them, as kube-proxy does (§2.2).
pub(super) async fn follow_node(
    mut events: UnboundedReceiver<SourceEvent>,
    started: Option<NodeInfo>,
    config: AgentConfig,
    status: Arc<AgentStatus>,
    wake: mpsc::Sender<Wake>,
    fatal: tokio::sync::mpsc::UnboundedSender<anyhow::Error>,
) {
    let name = config.node.hostname.clone();
    while let Some(event) = events.recv().await {
        let Some(node) = node_of(event) else {
            continue;
        };
        status.set_node_eligible(Some(node.as_ref().is_some_and(|n| n.eligible)));
        let reason = match (&started, &node) {
            (Some(_), None) => Some("was deleted".to_string()),
            (Some(before), Some(now)) if before.ips != now.ips => Some(format!(
                "changed its addresses from {:?} to {:?}",
                before.ips, now.ips
            )),
            (None, Some(now)) if !now.ips.is_empty() => {
                Some(format!("appeared with addresses {:?}", now.ips))
            }
            (Some(before), Some(now))
                if config.detect_local == DetectLocal::NodeCidr
                    && before.pod_cidrs != now.pod_cidrs =>
            {
                Some("changed its pod CIDRs".to_string())
            }
            _ => None,
        };
        if let Some(reason) = reason {
            let _ = fatal.send(anyhow::anyhow!(
                "node {name:?} {reason}; exiting so that the agent restarts with it"
            ));
            return;
        }
        if let Some(node) = node {
            if wake.send(Wake::Node(node)).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ips_follow_get_node_host_ips() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n", "labels": {ZONE_LABEL: "zone-a"}},
            "spec": {"podCIDRs": ["10.244.1.0/24", "fd00:1::/64"],
                     "taints": [{"key": "other", "effect": "NoSchedule"}]},
            "status": {"addresses": [
                {"type": "Hostname", "address": "n"},
                {"type": "ExternalIP", "address": "fd00::5"},
                {"type": "InternalIP", "address": "192.168.1.5"},
                {"type": "InternalIP", "address": "192.168.1.6"}
            ]}
        }))
        .unwrap();
        let info = NodeInfo::of(&node);
        assert_eq!(
            info.ips,
            vec![
                "192.168.1.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert_eq!(info.pod_cidrs.len(), 2);
        assert_eq!(info.zone.as_deref(), Some("zone-a"));
        assert!(info.eligible);
    }

    #[test]
    fn a_node_being_removed_is_not_eligible() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n"},
            "spec": {"taints": [{"key": TO_BE_DELETED_TAINT, "effect": "NoSchedule"}]}
        }))
        .unwrap();
        assert!(!NodeInfo::of(&node).eligible);
        assert!(NodeInfo::of(&node).ips.is_empty());
    }
}
