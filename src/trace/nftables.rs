//! The walker over nftables rules: one family's `kube-proxy` table, its base chains in
//! priority order, the chains, sets and verdict maps they reach, as the rendered script reads
//! back or the kernel lists it (`--live`).

use std::collections::HashMap;

use crate::family::IpFamily;
use crate::nftables::{
    write_rule, Direction, ElementValue, Field, Hook, Match, Rule, Ruleset, SetFlag, Statement,
    Value, Verdict,
};

use super::packet::{parse_mark, AffinityEvent, AffinityState, Branch, End, Host};
use super::{Entry, Rules, WalkLimits};

/// A set as the walker needs it: affinity sets (dynamic, with a timeout) are looked up in the
/// [`AffinityState`], the others in their elements.
#[derive(Debug, Clone, Default)]
pub struct SetContent {
    /// Element lifetime of a timeout set.
    pub timeout: Option<u32>,
    pub dynamic: bool,
    pub elements: Vec<Vec<Value>>,
}

/// One family's `kube-proxy` table as the tracer walks it.
#[derive(Debug, Clone)]
pub struct NftablesRules {
    family: IpFamily,
    /// Base chains: hook, priority, name.
    base: Vec<(Hook, i32, String)>,
    chains: HashMap<String, Vec<Entry<Rule>>>,
    sets: HashMap<String, SetContent>,
    maps: HashMap<String, Vec<(Vec<Value>, ElementValue)>>,
    /// Maps the packet path adds to (affinity): their elements are live state.
    dynamic_maps: Vec<String>,
}

impl NftablesRules {
    pub fn new(family: IpFamily) -> NftablesRules {
        NftablesRules {
            family,
            base: Vec::new(),
            chains: HashMap::new(),
            sets: HashMap::new(),
            maps: HashMap::new(),
            dynamic_maps: Vec::new(),
        }
    }

    pub fn from_ruleset(ruleset: &Ruleset) -> NftablesRules {
        let mut rules = NftablesRules::new(ruleset.family());
        for chain in &ruleset.chains {
            let entries = chain.rules.iter().cloned().map(Entry::Rule).collect();
            rules.insert_chain(
                &chain.name,
                chain.base.map(|b| (b.hook, b.priority)),
                entries,
            );
        }
        for set in &ruleset.sets {
            rules.sets.insert(
                set.name.to_string(),
                SetContent {
                    timeout: set.timeout,
                    dynamic: set.flags.contains(&SetFlag::Dynamic),
                    elements: Vec::new(),
                },
            );
        }
        for map in &ruleset.maps {
            rules.maps.insert(map.name.to_string(), Vec::new());
            if map.flags.contains(&SetFlag::Dynamic) {
                rules.dynamic_maps.push(map.name.to_string());
            }
        }
        for element in &ruleset.elements {
            rules.insert_element(
                &element.container,
                element.key.to_vec(),
                element.value.clone(),
            );
        }
        rules
    }

    /// Adds a chain; `base` is its hook and priority when it is a base chain.
    pub fn insert_chain(
        &mut self,
        name: &str,
        base: Option<(Hook, i32)>,
        entries: Vec<Entry<Rule>>,
    ) {
        if let Some((hook, priority)) = base {
            self.base.push((hook, priority, name.to_string()));
            // Stable: chains of equal priority keep their creation order.
            self.base.sort_by_key(|(_, priority, _)| *priority);
        }
        self.chains.insert(name.to_string(), entries);
    }

    /// Adds an empty map (elements come with [`NftablesRules::insert_element`]).
    pub fn insert_map(&mut self, name: &str) {
        self.maps.entry(name.to_string()).or_default();
    }

    pub fn insert_set(&mut self, name: &str, content: SetContent) {
        self.sets.insert(name.to_string(), content);
    }

    /// Adds an element to a set (no value) or map (with a verdict or data), creating the
    /// container.
    pub fn insert_element(
        &mut self,
        container: &str,
        key: Vec<Value>,
        value: Option<ElementValue>,
    ) {
        match value {
            Some(value) => self
                .maps
                .entry(container.to_string())
                .or_default()
                .push((key, value)),
            None => self
                .sets
                .entry(container.to_string())
                .or_default()
                .elements
                .push(key),
        }
    }

