//! nftables mode: one atomic `nft -f -` transaction per family and sync (spec §5A.11, §5.11).
//!
//! [`Syncer`] remembers the ruleset it last committed and turns the difference to the desired
//! one into `add`/`flush`/`delete` commands of exactly the objects that changed:
//!
//! * a chain whose rules changed is rewritten (`add chain`, `flush chain`, its rules); a chain
//!   no longer wanted is flushed at once and deleted in a transaction of its own once a grace
//!   period (1 s, §5.11 "stale objects") has passed, so that older kernels have released the
//!   references from deleted map elements; a stale chain wanted again is simply rewritten;
//! * sets and maps are added when new and deleted when gone. An affinity set of an endpoint
//!   that still exists is never deleted or re-created, so its elements — the clients' affinity
//!   state, written by the packet path — survive every sync (§5A.9 item 2);
//! * elements of the other containers are written as differences (delete, add, or both when
//!   the value or comment changed).
//!
//! The kernel is read only for a **full sync**: the first sync of a syncer, the one after a
//! refused transaction, after drift was detected, and periodically (§6). A full sync reads the
//! table (`nft -j list table`), then `add`s the table, every chain (flushing those that have
//! rules) with all its rules, every set and map (idempotent: elements of affinity sets stay),
//! writes the element differences against what it read, and handles objects that should not
//! be there as stale. A kernel that refuses a transaction applies none of it (nft's batches are
//! atomic); the error names the refused command, and the next sync is full.
//!
//! **Drift** (someone flushed or deleted kproxy's table or chains): before a partial sync the
//! syncer counts the rules of the `services` chain in the kernel (`nft -t -j list chain`); a
//! missing table or chain, or another count, turns the sync into a full one. A flush of the
//! table or of `services` is caught this way; changes to individual service chains are
//! repaired by the next periodic full sync, or when that service changes.
//!
//! **One-shot** (`kproxy sync --once`, [`sync_once`]): every run is a full sync, and no grace
//! period can pass inside one process. A stale chain is flushed, and deleted in the same
//! transaction only when no set element (a named map's or an anonymous verdict map's inside a
//! rule) pointed at it when the table was read: references from rules are released by the
//! flushes earlier in the same transaction on every kernel, but references from elements
//! deleted in the same transaction are not released in time on older kernels (§5.11). A chain
//! kept that way is empty and unreferenced afterwards, so the next run deletes it.
//!
//! Ownership: kproxy touches nothing but the `ip kube-proxy` and `ip6 kube-proxy` tables,
//! and owns everything in them (§5.1, §5.12).

mod applier;
mod fake;
mod kernel;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rustc_hash::{FxHashMap, FxHashSet};

pub use applier::{parse_error, render_transaction, Applier, NftApplier};
pub use fake::{FakeKernel, Recorded};
pub use kernel::{
    parse_listing, ChainKind, ContainerDecl, KernelChain, KernelContainer, KernelTable,
};

use super::{SyncError, SyncReport};
use crate::family::IpFamily;
use crate::nftables::{
    Chain, Command, Element, Map, Name, Object, ObjectId, Ruleset, Set, SetFlag, Value, SERVICES,
};

/// How a [`Syncer`] behaves.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// How long a flushed, no longer wanted chain is kept before it is deleted (§5.11: 1 s).
    pub stale_chain_delay: Duration,
    /// A sync after this much time since the last full sync is a full sync (§6: one hour).
    pub full_sync_period: Option<Duration>,
    /// Check the `services` chain's rule count before each partial sync (drift detection).
    pub drift_check: bool,
    /// A process that syncs once: delete stale chains at once when that is safe (module docs).
    pub one_shot: bool,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            stale_chain_delay: Duration::from_secs(1),
            full_sync_period: Some(Duration::from_secs(3600)),
            drift_check: true,
            one_shot: false,
        }
    }
}

impl SyncOptions {
    /// For `kproxy sync --once`.
    pub fn one_shot() -> SyncOptions {
        SyncOptions {
            one_shot: true,
            ..SyncOptions::default()
        }
    }
}

