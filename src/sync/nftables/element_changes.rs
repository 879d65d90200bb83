//! The `maps` layout's path for an EndpointSlice change (docs/maps-layout.md, "Syncing"):
//! element changes ([`crate::nftables::ElementDelta`]) applied to what the syncer last
//! committed, without building and comparing the whole table.

use std::time::Instant;

use super::{
    commit, delete_due_stale_chains, prune_live_state, Applier, Changes, Object, Phase, SyncError,
    SyncReport, Syncer, Timed, Transaction, SERVICES,
};
use crate::family::IpFamily;
use rustc_hash::FxHashMap;

impl<A: Applier> Syncer<A> {
    /// Whether the table this syncer last committed holds `chain`.
    pub fn has_chain(&self, family: IpFamily, chain: &str) -> bool {
        self.families
            .get(&family)
            .and_then(|state| state.applied.as_ref())
            .is_some_and(|applied| applied.chains.contains_key(chain))
    }

    /// The chains and maps of the table last committed (none before the first commit).
    pub fn table_objects(&self, family: IpFamily) -> crate::nftables::TableObjects {
        let applied = self.families.get(&family).and_then(|s| s.applied.as_ref());
        crate::nftables::TableObjects {
            chains: applied
                .map(|a| a.chains.keys().cloned().collect())
                .unwrap_or_default(),
            maps: applied
                .map(|a| a.maps.keys().cloned().collect())
                .unwrap_or_default(),
        }
    }

    /// The elements last committed, by container and key; `None` before the first commit
    /// or after a failure.
    pub fn committed_elements(
        &self,
        family: IpFamily,
    ) -> Option<&dyn crate::nftables::affinity_pins::ElementLookup> {
        let applied = self.families.get(&family)?.applied.as_ref()?;
        Some(applied)
    }

    /// The objects of the table last committed (the table, chains, rules, sets, maps and
    /// elements), as counted for a full ruleset.
    pub fn object_count(&self, family: IpFamily) -> usize {
        let Some(applied) = self.families.get(&family).and_then(|s| s.applied.as_ref()) else {
            return 0;
        };
        1 + applied.chains.len()
            + applied
                .chains
                .values()
                .map(|c| c.rules.len())
                .sum::<usize>()
            + applied.sets.len()
            + applied.maps.len()
            + applied.element_count
    }

