//! iptables mode: makes the kernel hold the desired [`Ruleset`] of each family with one
//! `iptables-restore --noflush` per sync (spec §4.1, §4.11).
//!
//! The [`IptablesSyncer`] keeps the ruleset it last committed. A *full* sync (first sync,
//! after a failure, after drift, periodically) re-reads the kernel with `iptables-save`,
//! ensures the jump rules from the built-in chains and the mangle canary (§4.2), then
//! rewrites every chain and deletes stale per-service chains. A *partial* sync rewrites the top-level
//! chains and only the per-service chains whose rules differ from what was committed, and
//! deletes the per-service chains no longer wanted; unchanged chains are not touched, so their
//! `recent` lists (ClientIP affinity, §4.8) and counters stay as they are.
//!
//! Failure: `iptables-restore` commits table by table (`filter`, then `nat`; both backends),
//! so when `nat` is refused `filter` is already in. The syncer then writes `filter` back as it
//! was (from memory, or from the `iptables-save` of a full sync), so a refused sync leaves the
//! previous rules. The error names the payload line the tool refused; the next sync is full.

mod applier;
mod cleanup;
mod duplicates;
mod staging;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

use rustc_hash::{FxHashMap, FxHashSet};

pub use applier::{
    detect_backend, Applier, Backend, BackendChoice, Exit, SpawnError, SystemApplier, Tool,
    RESTORE_FLAGS, WAIT_FLAGS,
};
pub use cleanup::{cleanup_applier, cleanup_with};
pub use staging::commit_sections;

use super::{SyncError, SyncReport, Timed};
use crate::family::IpFamily;
use crate::iptables::{
    is_owned_chain, is_service_chain, restore_payload, Chain, ChainContent, ChainName,
    RestorePayload, Ruleset, Table, TablePatch, KUBE_EXTERNAL_SERVICES, KUBE_FIREWALL,
    KUBE_FORWARD, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_PROXY_CANARY, KUBE_PROXY_FIREWALL,
    KUBE_SERVICES,
};
use crate::sync::netlink::NetfilterSocket;
use staging::{ChainLines, Order};

/// kube-proxy's full-sync period (§6): at least one full sync an hour.
pub const DEFAULT_FULL_SYNC_PERIOD: Duration = Duration::from_secs(3600);

/// One jump rule from a built-in chain (§4.2).
#[derive(Debug)]
struct Jump {
    table: &'static str,
    chain: &'static str,
    /// Matches, each argument as passed to `iptables` (a comment is one argument).
    matches: &'static [&'static str],
    target: &'static str,
}

const NEW_EXTERNAL: &[&str] = &[
    "-m",
    "conntrack",
    "--ctstate",
    "NEW",
    "-m",
    "comment",
    "--comment",
    "kubernetes externally-visible service portals",
];
const HEALTH_CHECK: &[&str] = &[
    "-m",
    "comment",
    "--comment",
    "kubernetes health check service ports",
];
const NEW_PORTALS: &[&str] = &[
    "-m",
    "conntrack",
    "--ctstate",
    "NEW",
    "-m",
    "comment",
    "--comment",
    "kubernetes service portals",
];
const FORWARDING: &[&str] = &["-m", "comment", "--comment", "kubernetes forwarding rules"];
const NEW_FIREWALL: &[&str] = &[
    "-m",
    "conntrack",
    "--ctstate",
    "NEW",
    "-m",
    "comment",
    "--comment",
    "kubernetes load balancer firewall",
];
const PORTALS: &[&str] = &["-m", "comment", "--comment", "kubernetes service portals"];
const POSTROUTING: &[&str] = &["-m", "comment", "--comment", "kubernetes postrouting rules"];

const fn jump(
    table: &'static str,
    chain: &'static str,
    matches: &'static [&'static str],
    target: &'static str,
) -> Jump {
    Jump {
        table,
        chain,
        matches,
        target,
    }
}

