//! A kernel in memory: an [`Applier`] that keeps `kube-proxy` tables as typed objects, applies
//! `add`/`flush`/`delete` commands all-or-nothing, refuses what the kernel refuses (missing
//! objects, deleting a chain or set that is still referenced, changing a declaration, adding an
//! element whose key holds another value) and records every transaction as nft text. For unit
//! tests and the stepwise conformance replay; [`FakeKernel::dump`] lists a table the way
//! kube-proxy's tests do.

use std::collections::BTreeMap;

use super::applier::Applier;
use super::kernel::{ChainKind, ContainerDecl, KernelChain, KernelContainer, KernelTable};
use crate::family::IpFamily;
use crate::nftables::TABLE_NAME;
use crate::nftables::{
    write_command, Chain, Command, Element, ElementValue, Map, Match, Name, Object, ObjectId, Rule,
    Set, Statement, Table, Value, Verdict,
};
use crate::sync::SyncError;

/// One transaction as handed to the fake, one nft command per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub family: IpFamily,
    pub commands: Vec<String>,
    /// Whether it was applied (else it was refused and changed nothing).
    pub applied: bool,
}

#[derive(Debug, Clone, Default)]
struct FakeTable {
    table: Option<Table>,
    /// Chains in creation order, each with its rules.
    chains: Vec<Chain>,
    sets: BTreeMap<Name, Set>,
    maps: BTreeMap<Name, Map>,
    elements: BTreeMap<(Name, Vec<Value>), Element>,
}

