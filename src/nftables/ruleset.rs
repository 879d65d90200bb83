//! Typed nftables objects. A [`Ruleset`] is everything kproxy owns in one family's
//! `kube-proxy` table; [`super::render`] is the only place that turns it into `nft` text.
//!
//! Every object has a stable identity ([`ObjectId`]: kind and name, elements by container and
//! key) so that a syncer can compare a desired ruleset with the applied one object by object,
//! and a chain's rules compare as a whole (`Vec<Rule>` equality).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use smallvec::SmallVec;

use crate::family::IpFamily;
use crate::model::Protocol;

/// A chain, set or map name. Shared because service and endpoint names are referenced from
/// many rules and elements.
pub type Name = Arc<str>;

/// The table every object lives in (§5.1).
pub const TABLE_NAME: &str = "kube-proxy";

/// One family's `kube-proxy` table with all its objects, in creation order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub table: Table,
    /// Every chain with its rules; names are unique.
    pub chains: Vec<Chain>,
    pub sets: Vec<Set>,
    pub maps: Vec<Map>,
    /// Elements of sets and maps; `(container, key)` is unique. Shared: the translation kept
    /// per service port, the ruleset built from it and the syncer's record of what it
    /// committed hold the same elements (over a million in a large `maps` layout table).
    pub elements: Vec<Arc<Element>>,
}

impl Ruleset {
    pub fn family(&self) -> IpFamily {
        self.table.family
    }

