//! The walker over iptables rules: the `nat` and `filter` tables of one family, kproxy's
//! chains plus the built-in chains that jump to them, as `iptables-restore` input reads (the
//! rendered rules) or `iptables-save` prints them (`--live`).

use std::collections::HashMap;
use std::net::IpAddr;

use crate::family::IpFamily;
use crate::iptables::{
    write_rule, Addr, AddrType, Match, RecentCheck, Rule, Ruleset, TableName, Target,
};
use crate::nftables::Hook;

use super::packet::{parse_mark, AffinityEvent, AffinityState, Branch, End, Host};
use super::{Entry, Rules, WalkLimits};

/// The built-in chains and the tables that hook them, in the order the kernel runs them
/// (nat at priority -100 before filter at 0; nat POSTROUTING at 100).
const HOOKS: [(Hook, &[(TableName, &str)]); 5] = [
    (Hook::Prerouting, &[(TableName::Nat, "PREROUTING")]),
    (Hook::Input, &[(TableName::Filter, "INPUT")]),
    (Hook::Forward, &[(TableName::Filter, "FORWARD")]),
    (
        Hook::Output,
        &[(TableName::Nat, "OUTPUT"), (TableName::Filter, "OUTPUT")],
    ),
    (Hook::Postrouting, &[(TableName::Nat, "POSTROUTING")]),
];

/// One family's `nat` and `filter` rules as the tracer walks them.
#[derive(Debug, Clone, Default)]
pub struct IptablesRules {
    family: Option<IpFamily>,
    chains: HashMap<(TableName, String), Vec<Entry<Rule>>>,
    /// Built-in chains whose policy is DROP (read from the kernel; rendered rules assume ACCEPT).
    dropping: Vec<(TableName, String)>,
}

impl IptablesRules {
    pub fn new(family: IpFamily) -> IptablesRules {
        IptablesRules {
            family: Some(family),
            ..IptablesRules::default()
        }
    }

    /// kproxy's chains of a rendered ruleset, and the built-in chains with the jump rules a sync
    /// inserts (each at the top, so the last inserted runs first, as on a node).
    pub fn from_ruleset(ruleset: &Ruleset) -> IptablesRules {
        let mut rules = IptablesRules::new(ruleset.family);
        for table in ruleset.tables() {
            for chain in &table.chains {
                rules.chains.insert(
                    (table.name, chain.name.to_string()),
                    chain.rules.iter().cloned().map(Entry::Rule).collect(),
                );
            }
        }
        for (table, line) in crate::sync::iptables::jump_rule_lines() {
            let table = if table == "nat" {
                TableName::Nat
            } else {
                TableName::Filter
            };
            let entry = match Rule::from_restore_line(&line) {
                Ok((chain, rule)) => {
                    if let Some(Target::Jump(target)) = &rule.target {
                        if !rules.chains.contains_key(&(table, target.to_string())) {
                            continue; // a sync inserts no jump to a chain it does not write
                        }
                    }
                    (chain.to_string(), Entry::Rule(rule))
                }
                Err(err) => (
                    line.split(' ').nth(1).unwrap_or("?").to_string(),
                    Entry::Uninterpreted(format!("{line} ({err})")),
                ),
            };
            rules
                .chains
                .entry((table, entry.0))
                .or_default()
                .insert(0, entry.1);
        }
        rules
    }

    /// Adds a chain (replacing one of the same name), for readers of live rules.
    pub fn insert_chain(&mut self, table: TableName, name: &str, entries: Vec<Entry<Rule>>) {
        self.chains.insert((table, name.to_string()), entries);
    }

    /// Marks a built-in chain's policy as DROP.
    pub fn set_dropping_policy(&mut self, table: TableName, name: &str) {
        self.dropping.push((table, name.to_string()));
    }

    pub fn chain(&self, table: TableName, name: &str) -> Option<&[Entry<Rule>]> {
        self.chains
            .get(&(table, name.to_string()))
            .map(Vec::as_slice)
    }

    /// The names of every `recent` list the rules check or set.
    pub fn recent_lists(&self) -> Vec<String> {
        let mut lists: Vec<String> = self
            .chains
            .values()
            .flatten()
            .filter_map(|entry| match entry {
                Entry::Rule(rule) => rule.matches.iter().find_map(|m| match m {
                    Match::Recent { list, .. } => Some(list.to_string()),
                    _ => None,
                }),
                Entry::Uninterpreted(_) => None,
            })
            .collect();
        lists.sort();
        lists.dedup();
        lists
    }
}

