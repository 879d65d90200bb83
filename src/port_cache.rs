//! Translation results kept per service port between translations, for both modes: the agent
//! translates only the ports that changed and reuses the others. A port is reused while the
//! model hands over the very same [`ServicePort`] (the agent's `NodeModel` keeps the ports of
//! unchanged Services shared) and the translation-wide settings are unchanged.

use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};

use crate::model::{ServicePort, ServicePortName};

/// How the ports handed over differ from the ports kept ([`PortCache::changes`]).
#[derive(Debug, Default)]
pub struct PortChanges<'a> {
    /// Ports kept for another version of them.
    pub changed: Vec<&'a Arc<ServicePort>>,
    /// Ports not kept.
    pub added: Vec<&'a Arc<ServicePort>>,
    /// Kept ports no longer handed over.
    pub removed: Vec<ServicePortName>,
}

impl PortChanges<'_> {
    /// Whether the set of ports is the same (only ports changed).
    pub fn same_ports(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// What each port's translation produced (`P`: the mode's part type).
pub struct PortCache<P> {
    /// Everything besides the port that the parts depend on (node settings, modes).
    settings: String,
    ports: FxHashMap<ServicePortName, (Arc<ServicePort>, P)>,
    /// The ports as last handed over, in their order: an unchanged model is recognised by
    /// comparing pointers in order, without a lookup per port.
    order: Vec<Arc<ServicePort>>,
}

impl<P> Default for PortCache<P> {
    fn default() -> Self {
        PortCache {
            settings: String::new(),
            ports: FxHashMap::default(),
            order: Vec::new(),
        }
    }
}

impl<P: Send> PortCache<P> {
    /// Brings the cache to `ports`: translates (in parallel) the ports it does not hold as they
    /// are, drops the ports no longer there, and forgets everything when `settings` differ
    /// from the last call's. Returns the parts in the order of `ports`.
    pub fn update<'a>(
        &'a mut self,
        settings: String,
        ports: &'a [Arc<ServicePort>],
        translate: impl Fn(&ServicePort) -> P + Sync,
    ) -> impl Iterator<Item = &'a P> + 'a {
        if self.settings != settings {
            self.ports.clear();
            self.settings = settings;
        }
        let changed: Vec<&Arc<ServicePort>> = ports
            .iter()
            .filter(|port| {
                !self
                    .ports
                    .get(&port.name)
                    .is_some_and(|(kept, _)| Arc::ptr_eq(kept, port))
            })
            .collect();
        let translated = crate::parallel::map_chunks(&changed, |chunk| {
            chunk
                .iter()
                .map(|&port| (port.clone(), translate(port)))
                .collect::<Vec<_>>()
        });
        for (port, part) in translated.into_iter().flatten() {
            self.ports.insert(port.name.clone(), (port, part));
        }
        if self.ports.len() > ports.len() {
            let wanted: FxHashSet<&ServicePortName> = ports.iter().map(|p| &p.name).collect();
            self.ports.retain(|name, _| wanted.contains(name));
        }
        self.order = ports.to_vec();
        let cache = &*self;
        ports
            .iter()
            .filter_map(move |port| cache.ports.get(&port.name).map(|(_, part)| part))
    }

    /// The ports kept.
    pub fn len(&self) -> usize {
        self.ports.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }

    /// The part kept for a port, if any.
    pub fn get(&self, name: &ServicePortName) -> Option<&P> {
        self.ports.get(name).map(|(_, part)| part)
    }

    /// Whether the parts kept were translated with `settings`.
    pub fn settings_match(&self, settings: &str) -> bool {
        self.settings == settings
    }

    /// How `ports` differ from the ports kept: ports kept for another version of them, ports
    /// not kept, and kept ports no longer in `ports`.
    pub fn changes<'a>(&self, ports: &'a [Arc<ServicePort>]) -> PortChanges<'a> {
        // The same ports in the same order: only the pointers that differ are looked at.
        if self.order.len() == ports.len() && ports.len() == self.ports.len() {
            let mut changed = Vec::new();
            let mut same_order = true;
            for (kept, port) in self.order.iter().zip(ports) {
                if Arc::ptr_eq(kept, port) {
                    continue;
                }
                if kept.name != port.name {
                    same_order = false;
                    break;
                }
                changed.push(port);
            }
            if same_order {
                return PortChanges {
                    changed,
                    ..PortChanges::default()
                };
            }
        }
        let mut changes = PortChanges::default();
        for port in ports {
            match self.ports.get(&port.name) {
                Some((kept, _)) if Arc::ptr_eq(kept, port) => {}
                Some(_) => changes.changed.push(port),
                None => changes.added.push(port),
            }
        }
        if self.ports.len() + changes.added.len() != ports.len() {
            let wanted: FxHashSet<&ServicePortName> = ports.iter().map(|p| &p.name).collect();
            changes.removed = self
                .order
                .iter()
                .map(|p| &p.name)
                .filter(|name| !wanted.contains(name) && self.ports.contains_key(*name))
                .cloned()
                .collect();
        }
        changes
    }

    /// Keeps `parts` as the translations of their ports (replacing the ones kept for their
    /// names) and forgets the ports `removed`; `ports` (which holds the kept ones) is the
    /// order now.
    pub fn apply(
        &mut self,
        ports: &[Arc<ServicePort>],
        parts: Vec<(Arc<ServicePort>, P)>,
        removed: &[ServicePortName],
    ) {
        for (port, part) in parts {
            self.ports.insert(port.name.clone(), (port, part));
        }
        for name in removed {
            self.ports.remove(name);
        }
        // In place when only ports changed: a copy would touch every port's count.
        if self.order.len() == ports.len() {
            for (kept, port) in self.order.iter_mut().zip(ports) {
                if !Arc::ptr_eq(kept, port) {
                    *kept = port.clone();
                }
            }
        } else {
            self.order = ports.to_vec();
        }
    }

    /// The port and part kept for a name, if any.
    pub fn kept(&self, name: &ServicePortName) -> Option<(&Arc<ServicePort>, &P)> {
        self.ports.get(name).map(|(port, part)| (port, part))
    }

    /// The parts kept, in no particular order.
    pub fn parts(&self) -> impl Iterator<Item = (&Arc<ServicePort>, &P)> {
        self.ports.values().map(|(port, part)| (port, part))
    }
}
