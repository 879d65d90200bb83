//! Typed iptables rules. A [`Ruleset`] is what one `iptables-restore` (or `ip6tables-restore`)
//! call loads; [`super::render`] is the only place that turns it into text.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use smallvec::SmallVec;

use crate::family::IpFamily;
use crate::model::Protocol;

/// A chain name. Shared because endpoint and service chain names are referenced from many rules.
pub type ChainName = Arc<str>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TableName {
    Filter,
    Nat,
}

impl TableName {
    pub fn as_str(self) -> &'static str {
        match self {
            TableName::Filter => "filter",
            TableName::Nat => "nat",
        }
    }
}

/// Everything kproxy writes for one IP family: the `filter` and `nat` tables.
#[derive(Debug, Clone, PartialEq)]
pub struct Ruleset {
    pub family: IpFamily,
    pub filter: Table,
    pub nat: Table,
}

impl Ruleset {
    pub fn tables(&self) -> [&Table; 2] {
        [&self.filter, &self.nat]
    }
}

/// The chains kproxy owns in one table, in output order.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub name: TableName,
    pub chains: Vec<Chain>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    pub name: ChainName,
    pub rules: Vec<Rule>,
}

impl Chain {
    /// An empty chain with room for `rules` rules.
    pub fn new(name: ChainName, rules: usize) -> Chain {
        Chain {
            name,
            rules: Vec::with_capacity(rules),
        }
    }
}

/// One `-A` line: matches in the order they are written, then an optional target (a rule
/// without target only counts packets; kube-proxy uses one at the end of `KUBE-FW-…`).
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub matches: Matches,
    pub target: Option<Target>,
}

/// A rule's matches. Almost every rule has at most three, kept inline: a large ruleset has
/// hundreds of thousands of rules, and one allocation less per rule is measurable.
pub type Matches = SmallVec<[Match; 3]>;

/// An address match operand: a host (`-d 10.0.0.1`) or a network (`-s 10.0.0.0/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addr {
    Host(IpAddr),
    Net(IpNet),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrType {
    /// `--src-type LOCAL`
    SourceLocal,
    /// `--dst-type LOCAL`
    DestinationLocal,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Match {
    /// `-m comment --comment TEXT`, quoted when the text has a space.
    Comment(Arc<str>),
    /// `-m P -p P`
    Protocol(Protocol),
    /// `[!] -s ADDR`
    Source { addr: Addr, negated: bool },
    /// `[!] -d ADDR`
    Destination { addr: Addr, negated: bool },
    /// `--dport N` (needs a preceding [`Match::Protocol`])
    DestinationPort(u16),
    /// `-m addrtype --src-type|--dst-type LOCAL`
    AddrType(AddrType),
    /// `-m recent --name LIST --rcheck --seconds N --reap` or `-m recent --name LIST --set`
    Recent { list: ChainName, check: RecentCheck },
    /// `-m statistic --mode random --probability P`, P printed with 10 decimals.
    RandomProbability(f64),
    /// `-m mark [!] --mark M/M`
    Mark { mark: Arc<str>, negated: bool },
    /// `-m conntrack [!] --ctstate STATES`
    ConntrackState { states: &'static str, negated: bool },
    /// `-m nfacct --nfacct-name NAME`
    Nfacct(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecentCheck {
    /// Record the source address (`--set`).
    Set,
    /// Match a source seen within the last N seconds, purging older entries.
    SeenWithin(u32),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Jump(ChainName),
    Accept,
    Drop,
    Reject,
    Return,
    Dnat(SocketAddr),
    /// `-j MARK --or-mark M`
    MarkOr(Arc<str>),
    /// `-j MARK --xor-mark M`
    MarkXor(Arc<str>),
    Masquerade {
        random_fully: bool,
    },
}

impl Rule {
    pub fn new(matches: Matches, target: Target) -> Rule {
        Rule {
            matches,
            target: Some(target),
        }
    }
}
