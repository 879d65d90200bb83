//! `iptables-save` output (nat and filter tables) read into the walker's [`IptablesRules`].
//!
//! The reader is lenient about the *form* of a line — options in any order, `/32` and `/128`
//! host masks, marks as `0x4000/0x4000`, `MARK --set-xmark`, probabilities with 11 decimals,
//! the default options `recent` prints (`--mask 255.255.255.255 --rsource`) — and strict about
//! its *meaning*: a line with anything it does not understand (an interface match, a port
//! range, another reject type, someone else's target, …) becomes
//! [`Entry::Uninterpreted`] as a whole, never a rule with a match silently left out. Other
//! people's rules (Docker, a CNI) are expected and never an error for the table.
//!
//! Pure: text in, rules out. The thin I/O part ([`read`]) runs the save tool of the node's
//! iptables backend.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::family::IpFamily;
use crate::iptables::{AddrType, ChainName, Match, Matches, RecentCheck, Rule, TableName, Target};
use crate::model::Protocol;
use crate::sync::iptables::{Applier, BackendChoice, SystemApplier};
use crate::trace::packet::parse_mark;
use crate::trace::{Entry, IptablesRules};

/// What one family's saved `nat` and `filter` tables hold, as the walker needs it.
#[derive(Debug, Clone)]
pub struct SavedTables {
    pub rules: IptablesRules,
    /// The `--seconds` of the `--rcheck` rules of each `recent` list.
    pub recent_seconds: BTreeMap<String, u32>,
    /// Lines outside any rule that were not understood, and similar remarks.
    pub notes: Vec<String>,
}

/// Reads `iptables-save` output of one family: any number of tables, of which `nat` and
/// `filter` are kept (others are skipped: the walker runs those two only).
pub fn read_save_text(text: &str, family: IpFamily) -> SavedTables {
    let mut tables: Vec<(TableName, SavedTable)> = Vec::new();
    let mut current: Option<usize> = None;
    let mut skipping = false;
    let mut notes = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            let table = match name {
                "nat" => TableName::Nat,
                "filter" => TableName::Filter,
                _ => {
                    skipping = true;
                    current = None;
                    continue;
                }
            };
            skipping = false;
            current = Some(match tables.iter().position(|(t, _)| *t == table) {
                Some(i) => i,
                None => {
                    tables.push((table, SavedTable::default()));
                    tables.len() - 1
                }
            });
            continue;
        }
        if line == "COMMIT" {
            current = None;
            skipping = false;
            continue;
        }
        if skipping {
            continue;
        }
        let Some(table) = current.and_then(|i| tables.get_mut(i)).map(|(_, t)| t) else {
            notes.push(format!(
                "iptables-save line {} outside a table: {line}",
                index + 1
            ));
            continue;
        };
        if let Some(declaration) = line.strip_prefix(':') {
            let mut parts = declaration.split(' ');
            let name = parts.next().unwrap_or_default();
            let policy = parts.next().unwrap_or_default();
            if name.is_empty() {
                notes.push(format!("iptables-save line {}: {line}", index + 1));
                continue;
            }
            table.declare(name, policy == "DROP");
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split(' ').next().unwrap_or_default();
            table.lines.push((chain.to_string(), line.to_string()));
        } else {
            notes.push(format!(
                "iptables-save line {} not understood: {line}",
                index + 1
            ));
        }
    }

    let mut rules = IptablesRules::new(family);
    let mut recent_seconds = BTreeMap::new();
    for (name, table) in tables {
        let mut chains: BTreeMap<String, Vec<Entry<Rule>>> = table
            .chains
            .iter()
            .map(|chain| (chain.clone(), Vec::new()))
            .collect();
        for (chain, line) in &table.lines {
            let entry =
                match parse_save_rule(line, family, &|c| table.chains.iter().any(|d| d == c)) {
                    Ok(rule) => {
                        for m in &rule.matches {
                            if let Match::Recent {
                                list,
                                check: RecentCheck::SeenWithin(seconds),
                            } = m
                            {
                                recent_seconds.insert(list.to_string(), *seconds);
                            }
                        }
                        Entry::Rule(rule)
                    }
                    Err(why) => Entry::Uninterpreted(format!("{line}  [{why}]")),
                };
            chains.entry(chain.clone()).or_default().push(entry);
        }
        for (chain, entries) in chains {
            rules.insert_chain(name, &chain, entries);
        }
        for chain in &table.dropping {
            rules.set_dropping_policy(name, chain);
        }
    }
    SavedTables {
        rules,
        recent_seconds,
        notes,
    }
}

