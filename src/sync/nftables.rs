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
//! syncer counts the rules of the `services` chain in the kernel, with a netlink dump the
//! kernel filters to that one chain ([`crate::sync::netlink::NetfilterSocket::rule_count`]; `nft list chain` would take
//! seconds on a large table). A missing table or chain, or another count, turns the sync into
//! a full one, which restores everything. A flushed or deleted table, a flushed ruleset and a
//! flushed or deleted `services` chain are caught this way; edits to individual service
//! chains are repaired by the next periodic full sync, or when that service changes.
//!
//! **Cost**: a partial sync looks every wanted object up in an index of what was applied
//! (`Applied`, kept current from each transaction's changes) and compares it; sets of
//! wanted names are built only when something was removed. Nothing is re-read or re-indexed.
//!
//! **One-shot** (`kproxy sync --once`, [`sync_once`]): every run is a full sync, and no grace
//! period can pass inside one process. A stale chain is flushed, and deleted in the same
//! transaction only when no set element (a named map's or an anonymous verdict map's inside a
//! rule) pointed at it when the table was read: references from rules are released by the
//! flushes earlier in the same transaction on every kernel, but references from elements
//! deleted in the same transaction are not released in time on older kernels (§5.11). A chain
//! kept that way is empty and unreferenced afterwards, so the next run deletes it.
//!
//! **Element changes** (the `maps` layout, docs/maps-layout.md): an EndpointSlice change comes
//! as element changes alone and is applied against `Applied` without the whole table
//! ([`Syncer::sync_delta`], element_changes.rs). After a commit that deleted elements, and after
//! a full sync, the applier may prune live state the commit made wrong
//! ([`Applier::prune_live_state`]: affinity entries pinned to removed endpoints).
//!
//! Ownership: kproxy touches nothing but its own tables (`ip`/`ip6` `kube-proxy`, or `kproxy`
//! for the `maps` layout), and owns everything in them (§5.1, §5.12).

mod affinity_sweep;
mod applier;
mod element_changes;
pub mod element_dump;
pub mod elements;
mod fake;
pub(crate) mod kernel;
pub mod netlink_elements;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::{FxHashMap, FxHashSet};

pub(crate) use applier::family_word;
pub use applier::{parse_error, render_transaction, Applier, NftApplier};
pub use fake::{FakeKernel, Recorded};
pub use kernel::{
    parse_listing, ChainKind, ContainerDecl, KernelChain, KernelContainer, KernelTable,
};

use super::{SyncError, SyncReport, Timed};
use crate::family::IpFamily;
use crate::nftables::affinity_pins::ElementLookup;
use crate::nftables::{
    Chain, Command, Element, ElementByKey, Map, Name, Object, ObjectId, Ruleset, Set, SetFlag,
    Value, SERVICES,
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
    applied: Option<Applied>,
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

    /// When the next sync is needed to delete chains whose grace period will then have passed
    /// (they are flushed already; only their deletion waits).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.families
            .values()
            .flat_map(|state| state.stale.values())
            .min()
            .map(|flushed| *flushed + self.options.stale_chain_delay)
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
        super::each_family(desired, |ruleset| self.sync_family(ruleset))
    }

    fn sync_family(&mut self, desired: &Ruleset) -> Result<SyncReport, SyncError> {
        let family = desired.family();
        let now = Instant::now();
        let state = self.families.entry(family).or_default();
        let mut applier = Timed::new(&mut self.applier);
        let mut report = SyncReport::new(family);

        // Stale chains past their grace period go first, in a transaction of their own.
        if state.applied.is_some() {
            let delay = self.options.stale_chain_delay;
            delete_due_stale_chains(
                state,
                &mut applier,
                family,
                now,
                delay,
                &mut report,
                &|_| desired.chains.iter().map(|c| c.name.clone()).collect(),
            );
        }

        let mut full = match (
            &state.applied,
            state.last_full,
            self.options.full_sync_period,
        ) {
            (None, _, _) => true,
            (Some(_), Some(last), Some(period)) => now.duration_since(last) >= period,
            _ => false,
        };
        if !full && self.options.drift_check {
            let expected = state
                .applied
                .as_ref()
                .and_then(|a| a.chains.get(SERVICES))
                .map(|c| c.rules.len());
            // A failed check counts as drift: the full sync will say what is wrong.
            let found = applier.rule_count(family, SERVICES).ok().flatten();
            full = expected != found;
        }

        let mut plan = None;
        if !full {
            if let Some(applied) = &state.applied {
                plan = partial(applied, desired, &state.stale);
            }
        }
        let plan = match plan {
            Some(plan) => plan,
            None => {
                full = true;
                let kernel = applier.read(family)?;
                let wanted = Index::new(desired);
                full_plan(desired, &wanted, kernel.as_ref(), self.options.one_shot)
            }
        };

        let commands = plan.transaction.commands();
        let deletes_elements = commands
            .iter()
            .any(|c| matches!(c, Command::Delete(ObjectId::Element { .. })));
        commit(state, &mut applier, family, &commands, &mut report)?;
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
        match (&mut state.applied, full) {
            (Some(applied), false) => applied.update(&plan.changes),
            _ => state.applied = Some(Applied::new(desired)),
        }
        // Live state the commit made wrong (affinity pins to removed endpoints). A failure
        // leaves the committed rules in place; the next full sync prunes again.
        if full || deletes_elements {
            prune_live_state(state, &mut applier, family, &mut report)?;
        }
        report.full = full;
        report.kernel = applier.spent;
        Ok(report)
    }
}

