//! Builds the per-family [`ProxyModel`] from validated objects: picks each Service's addresses
//! of the family, merges its EndpointSlices per port, and selects endpoints (§2.1–§2.5).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use super::claims::{Frontend, Offer, Via};
use super::endpoints::select;
use super::validate::{ServiceSpec, SliceSpec, ValidCluster};
use super::{Endpoint, EndpointSelection, Protocol, ServicePort, ServicePortName};
use crate::config::NodeConfig;
use crate::family::IpFamily;

/// Every proxied service port of one IP family, ordered by `namespace/name` and then by the
/// order of `spec.ports`.
#[derive(Debug, Clone)]
pub struct ProxyModel {
    pub family: IpFamily,
    /// Shared, so that the agent can keep the ports of unchanged Services from one sync to
    /// the next without copying them.
    pub ports: Vec<Arc<ServicePort>>,
}

impl ProxyModel {
    pub fn build(cluster: &ValidCluster, config: &NodeConfig, family: IpFamily) -> ProxyModel {
        let mut slices_by_service: HashMap<(&str, &str), Vec<&SliceSpec>> = HashMap::new();
        for slice in cluster.slices.iter().filter(|s| s.family == family) {
            slices_by_service
                .entry((slice.namespace.as_str(), slice.service_name.as_str()))
                .or_default()
                .push(slice);
        }

        let mut services: Vec<&ServiceSpec> = cluster.services.iter().collect();
        // kube-proxy's canonical dump order sorts by the "namespace/name" string.
        services.sort_by_cached_key(|s| format!("{}/{}", s.namespace, s.name));

        let none = BTreeSet::new();
        // Services are independent: built on every core, kept in order.
        let built = crate::parallel::map_chunks(&services, |services| {
            let mut ports = Vec::new();
            for service in services {
                let slices = slices_by_service
                    .get(&(service.namespace.as_str(), service.name.as_str()))
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let withheld = if cluster.withheld.is_empty() {
                    &none
                } else {
                    cluster.withheld.get(&service.key()).unwrap_or(&none)
                };
                ports.extend(service_ports(service, withheld, slices, config, family));
            }
            ports
        });
        ProxyModel {
            family,
            ports: built.concat(),
        }
    }

    /// Endpoints over all service ports, the figure behind iptables' large-cluster mode.
    pub fn total_endpoints(&self) -> usize {
        self.ports.iter().map(|p| p.endpoints.len()).sum()
    }
}

/// The service ports of one Service in one family, in `spec.ports` order, with their endpoints
/// merged from the Service's slices of that family. Empty when the Service has no cluster IP of
/// the family. The unit the agent rebuilds when a Service or one of its slices changes.
/// `withheld`: frontends another Service holds (`claims`), left out.
pub fn service_ports(
    service: &ServiceSpec,
    withheld: &BTreeSet<Offer>,
    slices: &[&SliceSpec],
    config: &NodeConfig,
    family: IpFamily,
) -> Vec<Arc<ServicePort>> {
    let Some(cluster_ip) = service
        .cluster_ips
        .iter()
        .find(|ip| IpFamily::of(ip) == family)
        .copied()
    else {
        return Vec::new();
    };
    // In slice-name order, so that merging is deterministic.
    let mut slices: Vec<&SliceSpec> = slices
        .iter()
        .copied()
        .filter(|s| s.family == family)
        .collect();
    slices.sort_by(|a, b| a.name.cmp(&b.name));
    service
        .ports
        .iter()
        .map(|port| {
            let name = ServicePortName {
                namespace: service.namespace.clone(),
                name: service.name.clone(),
                port: port.name.clone(),
                protocol: port.protocol,
            };
            let mut service_port = ServicePort {
                cluster_ip,
                port: port.port,
                node_port: port.node_port,
                external_ips: offered(
                    &service.external_ips,
                    Via::ExternalIp,
                    port,
                    family,
                    withheld,
                ),
                load_balancer_ips: offered(
                    &service.load_balancer_ips,
                    Via::LoadBalancerIp,
                    port,
                    family,
                    withheld,
                ),
                source_ranges: service
                    .source_ranges
                    .iter()
                    .filter(|n| IpFamily::of_net(n) == family)
                    .copied()
                    .collect(),
                affinity_timeout: service.affinity_timeout,
                external_policy_local: service.external_policy_local,
                internal_policy_local: service.internal_policy_local,
                health_check_node_port: service.health_check_node_port,
                endpoints: merge_endpoints(&slices, &port.name, port.protocol, config),
                selection: EndpointSelection::default(),
                name,
            };
            service_port.selection = select(&service_port, config);
            Arc::new(service_port)
        })
        .collect()
}

/// The addresses of the family through which this port is offered, less the withheld ones.
fn offered(
    ips: &[std::net::IpAddr],
    via: Via,
    port: &super::PortSpec,
    family: IpFamily,
    withheld: &BTreeSet<Offer>,
) -> Vec<std::net::IpAddr> {
    ips.iter()
        .filter(|ip| IpFamily::of(ip) == family)
        .filter(|&&ip| {
            withheld.is_empty()
                || !withheld.contains(&Offer {
                    via,
                    frontend: Frontend {
                        ip,
                        protocol: port.protocol,
                        port: port.port,
                    },
                })
        })
        .copied()
        .collect()
}

/// All endpoints of one service port over all slices of its Service, keyed by endpoint string:
/// a ready (non-terminating) copy replaces a terminating one, never the reverse.
fn merge_endpoints(
    slices: &[&SliceSpec],
    port_name: &str,
    protocol: Protocol,
    config: &NodeConfig,
) -> Vec<Endpoint> {
    let mut merged: BTreeMap<String, Endpoint> = BTreeMap::new();
    for slice in slices {
        for slice_port in slice
            .ports
            .iter()
            .filter(|p| p.name == port_name && p.protocol == protocol)
        {
            for e in &slice.endpoints {
                let endpoint = Endpoint {
                    addr: SocketAddr::new(e.ip, slice_port.port),
                    ready: e.ready,
                    serving: e.serving,
                    terminating: e.terminating,
                    local: e.node_name.as_deref() == Some(config.hostname.as_str()),
                    hints: e.hints.clone(),
                };
                let key = endpoint.endpoint_string();
                match merged.get(&key) {
                    Some(_) if endpoint.terminating => {}
                    _ => {
                        merged.insert(key, endpoint);
                    }
                }
            }
        }
    }
    // BTreeMap iteration is byte-wise string order of the endpoint string, as kube-proxy sorts.
    merged.into_values().collect()
}