#[derive(Default)]
struct SavedTable {
    chains: Vec<String>,
    dropping: Vec<String>,
    /// `(chain, whole line)` of every `-A` line, in order.
    lines: Vec<(String, String)>,
}

impl SavedTable {
    fn declare(&mut self, name: &str, dropping: bool) {
        if !self.chains.iter().any(|c| c == name) {
            self.chains.push(name.to_string());
        }
        if dropping {
            self.dropping.push(name.to_string());
        }
    }
}

/// The conntrack state lists the rule type can hold, as sets of state names.
const CTSTATES: [&str; 4] = [
    "NEW",
    "INVALID",
    "RELATED,ESTABLISHED",
    "RELATED,ESTABLISHED,DNAT",
];

/// The names of the nfacct counters the rule type can hold.
const NFACCT_NAMES: [&str; 2] = [
    "ct_state_invalid_dropped_pkts",
    "localhost_nps_accepted_pkts",
];

/// The options of one `-m recent` match, gathered before they are judged together.
#[derive(Default)]
struct RecentOptions {
    name: Option<String>,
    set: bool,
    rcheck: bool,
    seconds: Option<u32>,
    reap: bool,
    other: Vec<String>,
}

#[derive(Default)]
struct StatisticOptions {
    random: bool,
    probability: Option<f64>,
    other: Vec<String>,
}

