//! A change of some service ports as element changes alone (issue 11, the `maps` layout): an
//! EndpointSlice change adds, removes or changes a few endpoint-map elements, and the agent
//! sends just those, without building the whole table and comparing it with what was applied
//! (at 100,000 services that comparison is over a million elements).
//!
//! [`translate_delta`] translates the changed ports only and compares each with its previous
//! translation. It gives up (`None`, and the caller builds the whole table as usual) whenever
//! the change could reach beyond the port's own elements and the shared chains it needs (a
//! pick of a new size comes with the delta): a port added or removed, other node settings, or
//! an element added or removed outside the maps an endpoint change touches. (Which frontends a port has decides
//! the table-wide parts built after the ports — see `Translator::maps_shadowed_nodeports` — and
//! an element keyed by a frontend is only added or removed when the frontends change.)

use super::maps::{endpoint_map_frontend, pick_chains_gaining};
use super::*;
use rustc_hash::FxHashSet;

/// The element changes that take the table from the previous translation of some service
/// ports to the current one.
#[derive(Debug, Default)]
pub struct ElementDelta {
    /// Elements no longer wanted: container and key.
    pub removed: Vec<(Name, Vec<Value>)>,
    /// Elements new, or with another value or comment.
    pub added: Vec<Arc<Element>>,
    /// Chains to write whole: shared chains the changed ports need and the table lacks (a pick
    /// of a new size, a new affinity timeout), with their rules, and the pick chains that
    /// gain a pick.
    pub chains: Vec<Chain>,
    /// Endpoint maps the changed ports need and the table lacks (endpoints of a new number).
    pub maps: Vec<Map>,
    /// A changed port has ClientIP affinity: clients may be pinned to an endpoint it lost.
    pub affinity: bool,
}

/// The chains and maps of the table a delta is for (what the syncer last committed).
#[derive(Debug, Default, Clone)]
pub struct TableObjects {
    pub chains: FxHashSet<Name>,
    pub maps: FxHashSet<Name>,
}

/// The changes since the translations kept in `cache`, when they are element changes of the
/// `maps` layout alone (module docs); the changed ports' new translations are then kept in
/// `cache`. `table` is what the table holds.
pub fn translate_delta(
    model: &ProxyModel,
    config: &NodeConfig,
    cache: &mut PortCache,
    table: &TableObjects,
) -> Option<ElementDelta> {
    if config.nftables_layout != NftablesLayout::Maps
        || !cache.settings_match(&cache_settings(model, config))
    {
        return None;
    }
    let changed = cache.changed(&model.ports)?;
    let translator = Translator::new(model, config);
    let mut delta = ElementDelta::default();
    let mut parts = Vec::with_capacity(changed.len());
    for port in changed {
        let mut part = translator.empty_copy();
        part.service_port(port);
        let new = part.out.into_part();
        port_delta(cache.get(&port.name)?, &new, table, &mut delta)?;
        delta.affinity |= port.affinity_timeout.is_some();
        parts.push((port.clone(), new));
    }
    let added: Vec<Name> = delta.chains.iter().map(|c| c.name.clone()).collect();
    let gaining = pick_chains_gaining(table.chains.iter().map(|name| &**name), &added);
    delta.chains.extend(gaining);
    cache.replace(&model.ports, parts);
    Some(delta)
}

