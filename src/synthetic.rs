//! A synthetic cluster for benchmarks: `services` Services with `endpoints` ready endpoints each.
//! Every tenth Service has ClientIP affinity, every fifth is a NodePort (as long as the node-port
//! range lasts: the 13 840 first Services hold its 2 768 ports, later ones stay ClusterIP),
//! every twentieth has a second (UDP) port. Addresses are unique: cluster IPs from
//! 10.96.0.0/12, pods from 10.128.0.0/9; a cluster that does not fit is refused.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{
    ClientIPConfig, Service, ServicePort, ServiceSpec, SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::source::ClusterState;

/// 10.96.0.0/12, the cluster IPs.
const CLUSTER_IP_BASE: u32 = 0x0a60_0000;
const CLUSTER_IP_PREFIX: u32 = 12;
/// 10.128.0.0/9, the pod IPs.
const POD_IP_BASE: u32 = 0x0a80_0000;
const POD_IP_PREFIX: u32 = 9;
/// The API server's default node-port range, 30000–32767.
const NODE_PORT_FIRST: usize = 30000;
const NODE_PORTS: usize = 2768;

/// A cluster the generator's address ranges cannot hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TooLarge {
    #[error("{services} Services need more cluster IPs than 10.96.0.0/12 holds (at most {max} Services)")]
    Services { services: usize, max: usize },
    #[error("{services} Services with {endpoints} endpoints each need more pod IPs than 10.128.0.0/9 holds (at most {max} endpoints in all)")]
    Endpoints {
        services: usize,
        endpoints: usize,
        max: usize,
    },
}

/// The usable addresses of a range: all but its network and broadcast addresses.
const fn usable(prefix: u32) -> usize {
    (1usize << (32 - prefix)) - 2
}

/// The synthetic cluster as API objects (module docs).
pub fn cluster(services: usize, endpoints: usize) -> Result<ClusterState, TooLarge> {
    let max = usable(CLUSTER_IP_PREFIX);
    if services > max {
        return Err(TooLarge::Services { services, max });
    }
    let max = usable(POD_IP_PREFIX);
    if services.checked_mul(endpoints).is_none_or(|all| all > max) {
        return Err(TooLarge::Endpoints {
            services,
            endpoints,
            max,
        });
    }
    let mut state = ClusterState::default();
    for i in 0..services {
        state.services.push(service(i));
        state.endpoint_slices.push(slice(i, endpoints));
    }
    Ok(state)
}

fn namespace(i: usize) -> String {
    format!("ns{}", i % 100)
}

/// The address `offset` after `base`; [`cluster`] has checked that it stays in its range.
fn ipv4(base: u32, offset: usize) -> String {
    Ipv4Addr::from(base + offset as u32).to_string()
}

/// Every fifth Service gets the next node port while the range lasts.
fn node_port(i: usize) -> Option<i32> {
    let index = i / 5;
    (i % 5 == 0 && index < NODE_PORTS).then(|| (NODE_PORT_FIRST + index) as i32)
}

fn service(i: usize) -> Service {
    let node_port = node_port(i);
    let mut ports = vec![ServicePort {
        name: Some("http".into()),
        protocol: Some("TCP".into()),
        port: 80,
        node_port,
        ..Default::default()
    }];
    if i % 20 == 0 {
        ports.push(ServicePort {
            name: Some("dns".into()),
            protocol: Some("UDP".into()),
            port: 53,
            ..Default::default()
        });
    }
    let affinity = i % 10 == 0;
    Service {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}")),
            namespace: Some(namespace(i)),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some(
                if node_port.is_some() {
                    "NodePort"
                } else {
                    "ClusterIP"
                }
                .into(),
            ),
            cluster_ip: Some(ipv4(CLUSTER_IP_BASE, i + 1)),
            ports: Some(ports),
            selector: Some(BTreeMap::from([("app".into(), format!("app-{i}"))])),
            session_affinity: Some(if affinity { "ClientIP" } else { "None" }.into()),
            session_affinity_config: affinity.then_some(SessionAffinityConfig {
                client_ip: Some(ClientIPConfig {
                    timeout_seconds: Some(10800),
                }),
            }),
            ..Default::default()
        }),
        status: None,
    }
}

