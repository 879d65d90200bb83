//! Manifests for the traffic tests on a [`Topology`], and what the clients reach: Services with
//! an HTTP (TCP 80) and a DNS (UDP 53) port, EndpointSlices of the topology's backends
//! (`10.244.N.2:8080` / `fd00:244:N::2:8080` on node `node-N`), and `kproxy sync --once` over
//! them in the node namespace.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use super::topology::{Topology, BACKEND_PORT, CLUSTER_CIDR, NODE_IP};

/// The namespace of every object here.
pub const NAMESPACE: &str = "test";
/// The node kproxy runs as: backend 1 (`node-1`) is its local endpoint.
pub const HOSTNAME: &str = "node-1";

/// A Service with TCP port `http` 80 and UDP port `dns` 53, both to the backends' 8080.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    /// One cluster IP per family, the primary first.
    pub cluster_ips: Vec<String>,
    /// ClientIP affinity with this timeout (seconds).
    pub affinity: Option<u32>,
    /// A NodePort for the TCP port (and type NodePort).
    pub node_port: Option<u16>,
    pub external_policy_local: bool,
    pub internal_policy_local: bool,
}

impl Service {
    pub fn new(name: &str, cluster_ip: &str) -> Service {
        Service {
            name: name.to_string(),
            cluster_ips: vec![cluster_ip.to_string()],
            affinity: None,
            node_port: None,
            external_policy_local: false,
            internal_policy_local: false,
        }
    }

    pub fn affinity(mut self, timeout_seconds: u32) -> Service {
        self.affinity = Some(timeout_seconds);
        self
    }

    pub fn node_port(mut self, port: u16) -> Service {
        self.node_port = Some(port);
        self
    }

    /// A second cluster IP, of the other family (dual-stack).
    pub fn also(mut self, cluster_ip: &str) -> Service {
        self.cluster_ips.push(cluster_ip.to_string());
        self
    }

    pub fn external_policy_local(mut self) -> Service {
        self.external_policy_local = true;
        self
    }

    pub fn internal_policy_local(mut self) -> Service {
        self.internal_policy_local = true;
        self
    }

    pub fn yaml(&self) -> String {
        let kind = if self.node_port.is_some() {
            "NodePort"
        } else {
            "ClusterIP"
        };
        let node_port = self
            .node_port
            .map(|p| format!(", nodePort: {p}"))
            .unwrap_or_default();
        let families: Vec<&str> = self
            .cluster_ips
            .iter()
            .map(|ip| if ip.contains(':') { "IPv6" } else { "IPv4" })
            .collect();
        let mut spec = format!(
            "  type: {kind}\n  clusterIP: {}\n  clusterIPs: [{}]\n  ipFamilies: [{}]\n",
            self.cluster_ips.first().map(String::as_str).unwrap_or(""),
            quoted(&self.cluster_ips),
            families.join(", ")
        );
        if self.cluster_ips.len() > 1 {
            spec.push_str("  ipFamilyPolicy: RequireDualStack\n");
        }
        spec.push_str(&format!(
            "  ports:\n  - {{name: http, protocol: TCP, port: 80{node_port}}}\n  - {{name: dns, protocol: UDP, port: 53}}\n"
        ));
        if let Some(t) = self.affinity {
            spec.push_str(&format!(
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {t}}}}}\n"
            ));
        }
        if self.external_policy_local {
            spec.push_str("  externalTrafficPolicy: Local\n");
        }
        if self.internal_policy_local {
            spec.push_str("  internalTrafficPolicy: Local\n");
        }
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {NAMESPACE}}}\nspec:\n{spec}",
            self.name
        )
    }
}

fn quoted(items: &[String]) -> String {
    items
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The IPv4 EndpointSlice of `service` with the backends numbered in `backends`
/// (`10.244.N.2:8080` on `node-N`); none is an empty slice.
pub fn slice(service: &str, backends: &[usize]) -> String {
    endpoint_slice(service, "IPv4", backends, |n| format!("10.244.{n}.2"))
}

/// The IPv6 EndpointSlice of `service` (`fd00:244:N::2:8080` on `node-N`).
pub fn slice6(service: &str, backends: &[usize]) -> String {
    endpoint_slice(service, "IPv6", backends, |n| {
        format!("\"fd00:244:{n}::2\"")
    })
}

fn endpoint_slice(
    service: &str,
    family: &str,
    backends: &[usize],
    address: impl Fn(usize) -> String,
) -> String {
    let endpoints: String = backends
        .iter()
        .map(|&n| format!("- {{addresses: [{}], nodeName: node-{n}}}\n", address(n)))
        .collect();
    let endpoints = if endpoints.is_empty() {
        "[]\n".to_string()
    } else {
        format!("\n{endpoints}")
    };
    let suffix = if family == "IPv6" { "v6" } else { "1" };
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-{suffix}, namespace: {NAMESPACE}, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: {family}\nports:\n- {{name: http, protocol: TCP, port: {BACKEND_PORT}}}\n- {{name: dns, protocol: UDP, port: {BACKEND_PORT}}}\nendpoints: {endpoints}"
    )
}

/// Writes manifests to a file that lives as long as the returned directory.
pub fn manifest_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cluster.yaml");
    std::fs::write(&path, text).expect("write manifests");
    (dir, path)
}

/// `kproxy sync --once --hostname node-1 --node-ip 10.100.0.1 --cluster-cidr 10.244.0.0/16
/// FLAGS FILE` in the node namespace; panics when it fails.
pub fn sync_once(topology: &Topology, flags: &[&str], manifests: &str) {
    let (_dir, path) = manifest_file(manifests);
    let path = path.to_string_lossy();
    let mut args = vec![
        "sync",
        "--once",
        "--hostname",
        HOSTNAME,
        "--node-ip",
        NODE_IP,
        "--cluster-cidr",
        CLUSTER_CIDR,
    ];
    args.extend_from_slice(flags);
    args.push(&path);
    let out = topology.kproxy(&args);
    assert!(
        out.status.success(),
        "kproxy {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn backend_names(n: &[usize]) -> BTreeSet<String> {
    n.iter().map(|i| format!("backend-{i}")).collect()
}

/// The number of backend `backend-N`.
pub fn backend_number(name: &str) -> Option<usize> {
    name.strip_prefix("backend-")?.parse().ok()
}

/// Which backend each client (10.100.0.2..=9) reaches at `target:port`, after checking that all
/// of its `count` connections reach the same one.
pub fn placement(
    topology: &Topology,
    proto: &str,
    target: &str,
    port: u16,
    count: usize,
) -> BTreeMap<u8, String> {
    (2..=9)
        .map(|client| {
            let answers = topology.connect(proto, client, target, port, count);
            assert_eq!(answers.len(), count, "client {client}: {answers:?}");
            let first = answers[0].clone();
            assert!(
                first.starts_with("backend-"),
                "client {client} to {proto} {target}:{port}: {answers:?}"
            );
            assert!(
                answers.iter().all(|a| *a == first),
                "client {client} to {proto} {target}:{port} was not kept on one endpoint: {answers:?}"
            );
            (client, first)
        })
        .collect()
}