/// Applies `commands` (if any) as one transaction. A refusal changed nothing in the kernel, but
/// what the syncer knows of the table is forgotten: the next sync is full.
fn commit(
    state: &mut FamilyState,
    applier: &mut impl Applier,
    family: IpFamily,
    commands: &[Command<'_>],
    report: &mut SyncReport,
) -> Result<(), SyncError> {
    if commands.is_empty() {
        return Ok(());
    }
    match applier.apply(family, commands) {
        Ok(bytes) => {
            report.objects += commands.len();
            report.bytes += bytes;
            Ok(())
        }
        Err(err) => {
            state.applied = None;
            state.stale.clear();
            Err(err)
        }
    }
}

/// Lets the applier remove live state the commit made wrong, judged against what was committed
/// ([`Applier::prune_live_state`]). A failure leaves the committed rules in place and makes the
/// next sync full, which prunes again.
fn prune_live_state(
    state: &mut FamilyState,
    applier: &mut impl Applier,
    family: IpFamily,
    report: &mut SyncReport,
) -> Result<(), SyncError> {
    let Some(committed) = &state.applied else {
        return Ok(());
    };
    match applier.prune_live_state(family, committed) {
        Ok(pruned) => {
            report.pruned = pruned;
            Ok(())
        }
        Err(err) => {
            state.applied = None;
            Err(err)
        }
    }
}

/// Deletes the stale chains of `state` whose grace period has passed and that are not wanted
/// again (`wanted`, asked of the state only when some are due), in a transaction of their own
/// (§5.11).
/// A refusal (something still refers to one) makes the next sync full.
fn delete_due_stale_chains(
    state: &mut FamilyState,
    applier: &mut impl Applier,
    family: IpFamily,
    now: Instant,
    delay: Duration,
    report: &mut SyncReport,
    wanted: &dyn Fn(&FamilyState) -> FxHashSet<Name>,
) {
    if !state
        .stale
        .values()
        .any(|flushed| now.duration_since(*flushed) >= delay)
    {
        return;
    }
    let wanted = wanted(state);
    let due: Vec<ObjectId> = state
        .stale
        .iter()
        .filter(|(name, flushed)| now.duration_since(**flushed) >= delay && !wanted.contains(*name))
        .map(|(name, _)| ObjectId::Chain(name.clone()))
        .collect();
    if due.is_empty() {
        return;
    }
    let commands: Vec<Command> = due.iter().map(Command::Delete).collect();
    match applier.apply(family, &commands) {
        Ok(bytes) => {
            report.objects += commands.len();
            report.bytes += bytes;
            for id in &due {
                if let ObjectId::Chain(name) = id {
                    state.stale.remove(name);
                }
            }
        }
        // Something still refers to one of them: the full sync re-reads the table and starts
        // the bookkeeping afresh (§5.11).
        Err(_) => {
            state.applied = None;
            state.stale.clear();
            report.cleanup_failed = true;
        }
    }
}

/// One-shot sync for `kproxy sync --once`: reads what the kernel holds, applies the difference.
pub fn sync_once(rulesets: &[Ruleset]) -> Result<Vec<SyncReport>, SyncError> {
    Syncer::new(NftApplier::new(), SyncOptions::one_shot()).sync(rulesets)
}

/// Removes every object kproxy owns (the `kube-proxy` tables) and nothing else.
pub fn cleanup(families: &[IpFamily]) -> Result<Vec<String>, SyncError> {
    cleanup_with(&mut NftApplier::new(), families)
}

/// [`cleanup`] through any applier: `delete table` of each family's table that exists (§5.12),
/// all in one transaction. Returns the tables removed (`table ip kube-proxy`).
pub fn cleanup_with(
    applier: &mut impl Applier,
    families: &[IpFamily],
) -> Result<Vec<String>, SyncError> {
    let mut present = Vec::new();
    for &family in families {
        if applier.table_exists(family)? {
            present.push(family);
        }
    }
    if present.is_empty() {
        return Ok(Vec::new());
    }
    applier.delete_tables(&present)?;
    Ok(present
        .iter()
        .map(|&family| {
            format!(
                "table {} {}",
                applier::family_word(family),
                applier.table_name()
            )
        })
        .collect())
}

/// The objects of a ruleset by identity.
struct Index<'a> {
    chains: FxHashMap<&'a str, &'a Chain>,
    sets: FxHashMap<&'a str, &'a Set>,
    maps: FxHashMap<&'a str, &'a Map>,
    elements: FxHashMap<(&'a str, &'a [Value]), &'a Arc<Element>>,
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
        self.sets.get(container).is_some_and(|s| is_live(&s.flags))
            || self.maps.get(container).is_some_and(|m| is_live(&m.flags))
    }
}

/// Affinity sets (and the maps layout's affinity map) are filled from the packet path.
fn is_live(flags: &[SetFlag]) -> bool {
    flags.contains(&SetFlag::Dynamic) || flags.contains(&SetFlag::Timeout)
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
        for rule in chain.rules.iter() {
            self.add(
                Phase::Rules,
                Object::Rule {
                    chain: &chain.name,
                    rule,
                },
            );
        }
    }

    /// Adds another transaction's operations after this one's, phase by phase.
    fn append(&mut self, other: Transaction<'a>) {
        let offset = self.ids.len();
        self.ids.extend(other.ids);
        for (mine, theirs) in self.phases.iter_mut().zip(other.phases) {
            mine.extend(theirs.into_iter().map(|op| match op {
                Op::Add(object) => Op::Add(object),
                Op::Flush(i) => Op::Flush(i + offset),
                Op::Delete(i) => Op::Delete(i + offset),
            }));
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
    /// What a partial transaction changes, to bring [`Applied`] up to date once it is applied.
    changes: Changes<'a>,
}

/// The objects a partial transaction writes or removes.
#[derive(Default)]
struct Changes<'a> {
    chains: Vec<&'a Chain>,
    removed_chains: Vec<Name>,
    sets: Vec<&'a Set>,
    maps: Vec<&'a Map>,
    removed_containers: Vec<Name>,
    elements: Vec<&'a Arc<Element>>,
    removed_elements: Vec<(Name, Vec<Value>)>,
}