/// What the syncer knows about one family's table.
#[derive(Debug, Default)]
struct FamilyState {
    /// Exactly what the kernel holds since the last successful sync (besides the stale chains
    /// and live affinity elements); `None`: unknown, the next sync is full.
    applied: Option<Ruleset>,
    /// Chains flushed because no longer wanted, with the time of the flush.
    stale: BTreeMap<Name, Instant>,
    last_full: Option<Instant>,
}

/// Keeps the kernel's `kube-proxy` tables equal to the desired rulesets (module docs).
pub struct Syncer<A: Applier> {
    applier: A,
    options: SyncOptions,
    families: BTreeMap<IpFamily, FamilyState>,
}

impl<A: Applier> Syncer<A> {
    pub fn new(applier: A, options: SyncOptions) -> Syncer<A> {
        Syncer {
            applier,
            options,
            families: BTreeMap::new(),
        }
    }

    pub fn applier(&self) -> &A {
        &self.applier
    }

    pub fn applier_mut(&mut self) -> &mut A {
        &mut self.applier
    }

    /// Makes the next sync of every family a full one.
    pub fn request_full_sync(&mut self) {
        for state in self.families.values_mut() {
            state.applied = None;
        }
    }

    /// Chains flushed and waiting for deletion.
    pub fn stale_chains(&self, family: IpFamily) -> Vec<Name> {
        self.families
            .get(&family)
            .map(|s| s.stale.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Moves the flush time of every stale chain `by` into the past, as kube-proxy's tests do
    /// to let the grace period pass without waiting.
    pub fn age_stale_chains(&mut self, by: Duration) {
        for state in self.families.values_mut() {
            for when in state.stale.values_mut() {
                *when = when.checked_sub(by).unwrap_or(*when);
            }
        }
    }

    /// Brings every family's table to its desired ruleset. Every family is attempted; the
    /// first error is returned (and that family's next sync is full).
    pub fn sync(&mut self, desired: &[Ruleset]) -> Result<Vec<SyncReport>, SyncError> {
        let mut reports = Vec::with_capacity(desired.len());
        let mut first_error = None;
        for ruleset in desired {
            match self.sync_family(ruleset) {
                Ok(report) => reports.push(report),
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(reports),
        }
    }

    fn sync_family(&mut self, desired: &Ruleset) -> Result<SyncReport, SyncError> {
        let family = desired.family();
        let now = Instant::now();
        let wanted = Index::new(desired);
        let state = self.families.entry(family).or_default();
        let mut report = SyncReport {
            family,
            full: false,
            objects: 0,
            bytes: 0,
        };

        // Stale chains past their grace period go first, in a transaction of their own.
        if state.applied.is_some() {
            let due: Vec<ObjectId> = state
                .stale
                .iter()
                .filter(|(name, flushed)| {
                    now.duration_since(**flushed) >= self.options.stale_chain_delay
                        && !wanted.chains.contains_key(&***name)
                })
                .map(|(name, _)| ObjectId::Chain(name.clone()))
                .collect();
            if !due.is_empty() {
                let commands: Vec<Command> = due.iter().map(Command::Delete).collect();
                match self.applier.apply(family, &commands) {
                    Ok(bytes) => {
                        report.objects += commands.len();
                        report.bytes += bytes;
                        for id in &due {
                            if let ObjectId::Chain(name) = id {
                                state.stale.remove(name);
                            }
                        }
                    }
                    // Something still refers to one of them: the full sync below re-reads
                    // the table and starts the bookkeeping afresh (§5.11).
                    Err(_) => {
                        state.applied = None;
                        state.stale.clear();
                    }
                }
            }
        }

        let mut full = match (&state.applied, state.last_full, self.options.full_sync_period) {
            (None, _, _) => true,
            (Some(_), Some(last), Some(period)) => now.duration_since(last) >= period,
            _ => false,
        };
        if !full && self.options.drift_check {
            let expected = state
                .applied
                .as_ref()
                .and_then(|a| a.chain(SERVICES))
                .map(|c| c.rules.len());
            // A failed check counts as drift: the full sync will say what is wrong.
            let found = self.applier.rule_count(family, SERVICES).ok().flatten();
            full = expected != found;
        }

        let mut plan = None;
        if !full {
            if let Some(applied) = &state.applied {
                plan = partial(applied, desired, &wanted, &state.stale);
            }
        }
        let plan = match plan {
            Some(plan) => plan,
            None => {
                full = true;
                let kernel = self.applier.read(family)?;
                full_plan(
                    desired,
                    &wanted,
                    kernel.as_ref(),
                    self.options.one_shot,
                )
            }
        };

        let commands = plan.transaction.commands();
        if !commands.is_empty() {
            match self.applier.apply(family, &commands) {
                Ok(bytes) => {
                    report.objects += commands.len();
                    report.bytes += bytes;
                }
                Err(err) => {
                    state.applied = None;
                    state.stale.clear();
                    return Err(err);
                }
            }
        }
        if full {
            // The kernel's leftovers are now the whole stale list; keep earlier flush times.
            let old = std::mem::take(&mut state.stale);
            for name in plan.stale_added {
                let when = old.get(&name).copied().unwrap_or(now);
                state.stale.insert(name, when);
            }
            state.last_full = Some(now);
        } else {
            for name in &plan.stale_revived {
                state.stale.remove(name);
            }
            for name in plan.stale_added {
                state.stale.insert(name, now);
            }
        }
        state.applied = Some(desired.clone());
        report.full = full;
        Ok(report)
    }
}

/// One-shot sync for `kproxy sync --once`: reads what the kernel holds, applies the difference.
pub fn sync_once(rulesets: &[Ruleset]) -> Result<Vec<SyncReport>, SyncError> {
    Syncer::new(NftApplier::new(), SyncOptions::one_shot()).sync(rulesets)
}

/// Removes every object kproxy owns (the `kube-proxy` tables) and nothing else.
pub fn cleanup(families: &[IpFamily]) -> Result<(), SyncError> {
    cleanup_with(&mut NftApplier::new(), families)
}

/// [`cleanup`] through any applier: `delete table` of each family's table that exists (§5.12).
pub fn cleanup_with(applier: &mut impl Applier, families: &[IpFamily]) -> Result<(), SyncError> {
    for &family in families {
        if applier.table_exists(family)? {
            applier.apply(family, &[Command::Delete(&ObjectId::Table)])?;
        }
    }
    Ok(())
}

/// The objects of a ruleset by identity.
struct Index<'a> {
    chains: FxHashMap<&'a str, &'a Chain>,
    sets: FxHashMap<&'a str, &'a Set>,
    maps: FxHashMap<&'a str, &'a Map>,
    elements: FxHashMap<(&'a str, &'a [Value]), &'a Element>,
}

impl<'a> Index<'a> {
    fn new(ruleset: &'a Ruleset) -> Index<'a> {
        Index {
            chains: ruleset.chains.iter().map(|c| (&*c.name, c)).collect(),
            sets: ruleset.sets.iter().map(|s| (&*s.name, s)).collect(),
            maps: ruleset.maps.iter().map(|m| (&*m.name, m)).collect(),
            elements: ruleset
                .elements
                .iter()
                .map(|e| ((&*e.container, e.key.as_slice()), e))
                .collect(),
        }
    }

    fn has_container(&self, name: &str) -> bool {
        self.sets.contains_key(name) || self.maps.contains_key(name)
    }

    /// Elements of this container are live state written by the packet path (affinity sets):
    /// the syncer never writes or removes them.
    fn is_live(&self, container: &str) -> bool {
        self.sets.get(container).is_some_and(|s| is_live_set(s))
    }
}

fn is_live_set(set: &Set) -> bool {
    set.flags.contains(&SetFlag::Dynamic) || set.flags.contains(&SetFlag::Timeout)
}

/// The parts of a transaction, in the order nft needs them: a chain exists before a rule or
/// element jumps to it; rules that refer to a set are flushed before it is deleted; a set
/// exists before its elements and the rules that use it.
#[derive(Clone, Copy)]
enum Phase {
    Table,
    /// Chains whose declaration must change are deleted, then added anew.
    ChainRecreate,
    /// `add chain` (and `flush chain`) of every chain written.
    Chains,
    /// Flushes of chains no longer wanted.
    StaleFlush,
    ContainerDelete,
    ContainerAdd,
    /// Containers whose elements could not be read are emptied and refilled.
    ContainerFlush,
    ElementDelete,
    Rules,
    ElementAdd,
    /// One-shot: stale chains nothing points at any more.
    ChainDelete,
}

const PHASES: usize = Phase::ChainDelete as usize + 1;

#[derive(Clone, Copy)]
enum Op<'a> {
    Add(Object<'a>),
    Flush(usize),
    Delete(usize),
}

/// A transaction under construction: commands borrow the desired ruleset, and the identities
/// of flushed and deleted objects are owned here.
struct Transaction<'a> {
    ids: Vec<ObjectId>,
    phases: [Vec<Op<'a>>; PHASES],
}

impl<'a> Transaction<'a> {
    fn new() -> Transaction<'a> {
        Transaction {
            ids: Vec::new(),
            phases: std::array::from_fn(|_| Vec::new()),
        }
    }

    fn add(&mut self, phase: Phase, object: Object<'a>) {
        self.phases[phase as usize].push(Op::Add(object));
    }

    fn flush(&mut self, phase: Phase, id: ObjectId) {
        self.ids.push(id);
        self.phases[phase as usize].push(Op::Flush(self.ids.len() - 1));
    }

    fn delete(&mut self, phase: Phase, id: ObjectId) {
        self.ids.push(id);
        self.phases[phase as usize].push(Op::Delete(self.ids.len() - 1));
    }

    /// `add chain`, `flush chain` and every rule: the chain ends up holding exactly its rules.
    fn rewrite_chain(&mut self, chain: &'a Chain, flush: bool) {
        self.add(Phase::Chains, Object::Chain(chain));
        if flush {
            self.flush(Phase::Chains, chain.id());
        }
        self.add_rules(chain);
    }

    fn add_rules(&mut self, chain: &'a Chain) {
        for rule in &chain.rules {
            self.add(
                Phase::Rules,
                Object::Rule {
                    chain: &chain.name,
                    rule,
                },
            );
        }
    }

    fn commands(&self) -> Vec<Command<'_>> {
        let len = self.phases.iter().map(Vec::len).sum();
        let mut commands = Vec::with_capacity(len);
        for phase in &self.phases {
            commands.extend(phase.iter().map(|op| match *op {
                Op::Add(object) => Command::Add(object),
                Op::Flush(i) => Command::Flush(&self.ids[i]),
                Op::Delete(i) => Command::Delete(&self.ids[i]),
            }));
        }
        commands
    }
}

/// A transaction and what it does to the stale-chain bookkeeping.
struct Plan<'a> {
    transaction: Transaction<'a>,
    /// Chains flushed (or found flushed) and kept for later deletion.
    stale_added: Vec<Name>,
    /// Stale chains the transaction writes again.
    stale_revived: Vec<Name>,
}

