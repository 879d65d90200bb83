//! The node's [`ProxyModel`]s, kept per Service between syncs: a sync rebuilds the service ports
//! of the Services that changed and reuses the others (shared, not copied). The models handed
//! to the backend are kept too, and only the changed Services' ports are replaced in them: at
//! 100,000 Services, building them anew touches every port (an `Arc` clone each), which costs
//! more than the rest of a one-Service sync.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::store::{ClusterStore, ServiceKey};
use crate::config::NodeConfig;
use crate::family::IpFamily;
use crate::model::{service_ports, ProxyModel, ServicePort, ServicePortName};

/// Per family, the service ports of every proxied Service in canonical order.
#[derive(Debug, Default)]
pub struct NodeModel {
    families: BTreeMap<IpFamily, BTreeMap<ServiceKey, Vec<Arc<ServicePort>>>>,
    /// The same ports as one model per family, in the order of `families`.
    models: Vec<ProxyModel>,
}

impl NodeModel {
    /// Rebuilds the Services in `changed` from the store; with `None`, every Service (after
    /// a change of the node's settings, which every endpoint selection depends on).
    pub fn update(
        &mut self,
        store: &ClusterStore,
        changed: Option<&BTreeSet<ServiceKey>>,
        config: &NodeConfig,
    ) {
        let wanted = config.family_mode.families();
        self.families.retain(|family, _| wanted.contains(family));
        // The kept models are updated in place when they are those of the wanted families.
        let in_step = changed.is_some()
            && self.models.len() == wanted.len()
            && wanted
                .iter()
                .all(|f| self.models.iter().any(|m| m.family == *f));
        for &family in wanted {
            let services = self.families.entry(family).or_default();
            let keys: Cow<BTreeSet<ServiceKey>> = match changed {
                Some(keys) => Cow::Borrowed(keys),
                None => Cow::Owned(
                    store
                        .services()
                        .map(|(k, _)| k.clone())
                        .chain(services.keys().cloned())
                        .collect(),
                ),
            };
            let model = self.models.iter_mut().find(|m| m.family == family);
            let mut model = model.filter(|_| in_step);
            for key in keys.iter() {
                let built = store.service(key).map(|service| {
                    service_ports(
                        service,
                        &store.withheld(key),
                        &store.slices_of(key),
                        config,
                        family,
                    )
                });
                let built = built.unwrap_or_default();
                if let Some(model) = model.as_deref_mut() {
                    replace_service(&mut model.ports, key, &built);
                }
                if built.is_empty() {
                    services.remove(key);
                } else {
                    services.insert(key.clone(), built);
                }
            }
        }
        if !in_step {
            self.models = self
                .families
                .iter()
                .map(|(&family, services)| ProxyModel {
                    family,
                    ports: services.values().flatten().cloned().collect(),
                })
                .collect();
        }
    }

    /// One model per family, in kube-proxy's order.
    pub fn models(&self) -> &[ProxyModel] {
        &self.models
    }
}

/// Puts `built` in place of the ports of Service `key` in `ports` (ordered by Service key).
fn replace_service(ports: &mut Vec<Arc<ServicePort>>, key: &str, built: &[Arc<ServicePort>]) {
    let start = ports.partition_point(|p| service_order(&p.name, key) == Ordering::Less);
    let end = start
        + ports[start..]
            .iter()
            .take_while(|p| service_order(&p.name, key) == Ordering::Equal)
            .count();
    ports.splice(start..end, built.iter().cloned());
}

