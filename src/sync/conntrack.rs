//! Stale UDP conntrack entries (spec §7). UDP has no connection teardown, so a flow whose
//! backend went away keeps being sent to it until its conntrack entry expires; and packets sent
//! while a service had no endpoints leave entries that bypass the new DNAT rules. After a sync,
//! every UDP entry towards a service address whose reply source is not a serving endpoint is
//! deleted.
//!
//! Planning is pure ([`UdpTargets`], [`is_stale`]); the table is read and entries are deleted
//! over ctnetlink ([`netlink`]), one entry at a time by its original tuple.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

mod netlink;

pub use netlink::ConntrackTable;

use super::SyncError;
use crate::family::IpFamily;
use crate::model::{Protocol, ProxyModel};

/// For each UDP service address and NodePort, the endpoint IPs that may answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UdpTargets {
    pub by_ip: BTreeMap<IpAddr, BTreeSet<IpAddr>>,
    pub by_node_port: BTreeMap<u16, BTreeSet<IpAddr>>,
}

impl UdpTargets {
    /// Serving endpoints count, terminating ones included; traffic policies and topology do
    /// not matter here (§7 step 1).
    pub fn of(model: &ProxyModel) -> UdpTargets {
        let mut targets = UdpTargets::default();
        for port in model
            .ports
            .iter()
            .filter(|p| p.name.protocol == Protocol::Udp)
        {
            let serving: BTreeSet<IpAddr> = port
                .endpoints
                .iter()
                .filter(|e| e.serving)
                .map(|e| e.ip())
                .collect();
            let addresses = std::iter::once(port.cluster_ip)
                .chain(port.load_balancer_ips.iter().copied())
                .chain(port.external_ips.iter().copied());
            for ip in addresses {
                targets
                    .by_ip
                    .entry(ip)
                    .or_default()
                    .extend(serving.iter().copied());
            }
            if let Some(node_port) = port.node_port {
                targets
                    .by_node_port
                    .entry(node_port)
                    .or_default()
                    .extend(serving.iter().copied());
            }
        }
        targets
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty() && self.by_node_port.is_empty()
    }
}

/// The original direction of a UDP conntrack entry: what identifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowTuple {
    pub source: IpAddr,
    pub destination: IpAddr,
    pub source_port: u16,
    pub destination_port: u16,
}

/// A UDP conntrack entry: where the client sent it, and who answered (after DNAT, the
/// backend; the service address itself when no rule translated it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpFlow {
    pub original: FlowTuple,
    pub reply_source: IpAddr,
}

/// A flow is stale when it goes to a UDP service address or NodePort and its answers do not
/// come from one of that service's serving endpoints (§7 step 2).
pub fn is_stale(targets: &UdpTargets, flow: &UdpFlow) -> bool {
    let answered_by_other = |serving: &BTreeSet<IpAddr>| !serving.contains(&flow.reply_source);
    targets
        .by_ip
        .get(&flow.original.destination)
        .is_some_and(answered_by_other)
        || targets
            .by_node_port
            .get(&flow.original.destination_port)
            .is_some_and(answered_by_other)
}

/// Deletes UDP flows to a service address whose backend is no longer a serving endpoint, in
/// the calling thread's network namespace. Returns the number of entries deleted.
pub fn cleanup_stale_udp(models: &[ProxyModel]) -> Result<usize, SyncError> {
    let mut table = None;
    let mut deleted = 0;
    for model in models {
        let targets = UdpTargets::of(model);
        if targets.is_empty() {
            continue; // no UDP service: nothing can be stale, and no need to list the table
        }
        let table = match &mut table {
            Some(table) => table,
            None => table
                .insert(ConntrackTable::open().map_err(failed("open a socket for", model.family))?),
        };
        let flows = table
            .udp_flows(model.family)
            .map_err(failed("list", model.family))?;
        for flow in flows.iter().filter(|flow| is_stale(&targets, flow)) {
            if table
                .delete(&flow.original)
                .map_err(failed("delete", model.family))?
            {
                deleted += 1;
            }
        }
    }
    Ok(deleted)
}

fn failed(action: &'static str, family: IpFamily) -> impl FnOnce(std::io::Error) -> SyncError {
    move |source| SyncError::Conntrack {
        action,
        family,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn flow(destination: &str, destination_port: u16, reply_source: &str) -> UdpFlow {
        UdpFlow {
            original: FlowTuple {
                source: ip("10.100.0.2"),
                destination: ip(destination),
                source_port: 40001,
                destination_port,
            },
            reply_source: ip(reply_source),
        }
    }

    /// Service 10.96.0.10 is served by 10.244.2.2; NodePort 30053 by 10.244.3.2.
    fn targets() -> UdpTargets {
        let mut targets = UdpTargets::default();
        targets
            .by_ip
            .insert(ip("10.96.0.10"), [ip("10.244.2.2")].into_iter().collect());
        targets
            .by_node_port
            .insert(30053, [ip("10.244.3.2")].into_iter().collect());
        targets
    }

    #[test]
    fn flows_to_gone_or_missing_backends_are_stale() {
        let targets = targets();
        // 10.244.1.2 no longer serves the service.
        assert!(is_stale(&targets, &flow("10.96.0.10", 53, "10.244.1.2")));
        // Sent while the service had no endpoints: answered by the VIP itself.
        assert!(is_stale(&targets, &flow("10.96.0.10", 53, "10.96.0.10")));
        // NodePort flow answered by a pod that no longer serves it.
        assert!(is_stale(&targets, &flow("10.100.0.1", 30053, "10.244.1.2")));
    }

    #[test]
    fn flows_to_serving_endpoints_or_elsewhere_are_kept() {
        let targets = targets();
        assert!(!is_stale(&targets, &flow("10.96.0.10", 53, "10.244.2.2")));
        assert!(!is_stale(
            &targets,
            &flow("10.100.0.1", 30053, "10.244.3.2")
        ));
        // Not a service address, not a NodePort: not ours to judge.
        assert!(!is_stale(&targets, &flow("10.0.0.99", 53, "10.0.0.99")));
    }
}