fn slice(i: usize, endpoints: usize) -> EndpointSlice {
    let mut ports = vec![EndpointPort {
        name: Some("http".into()),
        protocol: Some("TCP".into()),
        port: Some(8080),
        ..Default::default()
    }];
    if i % 20 == 0 {
        ports.push(EndpointPort {
            name: Some("dns".into()),
            protocol: Some("UDP".into()),
            port: Some(5353),
            ..Default::default()
        });
    }
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}-1")),
            namespace: Some(namespace(i)),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".into(),
                format!("svc-{i}"),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: (0..endpoints)
            .map(|j| Endpoint {
                addresses: vec![ipv4(POD_IP_BASE, i * endpoints + j + 1)],
                node_name: Some(format!("node-{}", j % 50)),
                ..Default::default()
            })
            .collect(),
        ports: Some(ports),
    }
}

/// Writes the cluster as a multi-document YAML stream.
pub fn write_manifests(state: &ClusterState, out: &mut impl Write) -> std::io::Result<()> {
    let docs = state
        .services
        .iter()
        .map(serde_yaml::to_string)
        .chain(state.endpoint_slices.iter().map(serde_yaml::to_string));
    for doc in docs {
        let doc = doc.map_err(std::io::Error::other)?;
        out.write_all(b"---\n")?;
        out.write_all(doc.as_bytes())?;
    }
    Ok(())
}

/// Writes the cluster as one JSON document, a `v1` `List` of the same objects in the same order
/// as [`write_manifests`] (Services, then EndpointSlices), one item a line. Each object is
/// serialized straight into `out`: no text of the whole cluster is built.
pub fn write_json_list(state: &ClusterState, out: &mut impl Write) -> std::io::Result<()> {
    out.write_all(b"{\"apiVersion\":\"v1\",\"kind\":\"List\",\"metadata\":{},\"items\":[")?;
    let mut separator: &[u8] = b"\n";
    for service in &state.services {
        out.write_all(separator)?;
        serde_json::to_writer(&mut *out, service)?;
        separator = b",\n";
    }
    for slice in &state.endpoint_slices {
        out.write_all(separator)?;
        serde_json::to_writer(&mut *out, slice)?;
        separator = b",\n";
    }
    out.write_all(b"\n]}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn node_ports_and_cluster_ips_stay_unique_beyond_the_node_port_range() {
        let state = cluster(20_000, 0).expect("fits");
        let mut node_ports = BTreeSet::new();
        let mut cluster_ips = BTreeSet::new();
        for service in &state.services {
            let spec = service.spec.as_ref().expect("a spec");
            assert!(cluster_ips.insert(spec.cluster_ip.clone()), "{spec:?}");
            for port in spec.ports.iter().flatten() {
                if let Some(n) = port.node_port {
                    assert!(node_ports.insert(n), "node port {n} twice");
                    assert!((30000..=32767).contains(&n));
                }
            }
            let has_node_port = spec.ports.iter().flatten().any(|p| p.node_port.is_some());
            assert_eq!(spec.type_.as_deref() == Some("NodePort"), has_node_port);
        }
        assert_eq!(node_ports.len(), 2768, "the whole range is used");
        // Small clusters are generated as before (golden files and benchmarks rely on it).
        let spec = |i: usize| state.services[i].spec.clone().expect("a spec");
        assert_eq!(spec(5).ports.expect("ports")[0].node_port, Some(30001));
        assert_eq!(spec(13_835).ports.expect("ports")[0].node_port, Some(32767));
        assert_eq!(spec(13_840).ports.expect("ports")[0].node_port, None);
        assert_eq!(spec(13_840).type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec(0).cluster_ip.as_deref(), Some("10.96.0.1"));
    }

    #[test]
    fn counts_the_ranges_cannot_hold_are_refused() {
        assert_eq!(
            cluster(usize::MAX, 10).err(),
            Some(TooLarge::Services {
                services: usize::MAX,
                max: 1_048_574
            })
        );
        assert!(matches!(
            cluster(1000, usize::MAX),
            Err(TooLarge::Endpoints { .. })
        ));
        assert!(matches!(
            cluster(100_000, 100),
            Err(TooLarge::Endpoints { .. })
        ));
        // Exactly at the edges: one more than the ranges hold.
        assert!(matches!(
            cluster(1_048_575, 0),
            Err(TooLarge::Services { .. })
        ));
        assert!(matches!(
            cluster(2, 4_194_304),
            Err(TooLarge::Endpoints { .. })
        ));
    }
}
