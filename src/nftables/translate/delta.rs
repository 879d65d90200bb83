//! A change of some service ports as element changes alone (issue 11, the `maps` layout): an
//! EndpointSlice change adds, removes or changes a few endpoint-map elements, and the agent
//! sends just those, without building the whole table and comparing it with what was applied
//! (at 100,000 services that comparison is over a million elements).
//!
//! [`translate_delta`] translates the changed and the added ports only, compares each changed
//! one with its previous translation, and adds or removes the elements of ports added or
//! removed. An element that ports share (the cluster IP of a Service's ports, a hairpin entry)
//! is removed only when no other port has it. It gives up (`None`, and the caller builds the
//! whole table as usual) when the change could reach beyond the ports' own elements and the
//! chains and maps they declare (a pick of a new size, with its chain and endpoint map, comes
//! with the delta): other node settings, or a port changed, added or removed that bears on the
//! table-wide `remember-nothing` elements (`Translator::maps_shadowed_nodeports`: a NodePort
//! with affinity comes or goes, or a frontend comes or goes on the protocol and port of one).

use super::maps::{
    endpoint_map_frontend, pick_chains_gaining, AFFINITY_TIMEOUTS, NODEPORT_AFFINITY_TIMEOUTS,
};
use super::*;
use crate::model::ServicePortName;
use crate::nftables::affinity_pins::ElementLookup;
use crate::port_cache::PortChanges;
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
    /// A changed or removed port has (or had) ClientIP affinity: clients may be pinned to an
    /// endpoint it lost, or to a frontend without affinity now.
    pub affinity: bool,
}

/// The chains and maps of the table a delta is for (what the syncer last committed).
#[derive(Debug, Default, Clone)]
pub struct TableObjects {
    pub chains: FxHashSet<Name>,
    pub maps: FxHashSet<Name>,
}

/// The changes since the translations kept in `cache`, when they are element changes of the
/// `maps` layout alone (module docs); `cache` then keeps the new ports' translations and forgets
/// the removed ones. `table` and `committed` are what the syncer last committed.
pub fn translate_delta(
    model: &ProxyModel,
    config: &NodeConfig,
    cache: &mut PortCache,
    table: &TableObjects,
    committed: &dyn ElementLookup,
) -> Option<ElementDelta> {
    if config.nftables_layout != NftablesLayout::Maps
        || !cache.settings_match(&cache_settings(model, config))
    {
        return None;
    }
    let changes = cache.changes(&model.ports);
    let translator = Translator::new(model, config);
    let translate = |port: &ServicePort| {
        let mut part = translator.empty_copy();
        part.service_port(port);
        part.out.into_part()
    };
    // A NodePort with affinity in the table (`protocol . port`).
    let sticky = |node_port: &[Value]| {
        committed
            .element(NODEPORT_AFFINITY_TIMEOUTS, node_port)
            .is_some()
    };
    let mut delta = ElementDelta::default();
    let mut parts = Vec::with_capacity(changes.changed.len() + changes.added.len());
    // Elements of shared containers a port no longer has: removed unless another port has them.
    let mut unshared: Vec<(Name, Vec<Value>)> = Vec::new();
    for &port in &changes.changed {
        let new = translate(port);
        let (old_port, old) = cache.kept(&port.name)?;
        unshadowed(Some(old), Some(&new), &sticky)?;
        declarations(&new, table, &mut delta)?;
        port_delta(old, &new, &mut delta, &mut unshared);
        // Pins to check: of an endpoint gone, or of a frontend that lost its affinity.
        delta.affinity |= port.affinity_timeout.is_some() || old_port.affinity_timeout.is_some();
        parts.push((port.clone(), new));
    }
    for &port in &changes.added {
        let new = translate(port);
        unshadowed(None, Some(&new), &sticky)?;
        declarations(&new, table, &mut delta)?;
        delta.added.extend(new.elements.iter().cloned());
        parts.push((port.clone(), new));
    }
    for name in &changes.removed {
        let (port, old) = cache.kept(name)?;
        unshadowed(Some(old), None, &sticky)?;
        for element in &old.elements {
            let id = (element.container.clone(), element.key.to_vec());
            if is_shared(&element.container) {
                unshared.push(id);
            } else {
                delta.removed.push(id);
            }
        }
        delta.affinity |= port.affinity_timeout.is_some();
    }
    if !unshared.is_empty() {
        // Once each: the ports of one Service all have its cluster IP.
        unshared.sort();
        unshared.dedup();
        let mut still = still_had(cache, &changes, &parts, &unshared);
        delta
            .removed
            .extend(unshared.into_iter().filter(|id| !still.remove(id)));
    }
    // Once each, too (the ports of a Service added together all have its cluster IP); the last
    // one wins, as in the whole table.
    let mut seen = FxHashSet::default();
    delta.added.reverse();
    delta
        .added
        .retain(|e| seen.insert((e.container.clone(), e.key.to_vec())));
    delta.added.reverse();
    let added: Vec<Name> = delta.chains.iter().map(|c| c.name.clone()).collect();
    let gaining = pick_chains_gaining(table.chains.iter().map(|name| &**name), &added);
    delta.chains.extend(gaining);
    cache.apply(&model.ports, parts, &changes.removed);
    Some(delta)
}