    pub fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|c| &*c.name == name)
    }

    pub fn set(&self, name: &str) -> Option<&Set> {
        self.sets.iter().find(|s| &*s.name == name)
    }

    pub fn map(&self, name: &str) -> Option<&Map> {
        self.maps.iter().find(|m| &*m.name == name)
    }

    /// The elements of one set or map, in ruleset order.
    pub fn elements_of<'a>(&'a self, container: &'a str) -> impl Iterator<Item = &'a Element> {
        self.elements
            .iter()
            .filter(move |e| &*e.container == container)
            .map(|e| &**e)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Table {
    pub family: IpFamily,
    pub name: Name,
    pub comment: Option<Name>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Chain {
    pub name: Name,
    /// Set for chains attached to a netfilter hook.
    pub base: Option<BaseChain>,
    pub comment: Option<Name>,
    /// The chain's rules in order; order is significant. Shared, so that a chain kept from
    /// one translation to the next, and the syncer's copy of what it applied, cost no copies
    /// and compare equal at a glance (`Arc`'s equality checks the pointer first).
    pub rules: std::sync::Arc<Vec<Rule>>,
}

impl Chain {
    /// Same name, hook and comment: the chain can be kept and only its rules rewritten.
    pub fn same_declaration(&self, other: &Chain) -> bool {
        self.name == other.name && self.base == other.base && self.comment == other.comment
    }
}

/// Type, hook and numeric priority of a base chain (§5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BaseChain {
    pub kind: ChainType,
    pub hook: Hook,
    pub priority: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChainType {
    Filter,
    Nat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

/// A named set. Affinity sets carry flags and a timeout (§5A.9).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Set {
    pub name: Name,
    /// The key's data types, concatenated with ` . `.
    pub key_type: Vec<DataType>,
    pub flags: Vec<SetFlag>,
    /// Element lifetime in seconds.
    pub timeout: Option<u32>,
    /// The most elements the set holds (nft's default for dynamic sets is 65535).
    pub size: Option<u32>,
    pub comment: Option<Name>,
}

impl Set {
    /// A set of plain elements (no flags, timeout or size) with a comment.
    pub fn plain(name: &str, key_type: Vec<DataType>, comment: &str) -> Set {
        Set {
            name: name.into(),
            key_type,
            flags: Vec::new(),
            timeout: None,
            size: None,
            comment: Some(comment.into()),
        }
    }
}

/// A named map from a concatenated key to a verdict (kube-proxy's maps) or to data (the
/// `maps` layout's endpoint and affinity maps: an address and a port).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Map {
    pub name: Name,
    pub key_type: Vec<DataType>,
    /// `[Verdict]`, or the data types of the value, concatenated.
    pub value_type: Vec<DataType>,
    pub flags: Vec<SetFlag>,
    /// Element lifetime in seconds (elements added from the packet path may set their own).
    pub timeout: Option<u32>,
    pub size: Option<u32>,
    pub comment: Option<Name>,
}

impl Map {
    /// A verdict map with a comment, kube-proxy's kind of map.
    pub fn verdict_map(name: &str, key_type: Vec<DataType>, comment: &str) -> Map {
        Map {
            name: name.into(),
            key_type,
            value_type: vec![DataType::Verdict],
            flags: Vec::new(),
            timeout: None,
            size: None,
            comment: Some(comment.into()),
        }
    }

    pub fn is_verdict_map(&self) -> bool {
        self.value_type == [DataType::Verdict]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DataType {
    Ipv4Addr,
    Ipv6Addr,
    InetProto,
    InetService,
    Verdict,
    /// A 32-bit number from `numgen` (an endpoint slot); declared with `typeof`, which is
    /// how nft lets a number be part of a concatenated key.
    Slot,
}

impl DataType {
    /// `ipv4_addr` or `ipv6_addr`.
    pub fn addr(family: IpFamily) -> DataType {
        match family {
            IpFamily::V4 => DataType::Ipv4Addr,
            IpFamily::V6 => DataType::Ipv6Addr,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SetFlag {
    /// Updated from the packet path (`update @set`).
    Dynamic,
    Timeout,
    /// Elements are ranges (here: networks in a concatenated key).
    Interval,
}

/// An element's key: its values held inline up to four (every key kproxy makes), as a table
/// of a million elements would otherwise hold a million more allocations.
pub type ElementKey = SmallVec<[Value; 4]>;

/// A map element's data: inline up to two values (an endpoint's address and port).
pub type ElementData = SmallVec<[Value; 2]>;

/// One element of a set (no value) or map (with a value). Identified by container and key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Element {
    /// The set or map it belongs to.
    pub container: Name,
    pub key: ElementKey,
    pub value: Option<ElementValue>,
    pub comment: Option<Name>,
}

/// What a map element maps its key to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ElementValue {
    Verdict(Verdict),
    /// Data, concatenated: e.g. an endpoint's address and port.
    Data(ElementData),
}

impl ElementValue {
    pub fn verdict(&self) -> Option<&Verdict> {
        match self {
            ElementValue::Verdict(verdict) => Some(verdict),
            ElementValue::Data(_) => None,
        }
    }
}

impl Element {
    pub fn id(&self) -> ObjectId {
        ObjectId::Element {
            container: self.container.clone(),
            key: self.key.to_vec(),
        }
    }
}

/// An element in an index of one container's elements: hashed and compared by its key alone,
/// and found by a key (`&[Value]`), so that the index holds no second copy of the key.
#[derive(Debug, Clone)]
pub struct ElementByKey(pub Arc<Element>);

impl std::hash::Hash for ElementByKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `[Value]` hashes: `Borrow` requires the same hash for the key looked up.
        self.0.key.as_slice().hash(state);
    }
}

impl PartialEq for ElementByKey {
    fn eq(&self, other: &ElementByKey) -> bool {
        self.0.key == other.0.key
    }
}

impl Eq for ElementByKey {}

impl std::borrow::Borrow<[Value]> for ElementByKey {
    fn borrow(&self) -> &[Value] {
        &self.0.key
    }
}

/// A literal in a rule or an element key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Value {
    Addr(IpAddr),
    Net(IpNet),
    Protocol(Protocol),
    Port(u16),
    /// A number, e.g. an endpoint slot.
    Integer(u32),
    /// An anonymous set: `{ a , b }`. (A boxed slice rather than a `Vec`: every `Value`, and
    /// element keys hold millions, is as large as this variant.)
    Set {
        members: Box<[Value]>,
        joining: Joining,
    },
}

/// How anonymous-set members are separated. Both mean the same to nft; kube-proxy writes the
/// ServiceCIDR list tightly (§5.5) and the firewall sources spaced (§5.7), and kproxy
/// reproduces its text exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Joining {
    /// `a,b`
    Tight,
    /// `a , b`
    Spaced,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Source,
    Destination,
}