/// The kernel's refusal: errno text as nft prints it.
struct Refusal(&'static str);

const ENOENT: Refusal = Refusal("No such file or directory");
const EEXIST: Refusal = Refusal("File exists");
const EBUSY: Refusal = Refusal("Device or resource busy");
const EINVAL: Refusal = Refusal("Invalid argument");

#[derive(Debug, Default)]
pub struct FakeKernel {
    tables: BTreeMap<IpFamily, FakeTable>,
    /// Every transaction, in order.
    pub transactions: Vec<Recorded>,
    refuse_next: usize,
    /// Number of `read` calls (full reads of a table).
    pub reads: usize,
    /// Number of `rule_count` calls (drift checks).
    pub rule_counts: usize,
}

impl FakeKernel {
    pub fn new() -> FakeKernel {
        FakeKernel::default()
    }

    /// Makes the next `count` transactions fail as if the kernel had refused their last command.
    pub fn refuse_next(&mut self, count: usize) {
        self.refuse_next = count;
    }

    /// The commands of the last transaction that was applied.
    pub fn last_applied(&self) -> Option<&Recorded> {
        self.transactions.iter().rev().find(|t| t.applied)
    }

    /// Adds an element to a set as the packet path does (`update @set`), e.g. a client address
    /// in an affinity set. Returns false when the set does not exist.
    pub fn insert_live_element(&mut self, family: IpFamily, set: &str, key: Vec<Value>) -> bool {
        let Some(table) = self.tables.get_mut(&family) else {
            return false;
        };
        let Some((name, _)) = table.sets.get_key_value(set) else {
            return false;
        };
        let container = name.clone();
        table.elements.insert(
            (container.clone(), key.clone()),
            Element {
                container,
                key: key.into(),
                value: None,
                comment: None,
            },
        );
        true
    }

    /// The elements a set or map holds.
    pub fn elements(&self, family: IpFamily, container: &str) -> Vec<Element> {
        self.tables
            .get(&family)
            .map(|t| {
                t.elements
                    .values()
                    .filter(|e| &*e.container == container)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Someone else's `nft flush table`: every rule goes, chains, sets and elements stay.
    pub fn flush_table(&mut self, family: IpFamily) {
        if let Some(table) = self.tables.get_mut(&family) {
            for chain in &mut table.chains {
                chain.rules = Default::default();
            }
        }
    }

    /// Someone else's `nft delete table`.
    pub fn delete_table(&mut self, family: IpFamily) {
        self.tables.remove(&family);
    }

    /// The table as `add` lines (table, chains, rules, sets, maps, elements), the form of
    /// kube-proxy's test dumps; empty when there is no table.
    pub fn dump(&self, family: IpFamily) -> String {
        let Some(table) = self.tables.get(&family) else {
            return String::new();
        };
        let Some(t) = &table.table else {
            return String::new();
        };
        let mut out = String::new();
        let mut line = |command: Command| {
            // The fake holds only objects that have a text form.
            let _ = write_command(&mut out, family, TABLE_NAME, &command);
            out.push('\n');
        };
        line(Command::Add(Object::Table(t)));
        for chain in &table.chains {
            line(Command::Add(Object::Chain(chain)));
        }
        for chain in &table.chains {
            for rule in chain.rules.iter() {
                line(Command::Add(Object::Rule {
                    chain: &chain.name,
                    rule,
                }));
            }
        }
        for set in table.sets.values() {
            line(Command::Add(Object::Set(set)));
        }
        for map in table.maps.values() {
            line(Command::Add(Object::Map(map)));
        }
        for element in table.elements.values() {
            line(Command::Add(Object::Element(element)));
        }
        out
    }
}

impl FakeTable {
    fn chain_index(&self, name: &str) -> Option<usize> {
        self.chains.iter().position(|c| &*c.name == name)
    }

    fn is_map(&self, name: &str) -> Option<bool> {
        if self.sets.contains_key(name) {
            Some(false)
        } else if self.maps.contains_key(name) {
            Some(true)
        } else {
            None
        }
    }

    /// Whether any rule (outside `except`) or element jumps to `chain`.
    fn chain_referenced(&self, chain: &str, except: usize) -> bool {
        let by_rules = self.chains.iter().enumerate().any(|(i, c)| {
            i != except
                && c.rules
                    .iter()
                    .any(|r| rule_chains(r).iter().any(|t| &**t == chain))
        });
        let by_elements = self.elements.values().any(
            |e| matches!(e.value.as_ref().and_then(ElementValue::verdict), Some(Verdict::Jump(t) | Verdict::Goto(t)) if &**t == chain),
        );
        by_rules || by_elements
    }

    fn container_referenced(&self, name: &str) -> bool {
        self.chains.iter().any(|c| {
            c.rules
                .iter()
                .any(|r| rule_containers(r).iter().any(|s| &**s == name))
        })
    }

    fn apply(&mut self, family: IpFamily, command: &Command) -> Result<(), Refusal> {
        if let Command::Add(Object::Table(table)) = command {
            if table.family != family {
                return Err(EINVAL);
            }
            if self.table.is_none() {
                self.table = Some((*table).clone());
            }
            return Ok(());
        }
        if self.table.is_none() {
            return Err(ENOENT);
        }
        match command {
            Command::Add(object) => self.add(object),
            Command::Flush(id) => match id {
                ObjectId::Table => {
                    for chain in &mut self.chains {
                        chain.rules = Default::default();
                    }
                    Ok(())
                }
                ObjectId::Chain(name) => {
                    let i = self.chain_index(name).ok_or(ENOENT)?;
                    self.chains[i].rules = Default::default();
                    Ok(())
                }
                ObjectId::Set(name) | ObjectId::Map(name) => {
                    if self.is_map(name) != Some(matches!(id, ObjectId::Map(_))) {
                        return Err(ENOENT);
                    }
                    self.elements.retain(|(c, _), _| c != name);
                    Ok(())
                }
                ObjectId::Element { .. } => Err(EINVAL),
            },
            Command::Delete(id) => match id {
                ObjectId::Table => {
                    *self = FakeTable::default();
                    Ok(())
                }
                ObjectId::Chain(name) => {
                    let i = self.chain_index(name).ok_or(ENOENT)?;
                    if self.chain_referenced(name, i) {
                        return Err(EBUSY);
                    }
                    self.chains.remove(i);
                    Ok(())
                }
                ObjectId::Set(name) | ObjectId::Map(name) => {
                    if self.is_map(name) != Some(matches!(id, ObjectId::Map(_))) {
                        return Err(ENOENT);
                    }
                    if self.container_referenced(name) {
                        return Err(EBUSY);
                    }
                    self.sets.remove(name);
                    self.maps.remove(name);
                    self.elements.retain(|(c, _), _| c != name);
                    Ok(())
                }
                ObjectId::Element { container, key } => self
                    .elements
                    .remove(&(container.clone(), key.clone()))
                    .map(|_| ())
                    .ok_or(ENOENT),
            },
        }
    }

    fn add(&mut self, object: &Object) -> Result<(), Refusal> {
        match object {
            Object::Table(_) => Ok(()),
            Object::Chain(chain) => {
                match self.chain_index(&chain.name) {
                    // A bare `add chain` of an existing chain changes nothing; a declaration
                    // with a hook must match the existing one.
                    Some(i) => {
                        if chain.base.is_some() && self.chains[i].base != chain.base {
                            return Err(EEXIST);
                        }
                    }
                    None => self.chains.push(Chain {
                        name: chain.name.clone(),
                        base: chain.base,
                        comment: chain.comment.clone(),
                        rules: Default::default(),
                    }),
                }
                Ok(())
            }
            Object::Rule { chain, rule } => {
                let i = self.chain_index(chain).ok_or(ENOENT)?;
                for target in rule_chains(rule) {
                    let j = self.chain_index(&target).ok_or(ENOENT)?;
                    if self.chains[j].base.is_some() {
                        return Err(EINVAL);
                    }
                }
                for container in rule_containers(rule) {
                    self.is_map(&container).ok_or(ENOENT)?;
                }
                std::sync::Arc::make_mut(&mut self.chains[i].rules).push((*rule).clone());
                Ok(())
            }
            Object::Set(set) => {
                if self.maps.contains_key(&set.name) {
                    return Err(EEXIST);
                }
                match self.sets.get_mut(&set.name) {
                    Some(have) => {
                        if have.key_type != set.key_type
                            || sorted(&have.flags) != sorted(&set.flags)
                        {
                            return Err(EEXIST);
                        }
                        // Newer kernels update the timeout in place; elements stay.
                        have.timeout = set.timeout;
                    }
                    None => {
                        self.sets.insert(set.name.clone(), (*set).clone());
                    }
                }
                Ok(())
            }
            Object::Map(map) => {
                if self.sets.contains_key(&map.name) {
                    return Err(EEXIST);
                }
                match self.maps.get(&map.name) {
                    Some(have) => {
                        if have.key_type != map.key_type || have.value_type != map.value_type {
                            return Err(EEXIST);
                        }
                    }
                    None => {
                        self.maps.insert(map.name.clone(), (*map).clone());
                    }
                }
                Ok(())
            }
            Object::Element(element) => {
                let is_map = self.is_map(&element.container).ok_or(ENOENT)?;
                let key_len = if is_map {
                    self.maps[&element.container].key_type.len()
                } else {
                    self.sets[&element.container].key_type.len()
                };
                if is_map != element.value.is_some() || key_len != element.key.len() {
                    return Err(EINVAL);
                }
                if let Some(Verdict::Jump(target) | Verdict::Goto(target)) =
                    element.value.as_ref().and_then(ElementValue::verdict)
                {
                    self.chain_index(target).ok_or(ENOENT)?;
                }
                let id = (element.container.clone(), element.key.to_vec());
                match self.elements.get(&id) {
                    // Same key and value: accepted, nothing changes (not even the comment).
                    Some(have) if have.value == element.value => Ok(()),
                    Some(_) => Err(EEXIST),
                    None => {
                        self.elements.insert(id, (*element).clone());
                        Ok(())
                    }
                }
            }
        }
    }

    fn read(&self) -> KernelTable {
        let mut in_element: Vec<Name> = self
            .elements
            .values()
            .filter_map(|e| match e.value.as_ref().and_then(ElementValue::verdict) {
                Some(Verdict::Jump(t) | Verdict::Goto(t)) => Some(t.clone()),
                _ => None,
            })
            .collect();
        for chain in &self.chains {
            for rule in chain.rules.iter() {
                for statement in &rule.statements {
                    if let Statement::RandomVerdict(verdicts) = statement {
                        in_element.extend(verdicts.iter().filter_map(verdict_chain).cloned());
                    }
                }
            }
        }
        let chains = self
            .chains
            .iter()
            .map(|c| KernelChain {
                name: c.name.clone(),
                kind: match c.base {
                    Some(base) => ChainKind::Base(base),
                    None => ChainKind::Regular,
                },
                rules: c.rules.len(),
                in_element: in_element.contains(&c.name),
            })
            .collect();
        let elements_of = |name: &Name| -> Vec<Element> {
            self.elements
                .values()
                .filter(|e| e.container == *name)
                .cloned()
                .collect()
        };
        let mut containers: Vec<KernelContainer> = self
            .sets
            .values()
            .map(|s| KernelContainer {
                name: s.name.clone(),
                is_map: false,
                decl: ContainerDecl::Set(s.clone()),
                elements: s.flags.is_empty().then(|| elements_of(&s.name)),
            })
            .collect();
        containers.extend(self.maps.values().map(|m| KernelContainer {
            name: m.name.clone(),
            is_map: true,
            decl: ContainerDecl::Map(m.clone()),
            elements: Some(elements_of(&m.name)),
        }));
        KernelTable { chains, containers }
    }
}

fn sorted<T: Ord + Clone>(items: &[T]) -> Vec<T> {
    let mut v = items.to_vec();
    v.sort();
    v.dedup();
    v
}

fn verdict_chain(verdict: &Verdict) -> Option<&Name> {
    match verdict {
        Verdict::Jump(t) | Verdict::Goto(t) => Some(t),
        _ => None,
    }
}

/// The chains a rule jumps to.
fn rule_chains(rule: &Rule) -> Vec<Name> {
    let mut out = Vec::new();
    for statement in &rule.statements {
        match statement {
            Statement::Verdict(v) => out.extend(verdict_chain(v).cloned()),
            Statement::RandomVerdict(vs) => {
                out.extend(vs.iter().filter_map(verdict_chain).cloned())
            }
            _ => {}
        }
    }
    out
}

/// The named sets and maps a rule refers to.
fn rule_containers(rule: &Rule) -> Vec<Name> {
    let mut out = Vec::new();
    for m in &rule.matches {
        if let Match::InSet { set, .. } = m {
            out.push(set.clone());
        }
    }
    for statement in &rule.statements {
        match statement {
            Statement::VerdictMap { map, .. } => out.push(map.clone()),
            Statement::UpdateSet { set, .. } => out.push(set.clone()),
            _ => {}
        }
    }
    out
}

impl Applier for FakeKernel {
    fn apply(&mut self, family: IpFamily, commands: &[Command<'_>]) -> Result<usize, SyncError> {
        let text = super::applier::render_transaction(family, TABLE_NAME, commands)?;
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        let refuse = |object: Option<String>, message: &str| SyncError::Refused {
            tool: "fake-nft".into(),
            family,
            object,
            message: format!("Could not process rule: {message}"),
        };
        if self.refuse_next > 0 {
            self.refuse_next -= 1;
            self.transactions.push(Recorded {
                family,
                commands: lines.clone(),
                applied: false,
            });
            return Err(refuse(lines.last().cloned(), "injected failure"));
        }
        let mut table = self.tables.get(&family).cloned().unwrap_or_default();
        for (i, command) in commands.iter().enumerate() {
            if let Err(Refusal(message)) = table.apply(family, command) {
                let object = lines.get(i).cloned();
                self.transactions.push(Recorded {
                    family,
                    commands: lines,
                    applied: false,
                });
                return Err(refuse(object, message));
            }
        }
        if table.table.is_some() {
            self.tables.insert(family, table);
        } else {
            self.tables.remove(&family);
        }
        self.transactions.push(Recorded {
            family,
            commands: lines,
            applied: true,
        });
        Ok(text.len())
    }

    fn read(&mut self, family: IpFamily) -> Result<Option<KernelTable>, SyncError> {
        self.reads += 1;
        Ok(self.tables.get(&family).map(FakeTable::read))
    }

    fn rule_count(&mut self, family: IpFamily, chain: &str) -> Result<Option<usize>, SyncError> {
        self.rule_counts += 1;
        Ok(self
            .tables
            .get(&family)
            .and_then(|t| t.chain_index(chain).map(|i| t.chains[i].rules.len())))
    }

    fn table_exists(&mut self, family: IpFamily) -> Result<bool, SyncError> {
        Ok(self.tables.contains_key(&family))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nftables::{DataType, SetFlag, TABLE_NAME};

    fn table() -> Table {
        Table {
            family: IpFamily::V4,
            name: TABLE_NAME.into(),
            comment: None,
        }
    }

    fn chain(name: &str) -> Chain {
        Chain {
            name: name.into(),
            base: None,
            comment: None,
            rules: Default::default(),
        }
    }

    #[test]
    fn refuses_like_the_kernel_and_applies_nothing_then() {
        let mut fake = FakeKernel::new();
        let t = table();
        let (a, b) = (chain("a"), chain("b"));
        let jump = Rule::new(vec![], vec![Statement::Verdict(Verdict::Goto("b".into()))]);
        let set = Set {
            name: "s".into(),
            key_type: vec![DataType::Ipv4Addr],
            flags: vec![SetFlag::Dynamic, SetFlag::Timeout],
            timeout: Some(10),
            size: None,
            comment: None,
        };
        fake.apply(
            IpFamily::V4,
            &[
                Command::Add(Object::Table(&t)),
                Command::Add(Object::Chain(&a)),
                Command::Add(Object::Chain(&b)),
                Command::Add(Object::Set(&set)),
                Command::Add(Object::Rule {
                    chain: "a",
                    rule: &jump,
                }),
            ],
        )
        .unwrap();
        let before = fake.dump(IpFamily::V4);
        let b_id = ObjectId::Chain("b".into());
        let missing = ObjectId::Set("missing".into());
        let c = chain("c");
        // b is referenced by a's rule: refused, and the chain added before it is not kept.
        let err = fake
            .apply(
                IpFamily::V4,
                &[Command::Add(Object::Chain(&c)), Command::Delete(&b_id)],
            )
            .unwrap_err();
        assert!(
            err.to_string().contains(
                "at delete chain ip kube-proxy b: Could not process rule: Device or resource busy"
            ),
            "{err}"
        );
        assert_eq!(fake.dump(IpFamily::V4), before);
        assert!(fake
            .apply(IpFamily::V4, &[Command::Delete(&missing)])
            .is_err());
        // Flushing the rule first releases the reference.
        let a_id = ObjectId::Chain("a".into());
        fake.apply(
            IpFamily::V4,
            &[Command::Flush(&a_id), Command::Delete(&b_id)],
        )
        .unwrap();
        assert!(!fake.dump(IpFamily::V4).contains("chain ip kube-proxy b"));
        // Re-adding the set keeps its (live) elements.
        assert!(fake.insert_live_element(
            IpFamily::V4,
            "s",
            vec![Value::Addr("10.0.0.1".parse().unwrap())]
        ));
        fake.apply(IpFamily::V4, &[Command::Add(Object::Set(&set))])
            .unwrap();
        assert_eq!(fake.elements(IpFamily::V4, "s").len(), 1);
        let mut other_flags = set.clone();
        other_flags.flags = vec![SetFlag::Timeout];
        assert!(fake
            .apply(IpFamily::V4, &[Command::Add(Object::Set(&other_flags))])
            .is_err());
        assert_eq!(fake.transactions.iter().filter(|t| t.applied).count(), 3);
    }
}