/// How a walk through one chain ends.
enum Flow {
    /// Fell off the end or met RETURN: the caller goes on with its next rule.
    Continue,
    /// A verdict that ends this table's pass over the hook (ACCEPT, DNAT, MASQUERADE) or the
    /// packet (DROP, REJECT: recorded in the branch).
    Stop,
}

struct Walk<'a> {
    rules: &'a IptablesRules,
    host: &'a Host,
    affinity: &'a AffinityState,
    limits: WalkLimits,
    steps_taken: usize,
}

impl Rules for IptablesRules {
    fn family(&self) -> IpFamily {
        self.family.unwrap_or(IpFamily::V4)
    }

    fn run_hook(
        &self,
        hook: Hook,
        branch: Branch,
        host: &Host,
        affinity: &AffinityState,
        limits: WalkLimits,
    ) -> Vec<Branch> {
        let tables = HOOKS
            .iter()
            .find(|(h, _)| *h == hook)
            .map(|(_, tables)| *tables)
            .unwrap_or(&[]);
        let mut walk = Walk {
            rules: self,
            host,
            affinity,
            limits,
            steps_taken: 0,
        };
        let mut branches = vec![branch];
        for &(table, chain) in tables {
            let mut next = Vec::new();
            for branch in branches {
                if branch.is_done() || self.chain(table, chain).is_none() {
                    next.push(branch);
                    continue;
                }
                for (mut branch, flow) in walk.chain(table, chain, branch, 0) {
                    if matches!(flow, Flow::Continue)
                        && self.dropping.contains(&(table, chain.to_string()))
                    {
                        branch.step(
                            format!("{} {chain}", table.as_str()),
                            "policy DROP".into(),
                            None,
                        );
                        branch.end = Some(End::Drop);
                    }
                    next.push(branch);
                }
            }
            branches = next;
        }
        branches
    }
}

/// Whether a rule's matches hold, and at what odds.
enum Test {
    No,
    Yes,
    /// A `statistic` match: holds with this probability.
    Maybe(f64),
}