/// What this syncer committed to one family's table, indexed by identity. Kept up to date by
/// each partial transaction's changes, so that a partial sync costs lookups, not a rebuild.
#[derive(Debug, Default)]
struct Applied {
    chains: FxHashMap<Name, Chain>,
    sets: FxHashMap<Name, Set>,
    maps: FxHashMap<Name, Map>,
    /// Elements by container, then key: the ruleset's own (shared, not copied).
    elements: FxHashMap<Name, FxHashSet<ElementByKey>>,
    element_count: usize,
}

impl ElementLookup for Applied {
    fn element(&self, container: &str, key: &[Value]) -> Option<&Element> {
        Applied::element(self, container, key).map(|element| &**element)
    }

    fn maps(&self) -> Vec<Name> {
        self.maps.keys().cloned().collect()
    }
}

impl Applied {
    fn new(ruleset: &Ruleset) -> Applied {
        let mut applied = Applied {
            chains: ruleset
                .chains
                .iter()
                .map(|c| (c.name.clone(), c.clone()))
                .collect(),
            sets: ruleset
                .sets
                .iter()
                .map(|s| (s.name.clone(), s.clone()))
                .collect(),
            maps: ruleset
                .maps
                .iter()
                .map(|m| (m.name.clone(), m.clone()))
                .collect(),
            ..Applied::default()
        };
        for element in &ruleset.elements {
            applied.insert_element(element);
        }
        applied
    }

    fn element(&self, container: &str, key: &[Value]) -> Option<&Arc<Element>> {
        Some(&self.elements.get(container)?.get(key)?.0)
    }

    /// How many elements `container` holds.
    fn len_of(&self, container: &str) -> usize {
        self.elements
            .get(container)
            .map_or(0, |elements| elements.len())
    }

    /// The most elements `container` may hold (its declared size), if it declares one.
    fn size_of(&self, container: &str) -> Option<u32> {
        match self.maps.get(container) {
            Some(map) => map.size,
            None => self.sets.get(container)?.size,
        }
    }

    /// Records `element`, replacing the one with its container and key.
    fn insert_element(&mut self, element: &Arc<Element>) {
        let elements = match self.elements.get_mut(&element.container) {
            Some(elements) => elements,
            None => self.elements.entry(element.container.clone()).or_default(),
        };
        let old = elements.replace(ElementByKey(element.clone()));
        if old.is_none() {
            self.element_count += 1;
        }
    }

    fn update(&mut self, changes: &Changes) {
        for chain in &changes.chains {
            self.chains.insert(chain.name.clone(), (*chain).clone());
        }
        for name in &changes.removed_chains {
            self.chains.remove(name);
        }
        for set in &changes.sets {
            self.sets.insert(set.name.clone(), (*set).clone());
        }
        for map in &changes.maps {
            self.maps.insert(map.name.clone(), (*map).clone());
        }
        for (container, key) in &changes.removed_elements {
            if let Some(elements) = self.elements.get_mut(container) {
                if elements.remove(key.as_slice()) {
                    self.element_count -= 1;
                }
            }
        }
        for name in &changes.removed_containers {
            self.sets.remove(name);
            self.maps.remove(name);
            if let Some(elements) = self.elements.remove(name) {
                self.element_count -= elements.len();
            }
        }
        for element in &changes.elements {
            self.insert_element(element);
        }
    }
}

/// The difference from what was applied to what is wanted; `None` when it cannot be written as
/// differences (a chain or container declaration changed) and a full sync must do it.
///
/// Each wanted object is looked up in what was applied; only when fewer were found than were
/// applied does something need deleting, and only then is the wanted side indexed too.
/// Removals are sorted by name, so the transaction text is deterministic.
fn partial<'a>(
    applied: &Applied,
    desired: &'a Ruleset,
    stale: &BTreeMap<Name, Instant>,
) -> Option<Plan<'a>> {
    // Elements are compared on a second thread when there are many: the two halves share
    // nothing, and this is most of a partial sync's own time (see examples/sync_bench.rs).
    let (structure, elements) = if desired.elements.len() >= PARALLEL_ELEMENTS {
        std::thread::scope(|scope| {
            let elements = scope.spawn(|| diff_elements(applied, desired));
            let structure = diff_structure(applied, desired, stale);
            let elements = elements
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (structure, elements)
        })
    } else {
        (
            diff_structure(applied, desired, stale),
            diff_elements(applied, desired),
        )
    };
    let mut plan = structure?;
    plan.transaction.append(elements.transaction);
    plan.changes.elements = elements.changed;
    for (container, key) in elements.gone {
        // Elements of a deleted container go with it.
        if !plan.changes.removed_containers.contains(&container) {
            plan.transaction.delete(
                Phase::ElementDelete,
                ObjectId::Element {
                    container: container.clone(),
                    key: key.clone(),
                },
            );
        }
        plan.changes.removed_elements.push((container, key));
    }
    Some(plan)
}

/// From this many elements on, a partial sync compares elements on a second thread.
const PARALLEL_ELEMENTS: usize = 4096;