/// The module whose options are being read.
enum Module {
    None,
    Comment(Option<Arc<str>>),
    /// `-m tcp|udp|sctp`, with its `--dport`.
    Port(Option<u16>),
    AddrType(Option<AddrType>),
    Recent(RecentOptions),
    Statistic(StatisticOptions),
    Mark(Option<Match>),
    Conntrack(Option<Match>),
    Nfacct(Option<&'static str>),
}

/// One saved `-A CHAIN …` line as a rule; `Err` names what was not understood.
/// `is_chain` tells which targets are chains of the table.
pub fn parse_save_rule(
    line: &str,
    family: IpFamily,
    is_chain: &dyn Fn(&str) -> bool,
) -> Result<Rule, String> {
    let tokens = tokens(line)?;
    let mut words = tokens.iter().map(String::as_str);
    if words.next() != Some("-A") {
        return Err("not an -A line".into());
    }
    let chain = words.next().ok_or("no chain")?;
    if line.split(' ').nth(1) != Some(chain) {
        return Err("a chain name in quotes".into());
    }
    let mut matches = Matches::new();
    let mut protocol: Option<Protocol> = None;
    let mut module = Module::None;
    let mut target = None;
    let mut negated = false;
    while let Some(word) = words.next() {
        let mut next = |what: &str| words.next().ok_or(format!("{word} without {what}"));
        if word == "!" {
            if negated {
                return Err("! !".into());
            }
            negated = true;
            continue;
        }
        let negation = std::mem::take(&mut negated);
        if let Some(option) = word.strip_prefix("--") {
            module_option(&mut module, option, negation, &mut next, family)?;
            continue;
        }
        finish(&mut module, &mut matches)?;
        match word {
            "-s" | "-d" => {
                let addr = address(next("an address")?, family)?;
                matches.push(if word == "-s" {
                    Match::Source {
                        addr,
                        negated: negation,
                    }
                } else {
                    Match::Destination {
                        addr,
                        negated: negation,
                    }
                });
            }
            "-p" => {
                if negation {
                    return Err("! -p".into());
                }
                if protocol.is_some() {
                    return Err("-p twice".into());
                }
                let name = next("a protocol")?;
                let p = Protocol::from_lower(name).ok_or(format!("protocol {name}"))?;
                protocol = Some(p);
                matches.push(Match::Protocol(p));
            }
            "-m" => {
                if negation {
                    return Err("! -m".into());
                }
                let name = next("a module")?;
                module = match name {
                    "comment" => Module::Comment(None),
                    "tcp" | "udp" | "sctp" => {
                        if protocol.map(Protocol::lower) != Some(name) {
                            return Err(format!("-m {name} without -p {name}"));
                        }
                        Module::Port(None)
                    }
                    "addrtype" => Module::AddrType(None),
                    "recent" => Module::Recent(RecentOptions::default()),
                    "statistic" => Module::Statistic(StatisticOptions::default()),
                    "mark" => Module::Mark(None),
                    "conntrack" => Module::Conntrack(None),
                    "nfacct" => Module::Nfacct(None),
                    other => return Err(format!("match module {other}")),
                };
            }
            "-j" => {
                if negation {
                    return Err("! -j".into());
                }
                let name = next("a target")?;
                let options: Vec<&str> = words.by_ref().collect();
                target = Some(parse_target(name, &options, family, is_chain)?);
            }
            other => return Err(format!("option {other}")),
        }
    }
    if negated {
        return Err("a ! at the end".into());
    }
    finish(&mut module, &mut matches)?;
    Ok(Rule { matches, target })
}

/// One `--option [value]` of the current module.
fn module_option<'a>(
    module: &mut Module,
    option: &str,
    negation: bool,
    next: &mut dyn FnMut(&str) -> Result<&'a str, String>,
    family: IpFamily,
) -> Result<(), String> {
    let refuse_negation = |negation: bool| {
        if negation {
            Err(format!("! --{option}"))
        } else {
            Ok(())
        }
    };
    match module {
        Module::None => return Err(format!("--{option} outside a match module")),
        Module::Comment(comment) => {
            refuse_negation(negation)?;
            if option != "comment" || comment.is_some() {
                return Err(format!("comment --{option}"));
            }
            let text = next("a comment")?;
            *comment = Some(Arc::from(text));
        }
        Module::Port(port) => {
            refuse_negation(negation)?;
            if (option != "dport" && option != "destination-port") || port.is_some() {
                return Err(format!("--{option}"));
            }
            let text = next("a port")?;
            *port = Some(text.parse().map_err(|_| format!("port {text:?}"))?);
        }
        Module::AddrType(kind) => {
            refuse_negation(negation)?;
            if kind.is_some() {
                return Err(format!("addrtype --{option} twice"));
            }
            let value = next("an address type")?;
            *kind = Some(match (option, value) {
                ("src-type", "LOCAL") => AddrType::SourceLocal,
                ("dst-type", "LOCAL") => AddrType::DestinationLocal,
                _ => return Err(format!("addrtype --{option} {value}")),
            });
        }
        Module::Recent(recent) => {
            refuse_negation(negation)?;
            match option {
                "name" => recent.name = Some(next("a list name")?.to_string()),
                "set" => recent.set = true,
                "rcheck" => recent.rcheck = true,
                "reap" => recent.reap = true,
                "seconds" => {
                    let text = next("seconds")?;
                    recent.seconds = Some(text.parse().map_err(|_| format!("seconds {text:?}"))?);
                }
                "mask" => {
                    let text = next("a mask")?;
                    let full = match family {
                        IpFamily::V4 => "255.255.255.255",
                        IpFamily::V6 => "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                    };
                    let mask: IpAddr = text.parse().map_err(|_| format!("mask {text:?}"))?;
                    if Some(mask) != full.parse().ok() {
                        recent.other.push(format!("--mask {text}"));
                    }
                }
                "rsource" => {}
                other => recent.other.push(format!("--{other}")),
            }
        }
        Module::Statistic(statistic) => {
            refuse_negation(negation)?;
            match option {
                "mode" => {
                    let mode = next("a mode")?;
                    if mode == "random" {
                        statistic.random = true;
                    } else {
                        statistic.other.push(format!("--mode {mode}"));
                    }
                }
                "probability" => {
                    let text = next("a probability")?;
                    let p: f64 = text
                        .parse()
                        .ok()
                        .filter(|p: &f64| (0.0..=1.0).contains(p))
                        .ok_or(format!("probability {text:?}"))?;
                    statistic.probability = Some(p);
                }
                other => statistic.other.push(format!("--{other}")),
            }
        }
        Module::Mark(mark) => {
            if option != "mark" || mark.is_some() {
                return Err(format!("mark --{option}"));
            }
            let value = next("a mark")?;
            let (bits, mask) = value
                .split_once('/')
                .ok_or(format!("mark {value} without a mask"))?;
            match (parse_mark(bits), parse_mark(mask)) {
                (Some(b), Some(m)) if b == m && b != 0 => {}
                _ => return Err(format!("mark {value} (only M/M is understood)")),
            }
            *mark = Some(Match::Mark {
                mark: Arc::from(bits),
                negated: negation,
            });
        }
        Module::Conntrack(state) => {
            if option != "ctstate" || state.is_some() {
                return Err(format!("conntrack --{option}"));
            }
            let list = next("states")?;
            let states = same_states(list).ok_or(format!("conntrack states {list}"))?;
            *state = Some(Match::ConntrackState {
                states,
                negated: negation,
            });
        }
        Module::Nfacct(name) => {
            refuse_negation(negation)?;
            if option != "nfacct-name" || name.is_some() {
                return Err(format!("nfacct --{option}"));
            }
            let text = next("a counter")?;
            *name = Some(
                NFACCT_NAMES
                    .into_iter()
                    .find(|n| *n == text)
                    .ok_or(format!("nfacct counter {text}"))?,
            );
        }
    }
    Ok(())
}

/// Ends the current module: its gathered options become a match, or an error when they are
/// incomplete or hold something the rule type cannot say.
fn finish(module: &mut Module, matches: &mut Matches) -> Result<(), String> {
    match std::mem::replace(module, Module::None) {
        Module::None | Module::Port(None) => {}
        Module::Comment(Some(text)) => matches.push(Match::Comment(text)),
        Module::Port(Some(port)) => matches.push(Match::DestinationPort(port)),
        Module::AddrType(Some(kind)) => matches.push(Match::AddrType(kind)),
        Module::Recent(recent) => {
            if !recent.other.is_empty() {
                return Err(format!("recent {}", recent.other.join(" ")));
            }
            let name = recent.name.ok_or("recent without --name")?;
            let list = ChainName::new(&name).ok_or(format!("recent list name {name:?}"))?;
            let check = match (recent.set, recent.rcheck, recent.seconds, recent.reap) {
                (true, false, None, false) => RecentCheck::Set,
                (false, true, Some(seconds), true) => RecentCheck::SeenWithin(seconds),
                _ => {
                    return Err(
                        "recent: only --set, or --rcheck --seconds N --reap, is understood".into(),
                    )
                }
            };
            matches.push(Match::Recent { list, check });
        }
        Module::Statistic(statistic) => {
            if !statistic.other.is_empty() {
                return Err(format!("statistic {}", statistic.other.join(" ")));
            }
            match (statistic.random, statistic.probability) {
                (true, Some(p)) => matches.push(Match::RandomProbability(p)),
                _ => return Err("statistic without --mode random --probability".into()),
            }
        }
        Module::Mark(Some(m)) | Module::Conntrack(Some(m)) => matches.push(m),
        Module::Nfacct(Some(name)) => matches.push(Match::Nfacct(name)),
        Module::Comment(None)
        | Module::AddrType(None)
        | Module::Mark(None)
        | Module::Conntrack(None)
        | Module::Nfacct(None) => return Err("a match module without its option".into()),
    }
    Ok(())
}

/// A state list as one of the lists the rule type holds, in any order.
fn same_states(list: &str) -> Option<&'static str> {
    fn sorted(text: &str) -> Vec<&str> {
        let mut states: Vec<&str> = text.split(',').collect();
        states.sort_unstable();
        states
    }
    let wanted = sorted(list);
    CTSTATES.into_iter().find(|known| sorted(known) == wanted)
}