    /// A chain's entries, for readers' tests.
    pub fn chain(&self, name: &str) -> Option<&[Entry<Rule>]> {
        self.chains.get(name).map(Vec::as_slice)
    }

    /// Marks a map as filled from the packet path (its elements are affinity state).
    pub fn set_dynamic_map(&mut self, name: &str) {
        if !self.dynamic_maps.iter().any(|m| m == name) {
            self.dynamic_maps.push(name.to_string());
        }
    }

    /// The affinity sets: dynamic sets with a timeout.
    pub fn affinity_sets(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .sets
            .iter()
            .filter(|(_, s)| s.dynamic && s.timeout.is_some())
            .map(|(name, _)| name.clone())
            .collect();
        names.sort();
        names
    }
}

impl Rules for NftablesRules {
    fn family(&self) -> IpFamily {
        self.family
    }

    fn run_hook(
        &self,
        hook: Hook,
        branch: Branch,
        host: &Host,
        affinity: &AffinityState,
        limits: WalkLimits,
    ) -> Vec<Branch> {
        let mut walk = Walk {
            rules: self,
            host,
            affinity,
            limits,
            steps_taken: 0,
        };
        let mut branches = vec![branch];
        for (_, _, chain) in self.base.iter().filter(|(h, _, _)| *h == hook) {
            let mut next = Vec::new();
            for branch in branches {
                if branch.is_done() {
                    next.push(branch);
                } else {
                    next.extend(walk.chain(chain, branch, 0).into_iter().map(|(b, _)| b));
                }
            }
            branches = next;
        }
        branches
    }
}

/// How a walk through one chain ends.
enum Flow {
    /// Fell off the end (or the goto'd chain did): the caller goes on.
    Continue,
    /// A verdict that ends this base chain's pass (a NAT statement) or the packet (drop,
    /// reject: recorded in the branch).
    Stop,
}

/// How one rule ends for one branch.
enum RuleEnd {
    /// On to the chain's next rule.
    Next,
    /// The chain is done, with this flow.
    Leave(Flow),
}

struct Walk<'a> {
    rules: &'a NftablesRules,
    host: &'a Host,
    affinity: &'a AffinityState,
    limits: WalkLimits,
    steps_taken: usize,
}