/// The element half of a partial diff.
struct ElementDiff<'a> {
    transaction: Transaction<'a>,
    /// Elements written (new, or replacing one with another value or comment).
    changed: Vec<&'a Arc<Element>>,
    /// Elements applied but no longer wanted, in a fixed order.
    gone: Vec<(Name, Vec<Value>)>,
}

/// Elements: differences only. (Affinity sets have no elements in a ruleset: theirs are the
/// packet path's, and never appear here.)
fn diff_elements<'a>(applied: &Applied, desired: &'a Ruleset) -> ElementDiff<'a> {
    let mut tx = Transaction::new();
    let mut changed = Vec::new();
    let mut found = 0;
    for element in &desired.elements {
        match applied.element(&element.container, &element.key) {
            Some(old) => {
                found += 1;
                // Most often the very element applied (a kept translation's): `Arc`'s
                // equality then compares the pointers alone.
                if old != element {
                    tx.delete(Phase::ElementDelete, old.id());
                    tx.add(Phase::ElementAdd, Object::Element(element));
                    changed.push(element);
                }
            }
            None => {
                tx.add(Phase::ElementAdd, Object::Element(element));
                changed.push(element);
            }
        }
    }
    let mut gone = Vec::new();
    if found < applied.element_count {
        let wanted: FxHashSet<(&str, &[Value])> = desired
            .elements
            .iter()
            .map(|e| (&*e.container, e.key.as_slice()))
            .collect();
        gone = applied
            .elements
            .values()
            .flat_map(|elements| elements.iter().map(|e| &e.0))
            .filter(|e| !wanted.contains(&(&*e.container, e.key.as_slice())))
            .map(|e| (e.container.clone(), e.key.to_vec()))
            .collect();
        gone.sort();
    }
    ElementDiff {
        transaction: tx,
        changed,
        gone,
    }
}

/// Chains, sets and maps: the part of a partial diff that may find a change only a full sync
/// can make (`None`).
fn diff_structure<'a>(
    applied: &Applied,
    desired: &'a Ruleset,
    stale: &BTreeMap<Name, Instant>,
) -> Option<Plan<'a>> {
    let mut tx = Transaction::new();
    let mut changes = Changes::default();
    let mut stale_added = Vec::new();
    let mut stale_revived = Vec::new();

    // Chains: rewritten when their rules changed. `add` + `flush` also for new chains, as
    // kube-proxy does (§5A.11 operation counts): the flush makes the write exact even if the
    // chain unexpectedly exists.
    let mut found = 0;
    for chain in &desired.chains {
        match applied.chains.get(&*chain.name) {
            Some(old) => {
                found += 1;
                if !old.same_declaration(chain) {
                    return None;
                }
                if old.rules != chain.rules {
                    tx.rewrite_chain(chain, true);
                    changes.chains.push(chain);
                }
            }
            None => {
                if stale.contains_key(&chain.name) {
                    stale_revived.push(chain.name.clone());
                }
                tx.rewrite_chain(chain, true);
                changes.chains.push(chain);
            }
        }
    }
    if found < applied.chains.len() {
        let wanted: FxHashSet<&str> = desired.chains.iter().map(|c| &*c.name).collect();
        let mut gone: Vec<&Chain> = applied
            .chains
            .values()
            .filter(|c| !wanted.contains(&*c.name))
            .collect();
        gone.sort_by(|a, b| a.name.cmp(&b.name));
        for chain in gone {
            if !chain.rules.is_empty() {
                tx.flush(Phase::StaleFlush, chain.id());
            }
            stale_added.push(chain.name.clone());
            changes.removed_chains.push(chain.name.clone());
        }
    }

    // Sets and maps: added when new; an unchanged one is not touched, so affinity sets keep
    // their elements. Only a timeout may change in place (`add set` updates it).
    let mut found = 0;
    for set in &desired.sets {
        match applied.sets.get(&*set.name) {
            None if applied.maps.contains_key(&*set.name) => return None,
            None => {}
            Some(old) if *old == *set => {
                found += 1;
                continue;
            }
            Some(old) if old.key_type == set.key_type && old.flags == set.flags => found += 1,
            Some(_) => return None,
        }
        tx.add(Phase::ContainerAdd, Object::Set(set));
        changes.sets.push(set);
    }
    for map in &desired.maps {
        match applied.maps.get(&*map.name) {
            None if applied.sets.contains_key(&*map.name) => return None,
            None => {}
            Some(old) if *old == *map => {
                found += 1;
                continue;
            }
            Some(old) if old.key_type == map.key_type && old.value_type == map.value_type => {
                found += 1
            }
            Some(_) => return None,
        }
        tx.add(Phase::ContainerAdd, Object::Map(map));
        changes.maps.push(map);
    }
    if found < applied.sets.len() + applied.maps.len() {
        let wanted: FxHashSet<&str> = desired
            .sets
            .iter()
            .map(|s| &*s.name)
            .chain(desired.maps.iter().map(|m| &*m.name))
            .collect();
        let mut gone: Vec<ObjectId> = applied
            .sets
            .values()
            .filter(|s| !wanted.contains(&*s.name))
            .map(Set::id)
            .chain(
                applied
                    .maps
                    .values()
                    .filter(|m| !wanted.contains(&*m.name))
                    .map(Map::id),
            )
            .collect();
        gone.sort();
        for id in gone {
            if let ObjectId::Set(name) | ObjectId::Map(name) = &id {
                changes.removed_containers.push(name.clone());
            }
            tx.delete(Phase::ContainerDelete, id);
        }
    }

    Some(Plan {
        transaction: tx,
        stale_added,
        stale_revived,
        changes,
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
            Some(have) if *have == &**element => {}
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
        changes: Changes::default(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NodeConfig;
    use crate::pipeline;
    use crate::source::Manifests;

    const V4: IpFamily = IpFamily::V4;

    /// `web`: ClientIP affinity over `web_endpoints` (10.244.N.5, N = 1..); `api`: no affinity,
    /// endpoints 10.244.1.6 (on this node) and `api_extra`; `local`: NodePort with
    /// externalTrafficPolicy Local, present when `with_local`.
    fn cluster(web_endpoints: usize, api_extra: &str, timeout: u32, with_local: bool) -> String {
        let web: String = (1..=web_endpoints)
            .map(|n| format!("- {{addresses: [10.244.{n}.5], nodeName: node-{n}}}\n"))
            .collect();
        let mut text = format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: ns}}
spec:
  clusterIP: 10.96.0.10
  ports: [{{name: http, protocol: TCP, port: 80}}]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {timeout}}}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: ns, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 8080}}]