/// The jump rules of §4.2, in the order kube-proxy ensures them.
const JUMPS: &[Jump] = &[
    jump("filter", "INPUT", NEW_EXTERNAL, KUBE_EXTERNAL_SERVICES),
    jump("filter", "FORWARD", NEW_EXTERNAL, KUBE_EXTERNAL_SERVICES),
    jump("filter", "INPUT", HEALTH_CHECK, KUBE_NODEPORTS),
    jump("filter", "FORWARD", NEW_PORTALS, KUBE_SERVICES),
    jump("filter", "OUTPUT", NEW_PORTALS, KUBE_SERVICES),
    jump("filter", "FORWARD", FORWARDING, KUBE_FORWARD),
    jump("filter", "INPUT", NEW_FIREWALL, KUBE_PROXY_FIREWALL),
    jump("filter", "OUTPUT", NEW_FIREWALL, KUBE_PROXY_FIREWALL),
    jump("filter", "FORWARD", NEW_FIREWALL, KUBE_PROXY_FIREWALL),
    jump("nat", "OUTPUT", PORTALS, KUBE_SERVICES),
    jump("nat", "PREROUTING", PORTALS, KUBE_SERVICES),
    jump("nat", "POSTROUTING", POSTROUTING, KUBE_POSTROUTING),
    jump("filter", "INPUT", &[], KUBE_FIREWALL),
    jump("filter", "OUTPUT", &[], KUBE_FIREWALL),
];

/// The jump rules of §4.2 as `(table, rule line)`, the line as `iptables-save` prints it
/// (for the tracer, which walks the built-in chains through them).
pub fn jump_rule_lines() -> impl Iterator<Item = (&'static str, String)> {
    JUMPS.iter().map(|jump| (jump.table, jump.save_line()))
}

/// The jumps checked on every partial sync to notice that someone flushed `nat` or `filter`
/// (e.g. `iptables -t nat -F`, which leaves every chain, canaries included, but no rule):
/// indexes into [`JUMPS`].
const DRIFT_PROBES: [usize; 2] = [10, 0];

impl Jump {
    /// `-t TABLE OP CHAIN MATCHES… -j TARGET`
    fn args(&self, op: &'static str) -> Vec<&'static str> {
        let mut args = vec!["-t", self.table, op, self.chain];
        args.extend_from_slice(self.matches);
        args.extend_from_slice(&["-j", self.target]);
        args
    }

    /// The rule as `iptables-save` prints it, to spot it in a save without running `-C`.
    fn save_line(&self) -> String {
        let mut line = format!("-A {}", self.chain);
        for arg in self.matches.iter().chain(&["-j", self.target]) {
            line.push(' ');
            if arg.contains(' ') {
                line.push('"');
                line.push_str(arg);
                line.push('"');
            } else {
                line.push_str(arg);
            }
        }
        line
    }

    /// `jump rule "-t nat -I PREROUTING … -j KUBE-SERVICES"`, for messages.
    fn describe(&self) -> String {
        format!(
            "jump rule \"-t {} {}\"",
            self.table,
            self.save_line().replacen("-A ", "-I ", 1)
        )
    }
}

/// What the syncer knows about one family.
#[derive(Debug, Default)]
struct FamilyState {
    /// The ruleset the kernel holds since the last successful sync; `None` when unknown (none
    /// yet, or the last one failed): the next sync is then a full one.
    applied: Option<Ruleset>,
    last_full: Option<Instant>,
    full_requested: bool,
    /// The kind of the last sync attempted, successful or not.
    attempted_full: bool,
}

/// Applies desired rulesets to the kernel through an [`Applier`]; see the module docs.
pub struct IptablesSyncer<A: Applier> {
    applier: A,
    /// Indexed by family: IPv4, IPv6.
    states: [FamilyState; 2],
    full_sync_period: Duration,
}

fn family_index(family: IpFamily) -> usize {
    match family {
        IpFamily::V4 => 0,
        IpFamily::V6 => 1,
    }
}

impl<A: Applier> IptablesSyncer<A> {
    /// A syncer that knows nothing yet: its first sync of each family is a full one.
    pub fn new(applier: A) -> IptablesSyncer<A> {
        IptablesSyncer {
            applier,
            states: Default::default(),
            full_sync_period: DEFAULT_FULL_SYNC_PERIOD,
        }
    }

    pub fn set_full_sync_period(&mut self, period: Duration) {
        self.full_sync_period = period;
    }

    /// Makes the next sync of every family a full one.
    pub fn request_full_sync(&mut self) {
        for state in &mut self.states {
            state.full_requested = true;
        }
    }

    pub fn applier(&self) -> &A {
        &self.applier
    }

    pub fn applier_mut(&mut self) -> &mut A {
        &mut self.applier
    }