impl Walk<'_> {
    fn chain(&mut self, name: &str, branch: Branch, depth: usize) -> Vec<(Branch, Flow)> {
        let Some(entries) = self.rules.chains.get(name) else {
            let mut branch = branch;
            branch
                .uninterpreted
                .push(format!("{name}: a jump to a chain that does not exist"));
            return vec![(branch, Flow::Continue)];
        };
        let mut done = Vec::new();
        let mut pending = vec![(branch, 0usize)];
        while let Some((mut branch, index)) = pending.pop() {
            self.steps_taken += 1;
            if depth > self.limits.depth || self.steps_taken > self.limits.steps {
                branch.uninterpreted.push(format!(
                    "{name}: the walk went deeper than {} chains or longer than {} rules \
                     (a loop?); stopped",
                    self.limits.depth, self.limits.steps
                ));
                done.push((branch, Flow::Stop));
                continue;
            }
            let Some(entry) = entries.get(index) else {
                done.push((branch, Flow::Continue));
                continue;
            };
            let rule = match entry {
                Entry::Rule(rule) => rule,
                Entry::Uninterpreted(text) => {
                    branch.uninterpreted.push(format!(
                        "{name}: {text} (not understood; taken as not matching)"
                    ));
                    pending.push((branch, index + 1));
                    continue;
                }
            };
            for (branch, end) in self.rule(name, rule, branch, depth) {
                match end {
                    RuleEnd::Next => pending.push((branch, index + 1)),
                    RuleEnd::Leave(flow) => done.push((branch, flow)),
                }
            }
        }
        done
    }

    fn rule(
        &mut self,
        chain: &str,
        rule: &Rule,
        mut branch: Branch,
        depth: usize,
    ) -> Vec<(Branch, RuleEnd)> {
        let mut text = String::new();
        let _ = write_rule(&mut text, self.rules.family, rule);
        for m in &rule.matches {
            if !self.test(m, &mut branch, chain, &text) {
                return vec![(branch, RuleEnd::Next)];
            }
        }
        branch.step(chain, text.clone(), None);
        self.statements(chain, &rule.statements, branch, depth, &text)
    }

    /// Runs statements in order from the first; a fork runs the rest once per branch.
    fn statements(
        &mut self,
        chain: &str,
        statements: &[Statement],
        mut branch: Branch,
        depth: usize,
        text: &str,
    ) -> Vec<(Branch, RuleEnd)> {
        let Some((statement, rest)) = statements.split_first() else {
            return vec![(branch, RuleEnd::Next)];
        };
        match statement {
            Statement::Verdict(verdict) => self.verdict(verdict, branch, depth),
            Statement::VerdictMap { key, map } => {
                let found = self.rules.maps.get(&**map).and_then(|elements| {
                    elements
                        .iter()
                        .find(|(k, _)| key_matches(key, k, &branch, None))
                        .and_then(|(_, v)| v.verdict().cloned())
                });
                match found {
                    Some(verdict) => {
                        note_last(&mut branch, format!("@{map} → {}", verdict_text(&verdict)));
                        self.verdict(&verdict, branch, depth)
                    }
                    None => {
                        note_last(&mut branch, format!("no element of @{map} for this packet"));
                        vec![(branch, RuleEnd::Next)]
                    }
                }
            }
            Statement::RandomVerdict(verdicts) => {
                let share = 1.0 / verdicts.len().max(1) as f64;
                let mut out = Vec::new();
                for (i, verdict) in verdicts.iter().enumerate() {
                    let mut fork = branch.split(share);
                    note_last(&mut fork, format!("numgen {i} → {}", verdict_text(verdict)));
                    out.extend(self.verdict(verdict, fork, depth));
                }
                out
            }
            Statement::MarkOr(mark) | Statement::MarkXor(mark) => {
                let Some(bits) = parse_mark(mark) else {
                    branch
                        .uninterpreted
                        .push(format!("{chain}: {text} (mark {mark:?} not understood)"));
                    return vec![(branch, RuleEnd::Next)];
                };
                if matches!(statement, Statement::MarkOr(_)) {
                    branch.mark |= bits;
                } else {
                    branch.mark ^= bits;
                }
                self.statements(chain, rest, branch, depth, text)
            }
            Statement::MasqueradeFullyRandom => {
                branch.masquerade = true;
                vec![(branch, RuleEnd::Leave(Flow::Stop))]
            }
            Statement::UpdateSet { set, .. } => {
                branch.affinity.push(AffinityEvent::Recorded {
                    store: set.to_string(),
                });
                self.statements(chain, rest, branch, depth, text)
            }
            Statement::Dnat(to) => {
                dnat(&mut branch, *to);
                vec![(branch, RuleEnd::Leave(Flow::Stop))]
            }
            Statement::DnatMap { key, map } => {
                // A random number in the key splits the branch, one way per value.
                let ways = key.iter().find_map(|f| match f {
                    Field::RandomNumber(n) => Some(*n),
                    _ => None,
                });
                let slots: Vec<Option<u32>> = match ways {
                    Some(n) => (0..n).map(Some).collect(),
                    None => vec![None],
                };
                let share = 1.0 / slots.len() as f64;
                let mut out = Vec::new();
                for slot in slots {
                    let mut fork = if ways.is_some() {
                        branch.split(share)
                    } else {
                        branch.clone()
                    };
                    let wanted = key_values(key, &fork, slot);
                    let found = self.map_data(map, &wanted);
                    // Every pick looks the client up in the affinity map first, with affinity
                    // or not: a miss says nothing (the update that records an entry says
                    // whether the frontend has affinity), a hit names the pinned endpoint.
                    if found.is_some() && self.rules.dynamic_maps.iter().any(|m| **m == **map) {
                        fork.affinity.push(AffinityEvent::Checked {
                            store: map.to_string(),
                            // The entry's own timeout comes with the update that records it.
                            timeout_seconds: 0,
                            hit: true,
                        });
                    }
                    let label = match slot {
                        Some(i) => format!("numgen {i}: "),
                        None => String::new(),
                    };
                    match found {
                        Some(to) => {
                            note_last(&mut fork, format!("{label}@{map} → dnat to {to}"));
                            dnat(&mut fork, to);
                            out.push((fork, RuleEnd::Leave(Flow::Stop)));
                        }
                        None => {
                            note_last(
                                &mut fork,
                                format!("{label}no element of @{map} for this packet"),
                            );
                            out.push((fork, RuleEnd::Next));
                        }
                    }
                }
                out
            }
            Statement::UpdateMap {
                map,
                key,
                timeout,
                value,
            } => {
                branch.affinity.push(AffinityEvent::RecordedMapping {
                    store: map.to_string(),
                    key: key_values(key, &branch, None),
                    value: key_values(value, &branch, None),
                    timeout_seconds: *timeout,
                });
                self.statements(chain, rest, branch, depth, text)
            }
            Statement::RandomDnat(targets) => {
                let share = 1.0 / targets.len().max(1) as f64;
                targets
                    .iter()
                    .enumerate()
                    .map(|(i, to)| {
                        let mut fork = branch.split(share);
                        note_last(&mut fork, format!("numgen {i} → dnat to {to}"));
                        dnat(&mut fork, *to);
                        (fork, RuleEnd::Leave(Flow::Stop))
                    })
                    .collect()
            }
        }
    }

    fn verdict(
        &mut self,
        verdict: &Verdict,
        mut branch: Branch,
        depth: usize,
    ) -> Vec<(Branch, RuleEnd)> {
        match verdict {
            Verdict::Drop | Verdict::Reject => {
                branch.end = Some(if *verdict == Verdict::Drop {
                    End::Drop
                } else {
                    End::Reject
                });
                vec![(branch, RuleEnd::Leave(Flow::Stop))]
            }
            Verdict::Jump(target) => self
                .chain(target, branch, depth + 1)
                .into_iter()
                .map(|(b, flow)| match flow {
                    Flow::Continue => (b, RuleEnd::Next),
                    Flow::Stop => (b, RuleEnd::Leave(Flow::Stop)),
                })
                .collect(),
            // The goto'd chain returns to this chain's caller.
            Verdict::Goto(target) => self
                .chain(target, branch, depth + 1)
                .into_iter()
                .map(|(b, flow)| (b, RuleEnd::Leave(flow)))
                .collect(),
        }
    }

    fn test(&self, m: &Match, branch: &mut Branch, chain: &str, text: &str) -> bool {
        match m {
            // The first packet of a new connection; DNATed once a nat rule rewrote it.
            Match::CtStateNew => true,
            Match::CtStatusDnat => branch.dnat.is_some(),
            Match::MarkBitSet(mark) => match parse_mark(mark) {
                Some(bits) => branch.mark & bits != 0,
                None => {
                    branch
                        .uninterpreted
                        .push(format!("{chain}: {text} (mark {mark:?} not understood)"));
                    false
                }
            },
            Match::FibLocal(Direction::Source) => self.host.is_local(branch.src),
            Match::FibLocal(Direction::Destination) => self.host.is_local(branch.dst),
            Match::Compare {
                field,
                negated,
                value,
            } => value_matches(value, &field_value(*field, branch, None)) != *negated,
            Match::InSet { key, set, negated } => {
                let found = self.in_set(key, set, branch, chain, text);
                found != *negated
            }
        }
    }

    /// The data a map (its elements, or for a dynamic map the affinity state) gives a key:
    /// an address and a port.
    fn map_data(&self, map: &str, key: &[Value]) -> Option<std::net::SocketAddr> {
        let data = self
            .rules
            .maps
            .get(map)
            .and_then(|elements| {
                elements.iter().find_map(|(k, v)| match v {
                    ElementValue::Data(data) if literal_key_matches(k, key) => Some(data.to_vec()),
                    _ => None,
                })
            })
            .or_else(|| self.affinity.mapping(map, key).map(<[Value]>::to_vec))?;
        match data.as_slice() {
            [Value::Addr(ip), Value::Port(port)] => Some(std::net::SocketAddr::new(*ip, *port)),
            _ => None,
        }
    }

    fn in_set(
        &self,
        key: &[Field],
        set: &str,
        branch: &mut Branch,
        chain: &str,
        text: &str,
    ) -> bool {
        match self.rules.sets.get(set) {
            Some(content) if content.dynamic && content.timeout.is_some() => {
                let client = match key {
                    [Field::SourceAddr] => branch.src,
                    _ => {
                        branch.uninterpreted.push(format!(
                            "{chain}: {text} (an affinity set keyed by other than the source \
                             address)"
                        ));
                        return false;
                    }
                };
                let hit = self.affinity.contains(set, client);
                branch.affinity.push(AffinityEvent::Checked {
                    store: set.to_string(),
                    timeout_seconds: content.timeout.unwrap_or(0),
                    hit,
                });
                if !hit {
                    branch.step(
                        chain,
                        text.to_string(),
                        Some(format!("no entry for {client} in @{set}: no match")),
                    );
                }
                hit
            }
            Some(content) => content
                .elements
                .iter()
                .any(|element| key_matches(key, element, branch, None)),
            None => {
                branch
                    .uninterpreted
                    .push(format!("{chain}: {text} (set @{set} does not exist)"));
                false
            }
        }
    }
}