endpoints:
{web}---
apiVersion: v1
kind: Service
metadata: {{name: api, namespace: ns}}
spec:
  clusterIP: 10.96.0.11
  ports: [{{name: grpc, protocol: TCP, port: 9000}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: api-1, namespace: ns, labels: {{kubernetes.io/service-name: api}}}}
addressType: IPv4
ports: [{{name: grpc, protocol: TCP, port: 9000}}]
endpoints:
- {{addresses: [10.244.1.6], nodeName: node-1}}
- {{addresses: [{api_extra}], nodeName: node-2}}
"#
        );
        if with_local {
            text.push_str(
                r#"---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: ns}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  clusterIP: 10.96.0.12
  ports: [{name: p, protocol: TCP, port: 80, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: ns, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{name: p, protocol: TCP, port: 8080}]
endpoints:
- {addresses: [10.244.1.7], nodeName: node-1}
- {addresses: [10.244.2.7], nodeName: node-2}
"#,
            );
        }
        text
    }

    fn rulesets(text: &str) -> Vec<Ruleset> {
        let mut config = NodeConfig::new("node-1");
        config.node_ips = vec!["10.100.0.1".parse().unwrap()];
        config.cluster_cidrs = vec!["10.244.0.0/16".parse().unwrap()];
        let mut manifests = Manifests::default();
        manifests.add_text(text, "test.yaml").unwrap();
        let plan = pipeline::plan(&manifests.state, &config);
        assert!(plan.notes.is_empty(), "{:?}", plan.notes);
        pipeline::nftables_rulesets(&plan, &config)
    }

    fn standard() -> Vec<Ruleset> {
        rulesets(&cluster(3, "10.244.2.6", 10800, false))
    }

    /// The table's lines in a fixed order, for comparing a dump with a ruleset.
    fn sorted_lines(text: &str) -> Vec<String> {
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        lines.sort();
        lines
    }

    fn syncer() -> Syncer<FakeKernel> {
        Syncer::new(FakeKernel::new(), SyncOptions::default())
    }

    fn new_commands(syncer: &Syncer<FakeKernel>, since: usize) -> Vec<String> {
        syncer.applier().transactions[since..]
            .iter()
            .flat_map(|t| t.commands.clone())
            .collect()
    }

    fn affinity_sets(ruleset: &Ruleset) -> Vec<Name> {
        ruleset
            .sets
            .iter()
            .filter(|s| crate::nftables::is_affinity_set_name(&s.name))
            .map(|s| s.name.clone())
            .collect()
    }

    fn client(n: u8) -> Vec<Value> {
        vec![Value::Addr(format!("10.100.0.{n}").parse().unwrap())]
    }

    #[test]
    fn first_sync_creates_the_table() {
        let desired = standard();
        let mut s = syncer();
        let reports = s.sync(&desired).unwrap();
        assert!(reports[0].full);
        let sent = &s.applier().transactions;
        assert_eq!(sent.len(), 1);
        // Nothing to flush or delete on an empty node: exactly the creation commands.
        assert_eq!(sent[0].commands.len(), desired[0].creation_commands().len());
        assert_eq!(reports[0].objects, sent[0].commands.len());
        assert!(sent[0].commands.iter().all(|c| c.starts_with("add ")));
        assert_eq!(
            sorted_lines(&s.applier().dump(V4)),
            sorted_lines(&desired[0].to_nft_script())
        );
    }

    #[test]
    fn unchanged_state_sends_nothing() {
        let desired = standard();
        let mut s = syncer();
        s.sync(&desired).unwrap();
        let report = &s.sync(&desired).unwrap()[0];
        assert_eq!((report.full, report.objects, report.bytes), (false, 0, 0));
        assert_eq!(s.applier().transactions.len(), 1, "no transaction at all");
        // Only the cheap drift check talked to the kernel; the table was read once.
        assert_eq!((s.applier().reads, s.applier().rule_counts), (1, 1));
    }

    #[test]
    fn changed_slice_touches_only_its_service_with_the_exact_count() {
        let mut s = syncer();
        s.sync(&standard()).unwrap();
        let before = s.applier().transactions.len();
        // api's second endpoint moves to another address (and onto this node).
        let changed = rulesets(&cluster(3, "10.244.1.9", 10800, false).replace(
            "{addresses: [10.244.1.9], nodeName: node-2}",
            "{addresses: [10.244.1.9], nodeName: node-1}",
        ));
        let report = &s.sync(&changed).unwrap()[0];
        let sent = new_commands(&s, before);
        // add + flush + the one DNAT rule of api's service chain, and the new endpoint's
        // hairpin element: 4 objects (kube-proxy's count for this change, §5A.11).
        assert_eq!(report.objects, 4, "{sent:#?}");
        assert_eq!(sent.len(), 4);
        let api_chain = changed[0]
            .chains
            .iter()
            .find(|c| c.name.ends_with("ns/api/tcp/grpc"))
            .unwrap()
            .name
            .clone();
        assert_eq!(sent[0], format!("add chain ip kube-proxy {api_chain}"));
        assert_eq!(sent[1], format!("flush chain ip kube-proxy {api_chain}"));
        assert!(sent[2].starts_with(&format!("add rule ip kube-proxy {api_chain} ")));
        assert!(sent[2].contains("10.244.1.9 . 9000"), "{}", sent[2]);
        assert_eq!(
            sent[3],
            "add element ip kube-proxy hairpin-connections { 10.244.1.9 . 10.244.1.9 . tcp . 9000 }"
        );
        assert_eq!(
            sorted_lines(&s.applier().dump(V4)),
            sorted_lines(&changed[0].to_nft_script())
        );
    }

    #[test]
    fn affinity_state_of_remaining_endpoints_survives() {
        let mut s = syncer();
        let three = standard();
        s.sync(&three).unwrap();
        let sets = affinity_sets(&three[0]);
        assert_eq!(sets.len(), 3);
        for (i, set) in sets.iter().enumerate() {
            assert!(s
                .applier_mut()
                .insert_live_element(V4, set, client(i as u8 + 2)));
        }

        // An unrelated change (api's endpoint) leaves every affinity set alone.
        let before = s.applier().transactions.len();
        s.sync(&rulesets(&cluster(3, "10.244.2.8", 10800, false)))
            .unwrap();
        assert!(new_commands(&s, before)
            .iter()
            .all(|c| !c.contains("affinity-")));

        // web loses its third endpoint: only that endpoint's set is deleted.
        let two = rulesets(&cluster(2, "10.244.2.8", 10800, false));
        let before = s.applier().transactions.len();
        s.sync(&two).unwrap();
        let sent = new_commands(&s, before);
        let removed = &sets[2];
        for set in &sets[..2] {
            assert!(
                sent.iter()
                    .all(|c| !c.contains(&format!(" {set} ")) && !c.ends_with(&format!(" {set}"))),
                "remaining set {set} touched: {sent:#?}"
            );
            assert_eq!(s.applier().elements(V4, set).len(), 1, "{set} lost state");
        }
        assert!(sent.contains(&format!("delete set ip kube-proxy {removed}")));
        assert!(s.applier().elements(V4, removed).is_empty());
        // Its endpoint chain is flushed now and deleted only after the grace period.
        let chain = removed.replacen("affinity-", "endpoint-", 1);
        assert!(sent.contains(&format!("flush chain ip kube-proxy {chain}")));
        assert!(!sent.iter().any(|c| c.starts_with("delete chain")));
        assert_eq!(s.stale_chains(V4), vec![Name::from(chain.as_str())]);
        let before = s.applier().transactions.len();
        s.sync(&two).unwrap();
        assert!(new_commands(&s, before).is_empty(), "grace period not over");
        s.age_stale_chains(Duration::from_secs(2));
        assert!(!s.sync(&two).unwrap()[0].cleanup_failed);
        assert_eq!(
            new_commands(&s, before),
            vec![format!("delete chain ip kube-proxy {chain}")]
        );
        assert!(s.stale_chains(V4).is_empty());
        assert_eq!(
            sorted_lines(&s.applier().dump(V4))
                .into_iter()
                .filter(|l| !l.starts_with("add element ip kube-proxy affinity-"))
                .collect::<Vec<_>>(),
            sorted_lines(&two[0].to_nft_script())
        );
    }

    #[test]
    fn refused_transaction_changes_nothing_and_the_next_sync_is_full() {
        let mut s = syncer();
        let old = standard();
        s.sync(&old).unwrap();
        let dump = s.applier().dump(V4);
        s.applier_mut().refuse_next(1);
        let new = rulesets(&cluster(2, "10.244.2.8", 10800, false));
        let err = s.sync(&new).unwrap_err();
        assert!(
            matches!(&err, SyncError::Refused { object: Some(o), .. } if o.contains("kube-proxy")),
            "{err}"
        );
        assert_eq!(s.applier().dump(V4), dump, "nothing of it applied");
        let report = &s.sync(&new).unwrap()[0];
        assert!(report.full);
        assert_eq!(s.applier().reads, 2, "the full sync re-read the kernel");
        // The third endpoint's chain, found in the kernel but not wanted, waits flushed.
        let stale = s.stale_chains(V4);
        assert_eq!(stale.len(), 1);
        assert!(stale[0].contains("10.244.3.5"));
        let stale_line = format!("add chain ip kube-proxy {}", stale[0]);
        assert_eq!(
            sorted_lines(&s.applier().dump(V4))
                .into_iter()
                .filter(|l| *l != stale_line)
                .collect::<Vec<_>>(),
            sorted_lines(&new[0].to_nft_script())
        );
        // And back to partial syncs.
        assert!(!s.sync(&new).unwrap()[0].full);
    }

    #[test]
    fn flushed_or_deleted_table_is_restored() {
        let desired = standard();
        let mut s = syncer();
        s.sync(&desired).unwrap();
        let set = affinity_sets(&desired[0])[0].clone();
        s.applier_mut().insert_live_element(V4, &set, client(2));
        let dump = s.applier().dump(V4);

        s.applier_mut().flush_table(V4);
        assert_ne!(s.applier().dump(V4), dump);
        assert!(s.sync(&desired).unwrap()[0].full, "drift detected");
        assert_eq!(
            s.applier().dump(V4),
            dump,
            "rules back, affinity state kept"
        );

        s.applier_mut().delete_table(V4);
        assert!(s.sync(&desired).unwrap()[0].full);
        assert_eq!(
            sorted_lines(&s.applier().dump(V4)),
            sorted_lines(&desired[0].to_nft_script())
        );
    }

    #[test]
    fn full_sync_over_an_existing_table_writes_only_what_differs() {
        let mut kernel = FakeKernel::new();
        let old = standard();
        Syncer::new(&mut kernel, SyncOptions::default())
            .sync(&old)
            .unwrap();
        let sets = affinity_sets(&old[0]);
        for set in &sets {
            kernel.insert_live_element(V4, set, client(3));
        }
        // A new process (restart) with api's endpoint changed.
        let new = rulesets(&cluster(3, "10.244.2.8", 10800, false));
        let before = kernel.transactions.len();
        let mut s = Syncer::new(&mut kernel, SyncOptions::default());
        assert!(s.sync(&new).unwrap()[0].full);
        drop(s);
        let sent: Vec<&String> = kernel.transactions[before..]
            .iter()
            .flat_map(|t| &t.commands)
            .collect();
        // Elements: only the hairpin-free api change shows (none: the moved endpoint is not
        // local), so no element is written at all; every set is re-added, never deleted.
        assert!(
            !sent.iter().any(|c| c.starts_with("add element")),
            "{sent:#?}"
        );
        assert!(!sent.iter().any(|c| c.starts_with("delete")), "{sent:#?}");
        for set in &sets {
            assert!(sent
                .iter()
                .any(|c| c.starts_with(&format!("add set ip kube-proxy {set} "))));
            assert_eq!(kernel.elements(V4, set).len(), 1, "{set} lost state");
        }
        // Every chain with rules was flushed and rewritten.
        let flushes = sent.iter().filter(|c| c.starts_with("flush chain")).count();
        assert_eq!(
            flushes,
            new[0].chains.iter().filter(|c| !c.rules.is_empty()).count()
        );
    }

    #[test]
    fn one_shot_deletes_stale_chains_only_when_no_element_points_at_them() {
        let mut kernel = FakeKernel::new();
        let with_local = rulesets(&cluster(3, "10.244.2.6", 10800, true));
        Syncer::new(&mut kernel, SyncOptions::one_shot())
            .sync(&with_local)
            .unwrap();
        let name = |prefix: &str| -> String {
            with_local[0]
                .chains
                .iter()
                .find(|c| c.name.starts_with(prefix) && c.name.ends_with("ns/local/tcp/p"))
                .unwrap()
                .name
                .to_string()
        };
        let (service, local, external) = (name("service-"), name("local-"), name("external-"));

        // The `local` Service goes away. Its service and external chains are targets of map
        // elements deleted in the same transaction: flushed only. Its local chain is reached
        // only from the external chain's rules: flushed and deleted.
        let without = standard();
        let before = kernel.transactions.len();
        Syncer::new(&mut kernel, SyncOptions::one_shot())
            .sync(&without)
            .unwrap();
        let sent: Vec<String> = kernel.transactions[before..]
            .iter()
            .flat_map(|t| t.commands.clone())
            .collect();
        for chain in [&service, &local, &external] {
            assert!(sent.contains(&format!("flush chain ip kube-proxy {chain}")));
        }
        assert!(sent.contains(&format!("delete chain ip kube-proxy {local}")));
        for chain in [&service, &external] {
            assert!(!sent.contains(&format!("delete chain ip kube-proxy {chain}")));
        }

        // The next run finds them empty and unreferenced, and deletes them.
        Syncer::new(&mut kernel, SyncOptions::one_shot())
            .sync(&without)
            .unwrap();
        let dump = kernel.dump(V4);
        assert!(!dump.contains("ns/local/"), "{dump}");
        assert_eq!(
            sorted_lines(&dump),
            sorted_lines(&without[0].to_nft_script())
        );
    }

    #[test]
    fn affinity_timeout_change_updates_the_sets_in_place() {
        let mut s = syncer();
        s.sync(&standard()).unwrap();
        let sets = affinity_sets(&standard()[0]);
        s.applier_mut().insert_live_element(V4, &sets[0], client(2));
        let before = s.applier().transactions.len();
        let longer = rulesets(&cluster(3, "10.244.2.6", 600, false));
        s.sync(&longer).unwrap();
        let sent = new_commands(&s, before);
        assert_eq!(sent.len(), 3, "{sent:#?}");
        assert!(sent.iter().all(
            |c| c.starts_with("add set ip kube-proxy affinity-") && c.contains("timeout 600s")
        ));
        assert_eq!(s.applier().elements(V4, &sets[0]).len(), 1);
    }

    #[test]
    fn periodic_full_sync_rereads_the_kernel() {
        let desired = standard();
        let options = SyncOptions {
            full_sync_period: Some(Duration::ZERO),
            ..SyncOptions::default()
        };
        let mut s = Syncer::new(FakeKernel::new(), options);
        s.sync(&desired).unwrap();
        let report = &s.sync(&desired).unwrap()[0];
        assert!(report.full);
        assert_eq!(s.applier().reads, 2);
        // Everything already there: only idempotent adds, flushes and rules; no element.
        let last = s.applier().last_applied().unwrap();
        assert!(last.commands.iter().all(|c| !c.contains(" element ")));
    }

    #[test]
    fn refused_stale_chain_deletion_turns_into_a_full_sync() {
        let mut s = syncer();
        s.sync(&standard()).unwrap();
        let two = rulesets(&cluster(2, "10.244.2.6", 10800, false));
        s.sync(&two).unwrap();
        let stale = s.stale_chains(V4);
        assert_eq!(stale.len(), 1);
        s.age_stale_chains(Duration::from_secs(2));
        s.applier_mut().refuse_next(1);
        let report = &s.sync(&two).unwrap()[0];
        assert!(
            report.full,
            "the refused deletion made this sync a full one"
        );
        assert!(report.cleanup_failed, "the refused deletion is reported");
        // The full sync found the chain again (empty) and waits anew before deleting it.
        assert_eq!(s.stale_chains(V4), stale);
        let before = s.applier().transactions.len();
        s.age_stale_chains(Duration::from_secs(2));
        assert!(!s.sync(&two).unwrap()[0].cleanup_failed);
        assert_eq!(
            new_commands(&s, before),
            vec![format!("delete chain ip kube-proxy {}", stale[0])]
        );
    }

    #[test]
    fn changed_base_chain_declaration_is_recreated_by_a_full_sync() {
        let mut s = syncer();
        s.sync(&standard()).unwrap();
        let mut changed = standard();
        let chain = changed[0]
            .chains
            .iter_mut()
            .find(|c| &*c.name == crate::nftables::NAT_PREROUTING)
            .unwrap();
        if let Some(base) = &mut chain.base {
            base.priority = -99;
        }
        let before = s.applier().transactions.len();
        let report = &s.sync(&changed).unwrap()[0];
        assert!(report.full, "a declaration change is not a partial sync");
        let sent = new_commands(&s, before);
        assert!(sent.contains(&"delete chain ip kube-proxy nat-prerouting".to_string()));
        assert_eq!(
            sorted_lines(&s.applier().dump(V4)),
            sorted_lines(&changed[0].to_nft_script())
        );
    }

    #[test]
    fn cleanup_removes_both_tables_and_only_them() {
        let mut kernel = FakeKernel::new();
        let v4 = standard();
        Syncer::new(&mut kernel, SyncOptions::default())
            .sync(&v4)
            .unwrap();
        cleanup_with(&mut kernel, &[IpFamily::V4, IpFamily::V6]).unwrap();
        assert_eq!(kernel.dump(V4), "");
        // Only the existing table was deleted; cleaning up again is fine.
        let deletes: Vec<&Recorded> = kernel
            .transactions
            .iter()
            .filter(|t| t.commands == ["delete table ip kube-proxy"])
            .collect();
        assert_eq!(deletes.len(), 1);
        cleanup_with(&mut kernel, &[IpFamily::V4, IpFamily::V6]).unwrap();
    }
}