    /// Applies element changes alone ([`crate::nftables::ElementDelta`]) to what was last
    /// committed, without comparing the whole table: the `maps` layout's path for an
    /// EndpointSlice change. Stale chains whose grace period has passed are deleted first, as
    /// in [`Syncer::sync`]. `None` when this sync must be a [`Syncer::sync`] instead: nothing
    /// committed yet or since a failure (also a refused stale-chain deletion), a full sync due,
    /// or drift.
    pub fn sync_delta(
        &mut self,
        family: IpFamily,
        delta: &crate::nftables::ElementDelta,
    ) -> Option<Result<SyncReport, SyncError>> {
        let now = Instant::now();
        let options = &self.options;
        let state = self.families.get_mut(&family)?;
        // Nothing committed yet, or forgotten after a failure: the whole-table path.
        state.applied.as_ref()?;
        if let (Some(last), Some(period)) = (state.last_full, options.full_sync_period) {
            if now.duration_since(last) >= period {
                return None;
            }
        }
        let mut applier = Timed::new(&mut self.applier);
        let mut report = SyncReport::new(family);
        // Stale chains past their grace period: deleted first, as in a full or partial sync
        // (unless the delta wants them again).
        delete_due_stale_chains(
            state,
            &mut applier,
            family,
            now,
            options.stale_chain_delay,
            &mut report,
            &|state| {
                let committed = state.applied.iter().flat_map(|a| a.chains.keys());
                committed
                    .chain(delta.chains.iter().map(|c| &c.name))
                    .cloned()
                    .collect()
            },
        );
        let applied = state.applied.as_ref()?;
        if options.drift_check {
            let expected = applied.chains.get(SERVICES).map(|c| c.rules.len());
            if applier.rule_count(family, SERVICES).ok().flatten() != expected {
                return None;
            }
        }

        // More elements than a container's declared size: the whole-table path declares a
        // larger one.
        let mut added: FxHashMap<&str, usize> = FxHashMap::default();
        for element in &delta.added {
            if applied.element(&element.container, &element.key).is_none() {
                *added.entry(&element.container).or_default() += 1;
            }
        }
        let overflows = added.iter().any(|(&container, &more)| {
            let size = applied.size_of(container).or_else(|| {
                let map = delta.maps.iter().find(|m| &*m.name == container)?;
                map.size
            });
            size.is_some_and(|size| applied.len_of(container) + more > size as usize)
        });
        if overflows {
            return None;
        }

        let mut transaction = Transaction::new();
        let mut changes = Changes::default();
        // New endpoint maps, new shared chains (a stale one, flushed, is simply written
        // again) and pick chains with new rules.
        for map in &delta.maps {
            if !applied.maps.contains_key(&map.name) {
                transaction.add(Phase::ContainerAdd, Object::Map(map));
                changes.maps.push(map);
            }
        }
        let mut revived = Vec::new();
        for chain in &delta.chains {
            let had_rules = match applied.chains.get(&chain.name) {
                Some(have) if have.rules == chain.rules => continue,
                Some(have) => !have.rules.is_empty(),
                None => false,
            };
            transaction.rewrite_chain(chain, had_rules);
            changes.chains.push(chain);
            if state.stale.contains_key(&chain.name) {
                revived.push(chain.name.clone());
            }
        }
        for (container, key) in &delta.removed {
            if let Some(old) = applied.element(container, key) {
                transaction.delete(Phase::ElementDelete, old.id());
                changes
                    .removed_elements
                    .push((container.clone(), key.clone()));
            }
        }
        for element in &delta.added {
            match applied.element(&element.container, &element.key) {
                Some(old) if old == element => continue,
                Some(old) => transaction.delete(Phase::ElementDelete, old.id()),
                None => {}
            }
            transaction.add(Phase::ElementAdd, Object::Element(element));
            changes.elements.push(element);
        }
        let commands = transaction.commands();
        let deletes = transaction.phases[Phase::ElementDelete as usize].len();
        if let Err(err) = commit(state, &mut applier, family, &commands, &mut report) {
            return Some(Err(err));
        }
        for name in &revived {
            state.stale.remove(name);
        }
        state.applied.as_mut()?.update(&changes);
        if deletes > 0 && delta.affinity {
            if let Err(err) = prune_live_state(state, &mut applier, family, &mut report) {
                return Some(Err(err));
            }
        }
        report.kernel = applier.spent;
        Some(Ok(report))
    }
}

#[cfg(test)]
mod tests {
    use crate::family::IpFamily;
    use crate::nftables::{ElementDelta, Ruleset};
    use crate::sync::nftables::{FakeKernel, SyncOptions, Syncer};

    #[test]
    fn an_element_change_beyond_a_declared_size_takes_the_whole_table_path() {
        let table = Ruleset::from_nft_script(
            "add table ip kproxy\n\
             add map ip kproxy endpoints { type ipv4_addr : ipv4_addr ; size 2 ; }\n\
             add element ip kproxy endpoints { 10.0.0.1 : 10.1.0.1 }\n",
        )
        .expect("the table reads");
        let mut syncer = Syncer::new(FakeKernel::new(), SyncOptions::default());
        syncer
            .sync(std::slice::from_ref(&table))
            .expect("the first sync");
        let more = |keys: &[&str]| {
            let text: String = keys
                .iter()
                .map(|k| format!("add element ip kproxy endpoints {{ {k} : 10.1.0.9 }}\n"))
                .collect();
            let added = Ruleset::from_nft_script(&format!(
                "add table ip kproxy\n\
                 add map ip kproxy endpoints {{ type ipv4_addr : ipv4_addr ; size 2 ; }}\n{text}"
            ))
            .expect("the elements read");
            ElementDelta {
                added: added.elements,
                ..ElementDelta::default()
            }
        };
        // A second element fits; a third would not (the kernel would refuse it).
        let fits = syncer.sync_delta(IpFamily::V4, &more(&["10.0.0.2"]));
        assert!(fits.is_some_and(|r| r.is_ok()));
        assert!(syncer
            .sync_delta(IpFamily::V4, &more(&["10.0.0.3"]))
            .is_none());
        // Replacing an element's value adds none.
        assert!(syncer
            .sync_delta(IpFamily::V4, &more(&["10.0.0.1"]))
            .is_some());
    }
}
