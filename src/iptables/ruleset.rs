//! Typed iptables rules. A [`Ruleset`] is what one `iptables-restore` (or `ip6tables-restore`)
//! call loads; [`super::render`] is the only place that turns it into text.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use smallvec::SmallVec;

use crate::family::IpFamily;
use crate::model::Protocol;

/// An iptables chain name: printable ASCII without blanks (restore input splits on them), at
/// most 28 bytes, the kernel's limit (`XT_EXTENSION_MAXNAMELEN` less the NUL). Kept inline and
/// `Copy`: a large ruleset names hundreds of thousands of chains, and every jump repeats one.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChainName {
    len: u8,
    bytes: [u8; ChainName::MAX_LEN],
}

impl ChainName {
    pub const MAX_LEN: usize = 28;

    /// `None` if the name is empty, too long, or not printable ASCII without blanks.
    pub const fn new(name: &str) -> Option<ChainName> {
        let src = name.as_bytes();
        if src.is_empty() || src.len() > Self::MAX_LEN {
            return None;
        }
        let mut bytes = [0u8; Self::MAX_LEN];
        let mut i = 0;
        while i < src.len() {
            if !src[i].is_ascii_graphic() {
                return None;
            }
            bytes[i] = src[i];
            i += 1;
        }
        Some(ChainName {
            len: src.len() as u8,
            bytes,
        })
    }

    /// For names fixed in this program (top-level chains, hashed names of fixed length).
    pub const fn fixed(name: &str) -> ChainName {
        match ChainName::new(name) {
            Some(chain) => chain,
            None => panic!("not a valid iptables chain name"),
        }
    }

    pub fn as_str(&self) -> &str {
        let bytes = &self.bytes[..self.len as usize];
        // SAFETY: `new` admits printable ASCII only, and ASCII is valid UTF-8. Checking again
        // on every use showed up as a tenth of render time.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }
}

impl std::ops::Deref for ChainName {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for ChainName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for ChainName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl PartialOrd for ChainName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Alphabetical, like the names themselves. Names hold no zero bytes and are zero-padded, so
/// comparing the padded bytes gives the same order; as two big-endian integers that is a
/// couple of instructions (sorting 100,000 chain names is part of every sync).
impl Ord for ChainName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.order_key().cmp(&other.order_key())
    }
}

impl ChainName {
    fn order_key(&self) -> (u128, u128) {
        let mut high = [0u8; 16];
        let mut low = [0u8; 16];
        high.copy_from_slice(&self.bytes[..16]);
        low[..Self::MAX_LEN - 16].copy_from_slice(&self.bytes[16..]);
        (u128::from_be_bytes(high), u128::from_be_bytes(low))
    }
}

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
    /// Shared, so that a chain kept from one translation to the next, and the syncer's copy of
    /// what it applied, cost no copies (and compare by pointer first: [`Chain::same_rules`]).
    pub rules: Arc<Vec<Rule>>,
}

impl Chain {
    /// An empty chain with room for `rules` rules.
    pub fn new(name: ChainName, rules: usize) -> Chain {
        Chain {
            name,
            rules: Arc::new(Vec::with_capacity(rules)),
        }
    }

    pub fn push(&mut self, rule: Rule) {
        Arc::make_mut(&mut self.rules).push(rule);
    }

    /// Appends another chain's rules.
    pub fn extend_from(&mut self, other: &Chain) {
        if self.rules.is_empty() {
            self.rules = other.rules.clone();
        } else if !other.rules.is_empty() {
            Arc::make_mut(&mut self.rules).extend(other.rules.iter().cloned());
        }
    }

    /// The same rules: the very same list, or equal ones.
    pub fn same_rules(&self, other: &Chain) -> bool {
        Arc::ptr_eq(&self.rules, &other.rules) || self.rules == other.rules
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_sort_alphabetically() {
        let mut names: Vec<&str> = vec![
            "KUBE-SVC-B",
            "KUBE-SVC-AB",
            "KUBE-SVC-A",
            "KUBE-SEP-Z",
            "KUBE-NODEPORTS",
            "KUBE-SVC-ABCDEFGHIJKLMNOPQRS",
            "KUBE-SVC-ABCDEFGHIJKLMNOPQR",
            "A",
            "KUBE-SVC-ABCDEFGHIJKLMNOPQRT",
        ];
        let mut chains: Vec<ChainName> = names.iter().map(|n| ChainName::fixed(n)).collect();
        chains.sort();
        names.sort();
        let sorted: Vec<&str> = chains.iter().map(|c| c.as_str()).collect();
        assert_eq!(sorted, names);
    }

    #[test]
    fn chain_names_follow_the_kernel_limits() {
        assert_eq!(
            ChainName::new("KUBE-SEP-SXIVWICOYRO3J4NJ")
                .unwrap()
                .as_str(),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        assert!(ChainName::new(&"X".repeat(28)).is_some());
        assert!(ChainName::new(&"X".repeat(29)).is_none());
        assert!(ChainName::new("").is_none());
        assert!(ChainName::new("A B").is_none());
        assert!(ChainName::new("KUBE-\u{e9}").is_none());
        let (a, b) = (
            ChainName::fixed("KUBE-SVC-B"),
            ChainName::fixed("KUBE-SVC-AZ"),
        );
        assert!(b < a, "ordered like the strings");
    }
}