#[cfg(test)]
mod large_tests {
    use super::*;
    use crate::config::NodeConfig;
    use crate::pipeline;

    fn rulesets(state: &crate::source::ClusterState) -> Vec<Ruleset> {
        let mut config = NodeConfig::new("node-1");
        config.node_ips = vec!["10.100.0.1".parse().unwrap()];
        config.cluster_cidrs = vec!["10.128.0.0/9".parse().unwrap()];
        let plan = pipeline::plan(state, &config);
        pipeline::nftables_rulesets(&plan, &config)
    }

    /// Enough elements for the two-thread diff: one changed and one removed Service give
    /// exactly their objects, in a fixed order, and the table ends up as wanted.
    #[test]
    fn large_partial_sync_is_exact() {
        let mut state = crate::synthetic::cluster(1500, 3).expect("fits");
        let first = rulesets(&state);
        assert!(first[0].elements.len() >= PARALLEL_ELEMENTS);
        let mut s = Syncer::new(FakeKernel::new(), SyncOptions::default());
        s.sync(&first).unwrap();

        // svc-7's local endpoint (node-1) moves; svc-1499 (no affinity, no NodePort) goes.
        state.endpoint_slices[7].endpoints[1].addresses = vec!["10.127.0.7".into()];
        state.services.remove(1499);
        let second = rulesets(&state);
        let before = s.applier().transactions.len();
        let report = &s.sync(&second).unwrap()[0];
        let sent = s.applier().transactions[before..]
            .iter()
            .flat_map(|t| t.commands.clone())
            .collect::<Vec<_>>();
        let expected = [
            "add chain ip kube-proxy service-GDSB2ZQ3-ns7/svc-7/tcp/http",
            "flush chain ip kube-proxy service-GDSB2ZQ3-ns7/svc-7/tcp/http",
            // svc-1499: its chain waits flushed; its elements go, in (container, key) order.
            "flush chain ip kube-proxy service-CLN6YCYK-ns99/svc-1499/tcp/http",
            "delete element ip kube-proxy cluster-ips { 10.96.5.220 }",
            "delete element ip kube-proxy hairpin-connections { 10.128.0.23 . 10.128.0.23 . tcp . 8080 }",
            "delete element ip kube-proxy hairpin-connections { 10.128.17.147 . 10.128.17.147 . tcp . 8080 }",
            "delete element ip kube-proxy service-ips { 10.96.5.220 . tcp . 80 }",
        ];
        assert_eq!(&sent[..expected.len()], &expected, "{sent:#?}");
        assert!(sent[expected.len()].contains("10.127.0.7 . 8080"));
        assert_eq!(
            sent[expected.len() + 1],
            "add element ip kube-proxy hairpin-connections { 10.127.0.7 . 10.127.0.7 . tcp . 8080 }"
        );
        assert_eq!(report.objects, expected.len() + 2);
        let mut dump: Vec<String> = s.applier().dump(V4).lines().map(str::to_string).collect();
        dump.retain(|l| !l.contains("svc-1499/"));
        dump.sort();
        let mut want: Vec<String> = second[0]
            .to_nft_script()
            .lines()
            .map(str::to_string)
            .collect();
        want.sort();
        assert_eq!(dump, want);
    }

    const V4: IpFamily = IpFamily::V4;
}
