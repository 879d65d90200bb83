//! Health-check node ports (spec kube-proxy-agent.md §6.2): for every Service with a
//! `healthCheckNodePort` (LoadBalancer, `externalTrafficPolicy: Local`), a listener that tells
//! cloud load balancers whether this node has local endpoints. Opened and closed after each
//! successful sync to match the Services.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::Serialize;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use super::http::{serve, Reply};
use crate::model::ProxyModel;

/// What one health-check port reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceHealth {
    pub namespace: String,
    pub name: String,
    /// Distinct IPs of this node's ready endpoints over all the Service's ports.
    pub local_endpoints: usize,
}

/// The health-check ports the models ask for, with their local endpoint counts.
pub fn wanted(models: &[ProxyModel]) -> BTreeMap<u16, ServiceHealth> {
    let mut ips: BTreeMap<u16, (ServiceHealth, std::collections::BTreeSet<IpAddr>)> =
        BTreeMap::new();
    for port in models.iter().flat_map(|m| &m.ports) {
        let Some(health_port) = port.health_check_node_port else {
            continue;
        };
        let entry = ips.entry(health_port).or_insert_with(|| {
            (
                ServiceHealth {
                    namespace: port.name.namespace.clone(),
                    name: port.name.name.clone(),
                    local_endpoints: 0,
                },
                Default::default(),
            )
        });
        entry.1.extend(
            port.endpoints
                .iter()
                .filter(|e| e.local && e.ready && !e.terminating)
                .map(|e| e.ip()),
        );
    }
    ips.into_iter()
        .map(|(port, (mut health, ips))| {
            health.local_endpoints = ips.len();
            (port, health)
        })
        .collect()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    service: ServiceRef<'a>,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(Serialize)]
struct ServiceRef<'a> {
    namespace: &'a str,
    name: &'a str,
}

/// kube-proxy's answer: 200 while there are local endpoints and the proxy is healthy.
pub fn reply(namespace: &str, name: &str, local_endpoints: usize, proxy_healthy: bool) -> Reply {
    let body = Body {
        service: ServiceRef { namespace, name },
        local_endpoints,
        service_proxy_healthy: proxy_healthy,
    };
    let mut text = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"\t");
    let mut serializer = serde_json::Serializer::with_formatter(&mut text, formatter);
    let _ = body.serialize(&mut serializer);
    let status = if local_endpoints > 0 && proxy_healthy {
        200
    } else {
        503
    };
    Reply::new(
        status,
        "application/json",
        String::from_utf8(text).unwrap_or_default(),
    )
    .with_header("X-Content-Type-Options", "nosniff")
    .with_header(
        "X-Load-Balancing-Endpoint-Weight",
        local_endpoints.to_string(),
    )
}

struct Listener {
    service: (String, String),
    local_endpoints: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The open health-check listeners.
pub struct ServiceHealthServers {
    runtime: Handle,
    /// Where to listen: the node's addresses in `--nodeport-addresses`, or every address.
    addresses: Vec<IpAddr>,
    proxy_healthy: Arc<dyn Fn() -> bool + Send + Sync>,
    listeners: BTreeMap<u16, Listener>,
}

impl ServiceHealthServers {
    pub fn new(
        runtime: Handle,
        addresses: Vec<IpAddr>,
        proxy_healthy: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> ServiceHealthServers {
        let addresses = if addresses.is_empty() {
            vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)]
        } else {
            addresses
        };
        ServiceHealthServers {
            runtime,
            addresses,
            proxy_healthy,
            listeners: BTreeMap::new(),
        }
    }

    /// Opens, closes and updates listeners to match `wanted`. A port that cannot be opened is
    /// reported and tried again at the next reconciliation.
    pub fn reconcile(&mut self, wanted: &BTreeMap<u16, ServiceHealth>) {
        self.listeners.retain(|port, listener| {
            wanted.get(port).is_some_and(|w| {
                (w.namespace.as_str(), w.name.as_str())
                    == (listener.service.0.as_str(), listener.service.1.as_str())
            })
        });
        for (&port, health) in wanted {
            if let Some(listener) = self.listeners.get(&port) {
                listener
                    .local_endpoints
                    .store(health.local_endpoints, Ordering::Relaxed);
                continue;
            }
            match self.open(port, health) {
                Ok(listener) => {
                    tracing::info!(
                        "serving the health check of Service {}/{} on port {port}",
                        health.namespace,
                        health.name
                    );
                    self.listeners.insert(port, listener);
                }
                Err(err) => tracing::error!(
                    "cannot open health check port {port} of Service {}/{}: {err}; retrying at the next sync",
                    health.namespace,
                    health.name
                ),
            }
        }
    }

    fn open(&self, port: u16, health: &ServiceHealth) -> std::io::Result<Listener> {
        let local_endpoints = Arc::new(AtomicUsize::new(health.local_endpoints));
        let mut tasks = Vec::new();
        let _context = self.runtime.enter();
        for &address in &self.addresses {
            let socket = std::net::TcpListener::bind(SocketAddr::new(address, port))?;
            socket.set_nonblocking(true)?;
            let socket = tokio::net::TcpListener::from_std(socket)?;
            let (namespace, name) = (health.namespace.clone(), health.name.clone());
            let count = local_endpoints.clone();
            let healthy = self.proxy_healthy.clone();
            let handler = Arc::new(move |_: &str| {
                reply(&namespace, &name, count.load(Ordering::Relaxed), healthy())
            });
            tasks.push(self.runtime.spawn(serve(socket, handler)));
        }
        Ok(Listener {
            service: (health.namespace.clone(), health.name.clone()),
            local_endpoints,
            tasks,
        })
    }

    /// The ports currently open.
    pub fn ports(&self) -> Vec<u16> {
        self.listeners.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_is_kube_proxys_body() {
        let ok = reply("ns", "svc", 2, true);
        assert_eq!(ok.status, 200);
        assert_eq!(
            ok.body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"ns\",\n\t\t\"name\": \"svc\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        assert_eq!(reply("ns", "svc", 0, true).status, 503);
        assert_eq!(reply("ns", "svc", 3, false).status, 503);
    }
}