/// Targets that are not chains, whatever a table declares.
const BUILTIN_TARGETS: [&str; 7] = [
    "ACCEPT",
    "DROP",
    "REJECT",
    "RETURN",
    "DNAT",
    "MARK",
    "MASQUERADE",
];

/// `-j NAME OPTIONS…`.
fn parse_target(
    name: &str,
    options: &[&str],
    family: IpFamily,
    is_chain: &dyn Fn(&str) -> bool,
) -> Result<Target, String> {
    let unexpected = || Err(format!("-j {name} {}", options.join(" ")));
    let target = match (name, options) {
        ("ACCEPT", []) => Target::Accept,
        ("DROP", []) => Target::Drop,
        ("RETURN", []) => Target::Return,
        ("REJECT", []) => Target::Reject,
        ("REJECT", ["--reject-with", with]) => {
            let default = match family {
                IpFamily::V4 => "icmp-port-unreachable",
                IpFamily::V6 => "icmp6-port-unreachable",
            };
            if *with != default {
                return unexpected();
            }
            Target::Reject
        }
        ("DNAT", ["--to-destination", to]) => {
            let to: SocketAddr = to.parse().map_err(|_| format!("DNAT to {to:?}"))?;
            if IpFamily::of(&to.ip()) != family {
                return Err(format!("DNAT to {to} in an {family} table"));
            }
            Target::Dnat(to)
        }
        ("MARK", ["--set-xmark", value]) => {
            let (bits, mask) = value.split_once('/').ok_or(format!("MARK {value}"))?;
            match (parse_mark(bits), parse_mark(mask)) {
                // (mark & ~mask) ^ bits: with mask = bits an or, with mask 0 an xor.
                (Some(b), Some(m)) if b == m => Target::MarkOr(Arc::from(bits)),
                (Some(_), Some(0)) => Target::MarkXor(Arc::from(bits)),
                _ => return unexpected(),
            }
        }
        ("MARK", ["--or-mark", bits]) if parse_mark(bits).is_some() => {
            Target::MarkOr(Arc::from(*bits))
        }
        ("MARK", ["--xor-mark", bits]) if parse_mark(bits).is_some() => {
            Target::MarkXor(Arc::from(*bits))
        }
        ("MASQUERADE", []) => Target::Masquerade {
            random_fully: false,
        },
        ("MASQUERADE", ["--random-fully"]) => Target::Masquerade { random_fully: true },
        (chain, []) if is_chain(chain) && !BUILTIN_TARGETS.contains(&chain) => {
            Target::Jump(ChainName::new(chain).ok_or(format!("chain name {chain:?}"))?)
        }
        _ => return unexpected(),
    };
    Ok(target)
}