/// How the Service of `port` sorts against the Service key `key` (`namespace/name`), as the
/// keys themselves sort, without building the port's key.
fn service_order(port: &ServicePortName, key: &str) -> Ordering {
    let port_key = port
        .namespace
        .bytes()
        .chain(std::iter::once(b'/'))
        .chain(port.name.bytes());
    port_key.cmp(key.bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Manifests;
    use std::time::SystemTime;

    /// Services of a small pool that share cluster IPs, node ports and external IPs are
    /// applied, changed and deleted in a fixed pseudo-random order; after every step the
    /// agent's incrementally updated models equal the ones `render` builds from scratch.
    #[test]
    fn incremental_models_equal_a_full_build_through_conflicts() {
        use k8s_openapi::api::core::v1::Service;
        use k8s_openapi::api::discovery::v1::EndpointSlice;
        use std::collections::BTreeMap;

        let config = NodeConfig::new("node-a");
        let mut store = ClusterStore::new(SystemTime::UNIX_EPOCH);
        let mut model = NodeModel::default();
        let slices: Vec<EndpointSlice> = (0..6)
            .map(|i| {
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": format!("s{i}-1"), "namespace": "ns",
                                 "labels": {"kubernetes.io/service-name": format!("s{i}")}},
                    "addressType": "IPv4",
                    "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
                    "endpoints": [{"addresses": [format!("10.244.0.{}", i + 1)],
                                   "nodeName": if i % 2 == 0 { "node-a" } else { "node-b" }}]
                }))
                .expect("a valid EndpointSlice")
            })
            .collect();
        store.replace_slices(&slices);
        let mut services: BTreeMap<String, Service> = BTreeMap::new();
        let mut seed: u64 = 0x5eed;
        let mut conflicts_seen = 0;
        for step in 0..400 {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let pick = |shift: u32, n: u64| (seed >> shift) % n;
            let name = format!("s{}", pick(33, 6));
            if pick(40, 5) == 0 {
                store.delete_service("ns", &name);
                services.remove(&name);
            } else {
                let mut metadata = serde_json::json!({"name": name, "namespace": "ns"});
                if pick(44, 3) != 0 {
                    metadata["creationTimestamp"] =
                        format!("2024-01-0{}T00:00:00Z", 1 + pick(46, 3)).into();
                }
                let service: Service = serde_json::from_value(serde_json::json!({
                    "metadata": metadata,
                    "spec": {
                        "type": "NodePort",
                        "clusterIP": format!("10.96.0.{}", 1 + pick(50, 3)),
                        "externalIPs": [format!("192.0.2.{}", 1 + pick(53, 2))],
                        "externalTrafficPolicy": if pick(55, 2) == 0 { "Local" } else { "Cluster" },
                        "ports": [{"name": "p", "port": 80 + pick(57, 2) as i32, "protocol": "TCP",
                                   "nodePort": 30000 + pick(59, 3) as i32}]
                    }
                }))
                .expect("a valid Service");
                store.apply_service(&service);
                services.insert(name, service);
            }
            let (changes, _) = store.take_changes();
            model.update(&store, Some(&changes.services), &config);

            let state = crate::source::ClusterState {
                services: services.values().cloned().collect(),
                endpoint_slices: slices.clone(),
            };
            let full = crate::pipeline::plan(&state, &config);
            conflicts_seen += full.notes.len();
            assert_eq!(
                format!("{:?}", model.models()),
                format!("{:?}", full.models),
                "step {step}: incremental and full models differ"
            );
        }
        assert!(
            conflicts_seen > 100,
            "the pool must conflict often: {conflicts_seen}"
        );
    }

    /// The agent's model must equal the one `render` builds from the same objects.
    #[test]
    fn incremental_models_equal_a_full_build() {
        let state = crate::synthetic::cluster(40, 3).expect("fits");
        let config = NodeConfig::new("node-a");
        let mut store = ClusterStore::new(SystemTime::UNIX_EPOCH);
        store.replace_services(&state.services);
        store.replace_slices(&state.endpoint_slices);
        let mut model = NodeModel::default();
        let (changes, _) = store.take_changes();
        model.update(&store, Some(&changes.services), &config);

        // Change one slice and delete one Service, then update only what changed.
        let mut slices = state.endpoint_slices.clone();
        slices[3].endpoints.truncate(1);
        let services: Vec<_> = state.services[1..].to_vec();
        store.replace_slices(&slices);
        store.replace_services(&services);
        let (changes, _) = store.take_changes();
        assert_eq!(changes.services.len(), 2, "{:?}", changes.services);
        model.update(&store, Some(&changes.services), &config);

        let mut manifests = Manifests::default();
        manifests.state.services = services;
        manifests.state.endpoint_slices = slices;
        let full = crate::pipeline::plan(&manifests.state, &config).models;
        assert_eq!(
            format!("{:?}", model.models()),
            format!("{full:?}"),
            "incremental and full models differ"
        );
    }

    /// Services added one at a time to a synced table, as the agent does (its model shares the
    /// ports of unchanged Services, the backend takes the element path): after each, the
    /// table holds what a whole-table sync of the same models holds.
    #[test]
    fn added_services_reach_the_table_as_a_whole_sync_would() {
        use crate::backend::{Backend, NftablesBackend};
        use crate::config::NftablesLayout;
        use crate::family::IpFamily;
        use crate::sync::nftables::{FakeKernel, SyncOptions};

        let mut config = NodeConfig::new("node-a");
        config.node_ips = vec!["10.100.0.1".parse().expect("address")];
        config.nftables_layout = NftablesLayout::Maps;
        let state = crate::synthetic::cluster(60, 3).expect("fits");
        let (first, added) = state.services.split_at(40);
        let mut store = ClusterStore::new(SystemTime::UNIX_EPOCH);
        store.replace_services(first);
        store.replace_slices(&state.endpoint_slices);
        let mut model = NodeModel::default();
        let (changes, _) = store.take_changes();
        model.update(&store, Some(&changes.services), &config);
        let mut backend = NftablesBackend::new(FakeKernel::new(), SyncOptions::default());
        let synced = backend.sync(model.models(), &config);
        assert!(synced[0].result.is_ok());
        for service in added {
            store.apply_service(service);
            let (changes, _) = store.take_changes();
            model.update(&store, Some(&changes.services), &config);
            let synced = backend.sync(model.models(), &config);
            assert!(synced[0].result.as_ref().is_ok_and(|r| !r.full));
            let mut whole = NftablesBackend::new(FakeKernel::new(), SyncOptions::default());
            whole.sync(model.models(), &config);
            let lines = |dump: String| -> Vec<String> {
                let mut lines: Vec<String> = dump.lines().map(str::to_string).collect();
                lines.sort();
                lines
            };
            let name = service.metadata.name.clone().unwrap_or_default();
            assert_eq!(
                lines(backend.syncer().applier().dump(IpFamily::V4)),
                lines(whole.syncer().applier().dump(IpFamily::V4)),
                "after adding {name}"
            );
        }
    }
}
