//! A synthetic cluster for benchmarks: `services` Services with `endpoints` ready endpoints each.
//! Every tenth Service has ClientIP affinity, every fifth is a NodePort, every twentieth has a
//! second (UDP) port. Addresses are unique: cluster IPs from 10.96.0.0/12, pods from 10.128.0.0/9.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{
    ClientIPConfig, Service, ServicePort, ServiceSpec, SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::source::ClusterState;

/// The synthetic cluster as API objects.
pub fn cluster(services: usize, endpoints: usize) -> ClusterState {
    let mut state = ClusterState::default();
    for i in 0..services {
        state.services.push(service(i));
        state.endpoint_slices.push(slice(i, endpoints));
    }
    state
}

fn namespace(i: usize) -> String {
    format!("ns{}", i % 100)
}

fn ipv4(base: u32, offset: usize) -> String {
    Ipv4Addr::from(base.wrapping_add(offset as u32)).to_string()
}

fn service(i: usize) -> Service {
    let node_port = i % 5 == 0;
    let mut ports = vec![ServicePort {
        name: Some("http".into()),
        protocol: Some("TCP".into()),
        port: 80,
        node_port: node_port.then_some(30000 + (i / 5 % 2768) as i32),
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
            type_: Some(if node_port { "NodePort" } else { "ClusterIP" }.into()),
            cluster_ip: Some(ipv4(0x0a60_0000, i + 1)),
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
                addresses: vec![ipv4(0x0a80_0000, i * endpoints + j + 1)],
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