impl Walk<'_> {
    fn chain(
        &mut self,
        table: TableName,
        name: &str,
        branch: Branch,
        depth: usize,
    ) -> Vec<(Branch, Flow)> {
        let label = format!("{} {name}", table.as_str());
        let Some(entries) = self.rules.chain(table, name) else {
            let mut branch = branch;
            branch
                .uninterpreted
                .push(format!("{label}: a jump to a chain that does not exist"));
            return vec![(branch, Flow::Continue)];
        };
        let mut done = Vec::new();
        // (branch, index of the next rule to test)
        let mut pending = vec![(branch, 0usize)];
        while let Some((mut branch, mut index)) = pending.pop() {
            loop {
                self.steps_taken += 1;
                if depth > self.limits.depth || self.steps_taken > self.limits.steps {
                    branch.uninterpreted.push(format!(
                        "{label}: the walk went deeper than {} chains or longer than {} \
                         rules (a loop?); stopped",
                        self.limits.depth, self.limits.steps
                    ));
                    done.push((branch, Flow::Stop));
                    break;
                }
                let Some(entry) = entries.get(index) else {
                    done.push((branch, Flow::Continue));
                    break;
                };
                index += 1;
                let rule = match entry {
                    Entry::Rule(rule) => rule,
                    Entry::Uninterpreted(text) => {
                        branch.uninterpreted.push(format!(
                            "{label}: {text} (not understood; taken as not matching)"
                        ));
                        continue;
                    }
                };
                let text = rule_text(name, rule);
                match self.test(rule, &mut branch, &label, &text) {
                    Test::No => continue,
                    Test::Maybe(p) => {
                        let p = p.clamp(0.0, 1.0);
                        if p < 1.0 {
                            pending.push((branch.split(1.0 - p), index));
                        }
                        if p <= 0.0 {
                            break;
                        }
                        branch = branch.split(p);
                    }
                    Test::Yes => {}
                }
                self.record_sets(rule, &mut branch);
                let Some(target) = &rule.target else {
                    branch.step(&label, text, Some("counts only".into()));
                    continue;
                };
                match target {
                    Target::Jump(chain) => {
                        branch.step(&label, text, None);
                        for (sub, flow) in self.chain(table, chain, branch, depth + 1) {
                            match flow {
                                Flow::Continue => pending.push((sub, index)),
                                Flow::Stop => done.push((sub, Flow::Stop)),
                            }
                        }
                        break;
                    }
                    Target::Return => {
                        branch.step(&label, text, None);
                        done.push((branch, Flow::Continue));
                        break;
                    }
                    Target::Accept => {
                        branch.step(&label, text, None);
                        branch.accepted = true;
                        done.push((branch, Flow::Stop));
                        break;
                    }
                    Target::Drop | Target::Reject => {
                        branch.step(&label, text, None);
                        branch.end = Some(if *target == Target::Drop {
                            End::Drop
                        } else {
                            End::Reject
                        });
                        done.push((branch, Flow::Stop));
                        break;
                    }
                    Target::Dnat(to) => {
                        branch.step(&label, text, None);
                        branch.dst = to.ip();
                        branch.dport = to.port();
                        branch.dnat = Some(*to);
                        done.push((branch, Flow::Stop));
                        break;
                    }
                    Target::Masquerade { .. } => {
                        branch.step(&label, text, None);
                        branch.masquerade = true;
                        done.push((branch, Flow::Stop));
                        break;
                    }
                    Target::MarkOr(mark) | Target::MarkXor(mark) => {
                        let Some(bits) = parse_mark(mark) else {
                            branch
                                .uninterpreted
                                .push(format!("{label}: {text} (mark {mark:?} not understood)"));
                            continue;
                        };
                        branch.step(&label, text, None);
                        if matches!(target, Target::MarkOr(_)) {
                            branch.mark |= bits;
                        } else {
                            branch.mark ^= bits;
                        }
                    }
                }
            }
        }
        done
    }

    /// Tests the matches in order; an affinity lookup is recorded on the branch whether it
    /// holds or not (a miss is the interesting part for a new client).
    fn test(&self, rule: &Rule, branch: &mut Branch, label: &str, text: &str) -> Test {
        let mut odds = None;
        for m in &rule.matches {
            let holds = match m {
                Match::Comment(_) | Match::Nfacct(_) => true,
                Match::Protocol(protocol) => branch.protocol == *protocol,
                Match::Source { addr, negated } => contains(addr, branch.src) != *negated,
                Match::Destination { addr, negated } => contains(addr, branch.dst) != *negated,
                Match::DestinationPort(port) => branch.dport == *port,
                Match::AddrType(AddrType::SourceLocal) => self.host.is_local(branch.src),
                Match::AddrType(AddrType::DestinationLocal) => self.host.is_local(branch.dst),
                Match::Recent {
                    list,
                    check: RecentCheck::Set,
                } => {
                    let _ = list; // recorded by `record_sets` once the whole rule matched
                    true
                }
                Match::Recent {
                    list,
                    check: RecentCheck::SeenWithin(seconds),
                } => {
                    let hit = self.affinity.contains(list, branch.src);
                    branch.affinity.push(AffinityEvent::Checked {
                        store: list.to_string(),
                        timeout_seconds: *seconds,
                        hit,
                    });
                    if !hit {
                        branch.step(
                            label,
                            text.to_string(),
                            Some(format!(
                                "no entry for {} in recent list {list}: no match",
                                branch.src
                            )),
                        );
                    }
                    hit
                }
                Match::RandomProbability(p) => {
                    odds = Some(odds.unwrap_or(1.0) * p);
                    true
                }
                Match::Mark { mark, negated } => match parse_mark(mark) {
                    Some(bits) => (branch.mark & bits == bits) != *negated,
                    None => {
                        branch
                            .uninterpreted
                            .push(format!("{label}: {text} (mark {mark:?} not understood)"));
                        false
                    }
                },
                // The first packet of a new connection: NEW; DNAT once a nat rule rewrote it.
                Match::ConntrackState { states, negated } => {
                    let state = states.split(',').any(|s| match s {
                        "NEW" => true,
                        "DNAT" => branch.dnat.is_some(),
                        _ => false,
                    });
                    state != *negated
                }
            };
            if !holds {
                return Test::No;
            }
        }
        match odds {
            Some(p) => Test::Maybe(p),
            None => Test::Yes,
        }
    }

    fn record_sets(&self, rule: &Rule, branch: &mut Branch) {
        for m in &rule.matches {
            if let Match::Recent {
                list,
                check: RecentCheck::Set,
            } = m
            {
                branch.affinity.push(AffinityEvent::Recorded {
                    store: list.to_string(),
                });
            }
        }
    }
}

fn contains(addr: &Addr, ip: IpAddr) -> bool {
    match addr {
        Addr::Host(host) => *host == ip,
        Addr::Net(net) => net.contains(&ip),
    }
}

fn rule_text(chain: &str, rule: &Rule) -> String {
    let mut text = format!("-A {chain}");
    write_rule(&mut text, rule);
    text
}