fn dnat(branch: &mut Branch, to: std::net::SocketAddr) {
    branch.dst = to.ip();
    branch.dport = to.port();
    branch.dnat = Some(to);
}

/// Adds to the note of the branch's last step.
fn note_last(branch: &mut Branch, note: String) {
    if let Some(step) = branch.steps.last_mut() {
        step.note = Some(match step.note.take() {
            Some(old) => format!("{old}; {note}"),
            None => note,
        });
    }
}

fn verdict_text(verdict: &Verdict) -> String {
    match verdict {
        Verdict::Jump(chain) => format!("jump {chain}"),
        Verdict::Goto(chain) => format!("goto {chain}"),
        Verdict::Drop => "drop".into(),
        Verdict::Reject => "reject".into(),
    }
}

/// The packet's value of a field; `slot` stands for a random number's outcome.
fn field_value(field: Field, branch: &Branch, slot: Option<u32>) -> Value {
    match field {
        Field::SourceAddr => Value::Addr(branch.src),
        Field::DestinationAddr => Value::Addr(branch.dst),
        Field::L4Proto => Value::Protocol(branch.protocol),
        Field::DestinationPort => Value::Port(branch.dport),
        Field::OriginalDestinationAddr => Value::Addr(branch.original_dst.ip()),
        Field::OriginalDestinationPort => Value::Port(branch.original_dst.port()),
        Field::RandomNumber(_) => Value::Integer(slot.unwrap_or(0)),
    }
}

fn key_values(fields: &[Field], branch: &Branch, slot: Option<u32>) -> Vec<Value> {
    fields
        .iter()
        .map(|f| field_value(*f, branch, slot))
        .collect()
}

/// Whether an element's key (literals, networks) holds the packet's key values.
fn literal_key_matches(element: &[Value], values: &[Value]) -> bool {
    element.len() == values.len()
        && element
            .iter()
            .zip(values)
            .all(|(literal, value)| value_matches(literal, value))
}

/// Whether a literal (or an interval, or an anonymous set of them) holds the packet's value.
fn value_matches(literal: &Value, value: &Value) -> bool {
    match (literal, value) {
        (Value::Net(net), Value::Addr(ip)) => net.contains(ip),
        (Value::Set { members, .. }, value) => members.iter().any(|m| value_matches(m, value)),
        (literal, value) => literal == value,
    }
}

fn key_matches(fields: &[Field], key: &[Value], branch: &Branch, slot: Option<u32>) -> bool {
    literal_key_matches(key, &key_values(fields, branch, slot))
}
