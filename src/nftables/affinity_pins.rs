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
//! Pure: the entries come from the kernel (a netlink dump), the endpoints from the elements
//! the syncer committed ([`ElementLookup`]).

use std::net::IpAddr;

use rustc_hash::{FxHashMap, FxHashSet};

use super::translate::maps::{
    endpoint_map_frontend, Frontend, AFFINITY_TIMEOUTS, NODEPORT_AFFINITY_TIMEOUTS,
    REMEMBER_NOTHING,
};
use super::{Element, ElementValue, Name, Value, Verdict};
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

/// The elements wanted in the table, by container and key (the syncer's record of what it
/// committed).
pub trait ElementLookup {
    fn element(&self, container: &str, key: &[Value]) -> Option<&Element>;
    /// The names of the table's maps.
    fn maps(&self) -> Vec<Name>;
}

/// The positions in `pins` of the entries whose endpoint is not among their frontend's
/// endpoints in `wanted` (a `maps`-layout table): in an endpoint map of `frontend . protocol .
/// port`, or of the NodePort `protocol . port`, where that frontend has ClientIP affinity. An
/// entry whose frontend has no endpoints, or no affinity (any more), is stale too. Each
/// frontend's endpoints are looked up slot by slot, once.
pub fn stale_pins(wanted: &dyn ElementLookup, pins: &[AffinityPin]) -> Vec<usize> {
    let maps = wanted.maps();
    let endpoint_maps = |kind: Frontend| -> Vec<&str> {
        maps.iter()
            .filter(|name| endpoint_map_frontend(name) == Some(kind))
            .map(|name| &**name)
            .collect()
    };
    let (address_maps, node_port_maps) = (
        endpoint_maps(Frontend::Address),
        endpoint_maps(Frontend::NodePort),
    );
    let mut by_address: FxHashMap<(IpAddr, Protocol, u16), FxHashSet<Endpoint>> =
        FxHashMap::default();
    let mut by_node_port: FxHashMap<(Protocol, u16), FxHashSet<Endpoint>> = FxHashMap::default();
    let mut stale = Vec::new();
    for (i, pin) in pins.iter().enumerate() {
        let endpoint = (pin.endpoint, pin.endpoint_port);
        let of_address = by_address
            .entry((pin.frontend, pin.protocol, pin.port))
            .or_insert_with(|| {
                let frontend = [
                    Value::Addr(pin.frontend),
                    Value::Protocol(pin.protocol),
                    Value::Port(pin.port),
                ];
                sticky_endpoints(wanted, AFFINITY_TIMEOUTS, &address_maps, &frontend)
            })
            .contains(&endpoint);
        let of_node_port = of_address
            || by_node_port
                .entry((pin.protocol, pin.port))
                .or_insert_with(|| {
                    let frontend = [Value::Protocol(pin.protocol), Value::Port(pin.port)];
                    sticky_endpoints(
                        wanted,
                        NODEPORT_AFFINITY_TIMEOUTS,
                        &node_port_maps,
                        &frontend,
                    )
                })
                .contains(&endpoint);
        if !of_address && !of_node_port {
            stale.push(i);
        }
    }
    stale
}

/// The endpoints of `frontend` when `timeouts` records its affinity; none otherwise.
fn sticky_endpoints(
    wanted: &dyn ElementLookup,
    timeouts: &str,
    maps: &[&str],
    frontend: &[Value],
) -> FxHashSet<Endpoint> {
    let remembered = wanted
        .element(timeouts, frontend)
        .and_then(|e| e.value.as_ref()?.verdict())
        .is_some_and(
            |verdict| !matches!(verdict, Verdict::Goto(chain) if **chain == *REMEMBER_NOTHING),
        );
    if remembered {
        endpoints(wanted, maps, frontend)
    } else {
        FxHashSet::default()
    }
}

/// Every endpoint of `frontend` in `maps`: slots 0, 1, … until one is missing.
fn endpoints(wanted: &dyn ElementLookup, maps: &[&str], frontend: &[Value]) -> FxHashSet<Endpoint> {
    let mut found = FxHashSet::default();
    for map in maps {
        let mut key = frontend.to_vec();
        key.push(Value::Integer(0));
        for slot in 0u32.. {
            if let Some(last) = key.last_mut() {
                *last = Value::Integer(slot);
            }
            match wanted.element(map, &key) {
                Some(element) => found.extend(endpoint_of(element.value.as_ref())),
                None => break,
            }
        }
    }
    found
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

/// A ruleset's elements as the syncer's record of a commit looks them up, for tests.
#[cfg(test)]
pub(crate) struct RulesetElements {
    elements: FxHashMap<(String, Vec<Value>), std::sync::Arc<Element>>,
    maps: Vec<Name>,
}

#[cfg(test)]
impl RulesetElements {
    pub(crate) fn of(ruleset: &super::Ruleset) -> RulesetElements {
        RulesetElements {
            elements: ruleset
                .elements
                .iter()
                .map(|e| ((e.container.to_string(), e.key.to_vec()), e.clone()))
                .collect(),
            maps: ruleset.maps.iter().map(|m| m.name.clone()).collect(),
        }
    }
}

#[cfg(test)]
impl ElementLookup for RulesetElements {
    fn element(&self, container: &str, key: &[Value]) -> Option<&Element> {
        self.elements
            .get(&(container.to_string(), key.to_vec()))
            .map(|e| &**e)
    }

    fn maps(&self) -> Vec<Name> {
        self.maps.clone()
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
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: default}
spec:
  clusterIP: 172.30.0.12
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: plain-1
  namespace: default
  labels: {kubernetes.io/service-name: plain}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints:
- addresses: ["10.244.5.5"]
  conditions: {ready: true}
"#;

    /// The ruleset's elements by container and key.
    fn index() -> RulesetElements {
        RulesetElements::of(&ruleset())
    }

    fn ruleset() -> crate::nftables::Ruleset {
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
        let wanted = index();
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
            // Stale: the endpoint is the frontend's, but the frontend has no affinity (every
            // pick tries the pin first, so such a pin would still be followed).
            pin("172.30.0.12", 80, "10.244.5.5", 8080),
        ];
        assert_eq!(stale_pins(&wanted, &pins), vec![2, 3, 4, 5, 6]);
        assert_eq!(stale_pins(&wanted, &[]), Vec::<usize>::new());
    }
}