/// `-s`/`-d` operands: a host with its full mask is a host.
fn address(text: &str, family: IpFamily) -> Result<crate::iptables::Addr, String> {
    use crate::iptables::Addr;
    let addr = if text.contains('/') {
        let net: IpNet = text.parse().map_err(|_| format!("network {text:?}"))?;
        if net.prefix_len() == net.max_prefix_len() {
            Addr::Host(net.addr())
        } else {
            Addr::Net(net)
        }
    } else {
        Addr::Host(text.parse().map_err(|_| format!("address {text:?}"))?)
    };
    let ip = match addr {
        Addr::Host(ip) => ip,
        Addr::Net(net) => net.addr(),
    };
    if IpFamily::of(&ip) != family {
        return Err(format!("{text} in an {family} table"));
    }
    Ok(addr)
}

/// The words of a saved line: blanks separate them; a double-quoted word (iptables-save
/// quotes comments) may hold blanks and `\"` / `\\` escapes. Control characters are refused.
fn tokens(line: &str) -> Result<Vec<String>, String> {
    if line.chars().any(char::is_control) {
        return Err("a control character".into());
    }
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        let Some(&first) = chars.peek() else {
            break;
        };
        let mut word = String::new();
        if first == '"' {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("an unterminated quote".into()),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => word.push(c),
                        None => return Err("an unterminated quote".into()),
                    },
                    Some(c) => word.push(c),
                }
            }
            if chars.peek().is_some_and(|c| *c != ' ') {
                return Err("a quote inside a word".into());
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ' ' {
                    break;
                }
                if c == '"' {
                    return Err("a quote inside a word".into());
                }
                word.push(c);
                chars.next();
            }
        }
        out.push(word);
    }
    Ok(out)
}

