//! The node's [`ProxyModel`]s, kept per Service between syncs: a sync rebuilds the service ports
//! of the Services that changed and reuses the others (shared, not copied).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::store::{ClusterStore, ServiceKey};
use crate::config::NodeConfig;
use crate::family::IpFamily;
use crate::model::{service_ports, ProxyModel, ServicePort};

/// Per family, the service ports of every proxied Service in canonical order.
#[derive(Debug, Default)]
pub struct NodeModel {
    families: BTreeMap<IpFamily, BTreeMap<ServiceKey, Vec<Arc<ServicePort>>>>,
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
        for &family in config.family_mode.families() {
            let ports = self.families.entry(family).or_default();
            let keys_before: Vec<ServiceKey> = match changed {
                Some(_) => Vec::new(),
                None => ports.keys().cloned().collect(),
            };
            let mut rebuild = |key: &ServiceKey| match store.service(key) {
                Some(service) => {
                    let built = service_ports(
                        service,
                        &store.withheld(key),
                        &store.slices_of(key),
                        config,
                        family,
                    );
                    if built.is_empty() {
                        ports.remove(key);
                    } else {
                        ports.insert(key.clone(), built);
                    }
                }
                None => {
                    ports.remove(key);
                }
            };
            match changed {
                Some(keys) => keys.iter().for_each(&mut rebuild),
                None => {
                    let keys: BTreeSet<ServiceKey> = store
                        .services()
                        .map(|(k, _)| k.clone())
                        .chain(keys_before)
                        .collect();
                    keys.iter().for_each(&mut rebuild);
                }
            }
        }
        let wanted = config.family_mode.families();
        self.families.retain(|family, _| wanted.contains(family));
    }

    /// One model per family, in kube-proxy's order.
    pub fn models(&self) -> Vec<ProxyModel> {
        self.families
            .iter()
            .map(|(&family, services)| ProxyModel {
                family,
                ports: services.values().flatten().cloned().collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Manifests;
    use std::time::SystemTime;

    /// The agent's model must equal the one `render` builds from the same objects.
    #[test]
    fn incremental_models_equal_a_full_build() {
        let state = crate::synthetic::cluster(40, 3);
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
}
