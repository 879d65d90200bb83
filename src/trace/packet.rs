//! The packet a trace follows, the node it arrives at, and one possible path of it through the
//! rules ([`Branch`]): random choices split a path in two, each with its share of the odds.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use crate::family::IpFamily;
use crate::model::Protocol;
use crate::nftables::Value;

/// Where the packet comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Arrives on one of the node's interfaces: PREROUTING, then INPUT or FORWARD.
    Outside,
    /// Sent by a process on the node: OUTPUT, then POSTROUTING.
    Node,
}

/// The first packet of a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub src: IpAddr,
    pub dst: SocketAddr,
    pub protocol: Protocol,
    pub origin: Origin,
}

impl Probe {
    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.src)
    }
}

/// The node: which addresses are its own (`--dst-type LOCAL`, `fib daddr type local`).
/// Loopback addresses always are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Host {
    local: Vec<IpAddr>,
}

impl Host {
    pub fn new(local: impl IntoIterator<Item = IpAddr>) -> Host {
        Host {
            local: local.into_iter().collect(),
        }
    }

    pub fn is_local(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || self.local.contains(&ip)
    }
}

/// Session-affinity entries as the kernel holds them: per `recent` list or affinity set, the
/// client addresses seen within its timeout. Empty for rendered rules (a client without any
/// entry); read from the kernel for `--live`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AffinityState {
    entries: HashMap<String, Vec<IpAddr>>,
    /// Dynamic maps' elements.
    mappings: HashMap<String, Vec<Mapping>>,
}

/// One element of a dynamic map: key → value.
type Mapping = (Vec<Value>, Vec<Value>);

impl AffinityState {
    pub fn insert(&mut self, store: &str, client: IpAddr) {
        let clients = self.entries.entry(store.to_string()).or_default();
        if !clients.contains(&client) {
            clients.push(client);
        }
    }

    pub fn contains(&self, store: &str, client: IpAddr) -> bool {
        self.entries
            .get(store)
            .is_some_and(|clients| clients.contains(&client))
    }

    /// Records `key → value` in a dynamic map, replacing an earlier value.
    pub fn insert_mapping(&mut self, store: &str, key: Vec<Value>, value: Vec<Value>) {
        let entries = self.mappings.entry(store.to_string()).or_default();
        entries.retain(|(k, _)| *k != key);
        entries.push((key, value));
    }

    /// The value a dynamic map holds for `key`.
    pub fn mapping(&self, store: &str, key: &[Value]) -> Option<&[Value]> {
        self.mappings
            .get(store)?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }

    /// Every store with its clients.
    pub fn stores(&self) -> impl Iterator<Item = (&str, &[IpAddr])> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }
}

/// One rule the packet matched (or, for affinity checks, was tested against), where it sits,
/// and what it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// `nat KUBE-SERVICES` (iptables) or the chain name (nftables).
    pub chain: String,
    /// The rule as the tool writes it.
    pub rule: String,
    /// What happened beyond "matched", e.g. `no entry for 10.0.0.9: no match`.
    pub note: Option<String>,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}] {}", self.chain, self.rule)?;
        if let Some(note) = &self.note {
            write!(f, "  ({note})")?;
        }
        Ok(())
    }
}

/// What the packet met about session affinity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AffinityEvent {
    /// A lookup of the client in a `recent` list or affinity set.
    Checked {
        store: String,
        timeout_seconds: u32,
        hit: bool,
    },
    /// The client was recorded in a `recent` list or affinity set.
    Recorded { store: String },
    /// A key and value were recorded in a dynamic map (the `maps` layout's affinity map).
    RecordedMapping {
        store: String,
        key: Vec<Value>,
        value: Vec<Value>,
        timeout_seconds: u32,
    },
}

/// How a path ends before the packet is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Drop,
    Reject,
}

/// One possible path of the packet, with its probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Branch {
    pub probability: f64,
    pub src: IpAddr,
    /// The destination, rewritten by DNAT.
    pub dst: IpAddr,
    /// The destination the packet was sent to (`ct original`).
    pub original_dst: SocketAddr,
    pub dport: u16,
    pub protocol: Protocol,
    pub mark: u32,
    /// Set when a DNAT rule rewrote the destination.
    pub dnat: Option<SocketAddr>,
    pub masquerade: bool,
    /// An explicit accept verdict was met.
    pub accepted: bool,
    pub end: Option<End>,
    pub steps: Vec<Step>,
    pub affinity: Vec<AffinityEvent>,
    /// Rules the walker could not interpret, with where they are; taken as not matching.
    pub uninterpreted: Vec<String>,
}

impl Branch {
    pub fn start(probe: &Probe) -> Branch {
        Branch {
            probability: 1.0,
            src: probe.src,
            dst: probe.dst.ip(),
            original_dst: probe.dst,
            dport: probe.dst.port(),
            protocol: probe.protocol,
            mark: 0,
            dnat: None,
            masquerade: false,
            accepted: false,
            end: None,
            steps: Vec::new(),
            affinity: Vec::new(),
            uninterpreted: Vec::new(),
        }
    }

    pub fn step(&mut self, chain: impl Into<String>, rule: String, note: Option<String>) {
        self.steps.push(Step {
            chain: chain.into(),
            rule,
            note,
        });
    }

    /// A copy taking `share` of this branch's odds.
    pub fn split(&self, share: f64) -> Branch {
        let mut branch = self.clone();
        branch.probability *= share;
        branch
    }

    pub fn is_done(&self) -> bool {
        self.end.is_some()
    }
}

/// Reads a mark as kproxy and the kernel tools print it (`0x00004000`, `0x4000`, `16384`).
pub fn parse_mark(text: &str) -> Option<u32> {
    match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}
