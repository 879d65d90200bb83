//! `kproxy trace`: where a packet goes through kproxy's rules, rendered or live.
//!
//! The walker reads the *rules* — parsed back from the text kproxy renders, or from what the
//! kernel tools list — never the model, so it checks what the kernel will actually be given.
//! A packet's path is followed hook by hook ([`follow`]); each mode's rules implement
//! [`Rules`], which passes a packet through the chains one hook runs. Random choices
//! (`statistic`, `numgen`) split the path into [`Branch`]es, each with its odds; session
//! affinity lookups consult an [`AffinityState`] (empty for rendered rules: a new client).
//! A rule the walker cannot interpret is reported on the branch and taken as not matching.
//!
//! What is modelled: the first packet of a new connection. Rendered rules are kproxy's chains
//! plus the built-in chains' jumps to them; with `--live`, every chain of the `nat` and
//! `filter` tables (iptables) or the `kube-proxy` table (nftables) — other tables (raw, mangle,
//! other nft tables) are not read. A packet from the node to one of its own addresses is
//! followed through OUTPUT, POSTROUTING and INPUT; its second pass through PREROUTING on the
//! loopback interface is not (nat does not see it again).

pub mod exceptions;
mod iptables;
pub mod live;
mod nftables;
mod outcome;
mod packet;
mod rendered;

pub use exceptions::{MapsDifference, ModeDifference};
pub use iptables::IptablesRules;
pub use nftables::{NftablesRules, SetContent};
pub use outcome::{AffinitySummary, EndpointShare, NextConnection, Trace, Verdict};
pub use packet::{AffinityEvent, AffinityState, Branch, End, Host, Origin, Probe, Step};
pub use rendered::{rendered_rules, ReadBackError};

use crate::family::IpFamily;
use crate::nftables::Hook;

/// A rule as read, or the text of one the reader did not understand.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry<R> {
    Rule(R),
    Uninterpreted(String),
}

/// Bounds on one hook's walk, so that rules read from a node (which may jump in circles)
/// cannot make the tracer loop.
#[derive(Debug, Clone, Copy)]
pub struct WalkLimits {
    /// Nested jumps.
    pub depth: usize,
    /// Rules tested in one hook, over all branches.
    pub steps: usize,
}

impl Default for WalkLimits {
    fn default() -> Self {
        WalkLimits {
            depth: 64,
            steps: 1_000_000,
        }
    }
}

/// One mode's rules of one family, as the tracer walks them.
pub trait Rules {
    fn family(&self) -> IpFamily;

    /// Passes the packet through every chain attached to `hook`, in the kernel's order,
    /// returning the branches it splits into.
    fn run_hook(
        &self,
        hook: Hook,
        branch: Branch,
        host: &Host,
        affinity: &AffinityState,
        limits: WalkLimits,
    ) -> Vec<Branch>;
}

/// Follows the probe's first packet through the hooks it passes and returns every branch.
pub fn follow(
    rules: &dyn Rules,
    probe: &Probe,
    host: &Host,
    affinity: &AffinityState,
) -> Vec<Branch> {
    let limits = WalkLimits::default();
    let run = |hook: Hook, branches: Vec<Branch>| -> Vec<Branch> {
        branches
            .into_iter()
            .flat_map(|branch| {
                if branch.is_done() {
                    vec![branch]
                } else {
                    rules.run_hook(hook, branch, host, affinity, limits)
                }
            })
            .collect()
    };
    let start = vec![Branch::start(probe)];
    match probe.origin {
        Origin::Outside => {
            let routed = run(Hook::Prerouting, start);
            // Routing: to one of the node's own addresses, or forwarded.
            let (local, forwarded): (Vec<Branch>, Vec<Branch>) =
                routed.into_iter().partition(|b| host.is_local(b.dst));
            let mut branches = run(Hook::Input, local);
            branches.extend(run(Hook::Postrouting, run(Hook::Forward, forwarded)));
            branches
        }
        Origin::Node => {
            let sent = run(Hook::Postrouting, run(Hook::Output, start));
            let (local, away): (Vec<Branch>, Vec<Branch>) =
                sent.into_iter().partition(|b| host.is_local(b.dst));
            let mut branches = run(Hook::Input, local);
            branches.extend(away);
            branches
        }
    }
}

/// Traces the probe and sums the branches up, checking what affinity does to the next
/// connection from the same client.
pub fn trace(rules: &dyn Rules, probe: &Probe, host: &Host, affinity: &AffinityState) -> Trace {
    let branches = follow(rules, probe, host, affinity);
    let mut next_connection = Vec::new();
    for branch in &branches {
        let Some(endpoint) = branch.dnat else {
            continue;
        };
        let mut after = affinity.clone();
        let mut recorded = false;
        for event in &branch.affinity {
            match event {
                AffinityEvent::Recorded { store } => after.insert(store, probe.src),
                AffinityEvent::RecordedMapping {
                    store, key, value, ..
                } => after.insert_mapping(store, key.clone(), value.clone()),
                AffinityEvent::Checked { .. } => continue,
            }
            recorded = true;
        }
        if !recorded {
            continue;
        }
        let again = Trace::summarise(follow(rules, probe, host, &after), Vec::new());
        next_connection.push(NextConnection {
            first: endpoint,
            next: again.endpoints,
        });
    }
    next_connection.sort_by_key(|n| n.first);
    next_connection.dedup_by_key(|n| n.first);
    Trace::summarise(branches, next_connection)
}

#[cfg(test)]
mod tests;
