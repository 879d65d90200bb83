//! Endpoint categorisation: which endpoints serve cluster traffic, which serve Local-policy
//! traffic, and which get rules at all. Spec §2.5 (categories) and §2.6 (topology).

use std::collections::BTreeSet;

use super::{Endpoint, ServicePort};
use crate::config::NodeConfig;

/// The endpoint sets of one service port, as indices into [`ServicePort::endpoints`] in
/// endpoint-string order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointSelection {
    pub cluster: Vec<usize>,
    pub local: Vec<usize>,
    pub reachable: Vec<usize>,
    pub has_any: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topology {
    None,
    SameNode,
    SameZone,
}

/// Computes the selection for a service port whose `endpoints` are already sorted.
pub(super) fn select(port: &ServicePort, config: &NodeConfig) -> EndpointSelection {
    let endpoints = &port.endpoints;
    let indices = |keep: &dyn Fn(&Endpoint) -> bool| -> Vec<usize> {
        (0..endpoints.len())
            .filter(|&i| keep(&endpoints[i]))
            .collect()
    };
    let mut selection = EndpointSelection::default();

    let mut topology = Topology::None;
    if port.uses_cluster_endpoints() {
        topology = topology_mode(endpoints, config);
        selection.cluster = indices(&|e| e.ready && passes(e, topology, config));
        if selection.cluster.is_empty() {
            // Fall back to endpoints that are shutting down but still serving (topology ignored).
            selection.cluster = indices(&|e| e.serving_terminating());
        }
        selection.has_any = !selection.cluster.is_empty();
    }

    let mut local_fallback = false;
    if port.uses_local_endpoints() {
        let mut local_ready = false;
        let mut local_serving_terminating = false;
        for e in endpoints {
            if e.ready || e.serving_terminating() {
                selection.has_any = true;
            }
            if e.local && e.ready {
                local_ready = true;
            } else if e.local && e.serving_terminating() {
                local_serving_terminating = true;
            }
        }
        if local_ready {
            selection.local = indices(&|e| e.local && e.ready);
        } else if local_serving_terminating {
            local_fallback = true;
            selection.local = indices(&|e| e.local && e.serving_terminating());
        }
    }

    selection.reachable = if !port.uses_local_endpoints() {
        selection.cluster.clone()
    } else if !port.uses_cluster_endpoints() {
        selection.local.clone()
    } else if topology == Topology::None && !local_fallback {
        // Every ready endpoint is a cluster endpoint, and local ones are ready: a superset.
        selection.cluster.clone()
    } else {
        let union: BTreeSet<usize> = selection
            .cluster
            .iter()
            .chain(&selection.local)
            .copied()
            .collect();
        union.into_iter().collect()
    };
    selection
}

/// kube-proxy's `topologyModeFromHints`: hints are used only when every ready endpoint has one
/// and at least one is meant for this node (or zone).
fn topology_mode(endpoints: &[Endpoint], config: &NodeConfig) -> Topology {
    let zone = config.zone.as_deref();
    let mut all_node_hints = true;
    let mut hint_for_node = false;
    let mut all_zone_hints = true;
    let mut hint_for_zone = false;
    for e in endpoints.iter().filter(|e| e.ready) {
        if e.node_hints().is_empty() {
            all_node_hints = false;
        } else if e.node_hints().contains(&config.hostname) {
            hint_for_node = true;
        }
        if e.zone_hints().is_empty() {
            all_zone_hints = false;
        } else if zone.is_some_and(|z| e.zone_hints().iter().any(|h| h == z)) {
            hint_for_zone = true;
        }
    }
    if config.prefer_same_node && all_node_hints && hint_for_node {
        Topology::SameNode
    } else if all_zone_hints && hint_for_zone {
        Topology::SameZone
    } else {
        Topology::None
    }
}

fn passes(e: &Endpoint, topology: Topology, config: &NodeConfig) -> bool {
    match topology {
        Topology::None => true,
        Topology::SameNode => e.node_hints().contains(&config.hostname),
        Topology::SameZone => config
            .zone
            .as_deref()
            .is_some_and(|z| e.zone_hints().iter().any(|h| h == z)),
    }
}