/// Which of `unshared` (elements of shared containers a changed or removed port no longer
/// has) another port still has: a kept port, or a changed or added port's new translation.
/// A pass over every kept port's elements (at 100,000 Services about 0.1 s: only when such an
/// element goes).
fn still_had(
    cache: &PortCache,
    changes: &PortChanges<'_>,
    parts: &[(Arc<ServicePort>, PortObjects)],
    unshared: &[(Name, Vec<Value>)],
) -> FxHashSet<(Name, Vec<Value>)> {
    let wanted: FxHashSet<(&str, &[Value])> = unshared
        .iter()
        .map(|(container, key)| (&**container, key.as_slice()))
        .collect();
    let replaced: FxHashSet<&ServicePortName> = changes
        .removed
        .iter()
        .chain(changes.changed.iter().map(|p| &p.name))
        .collect();
    let kept = cache
        .parts()
        .filter(|(port, _)| !replaced.contains(&port.name))
        .map(|(_, part)| part);
    let mut found = FxHashSet::default();
    for part in kept.chain(parts.iter().map(|(_, part)| part)) {
        for element in &part.elements {
            if wanted.contains(&(&*element.container, element.key.as_slice())) {
                found.insert((element.container.clone(), element.key.to_vec()));
            }
        }
    }
    found
}

/// `None` when replacing a port's translation `old` with `new` (either absent for a port added
/// or removed) changes the table-wide `remember-nothing` elements
/// (`Translator::maps_shadowed_nodeports`): a NodePort with affinity comes or goes, or a
/// frontend comes or goes from `service-ips` or `affinity-timeouts` on the protocol and port of
/// a NodePort with affinity (`sticky`).
fn unshadowed(
    old: Option<&PortObjects>,
    new: Option<&PortObjects>,
    sticky: &dyn Fn(&[Value]) -> bool,
) -> Option<()> {
    let keys = |part: Option<&PortObjects>, container: &str| -> FxHashSet<Vec<Value>> {
        part.into_iter()
            .flat_map(|p| &p.elements)
            .filter(|e| *e.container == *container)
            .map(|e| e.key.to_vec())
            .collect()
    };
    if keys(old, NODEPORT_AFFINITY_TIMEOUTS) != keys(new, NODEPORT_AFFINITY_TIMEOUTS) {
        return None;
    }
    for container in [SERVICE_IPS, AFFINITY_TIMEOUTS] {
        let (before, after) = (keys(old, container), keys(new, container));
        for key in before.symmetric_difference(&after) {
            if key.get(1..).is_some_and(sticky) {
                return None;
            }
        }
    }
    Some(())
}

/// Containers whose elements more than one port may have.
fn is_shared(container: &str) -> bool {
    container == CLUSTER_IPS || container == HAIRPIN_CONNECTIONS
}