/// Adds the element changes from `old` to `new` (one port's translations) to `delta`; `None`
/// when the change is more than that.
fn port_delta(
    old: &PortObjects,
    new: &PortObjects,
    table: &TableObjects,
    delta: &mut ElementDelta,
) -> Option<()> {
    // A port declares no sets, and no maps but the endpoint maps it uses: one the table lacks
    // comes with the delta.
    if !old.sets.is_empty() || !new.sets.is_empty() {
        return None;
    }
    let endpoint_map = |container: &str| endpoint_map_frontend(container).is_some();
    if !old
        .maps
        .iter()
        .chain(&new.maps)
        .all(|m| endpoint_map(&m.name))
    {
        return None;
    }
    for map in &new.maps {
        if !table.maps.contains(&map.name) && !delta.maps.iter().any(|m| m.name == map.name) {
            delta.maps.push(map.clone());
        }
    }
    // A port's chains are the shared pick and remember chains, declared empty (their rules
    // come with the table-wide part): one the table lacks comes with the delta, with its rules.
    for chain in &new.chains {
        if !chain.rules.is_empty() {
            return None;
        }
        let known =
            table.chains.contains(&chain.name) || delta.chains.iter().any(|c| c.name == chain.name);
        if !known {
            delta.chains.push(Chain {
                name: chain.name.clone(),
                base: None,
                comment: None,
                rules: Arc::new(super::maps::shared_chain_rules(&chain.name)?),
            });
        }
    }
    let before: FxHashMap<(&str, &[Value]), &Arc<Element>> = old
        .elements
        .iter()
        .map(|e| ((&*e.container, e.key.as_slice()), e))
        .collect();
    let after: FxHashSet<(&str, &[Value])> = new
        .elements
        .iter()
        .map(|e| (&*e.container, e.key.as_slice()))
        .collect();
    for element in &new.elements {
        match before.get(&(&*element.container, element.key.as_slice())) {
            Some(kept) if **kept == *element => {}
            Some(_) => delta.added.push(element.clone()),
            None if endpoint_map(&element.container) => delta.added.push(element.clone()),
            None => return None,
        }
    }
    for element in &old.elements {
        if !after.contains(&(&*element.container, element.key.as_slice())) {
            if !endpoint_map(&element.container) {
                return None;
            }
            delta
                .removed
                .push((element.container.clone(), element.key.to_vec()));
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Manifests;

    fn manifest(endpoints: &[&str], extra_port: bool) -> String {
        let ports = if extra_port {
            "[{name: http, protocol: TCP, port: 80}, {name: dns, protocol: UDP, port: 53}]"
        } else {
            "[{name: http, protocol: TCP, port: 80}]"
        };
        let addresses: Vec<String> = endpoints
            .iter()
            .map(|a| format!("- addresses: [\"{a}\"]\n  conditions: {{ready: true}}\n"))
            .collect();
        format!(
            r#"
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: 172.30.0.10
  ports: {ports}
  sessionAffinity: ClientIP
---
apiVersion: v1
kind: Service
metadata: {{name: other, namespace: default}}
spec:
  clusterIP: 172.30.0.11
  ports: [{{name: http, protocol: TCP, port: 80}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 80}}]
endpoints:
{}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: other-1
  namespace: default
  labels: {{kubernetes.io/service-name: other}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 80}}]
endpoints:
- addresses: ["10.244.9.9"]
  conditions: {{ready: true}}
"#,
            addresses.concat()
        )
    }

    fn config() -> NodeConfig {
        let mut config = NodeConfig::new("node-1");
        config.node_ips = vec!["10.0.0.1".parse().expect("address")];
        config.nftables_layout = NftablesLayout::Maps;
        config
    }

    fn model(text: &str, config: &NodeConfig) -> ProxyModel {
        let mut manifests = Manifests::default();
        manifests
            .add_text(text, "test")
            .expect("the manifest reads");
        crate::pipeline::plan(&manifests.state, config)
            .models
            .remove(0)
    }

    /// `new`, sharing every port of `old` that is unchanged, as the agent's model does.
    fn shared(old: &ProxyModel, mut new: ProxyModel, changed: &str) -> ProxyModel {
        for port in new.ports.iter_mut() {
            if port.name.name != changed {
                if let Some(kept) = old.ports.iter().find(|p| p.name == port.name) {
                    *port = kept.clone();
                }
            }
        }
        new
    }

    /// The chains and maps of a translation, as the syncer reports them once it is committed.
    fn table(ruleset: &Ruleset) -> TableObjects {
        TableObjects {
            chains: ruleset.chains.iter().map(|c| c.name.clone()).collect(),
            maps: ruleset.maps.iter().map(|m| m.name.clone()).collect(),
        }
    }

    /// The elements of a translation, by container and key, as text.
    fn elements(ruleset: &Ruleset) -> std::collections::BTreeSet<String> {
        ruleset.elements.iter().map(|e| format!("{e:?}")).collect()
    }

    #[test]
    fn an_endpoint_change_is_the_element_difference_of_the_whole_translation() {
        let config = config();
        let old = model(&manifest(&["10.244.1.5", "10.244.2.7"], false), &config);
        let mut cache = PortCache::default();
        let before = translate_cached(&old, &config, &mut cache);
        let table = table(&before);
        // Two endpoints become two others (same count, same pick chain), then one of them goes.
        for endpoints in [
            &["10.244.1.5", "10.244.3.9"][..],
            &["10.244.3.9", "10.244.4.4"],
        ] {
            let new = shared(&old, model(&manifest(endpoints, false), &config), "web");
            let delta =
                translate_delta(&new, &config, &mut cache, &table).expect("an element change");
            assert!(delta.affinity);
            let after = translate(&new, &config);
            // Applying the delta to the old elements gives the new translation's elements.
            let mut applied: FxHashMap<(String, Vec<Value>), String> = before
                .elements
                .iter()
                .map(|e| ((e.container.to_string(), e.key.to_vec()), format!("{e:?}")))
                .collect();
            for (container, key) in &delta.removed {
                assert!(applied
                    .remove(&(container.to_string(), key.clone()))
                    .is_some());
            }
            for element in &delta.added {
                applied.insert(
                    (element.container.to_string(), element.key.to_vec()),
                    format!("{element:?}"),
                );
            }
            let got: std::collections::BTreeSet<String> = applied.into_values().collect();
            assert_eq!(got, elements(&after));
            // The cache now holds the new translation: the full path gives the same table.
            assert_eq!(translate_cached(&new, &config, &mut cache), after);
            // Back to the old endpoints for the next round.
            let back = translate_delta(&old, &config, &mut cache, &table);
            assert!(back.is_some());
        }
    }

    #[test]
    fn more_than_elements_and_shared_chains_goes_the_full_way() {
        let config = config();
        let old = model(&manifest(&["10.244.1.5", "10.244.2.7"], false), &config);
        let mut cache = PortCache::default();
        let before = translate_cached(&old, &config, &mut cache);
        let table = table(&before);
        // A third endpoint needs a pick of three, which the table does not have: its chain and
        // endpoint map come with the delta, as the whole translation has them, and the pick
        // chain that tries it gains it (and keeps the pick of two, unused now, until a full
        // sync).
        let three = shared(
            &old,
            model(
                &manifest(&["10.244.1.5", "10.244.2.7", "10.244.3.9"], false),
                &config,
            ),
            "web",
        );
        let delta = translate_delta(&three, &config, &mut cache, &table)
            .expect("elements, a map and chains");
        let whole = translate(&three, &config);
        let names: Vec<&str> = delta.chains.iter().map(|c| &*c.name).collect();
        assert_eq!(names, ["cluster-pick-3", "cluster-pick"]);
        assert_eq!(whole.chain("cluster-pick-3"), delta.chains.first());
        let maps: Vec<&Map> = delta.maps.iter().collect();
        assert_eq!(maps, [whole.map("cluster-endpoints-3").expect("the map")]);
        let jumps = |chain: &Chain| -> Vec<String> {
            chain
                .rules
                .iter()
                .map(|r| format!("{:?}", r.statements))
                .collect()
        };
        let mut expected = jumps(whole.chain("cluster-pick").expect("the pick chain"));
        expected.insert(
            2,
            format!("{:?}", [verdict(Verdict::Jump("cluster-pick-2".into()))]),
        );
        assert_eq!(jumps(&delta.chains[1]), expected);
        // Every element of the frontend moved to the map of three.
        assert!(delta
            .added
            .iter()
            .filter(|e| e.container.contains("endpoints"))
            .all(|e| &*e.container == "cluster-endpoints-3"));
        assert_eq!(
            delta
                .removed
                .iter()
                .filter(|(container, _)| &**container == "cluster-endpoints-2")
                .count(),
            2
        );
        // A port more: the set of ports changed.
        let ported = shared(
            &old,
            model(&manifest(&["10.244.1.5", "10.244.2.7"], true), &config),
            "web",
        );
        assert!(translate_delta(&ported, &config, &mut cache, &table).is_none());
        // No endpoints: the frontend leaves service-ips for no-endpoint-services.
        let mut cache = PortCache::default();
        translate_cached(&old, &config, &mut cache);
        let none = shared(&old, model(&manifest(&[], false), &config), "web");
        assert!(translate_delta(&none, &config, &mut cache, &table).is_none());
        // Other node settings.
        let mut moved = config.clone();
        moved.node_ips = vec!["10.0.0.2".parse().expect("address")];
        assert!(translate_delta(&old, &moved, &mut cache, &table).is_none());
        // kube-proxy's layout has no element path.
        let mut kube_proxy = config.clone();
        kube_proxy.nftables_layout = NftablesLayout::KubeProxy;
        assert!(translate_delta(&old, &kube_proxy, &mut cache, &table).is_none());
    }
}