/// Runs the save tool of the node's iptables backend (`choice`, detected for `Auto` the way
/// the syncer does) for `nat` and `filter` and reads what it prints.
pub fn read(family: IpFamily, choice: BackendChoice) -> anyhow::Result<SavedTables> {
    use anyhow::Context;
    let mut applier = SystemApplier::new(choice);
    let mut text = String::new();
    for table in ["nat", "filter"] {
        let program = applier.program(family, crate::sync::iptables::Tool::Save);
        let exit = applier
            .save(family, Some(table))
            .with_context(|| format!("cannot read the {table} table"))?;
        if !exit.success() {
            anyhow::bail!(
                "{program} -t {table} failed ({} backend): {}",
                applier.backend(),
                exit.stderr.trim()
            );
        }
        text.push_str(&exit.stdout);
    }
    Ok(read_save_text(&text, family))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iptables::{write_rule, Addr};

    fn chains(c: &str) -> bool {
        c.starts_with("KUBE-") || c == "DOCKER"
    }

    fn rule(line: &str) -> Result<Rule, String> {
        parse_save_rule(line, IpFamily::V4, &chains)
    }

    fn text(rule: &Rule) -> String {
        let mut out = String::new();
        write_rule(&mut out, rule);
        out
    }

    #[test]
    fn saved_forms_of_kproxys_rules_are_read() {
        let r = rule("-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment \"default/my-service:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-I37Z43XJW6BD4TLV").unwrap();
        assert_eq!(
            r.matches.as_slice(),
            &[
                Match::Destination {
                    addr: Addr::Host("172.30.0.41".parse().unwrap()),
                    negated: false
                },
                Match::Protocol(Protocol::Tcp),
                Match::Comment("default/my-service:http cluster IP".into()),
                Match::DestinationPort(80),
            ]
        );
        assert_eq!(
            r.target,
            Some(Target::Jump(ChainName::fixed("KUBE-SVC-I37Z43XJW6BD4TLV")))
        );
        let r = rule("-A KUBE-SVC-X -m comment --comment \"a -> b\" -m recent --rcheck --seconds 10000 --reap --name KUBE-SEP-Y --mask 255.255.255.255 --rsource -j KUBE-SEP-Y").unwrap();
        assert_eq!(
            r.matches[1],
            Match::Recent {
                list: ChainName::fixed("KUBE-SEP-Y"),
                check: RecentCheck::SeenWithin(10000)
            }
        );
        let r = rule("-A KUBE-SEP-Y -p tcp -m comment --comment x -m recent --set --name KUBE-SEP-Y --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.244.3.9:80").unwrap();
        assert_eq!(
            text(&r),
            " -m tcp -p tcp -m comment --comment x -m recent --name KUBE-SEP-Y --set -j DNAT --to-destination 10.244.3.9:80"
        );
        let r = rule(
            "-A KUBE-SVC-X -m statistic --mode random --probability 0.33333333349 -j KUBE-SEP-Y",
        )
        .unwrap();
        assert_eq!(r.matches[0], Match::RandomProbability(0.33333333349));
        assert_eq!(
            rule("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000")
                .unwrap()
                .target,
            Some(Target::MarkOr("0x4000".into()))
        );
        assert_eq!(
            rule("-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0")
                .unwrap()
                .target,
            Some(Target::MarkXor("0x4000".into()))
        );
        assert_eq!(
            rule("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN")
                .unwrap()
                .matches[0],
            Match::Mark {
                mark: "0x4000".into(),
                negated: true
            }
        );
        let r = rule("-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP").unwrap();
        assert_eq!(
            r.matches[3],
            Match::ConntrackState {
                states: "RELATED,ESTABLISHED,DNAT",
                negated: true
            }
        );
        // Any order of the states.
        assert!(matches!(
            rule("-A KUBE-FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT")
                .unwrap()
                .matches[0],
            Match::ConntrackState {
                states: "RELATED,ESTABLISHED",
                ..
            }
        ));
        assert_eq!(
            rule("-A KUBE-SERVICES -d 172.30.0.60/32 -p tcp -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable").unwrap().target,
            Some(Target::Reject)
        );
        assert_eq!(
            rule("-A KUBE-POSTROUTING -j MASQUERADE --random-fully")
                .unwrap()
                .target,
            Some(Target::Masquerade { random_fully: true })
        );
        let r =
            rule("-A KUBE-FW-X -m comment --comment \"other traffic will be dropped\"").unwrap();
        assert_eq!(r.target, None);
        let r = parse_save_rule(
            "-A KUBE-SEP-Y -s fd00:244::7/128 -p tcp -m recent --set --name KUBE-SEP-Y --mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff --rsource -m tcp -j DNAT --to-destination [fd00:244::7]:80",
            IpFamily::V6,
            &chains,
        )
        .unwrap();
        assert_eq!(
            r.matches[0],
            Match::Source {
                addr: Addr::Host("fd00:244::7".parse().unwrap()),
                negated: false
            }
        );
        assert_eq!(
            r.target,
            Some(Target::Dnat("[fd00:244::7]:80".parse().unwrap()))
        );
    }

    #[test]
    fn comments_keep_escaped_quotes() {
        let r = rule(r#"-A KUBE-X -m comment --comment "say \"hi\" \\ there" -j ACCEPT"#).unwrap();
        assert_eq!(r.matches[0], Match::Comment("say \"hi\" \\ there".into()));
    }

    /// A line understood only in part is refused as a whole, naming what was not understood.
    #[test]
    fn partly_understood_lines_are_refused() {
        let refused = [
            ("-A FORWARD -o docker0 -j DOCKER", "-o"),
            ("-A DOCKER -d 172.17.0.2/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport 80 -j ACCEPT", "-i"),
            ("-A KUBE-X -p tcp -m tcp --dport 80:90 -j ACCEPT", "80:90"),
            ("-A KUBE-X -p tcp -m tcp ! --dport 80 -j ACCEPT", "! --dport"),
            ("-A KUBE-X -p tcp -m tcp --dport 80 --tcp-flags SYN SYN -j ACCEPT", "tcp-flags"),
            ("-A KUBE-X -p tcp -m multiport --dports 80,443 -j ACCEPT", "multiport"),
            ("-A KUBE-X -m udp -p udp --dport 53 -j ACCEPT", "without -p"),
            ("-A KUBE-X -m recent --rcheck --seconds 10 --reap --name L --mask 255.255.255.0 --rsource -j ACCEPT", "--mask 255.255.255.0"),
            ("-A KUBE-X -m recent --rcheck --seconds 10 --reap --hitcount 2 --name L -j ACCEPT", "--hitcount"),
            ("-A KUBE-X -m recent --rcheck --name L --rsource -j ACCEPT", "only --set"),
            ("-A KUBE-X -m recent --update --seconds 10 --name L -j ACCEPT", "--update"),
            ("-A KUBE-X -m recent --set --name L --rdest -j ACCEPT", "--rdest"),
            ("-A KUBE-X -m statistic --mode nth --every 2 --packet 0 -j ACCEPT", "--mode nth"),
            ("-A KUBE-X -m mark --mark 0x1 -j ACCEPT", "without a mask"),
            ("-A KUBE-X -m mark --mark 0x4000/0xffff -j ACCEPT", "only M/M"),
            ("-A KUBE-X -m conntrack --ctstate NEW,ESTABLISHED -j ACCEPT", "conntrack states"),
            ("-A KUBE-X -m conntrack --ctstatus DNAT -j ACCEPT", "--ctstatus"),
            ("-A KUBE-X -m addrtype --dst-type LOCAL --limit-iface-in -j ACCEPT", "limit-iface-in"),
            ("-A KUBE-X -m addrtype ! --dst-type LOCAL -j ACCEPT", "! --dst-type"),
            ("-A KUBE-X -j REJECT --reject-with tcp-reset", "tcp-reset"),
            ("-A KUBE-X -j DNAT --to-destination 10.0.0.1", "DNAT to"),
            ("-A KUBE-X -j DNAT --to-destination 10.0.0.1:80 --random", "--random"),
            ("-A KUBE-X -j MARK --set-xmark 0x4000/0xffff", "MARK"),
            ("-A KUBE-X -j MASQUERADE --to-ports 1000", "--to-ports"),
            ("-A KUBE-X -j LOG --log-prefix x", "LOG"),
            ("-A KUBE-X -j NOTRACK", "NOTRACK"),
            ("-A KUBE-X -g KUBE-Y", "-g"),
            ("-A KUBE-X -s 10.0.0.0/8 -s", "without"),
            ("-A KUBE-X -d fd00::1/128 -j ACCEPT", "IPv4 table"),
            ("-A KUBE-X -m comment --comment \"open -j ACCEPT", "unterminated"),
            ("-A KUBE-X ! -j ACCEPT", "! -j"),
            ("-A KUBE-X -m comment -j ACCEPT", "without its option"),
            ("-A KUBE-X -j ACCEPT !", "-j ACCEPT !"),
            ("-A \"KUBE-X -> y\" -j ACCEPT", "a chain name in quotes"),
        ];
        for (line, why) in refused {
            match rule(line) {
                Ok(r) => panic!("{line} read as {r:?}"),
                Err(e) => assert!(e.contains(why), "{line}: {e} (wanted {why})"),
            }
        }
    }

    #[test]
    fn tables_policies_and_other_peoples_rules() {
        let text = "# Generated by iptables-save\n*mangle\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j MARK --set-xmark 0x1/0x1\nCOMMIT\n*filter\n:INPUT ACCEPT [10:20]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n:DOCKER - [0:0]\n:KUBE-FORWARD - [0:0]\n-A FORWARD -j KUBE-FORWARD\n-A FORWARD -o docker0 -j DOCKER\n-A DOCKER -j RETURN\nCOMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n-A STRAY -j ACCEPT\n";
        let saved = read_save_text(text, IpFamily::V4);
        let forward = saved.rules.chain(TableName::Filter, "FORWARD").unwrap();
        assert!(matches!(forward[0], Entry::Rule(_)));
        match &forward[1] {
            Entry::Uninterpreted(text) => {
                assert!(
                    text.starts_with("-A FORWARD -o docker0 -j DOCKER  ["),
                    "{text}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            saved
                .rules
                .chain(TableName::Filter, "DOCKER")
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            saved.rules.chain(TableName::Filter, "INPUT").unwrap().len(),
            0
        );
        assert!(saved.rules.chain(TableName::Nat, "PREROUTING").is_some());
        assert_eq!(saved.notes.len(), 1, "{:?}", saved.notes);
        assert!(saved.notes[0].contains("outside a table"));
        // FORWARD's DROP policy ends a packet that nothing accepted.
        use crate::model::Protocol;
        use crate::trace::{Origin, Probe};
        let probe = Probe {
            src: "10.0.0.9".parse().unwrap(),
            dst: "10.1.0.1:80".parse().unwrap(),
            protocol: Protocol::Tcp,
            origin: Origin::Outside,
        };
        let trace = crate::trace::trace(
            &saved.rules,
            &probe,
            &crate::trace::Host::default(),
            &Default::default(),
        );
        assert_eq!(trace.verdict, crate::trace::Verdict::Drop);
        assert!(!trace.uninterpreted.is_empty());
    }

    #[test]
    fn recent_seconds_are_gathered_per_list() {
        let text = "*nat\n:KUBE-SVC-X - [0:0]\n:KUBE-SEP-A - [0:0]\n-A KUBE-SVC-X -m recent --rcheck --seconds 300 --reap --name KUBE-SEP-A --mask 255.255.255.255 --rsource -j KUBE-SEP-A\n-A KUBE-SEP-A -m recent --set --name KUBE-SEP-A --mask 255.255.255.255 --rsource -j ACCEPT\nCOMMIT\n";
        let saved = read_save_text(text, IpFamily::V4);
        assert_eq!(saved.recent_seconds.get("KUBE-SEP-A"), Some(&300));
        assert_eq!(saved.rules.recent_lists(), vec!["KUBE-SEP-A".to_string()]);
    }
}