/// The packet fields rules look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// `ip saddr` / `ip6 saddr`
    SourceAddr,
    /// `ip daddr` / `ip6 daddr`
    DestinationAddr,
    /// `meta l4proto`
    L4Proto,
    /// `th dport`
    DestinationPort,
    /// `ct original ip daddr`: the destination before DNAT.
    OriginalDestinationAddr,
    /// `ct original proto-dst`: the destination port before DNAT (nft needs a protocol match
    /// before it in the rule to know its type).
    OriginalDestinationPort,
    /// `numgen random mod N`: a random number below N.
    RandomNumber(u32),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Verdict {
    Jump(Name),
    Goto(Name),
    Drop,
    Reject,
}

/// One rule: matches, then statements, then an optional comment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub statements: Vec<Statement>,
    pub comment: Option<Name>,
}

impl Rule {
    pub fn new(matches: Vec<Match>, statements: Vec<Statement>) -> Rule {
        Rule {
            matches,
            statements,
            comment: None,
        }
    }

    pub fn with_comment(mut self, comment: &str) -> Rule {
        self.comment = Some(comment.into());
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Match {
    /// `ct state new`
    CtStateNew,
    /// `ct status dnat`: the connection was DNATed.
    CtStatusDnat,
    /// `mark and M != 0`
    MarkBitSet(Name),
    /// `fib saddr type local` (or `daddr`): the address belongs to this host.
    FibLocal(Direction),
    /// `FIELD [!=] VALUE`
    Compare {
        field: Field,
        negated: bool,
        value: Value,
    },
    /// `FIELD . FIELD … [!=] @set`
    InSet {
        key: Vec<Field>,
        set: Name,
        negated: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Statement {
    Verdict(Verdict),
    /// `FIELD . FIELD … vmap @map`
    VerdictMap {
        key: Vec<Field>,
        map: Name,
    },
    /// `numgen random mod N vmap { 0 : V0 , 1 : V1 , … }`
    RandomVerdict(Vec<Verdict>),
    /// `mark set mark or M`
    MarkOr(Name),
    /// `mark set mark xor M`
    MarkXor(Name),
    /// `masquerade fully-random`
    MasqueradeFullyRandom,
    /// `update @set { FIELD }`: add the packet's field to a dynamic set or refresh its timeout.
    UpdateSet {
        set: Name,
        field: Field,
    },
    /// `dnat to ADDR:PORT`
    Dnat(SocketAddr),
    /// `dnat ip addr . port to numgen random mod N map { 0 : A0 . P0 , … }` (§5A.7).
    RandomDnat(Vec<SocketAddr>),
    /// `dnat ip addr . port to FIELD . FIELD … map @map`: the address and port the map gives
    /// for the key; no element, no match.
    DnatMap {
        key: Vec<Field>,
        map: Name,
    },
    /// `update @map { FIELD … timeout Ns : FIELD . FIELD }`: add or refresh an element of a
    /// dynamic map from the packet path.
    UpdateMap {
        map: Name,
        key: Vec<Field>,
        timeout: u32,
        value: Vec<Field>,
    },
}

/// The identity of an object inside the table, for diffing desired against applied state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectId {
    Table,
    Chain(Name),
    Set(Name),
    Map(Name),
    Element { container: Name, key: Vec<Value> },
}

impl ObjectId {
    /// The object kind's word in `nft` commands.
    pub fn kind(&self) -> &'static str {
        match self {
            ObjectId::Table => "table",
            ObjectId::Chain(_) => "chain",
            ObjectId::Set(_) => "set",
            ObjectId::Map(_) => "map",
            ObjectId::Element { .. } => "element",
        }
    }
}

impl Chain {
    pub fn id(&self) -> ObjectId {
        ObjectId::Chain(self.name.clone())
    }
}

impl Set {
    pub fn id(&self) -> ObjectId {
        ObjectId::Set(self.name.clone())
    }
}

impl Map {
    pub fn id(&self) -> ObjectId {
        ObjectId::Map(self.name.clone())
    }
}

#[cfg(test)]
mod tests {
    /// Element keys and data hold millions of values in a large table (the `maps` layout at
    /// 100,000 services): a value stays three words.
    #[test]
    fn a_value_is_three_words() {
        assert_eq!(
            std::mem::size_of::<super::Value>(),
            3 * std::mem::size_of::<usize>()
        );
    }
}