    /// Whether the last sync attempted for `family` was a full one (kube-proxy counts failed
    /// partial restores separately).
    pub fn attempted_full(&self, family: IpFamily) -> bool {
        self.states[family_index(family)].attempted_full
    }

    /// The ruleset last committed for `family`, if the syncer knows it.
    pub fn applied(&self, family: IpFamily) -> Option<&Ruleset> {
        self.states[family_index(family)].applied.as_ref()
    }

    /// Makes the kernel hold `desired`: one restore per family. Families are independent: a
    /// failure of one is returned after the others were synced.
    pub fn sync(&mut self, desired: Vec<Ruleset>) -> Result<Vec<SyncReport>, SyncError> {
        super::each_family(desired, |ruleset| self.sync_family(ruleset))
    }

    fn sync_family(&mut self, desired: Ruleset) -> Result<SyncReport, SyncError> {
        let family = desired.family;
        let period = self.full_sync_period;
        let state = &mut self.states[family_index(family)];
        let mut timed = Timed::new(&mut self.applier);
        let applier = &mut timed;
        let full = match &state.applied {
            None => true,
            Some(_) if state.full_requested => true,
            Some(_) if state.last_full.is_none_or(|t| t.elapsed() >= period) => true,
            Some(_) => drifted(applier, family)?,
        };
        state.attempted_full = full;
        // Whatever happens next, the kernel may no longer hold `applied` until it succeeds.
        let previous = state.applied.take();
        let result = if full {
            full_sync(applier, &desired)
        } else {
            match &previous {
                Some(previous) => partial_sync(applier, &desired, previous),
                None => full_sync(applier, &desired),
            }
        };
        let sent = result?;
        state.applied = Some(desired);
        // Freeing a large ruleset takes a while (30 ms for 10,000 Services): not on the way.
        if let Some(previous) = previous {
            std::thread::spawn(move || drop(previous));
        }
        if full {
            state.last_full = Some(Instant::now());
            state.full_requested = false;
        }
        Ok(SyncReport {
            family,
            full,
            objects: sent.lines,
            bytes: sent.text.len(),
            duration: Duration::ZERO,
            kernel: timed.spent,
            cleanup_failed: false,
            pruned: 0,
        })
    }
}

/// One-shot sync for `kproxy sync --once`, with the backend the node uses. A fresh process
/// knows nothing it applied, so this is a full sync (as a kube-proxy restart is).
pub fn sync_once(rulesets: &[Ruleset]) -> Result<Vec<SyncReport>, SyncError> {
    sync_once_with(rulesets, BackendChoice::Auto)
}

/// [`sync_once`] with a chosen backend (`--iptables-backend`).
pub fn sync_once_with(
    rulesets: &[Ruleset],
    backend: BackendChoice,
) -> Result<Vec<SyncReport>, SyncError> {
    IptablesSyncer::new(SystemApplier::new(backend)).sync(rulesets.to_vec())
}

/// A partial sync that finds any of these missing turns into a full one: the mangle canary
/// (kube-proxy's own check, §4.2) and two jump rules, one per table we write. Asked over
/// netlink where the rules live in nf_tables, else (or if that fails) with `iptables`.
fn drifted(applier: &mut impl Applier, family: IpFamily) -> Result<bool, SyncError> {
    if let Some(drifted) = over_netlink(applier, |socket| drifted_in_nf_tables(socket, family)) {
        return Ok(drifted);
    }
    let canary = applier
        .iptables(family, &["-t", "mangle", "-S", KUBE_PROXY_CANARY])
        .map_err(spawn_error)?;
    if !canary.success() {
        return Ok(true);
    }
    for probe in DRIFT_PROBES {
        let check = applier
            .iptables(family, &JUMPS[probe].args("-C"))
            .map_err(spawn_error)?;
        if !check.success() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Asks `query` over the applier's netlink socket. `None` where there is none (legacy backend,
/// fake kernel) or the query failed: the caller then asks the tools, which can say why.
fn over_netlink<T>(
    applier: &mut impl Applier,
    query: impl FnOnce(&mut NetfilterSocket) -> std::io::Result<T>,
) -> Option<T> {
    applier
        .nf_tables_socket()?
        .and_then(|mut socket| query(&mut socket))
        .ok()
}

/// [`drifted`] over netlink: iptables-nft keeps each table as an nf_tables table of the same
/// name, with chains of the same names.
fn drifted_in_nf_tables(socket: &mut NetfilterSocket, family: IpFamily) -> std::io::Result<bool> {
    if !socket.chain_exists(family, "mangle", KUBE_PROXY_CANARY)? {
        return Ok(true);
    }
    for probe in DRIFT_PROBES {
        let jump = &JUMPS[probe];
        if !socket.jumps_to(family, jump.table, jump.chain, jump.target)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Ensures the jump rules and the mangle canary, then rewrites every chain; stale per-service
/// chains found in the kernel are deleted, retired top-level ones emptied.
fn full_sync(applier: &mut impl Applier, desired: &Ruleset) -> Result<RestorePayload, SyncError> {
    let family = desired.family;
    let kernel = [
        // filter comes first in the payload: only its rules may need writing back (`apply`).
        read_table(applier, family, desired.filter.name.as_str(), true)?,
        read_chains(applier, family, desired.nat.name.as_str())?,
    ];
    let canary = ChainName::fixed(KUBE_PROXY_CANARY);
    let patches: Vec<TablePatch> = desired
        .tables()
        .iter()
        .zip(&kernel)
        .map(|(table, kernel)| {
            let wanted: FxHashSet<ChainName> = table.chains.iter().map(|c| c.name).collect();
            let mut flush = vec![canary];
            flush.extend(kernel.chains.iter().copied().filter(|name| {
                *name != canary
                    && !is_service_chain(name)
                    && is_owned_chain(name)
                    && !wanted.contains(name)
            }));
            TablePatch {
                table: table.name.as_str(),
                write: table.chains.iter().map(ChainContent::Rules).collect(),
                flush,
                delete: kernel
                    .chains
                    .iter()
                    .copied()
                    .filter(|name| is_service_chain(name) && !wanted.contains(name))
                    .collect(),
            }
        })
        .collect();
    let old_filter: Vec<ChainLines> = kernel[0]
        .rules
        .iter()
        .map(|(name, lines)| ChainLines {
            name: *name,
            lines: lines.clone(),
        })
        .collect();
    let order = staging::order(&old_filter, &staging::rendered(&desired.filter));
    let patches = arrange(patches, &order);
    let payload = restore_payload(&patches);
    // Jump rules and the mangle canary first, as kube-proxy does: on a fresh node the tables
    // are still empty then, which matters for legacy iptables, where every single command
    // rewrites its whole table (after the restore, 28 commands on a 10,000-Service nat table
    // took 67 s). An empty chain jumped to meanwhile lets packets pass through unchanged.
    ensure_jumps(applier, desired, &kernel)?;
    duplicates::remove_duplicate_jumps(applier, family, &kernel)?;
    ensure_chain(applier, family, "mangle", KUBE_PROXY_CANARY)?;
    apply(applier, family, &payload, &patches, |table| {
        kernel
            .iter()
            .find(|k| k.table == table && k.rules_kept)
            .map(Before::Kernel)
    })?;
    Ok(payload)
}

/// Rewrites the top-level chains, and the per-service chains that are new or changed since
/// `previous`; deletes the per-service chains `previous` had and `desired` has not.
fn partial_sync(
    applier: &mut impl Applier,
    desired: &Ruleset,
    previous: &Ruleset,
) -> Result<RestorePayload, SyncError> {
    let patches: Vec<TablePatch> = desired
        .tables()
        .iter()
        .zip(previous.tables())
        .map(|(table, before)| partial_patch(table, before))
        .collect();
    let order = staging::order(
        &staging::rendered(&previous.filter),
        &staging::rendered(&desired.filter),
    );
    let patches = arrange(patches, &order);
    let payload = restore_payload(&patches);
    apply(applier, desired.family, &payload, &patches, |table| {
        previous
            .tables()
            .into_iter()
            .find(|t| t.name.as_str() == table)
            .map(Before::Applied)
    })?;
    Ok(payload)
}

/// The commits of a sync in the order of `order`, from its filter and nat patches (in that
/// order): see src/sync/iptables/staging.rs for why.
fn arrange<'a>(patches: Vec<TablePatch<'a>>, order: &'a Order) -> Vec<TablePatch<'a>> {
    let mut patches = patches.into_iter();
    let (Some(filter), Some(nat)) = (patches.next(), patches.next()) else {
        return patches.collect();
    };
    match order {
        Order::FilterFirst => vec![filter, nat],
        Order::NatFirst => vec![nat, filter],
        Order::Staged(middle) => vec![
            TablePatch {
                table: filter.table,
                write: middle
                    .iter()
                    .map(|chain| ChainContent::Saved {
                        name: chain.name,
                        lines: &chain.lines,
                    })
                    .collect(),
                flush: Vec::new(),
                delete: Vec::new(),
            },
            nat,
            filter,
        ],
    }
}

fn partial_patch<'a>(table: &'a Table, before: &Table) -> TablePatch<'a> {
    // Top-level chains are always written (§4.11); a service chain when it is new or its
    // rules differ from what was committed. Unchanged chains share their rule lists with the
    // committed ones (the translation cache), so most comparisons are a pointer comparison.
    let ServiceChains { pairs, gone } = service_chains(table, before);
    let changed: Vec<bool> = crate::parallel::map_chunks(&pairs, |pairs| {
        pairs
            .iter()
            .map(|(chain, previous)| previous.is_none_or(|p| !p.same_rules(chain)))
            .collect::<Vec<bool>>()
    })
    .concat();
    // `pairs` follows the service chains in table order.
    let mut changed = changed.into_iter();
    let write = table
        .chains
        .iter()
        .filter(|c| !is_service_chain(&c.name) || changed.next().unwrap_or(true))
        .map(ChainContent::Rules)
        .collect();
    let top: FxHashSet<ChainName> = table
        .chains
        .iter()
        .filter(|c| !is_service_chain(&c.name))
        .map(|c| c.name)
        .collect();
    TablePatch {
        table: table.name.as_str(),
        write,
        // A top-level chain no longer wanted may still be jumped to: empty it, keep it.
        flush: before
            .chains
            .iter()
            .map(|c| c.name)
            .filter(|name| !is_service_chain(name) && !top.contains(name))
            .collect(),
        delete: gone,
    }
}

/// The service chains of a table, each with the committed chain of the same name, if any,
/// and the committed service chains no longer wanted.
struct ServiceChains<'a, 'b> {
    /// In the order of `table`'s chains.
    pairs: Vec<(&'a Chain, Option<&'b Chain>)>,
    gone: Vec<ChainName>,
}

/// [`ServiceChains`] of `table` against `before`. The translator emits service chains sorted
/// by name, so this is a merge; any other order falls back to hash lookups.
fn service_chains<'a, 'b>(table: &'a Table, before: &'b Table) -> ServiceChains<'a, 'b> {
    let desired: Vec<&Chain> = table
        .chains
        .iter()
        .filter(|c| is_service_chain(&c.name))
        .collect();
    let previous: Vec<&Chain> = before
        .chains
        .iter()
        .filter(|c| is_service_chain(&c.name))
        .collect();
    let sorted = |chains: &[&Chain]| chains.windows(2).all(|w| w[0].name < w[1].name);
    if !sorted(&desired) || !sorted(&previous) {
        let index: FxHashMap<ChainName, &Chain> = previous.iter().map(|c| (c.name, *c)).collect();
        let wanted: FxHashSet<ChainName> = desired.iter().map(|c| c.name).collect();
        return ServiceChains {
            gone: previous
                .iter()
                .map(|c| c.name)
                .filter(|name| !wanted.contains(name))
                .collect(),
            pairs: desired
                .into_iter()
                .map(|c| (c, index.get(&c.name).copied()))
                .collect(),
        };
    }
    let mut pairs = Vec::with_capacity(desired.len());
    let mut gone = Vec::new();
    let mut rest = previous.as_slice();
    for chain in desired {
        while let Some(p) = rest.first().filter(|p| p.name < chain.name) {
            gone.push(p.name);
            rest = &rest[1..];
        }
        let same = rest.first().copied().filter(|p| p.name == chain.name);
        if same.is_some() {
            rest = &rest[1..];
        }
        pairs.push((chain, same));
    }
    gone.extend(rest.iter().map(|p| p.name));
    ServiceChains { pairs, gone }
}

/// What a table held before a sync, to put it back when a later table of the same payload
/// was refused.
enum Before<'a> {
    Applied(&'a Table),
    Kernel(&'a KernelTable),
}

impl<'a> Before<'a> {
    /// The chain's earlier content; `None` if it did not exist.
    fn content(&self, name: ChainName) -> Option<ChainContent<'a>> {
        match self {
            Before::Applied(table) => table
                .chains
                .iter()
                .find(|c| c.name == name)
                .map(ChainContent::Rules),
            Before::Kernel(kernel) => kernel
                .rules
                .get(&name)
                .map(|lines| ChainContent::Saved { name, lines }),
        }
    }
}

/// Runs the restore. On failure, names the refused line, and writes back the tables of
/// `patches` that were committed before it (`before` gives their earlier content).
fn apply<'a>(
    applier: &mut impl Applier,
    family: IpFamily,
    payload: &RestorePayload,
    patches: &[TablePatch],
    before: impl Fn(&str) -> Option<Before<'a>>,
) -> Result<(), SyncError> {
    let exit = applier
        .restore(family, &payload.text)
        .map_err(spawn_error)?;
    if exit.success() {
        return Ok(());
    }
    let line = failed_line(&exit.stderr);
    let mut message = tool_message(&exit);
    if let Some(line) = line {
        // The commits before the refused line took effect: undo them, the last first, so that
        // the kernel goes back through the states the sync went through (each of them safe,
        // src/sync/iptables/staging.rs). One that cannot be undone stops it there.
        let committed: Vec<&TablePatch> = payload
            .commits
            .iter()
            .zip(patches.iter().filter(|p| !p.is_empty()))
            .filter(|((_, commit), _)| *commit < line)
            .map(|(_, patch)| patch)
            .collect();
        for patch in committed.into_iter().rev() {
            let table = patch.table;
            let undone = match before(table) {
                Some(before) => match roll_back(applier, family, patch, &before) {
                    Ok(()) => {
                        message.push_str(&format!(
                            "; table {table} had been committed and was put back"
                        ));
                        true
                    }
                    Err(err) => {
                        message.push_str(&format!(
                            "; table {table} had been committed, putting it back failed: {err}"
                        ));
                        false
                    }
                },
                None => {
                    message.push_str(&format!(
                        "; table {table} had been committed and cannot be put back (the tables \
                         committed before it stay: an intermediate state that drops nothing \
                         the old or the new rules carry); the next sync completes it"
                    ));
                    false
                }
            };
            if !undone {
                break;
            }
        }
    }
    Err(SyncError::Refused {
        tool: applier.program(family, Tool::Restore),
        family,
        object: line.map(|line| describe_line(payload, line)),
        message,
    })
}

/// Restores one table's chains touched by `patch` to their `before` content: chains that did
/// not exist are deleted (per-service) or left empty (top-level, maybe jumped to).
fn roll_back(
    applier: &mut impl Applier,
    family: IpFamily,
    patch: &TablePatch,
    before: &Before,
) -> Result<(), SyncError> {
    let mut seen = FxHashSet::default();
    let mut undo = TablePatch {
        table: patch.table,
        ..TablePatch::default()
    };
    let touched = patch
        .write
        .iter()
        .map(ChainContent::name)
        .chain(patch.flush.iter().copied())
        .chain(patch.delete.iter().copied());
    for name in touched {
        if !seen.insert(name) {
            continue;
        }
        match before.content(name) {
            Some(content) => undo.write.push(content),
            None if is_service_chain(&name) => undo.delete.push(name),
            None => undo.flush.push(name),
        }
    }
    let payload = restore_payload(std::slice::from_ref(&undo));
    apply(applier, family, &payload, &[], |_| None)
}

/// Inserts the missing jump rules of §4.2 whose target chain the ruleset has, at the top
/// (`-I`). The `iptables-save` of this sync decides what to ask: a rule it shows exists; a
/// target chain it does not show is created, and nothing can jump to it yet; otherwise `-C`
/// tells.
fn ensure_jumps(
    applier: &mut impl Applier,
    desired: &Ruleset,
    kernel: &[KernelTable],
) -> Result<(), SyncError> {
    let family = desired.family;
    let mut created: Vec<(&str, &str)> = Vec::new();
    for jump in JUMPS {
        let Some(table) = desired
            .tables()
            .into_iter()
            .find(|t| t.name.as_str() == jump.table)
        else {
            continue;
        };
        if !table.chains.iter().any(|c| &*c.name == jump.target) {
            continue;
        }
        let kernel = kernel.iter().find(|k| k.table == jump.table);
        // Present (extra copies are removed by `duplicates::remove_duplicate_jumps`).
        if kernel.is_some_and(|k| k.jumps.get(&jump.save_line()).is_some_and(|n| *n > 0)) {
            continue;
        }
        // A jump needs its target: create it empty (the restore fills it). Where the save
        // showed no such chain, nothing can jump to it yet, so `-C` is skipped.
        let target = (jump.table, jump.target);
        if kernel.is_some_and(|k| k.has_chain(jump.target)) {
            let check = applier
                .iptables(family, &jump.args("-C"))
                .map_err(spawn_error)?;
            if check.success() {
                continue;
            }
        } else if !created.contains(&target) {
            ensure_chain(applier, family, jump.table, jump.target)?;
            created.push(target);
        }
        let insert = applier
            .iptables(family, &jump.args("-I"))
            .map_err(spawn_error)?;
        if !insert.success() {
            return Err(iptables_refused(applier, family, jump.describe(), &insert));
        }
    }
    Ok(())
}

/// `iptables -t TABLE -N CHAIN`; a chain that exists already (exit status 1) is fine.
fn ensure_chain(
    applier: &mut impl Applier,
    family: IpFamily,
    table: &str,
    chain: &str,
) -> Result<(), SyncError> {
    let exit = applier
        .iptables(family, &["-t", table, "-N", chain])
        .map_err(spawn_error)?;
    if exit.success() || exit.code == Some(1) {
        return Ok(());
    }
    Err(iptables_refused(
        applier,
        family,
        format!("chain {chain} in table {table}"),
        &exit,
    ))
}

/// The error for a single `iptables` command that failed on `object`.
fn iptables_refused(
    applier: &impl Applier,
    family: IpFamily,
    object: String,
    exit: &Exit,
) -> SyncError {
    SyncError::Refused {
        tool: applier.program(family, Tool::Iptables),
        family,
        object: Some(object),
        message: tool_message(exit),
    }
}

/// One table as `iptables-save` shows it, as far as kproxy cares.
#[derive(Debug, Default)]
struct KernelTable {
    table: String,
    /// Every chain, in save order (names a restore could not write are left out).
    chains: Vec<ChainName>,
    /// The saved rule lines of kproxy's chains (empty chains included), if kept.
    rules: FxHashMap<ChainName, Vec<String>>,
    rules_kept: bool,
    /// Rules of other chains that jump to one of kproxy's chains, as saved, with the number
    /// of copies of each. Read over netlink, a count is of the rules of the built-in chain
    /// jumping to the target, whatever their matches: only a count of 1 is certain.
    jumps: FxHashMap<String, usize>,
    /// The counts in `jumps` are of the exact rule (from a save), not over netlink.
    jumps_exact: bool,
}

impl KernelTable {
    fn has_chain(&self, name: &str) -> bool {
        self.chains.iter().any(|c| &**c == name)
    }
}

/// Parses `iptables-save` output into its tables; with `keep_rules`, the rule lines of
/// kproxy's chains too.
fn parse_save(text: &str, keep_rules: bool) -> Vec<KernelTable> {
    let mut tables: Vec<KernelTable> = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('*') {
            tables.push(KernelTable {
                table: name.trim().to_string(),
                rules_kept: keep_rules,
                jumps_exact: true,
                ..KernelTable::default()
            });
            continue;
        }
        let Some(table) = tables.last_mut() else {
            continue;
        };
        if let Some(decl) = line.strip_prefix(':') {
            let Some(name) = decl.split(' ').next().and_then(ChainName::new) else {
                continue;
            };
            table.chains.push(name);
            if keep_rules && is_owned_chain(&name) {
                table.rules.entry(name).or_default();
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split(' ').next().and_then(ChainName::new);
            match chain {
                Some(chain) if is_owned_chain(&chain) && keep_rules => {
                    table.rules.entry(chain).or_default().push(line.to_string());
                }
                Some(chain) if is_owned_chain(&chain) => {}
                _ if rule.contains(" -j KUBE-") => {
                    *table.jumps.entry(line.to_string()).or_default() += 1;
                }
                _ => {}
            }
        }
    }
    tables
}

/// `iptables-save -t TABLE`, parsed. A table that does not exist yet reads as empty.
fn read_table(
    applier: &mut impl Applier,
    family: IpFamily,
    table: &str,
    keep_rules: bool,
) -> Result<KernelTable, SyncError> {
    let exit = applier.save(family, Some(table)).map_err(spawn_error)?;
    if !exit.success() {
        return Err(SyncError::Read {
            tool: applier.program(family, Tool::Save),
            family,
            message: tool_message(&exit),
        });
    }
    Ok(parse_save(&exit.stdout, keep_rules)
        .into_iter()
        .find(|t| t.table == table)
        .unwrap_or_else(|| KernelTable {
            table: table.to_string(),
            rules_kept: keep_rules,
            ..KernelTable::default()
        }))
}

/// A table whose rules are not needed (nat): only its chains and kproxy's jump rules. With
/// the nf_tables backend they are read over netlink. `iptables-nft-save -t nat` takes 85 s
/// and 300 MB for 10,000 Services and has to read every rule to print the chain names; the
/// netlink dump of the chains alone takes a fraction of a second.
fn read_chains(
    applier: &mut impl Applier,
    family: IpFamily,
    table: &str,
) -> Result<KernelTable, SyncError> {
    if let Some(kernel) = over_netlink(applier, |socket| chains_in_nf_tables(socket, family, table))
    {
        return Ok(kernel);
    }
    read_table(applier, family, table, false)
}

/// [`read_chains`] over netlink. A jump rule of §4.2 counts as present when its built-in
/// chain has a rule jumping to its target; `-C` would also compare the matches.
fn chains_in_nf_tables(
    socket: &mut NetfilterSocket,
    family: IpFamily,
    table: &str,
) -> std::io::Result<KernelTable> {
    let mut chains: Vec<ChainName> = socket
        .chain_names(family, table)?
        .iter()
        .filter_map(|name| ChainName::new(name))
        .collect();
    chains.sort();
    let mut jumps = FxHashMap::default();
    for jump in JUMPS.iter().filter(|j| j.table == table) {
        let count = socket.jumps_to_count(family, table, jump.chain, jump.target)?;
        if count > 0 {
            jumps.insert(jump.save_line(), count);
        }
    }
    Ok(KernelTable {
        table: table.to_string(),
        chains,
        rules: FxHashMap::default(),
        rules_kept: false,
        jumps,
        jumps_exact: false,
    })
}

/// The payload line number in a restore error: `Error occurred at line: N` (parse errors),
/// `line N failed` (legacy commit), `line N: CHAIN_DEL failed …` (nft commit).
fn failed_line(stderr: &str) -> Option<usize> {
    let mut rest = stderr;
    while let Some(i) = rest.find("line") {
        rest = &rest[i + 4..];
        let after = rest.trim_start_matches([':', ' ']);
        let end = after
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(after.len());
        if let Ok(n) = after[..end].parse() {
            return Some(n);
        }
    }
    None
}

/// `line N (table T, chain C): TEXT` for an error message.
fn describe_line(payload: &RestorePayload, line: usize) -> String {
    let table = payload.table_of_line(line).unwrap_or("?");
    let Some(text) = payload.line(line) else {
        return format!("line {line} (past the end of the payload)");
    };
    let chain = text
        .strip_prefix("-A ")
        .or_else(|| text.strip_prefix("-X "))
        .or_else(|| text.strip_prefix(':'))
        .and_then(|rest| rest.split(' ').next());
    match chain {
        Some(chain) => format!("line {line} (table {table}, chain {chain}): {text}"),
        // nft reports some refusals (a jump to a missing chain) at the commit; its message
        // names the object.
        None if text == "COMMIT" => format!("line {line}, the commit of table {table}"),
        None => format!("line {line} (table {table}): {text}"),
    }
}

/// The tool's own words, without usage hints and deprecation notes.
fn tool_message(exit: &Exit) -> String {
    let lines: Vec<&str> = exit
        .stderr
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Try `") && !l.starts_with("Ignoring deprecated")
        })
        .collect();
    if lines.is_empty() {
        match exit.code {
            Some(code) => format!("exit status {code}"),
            None => "killed by a signal".to_string(),
        }
    } else {
        lines.join("; ")
    }
}

fn spawn_error(err: SpawnError) -> SyncError {
    SyncError::Spawn {
        tool: err.program,
        source: err.source,
    }
}