/// The difference from what was applied to what is wanted; `None` when it cannot be written as
/// differences (a chain or container declaration changed) and a full sync must do it.
fn partial<'a>(
    applied: &'a Ruleset,
    desired: &'a Ruleset,
    wanted: &Index<'a>,
    stale: &BTreeMap<Name, Instant>,
) -> Option<Plan<'a>> {
    let have = Index::new(applied);
    let mut tx = Transaction::new();
    let mut stale_added = Vec::new();
    let mut stale_revived = Vec::new();

    // Chains: rewritten when their rules changed. `add` + `flush` also for new chains, as
    // kube-proxy does (§5A.11 operation counts): the flush makes the write exact even if the
    // chain unexpectedly exists.
    for chain in &desired.chains {
        match have.chains.get(&*chain.name) {
            Some(old) if !old.same_declaration(chain) => return None,
            Some(old) if old.rules == chain.rules => {}
            Some(_) => tx.rewrite_chain(chain, true),
            None => {
                if stale.contains_key(&chain.name) {
                    stale_revived.push(chain.name.clone());
                }
                tx.rewrite_chain(chain, true);
            }
        }
    }
    for chain in &applied.chains {
        if !wanted.chains.contains_key(&*chain.name) {
            if !chain.rules.is_empty() {
                tx.flush(Phase::StaleFlush, chain.id());
            }
            stale_added.push(chain.name.clone());
        }
    }

    // Sets and maps: added when new; an unchanged one is not touched, so affinity sets keep
    // their elements. Only a timeout may change in place (`add set` updates it).
    for set in &desired.sets {
        match have.sets.get(&*set.name) {
            None if have.maps.contains_key(&*set.name) => return None,
            None => tx.add(Phase::ContainerAdd, Object::Set(set)),
            Some(old) if *old == set => {}
            Some(old) if old.key_type == set.key_type && old.flags == set.flags => {
                tx.add(Phase::ContainerAdd, Object::Set(set))
            }
            Some(_) => return None,
        }
    }
    for map in &desired.maps {
        match have.maps.get(&*map.name) {
            None if have.sets.contains_key(&*map.name) => return None,
            None => tx.add(Phase::ContainerAdd, Object::Map(map)),
            Some(old) if *old == map => {}
            Some(old) if old.key_type == map.key_type && old.value_type == map.value_type => {
                tx.add(Phase::ContainerAdd, Object::Map(map))
            }
            Some(_) => return None,
        }
    }
    for set in &applied.sets {
        if !wanted.has_container(&set.name) {
            tx.delete(Phase::ContainerDelete, set.id());
        }
    }
    for map in &applied.maps {
        if !wanted.has_container(&map.name) {
            tx.delete(Phase::ContainerDelete, map.id());
        }
    }

    // Elements: differences only.
    for element in &desired.elements {
        if wanted.is_live(&element.container) {
            continue;
        }
        match have
            .elements
            .get(&(&*element.container, element.key.as_slice()))
        {
            Some(old) if *old == element => {}
            Some(old) => {
                tx.delete(Phase::ElementDelete, old.id());
                tx.add(Phase::ElementAdd, Object::Element(element));
            }
            None => tx.add(Phase::ElementAdd, Object::Element(element)),
        }
    }
    for element in &applied.elements {
        if wanted.has_container(&element.container)
            && !wanted.is_live(&element.container)
            && !wanted
                .elements
                .contains_key(&(&*element.container, element.key.as_slice()))
        {
            tx.delete(Phase::ElementDelete, element.id());
        }
    }

    Some(Plan {
        transaction: tx,
        stale_added,
        stale_revived,
    })
}

