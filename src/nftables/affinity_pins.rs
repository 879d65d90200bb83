//! Which ClientIP affinity entries of the `maps` layout pin a client to an endpoint its
//! frontend no longer has (docs/maps-layout.md, "Endpoint removal and affinity").
//!
//! The packet path writes `@affinity` (client . frontend → endpoint); nothing in the rules
//! checks, when a sticky pick reads an entry, that the endpoint is still one of the
//! frontend's. kube-proxy's layout gets that for free: an endpoint's affinity set goes with
//! its endpoint chain. Here the syncer removes such entries once the endpoint is gone, so
//! that only the clients pinned to a removed endpoint are re-balanced, and no client stays
//! pinned to an endpoint that no longer exists.
//!
//! Pure: the entries come from the kernel (a netlink dump), the endpoints from the desired
//! ruleset.

use std::net::IpAddr;

use rustc_hash::{FxHashMap, FxHashSet};

use super::translate::maps::{
    CLUSTER_ENDPOINTS, LOCAL_ENDPOINTS, NODEPORT_CLUSTER_ENDPOINTS, NODEPORT_LOCAL_ENDPOINTS,
};
use super::{ElementValue, Ruleset, Value};
use crate::model::Protocol;

/// One `@affinity` entry: `client . frontend address . protocol . frontend port : endpoint
/// address . endpoint port`. For a NodePort the frontend address is the node address the
/// client connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AffinityPin {
    pub client: IpAddr,
    pub frontend: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
    pub endpoint: IpAddr,
    pub endpoint_port: u16,
}

/// Endpoint address and port.
type Endpoint = (IpAddr, u16);

/// The positions in `pins` of the entries whose endpoint is not among their frontend's
/// endpoints in `ruleset` (a `maps`-layout ruleset): in the cluster-wide or node-local
/// endpoint map of `frontend . protocol . port`, or of the NodePort `protocol . port`. An
/// entry whose frontend has no endpoints at all is stale too.
pub fn stale_pins(ruleset: &Ruleset, pins: &[AffinityPin]) -> Vec<usize> {
    if pins.is_empty() {
        return Vec::new();
    }
    // Only the frontends the entries name are collected: one pass over the elements.
    let addresses: FxHashSet<(IpAddr, Protocol, u16)> = pins
        .iter()
        .map(|p| (p.frontend, p.protocol, p.port))
        .collect();
    let node_ports: FxHashSet<(Protocol, u16)> =
        pins.iter().map(|p| (p.protocol, p.port)).collect();
    let mut by_address: FxHashMap<(IpAddr, Protocol, u16), FxHashSet<Endpoint>> =
        FxHashMap::default();
    let mut by_node_port: FxHashMap<(Protocol, u16), FxHashSet<Endpoint>> = FxHashMap::default();
    for element in &ruleset.elements {
        let container = &*element.container;
        let address_map = container == CLUSTER_ENDPOINTS || container == LOCAL_ENDPOINTS;
        let node_port_map =
            container == NODEPORT_CLUSTER_ENDPOINTS || container == NODEPORT_LOCAL_ENDPOINTS;
        if !address_map && !node_port_map {
            continue;
        }
        let Some(endpoint) = endpoint_of(element.value.as_ref()) else {
            continue;
        };
        match element.key.as_slice() {
            [Value::Addr(address), Value::Protocol(protocol), Value::Port(port), Value::Integer(_)]
                if address_map =>
            {
                let frontend = (*address, *protocol, *port);
                if addresses.contains(&frontend) {
                    by_address.entry(frontend).or_default().insert(endpoint);
                }
            }
            [Value::Protocol(protocol), Value::Port(port), Value::Integer(_)] if node_port_map => {
                let frontend = (*protocol, *port);
                if node_ports.contains(&frontend) {
                    by_node_port.entry(frontend).or_default().insert(endpoint);
                }
            }
            _ => {}
        }
    }
    pins.iter()
        .enumerate()
        .filter(|(_, pin)| {
            let endpoint = (pin.endpoint, pin.endpoint_port);
            let of_address = by_address
                .get(&(pin.frontend, pin.protocol, pin.port))
                .is_some_and(|endpoints| endpoints.contains(&endpoint));
            let of_node_port = by_node_port
                .get(&(pin.protocol, pin.port))
                .is_some_and(|endpoints| endpoints.contains(&endpoint));
            !of_address && !of_node_port
        })
        .map(|(i, _)| i)
        .collect()
}

fn endpoint_of(value: Option<&ElementValue>) -> Option<Endpoint> {
    match value? {
        ElementValue::Data(data) => match data.as_slice() {
            [Value::Addr(address), Value::Port(port)] => Some((*address, *port)),
            _ => None,
        },
        ElementValue::Verdict(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{NftablesLayout, NodeConfig};
    use crate::source::Manifests;

    const MANIFEST: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 172.30.0.10
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}]
  sessionAffinity: ClientIP
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints:
- addresses: ["10.244.1.5"]
  conditions: {ready: true}
- addresses: ["10.244.2.7"]
  conditions: {ready: true}
"#;

    fn ruleset() -> Ruleset {
        let mut manifests = Manifests::default();
        manifests
            .add_text(MANIFEST, "test")
            .expect("the manifest reads");
        let state = manifests.state;
        let mut config = NodeConfig::new("node-1");
        config.node_ips = vec!["10.0.0.1".parse().expect("address")];
        config.nftables_layout = NftablesLayout::Maps;
        let plan = crate::pipeline::plan(&state, &config);
        assert!(plan.notes.is_empty(), "{:?}", plan.notes);
        crate::pipeline::nftables_rulesets(&plan, &config).remove(0)
    }

    fn pin(frontend: &str, port: u16, endpoint: &str, endpoint_port: u16) -> AffinityPin {
        AffinityPin {
            client: "10.0.0.9".parse().expect("address"),
            frontend: frontend.parse().expect("address"),
            protocol: Protocol::Tcp,
            port,
            endpoint: endpoint.parse().expect("address"),
            endpoint_port,
        }
    }

    #[test]
    fn a_pin_to_an_endpoint_of_its_frontend_stays_and_every_other_is_stale() {
        let ruleset = ruleset();
        let pins = [
            // Kept: the cluster IP's endpoints, and the NodePort's on a node address.
            pin("172.30.0.10", 80, "10.244.1.5", 8080),
            pin("10.0.0.1", 30080, "10.244.2.7", 8080),
            // Stale: an endpoint gone, the right address on another port, a frontend that
            // does not exist, and a NodePort entry pinned to a gone endpoint.
            pin("172.30.0.10", 80, "10.244.3.9", 8080),
            pin("172.30.0.10", 80, "10.244.1.5", 9090),
            pin("172.30.0.11", 80, "10.244.1.5", 8080),
            pin("10.0.0.1", 30080, "10.244.3.9", 8080),
        ];
        assert_eq!(stale_pins(&ruleset, &pins), vec![2, 3, 4, 5]);
        assert_eq!(stale_pins(&ruleset, &[]), Vec::<usize>::new());
    }
}