/// Adds what `part` declares and the table lacks (endpoint maps, shared pick and remember
/// chains with their rules) to `delta`; `None` when it declares anything else.
fn declarations(part: &PortObjects, table: &TableObjects, delta: &mut ElementDelta) -> Option<()> {
    // A port declares no sets, and no maps but the endpoint maps it uses.
    if !part.sets.is_empty() || !part.maps.iter().all(|m| is_endpoint_map(&m.name)) {
        return None;
    }
    for map in &part.maps {
        if !table.maps.contains(&map.name) && !delta.maps.iter().any(|m| m.name == map.name) {
            delta.maps.push(map.clone());
        }
    }
    // A port's chains are the shared pick and remember chains, declared empty (their rules
    // come with the table-wide part).
    for chain in &part.chains {
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
    Some(())
}

fn is_endpoint_map(container: &str) -> bool {
    endpoint_map_frontend(container).is_some()
}

/// Adds the element changes from `old` to `new` (one port's translations) to `delta`;
/// elements of shared containers that go are put in `unshared` instead, to be checked.
fn port_delta(
    old: &PortObjects,
    new: &PortObjects,
    delta: &mut ElementDelta,
    unshared: &mut Vec<(Name, Vec<Value>)>,
) {
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
            _ => delta.added.push(element.clone()),
        }
    }
    for element in &old.elements {
        if !after.contains(&(&*element.container, element.key.as_slice())) {
            let id = (element.container.clone(), element.key.to_vec());
            if is_shared(&element.container) {
                unshared.push(id);
            } else {
                delta.removed.push(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nftables::affinity_pins::RulesetElements;
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

    /// The elements of a translation, as the syncer looks them up once it is committed.
    fn committed_of(ruleset: &Ruleset) -> RulesetElements {
        RulesetElements::of(ruleset)
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
        let committed = committed_of(&before);
        // Two endpoints become two others (same count, same pick chain), then one of them goes.
        for endpoints in [
            &["10.244.1.5", "10.244.3.9"][..],
            &["10.244.3.9", "10.244.4.4"],
        ] {
            let new = shared(&old, model(&manifest(endpoints, false), &config), "web");
            let delta = translate_delta(&new, &config, &mut cache, &table, &committed)
                .expect("an element change");
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
            let back = translate_delta(&old, &config, &mut cache, &table, &committed);
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
        let committed = committed_of(&before);
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
        let delta = translate_delta(&three, &config, &mut cache, &table, &committed)
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

        // No endpoints: the frontend leaves service-ips for no-endpoint-services, elements too.
        let mut cache = PortCache::default();
        translate_cached(&old, &config, &mut cache);
        let none = shared(&old, model(&manifest(&[], false), &config), "web");
        let delta =
            translate_delta(&none, &config, &mut cache, &table, &committed).expect("elements");
        assert_eq!(apply(&before, &delta), elements(&translate(&none, &config)));
        // Other node settings.
        let mut moved = config.clone();
        moved.node_ips = vec!["10.0.0.2".parse().expect("address")];
        assert!(translate_delta(&old, &moved, &mut cache, &table, &committed).is_none());
        // kube-proxy's layout has no element path.
        let mut kube_proxy = config.clone();
        kube_proxy.nftables_layout = NftablesLayout::KubeProxy;
        assert!(translate_delta(&old, &kube_proxy, &mut cache, &table, &committed).is_none());
    }

    /// The ports of `new`, with those equal to a port of `old` shared with it, as the agent's
    /// model shares the ports of unchanged Services.
    fn share_unchanged(old: &ProxyModel, mut new: ProxyModel) -> ProxyModel {
        for port in new.ports.iter_mut() {
            if let Some(kept) = old
                .ports
                .iter()
                .find(|k| format!("{k:?}") == format!("{port:?}"))
            {
                *port = kept.clone();
            }
        }
        new
    }

    /// `before`'s elements with `delta` applied, as text.
    fn apply(before: &Ruleset, delta: &ElementDelta) -> std::collections::BTreeSet<String> {
        let mut applied: FxHashMap<(String, Vec<Value>), String> = before
            .elements
            .iter()
            .map(|e| ((e.container.to_string(), e.key.to_vec()), format!("{e:?}")))
            .collect();
        for (container, key) in &delta.removed {
            let removed = applied.remove(&(container.to_string(), key.clone()));
            assert!(removed.is_some(), "{container} {key:?} is not in the table");
        }
        for element in &delta.added {
            applied.insert(
                (element.container.to_string(), element.key.to_vec()),
                format!("{element:?}"),
            );
        }
        applied.into_values().collect()
    }

    fn service_text(name: &str, ip: &str, spec: &str, endpoints: &[(&str, bool)]) -> String {
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|(address, local)| {
                let node = if *local { "node-1" } else { "node-2" };
                format!("- {{addresses: [\"{address}\"], conditions: {{ready: true}}, nodeName: {node}}}\n")
            })
            .collect();
        format!(
            r#"---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  clusterIP: {ip}
  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080}}]
{spec}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 8080}}]
endpoints:
{}
"#,
            endpoints.concat()
        )
    }

    #[test]
    fn services_added_and_removed_are_the_element_difference_of_the_whole_translation() {
        let config = config();
        let web = service_text(
            "web",
            "172.30.0.10",
            "  sessionAffinity: ClientIP",
            &[("10.244.1.5", false), ("10.244.2.7", false)],
        );
        let other = service_text("other", "172.30.0.11", "", &[("10.244.9.9", true)]);
        // Shares its local endpoint (a hairpin entry) with `other`.
        let extra = service_text(
            "extra",
            "172.30.0.12",
            "",
            &[("10.244.9.9", true), ("10.244.8.8", false)],
        );
        let mut cache = PortCache::default();
        let old = model(&format!("{web}{other}"), &config);
        let before = translate_cached(&old, &config, &mut cache);
        let table = table(&before);
        let committed = committed_of(&before);

        // A Service more: its elements are added, nothing removed.
        let more = share_unchanged(&old, model(&format!("{web}{other}{extra}"), &config));
        let delta =
            translate_delta(&more, &config, &mut cache, &table, &committed).expect("elements");
        assert!(delta.removed.is_empty(), "{:?}", delta.removed);
        let after = translate(&more, &config);
        assert_eq!(apply(&before, &delta), elements(&after));
        assert_eq!(translate_cached(&more, &config, &mut cache), after);

        // A Service fewer: its elements go, but the hairpin entry `extra` has too.
        let fewer = share_unchanged(&more, model(&format!("{web}{extra}"), &config));
        let delta =
            translate_delta(&fewer, &config, &mut cache, &table, &committed).expect("elements");
        assert!(delta
            .removed
            .iter()
            .all(|(container, _)| &**container != HAIRPIN_CONNECTIONS));
        let last = translate(&fewer, &config);
        assert_eq!(apply(&after, &delta), elements(&last));
        assert_eq!(translate_cached(&fewer, &config, &mut cache), last);

        // And `extra` goes too: now the hairpin entry goes with it.
        let alone = share_unchanged(&fewer, model(&web, &config));
        let delta =
            translate_delta(&alone, &config, &mut cache, &table, &committed).expect("elements");
        assert!(delta
            .removed
            .iter()
            .any(|(container, _)| &**container == HAIRPIN_CONNECTIONS));
        assert_eq!(apply(&last, &delta), elements(&translate(&alone, &config)));
    }

    #[test]
    fn a_service_that_bears_on_the_nodeport_affinity_guard_goes_the_full_way() {
        let config = config();
        let sticky_node_port = service_text(
            "web",
            "172.30.0.10",
            "  type: NodePort\n  sessionAffinity: ClientIP",
            &[("10.244.1.5", false)],
        )
        .replace("targetPort: 8080}", "targetPort: 8080, nodePort: 30080}");
        let plain = service_text("other", "172.30.0.11", "", &[("10.244.9.9", false)]);
        // A Service without affinity on the protocol and port of that NodePort.
        let on_the_node_port = service_text("shadow", "172.30.0.12", "", &[("10.244.8.8", false)])
            .replace("port: 80,", "port: 30080,");
        let mut cache = PortCache::default();
        let old = model(&plain, &config);
        let before = translate_cached(&old, &config, &mut cache);
        let table = table(&before);
        let committed = committed_of(&before);
        // A NodePort with affinity added: the guard changes.
        let added = share_unchanged(&old, model(&format!("{plain}{sticky_node_port}"), &config));
        assert!(translate_delta(&added, &config, &mut cache, &table, &committed).is_none());
        // With it in the table, a frontend on its protocol and port added.
        let committed = committed_of(&translate(&added, &config));
        let mut cache = PortCache::default();
        translate_cached(&added, &config, &mut cache);
        let shadowed = share_unchanged(
            &added,
            model(
                &format!("{plain}{sticky_node_port}{on_the_node_port}"),
                &config,
            ),
        );
        assert!(translate_delta(&shadowed, &config, &mut cache, &table, &committed).is_none());
        // Anything else added beside it is elements.
        let mut cache = PortCache::default();
        translate_cached(&added, &config, &mut cache);
        let other = service_text("more", "172.30.0.13", "", &[("10.244.7.7", false)]);
        let more = share_unchanged(
            &added,
            model(&format!("{plain}{sticky_node_port}{other}"), &config),
        );
        assert!(translate_delta(&more, &config, &mut cache, &table, &committed).is_some());
    }

    #[test]
    fn affinity_turned_off_is_elements_and_asks_for_the_pins_to_be_checked() {
        let config = config();
        let sticky = service_text(
            "web",
            "172.30.0.10",
            "  sessionAffinity: ClientIP",
            &[("10.244.1.5", false)],
        );
        let plain = sticky.replace("  sessionAffinity: ClientIP\n", "");
        let mut cache = PortCache::default();
        let old = model(&sticky, &config);
        let before = translate_cached(&old, &config, &mut cache);
        let (table, committed) = (table(&before), committed_of(&before));
        let new = model(&plain, &config);
        assert!(new.ports[0].affinity_timeout.is_none());
        let delta =
            translate_delta(&new, &config, &mut cache, &table, &committed).expect("elements");
        assert!(delta.affinity, "the frontend's pins must be checked");
        assert_eq!(apply(&before, &delta), elements(&translate(&new, &config)));
    }

    #[test]
    fn a_service_of_two_ports_removed_removes_its_cluster_ip_once() {
        let config = config();
        let two_ports = manifest(&["10.244.1.5"], true);
        let mut cache = PortCache::default();
        let old = model(&two_ports, &config);
        assert_eq!(old.ports.len(), 3, "web has two ports, other one");
        let before = translate_cached(&old, &config, &mut cache);
        let (table, committed) = (table(&before), committed_of(&before));
        // Only `other` stays.
        let mut fewer = model(&two_ports, &config);
        fewer.ports.retain(|p| p.name.name == "other");
        let fewer = share_unchanged(&old, fewer);
        let delta =
            translate_delta(&fewer, &config, &mut cache, &table, &committed).expect("elements");
        let cluster_ip: Vec<_> = delta
            .removed
            .iter()
            .filter(|(container, _)| &**container == CLUSTER_IPS)
            .collect();
        assert_eq!(cluster_ip.len(), 1, "{:?}", delta.removed);
        let after = translate(&fewer, &config);
        assert_eq!(apply(&before, &delta), elements(&after));
        // And back: the two ports come with the cluster IP once.
        let back = share_unchanged(&fewer, model(&two_ports, &config));
        let delta =
            translate_delta(&back, &config, &mut cache, &table, &committed).expect("elements");
        let cluster_ip = delta
            .added
            .iter()
            .filter(|e| &*e.container == CLUSTER_IPS)
            .count();
        assert_eq!(cluster_ip, 1, "{:?}", delta.added);
        assert_eq!(apply(&after, &delta), elements(&before));
    }
}