/// A full sync over what the kernel holds (`None`: no table yet).
fn full_plan<'a>(
    desired: &'a Ruleset,
    wanted: &Index<'a>,
    kernel: Option<&KernelTable>,
    one_shot: bool,
) -> Plan<'a> {
    let empty = KernelTable::default();
    let kernel = kernel.unwrap_or(&empty);
    let chains: FxHashMap<&str, &KernelChain> =
        kernel.chains.iter().map(|c| (&*c.name, c)).collect();
    let containers: FxHashMap<&str, &KernelContainer> =
        kernel.containers.iter().map(|c| (&*c.name, c)).collect();
    let mut tx = Transaction::new();
    let mut stale_added = Vec::new();

    tx.add(Phase::Table, Object::Table(&desired.table));

    // Every chain is written; those holding rules are flushed first.
    for chain in &desired.chains {
        match chains.get(&*chain.name) {
            Some(have) if !have.kind.matches(chain.base.as_ref()) => {
                // E.g. a base chain with another priority: only a new chain can have the
                // wanted hook. Deleting it takes its rules along.
                tx.delete(Phase::ChainRecreate, chain.id());
                tx.rewrite_chain(chain, false);
            }
            Some(have) => tx.rewrite_chain(chain, have.rules > 0),
            None => tx.rewrite_chain(chain, false),
        }
    }
    for have in &kernel.chains {
        if wanted.chains.contains_key(&*have.name) {
            continue;
        }
        let id = ObjectId::Chain(have.name.clone());
        if have.rules > 0 {
            tx.flush(Phase::StaleFlush, id.clone());
        }
        if one_shot && !have.in_element {
            tx.delete(Phase::ChainDelete, id);
        } else {
            stale_added.push(have.name.clone());
        }
    }

    // Containers: `add` of every wanted one (idempotent, elements stay); a kernel container
    // with another declaration is replaced; containers not wanted are deleted.
    for have in &kernel.containers {
        if !wanted.has_container(&have.name) {
            tx.delete(Phase::ContainerDelete, container_id(have));
        }
    }
    // Which wanted containers hold elements kproxy manages, and what they hold now.
    let mut known: FxHashMap<&str, FxHashMap<&[Value], &Element>> = FxHashMap::default();
    let mut refill: FxHashSet<&str> = FxHashSet::default();
    let mut add_container = |tx: &mut Transaction<'a>, name: &'a str, object, accepts: bool| {
        let live = wanted.is_live(name);
        match containers.get(name) {
            Some(have) if accepts => {
                tx.add(Phase::ContainerAdd, object);
                if !live {
                    match &have.elements {
                        Some(elements) => {
                            known.insert(
                                name,
                                elements.iter().map(|e| (e.key.as_slice(), e)).collect(),
                            );
                        }
                        None => {
                            tx.flush(Phase::ContainerFlush, container_id(have));
                            refill.insert(name);
                        }
                    }
                }
            }
            Some(have) => {
                tx.delete(Phase::ContainerDelete, container_id(have));
                tx.add(Phase::ContainerAdd, object);
                refill.insert(name);
            }
            None => {
                tx.add(Phase::ContainerAdd, object);
                refill.insert(name);
            }
        }
    };
    for set in &desired.sets {
        let accepts = containers
            .get(&*set.name)
            .is_some_and(|c| c.decl.accepts_set(set));
        add_container(&mut tx, &set.name, Object::Set(set), accepts);
    }
    for map in &desired.maps {
        let accepts = containers
            .get(&*map.name)
            .is_some_and(|c| c.decl.accepts_map(map));
        add_container(&mut tx, &map.name, Object::Map(map), accepts);
    }

    for element in &desired.elements {
        let container = &*element.container;
        if wanted.is_live(container) {
            continue;
        }
        if refill.contains(container) {
            tx.add(Phase::ElementAdd, Object::Element(element));
            continue;
        }
        let current = known
            .get(container)
            .and_then(|elements| elements.get(element.key.as_slice()));
        match current {
            Some(have) if *have == element => {}
            Some(have) => {
                tx.delete(Phase::ElementDelete, have.id());
                tx.add(Phase::ElementAdd, Object::Element(element));
            }
            None => tx.add(Phase::ElementAdd, Object::Element(element)),
        }
    }
    // In the kernel's order, so that the transaction text is deterministic.
    for container in &kernel.containers {
        if !known.contains_key(&*container.name) {
            continue;
        }
        for have in container.elements.iter().flatten() {
            if !wanted
                .elements
                .contains_key(&(&*container.name, have.key.as_slice()))
            {
                tx.delete(Phase::ElementDelete, have.id());
            }
        }
    }

    Plan {
        transaction: tx,
        stale_added,
        stale_revived: Vec::new(),
    }
}

fn container_id(container: &KernelContainer) -> ObjectId {
    match container.decl {
        ContainerDecl::Map(_) => ObjectId::Map(container.name.clone()),
        ContainerDecl::Set(_) => ObjectId::Set(container.name.clone()),
        ContainerDecl::Other if container.is_map => ObjectId::Map(container.name.clone()),
        ContainerDecl::Other => ObjectId::Set(container.name.clone()),
    }
}
