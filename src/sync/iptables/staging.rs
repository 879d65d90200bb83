//! The order of the commits of one iptables sync, so that a sync interrupted between them
//! (`kill -9`, a node losing power, a refused later table) never leaves a state that drops or
//! rejects traffic that the old rules or the new rules would have carried.
//!
//! # The half states
//!
//! `iptables-restore` commits table by table, so a sync that writes `filter` and `nat` passes
//! through a state where one table is new and the other old. What either table does to a
//! packet depends on the other:
//!
//! * nat's DNAT (PREROUTING, OUTPUT) comes before filter (INPUT, FORWARD, OUTPUT), and
//!   filter's REJECT/DROP rules match the *original* destination of a Service (cluster IP,
//!   external IP, LB IP, NodePort: `KUBE-SERVICES`, `KUBE-EXTERNAL-SERVICES`,
//!   `KUBE-PROXY-FIREWALL`, kube-proxy-rules.md §4.9, §4.2). So they only ever see packets
//!   nat did *not* DNAT: a packet is carried when nat DNATs it, whatever filter's rejects say,
//!   and one nat did not DNAT is rejected or dropped if filter has a rule for it.
//! * filter's ACCEPT rules (`KUBE-FORWARD` for packets carrying the masquerade mark and for
//!   replies, `KUBE-NODEPORTS` for health-check ports) carry what nat prepared, where the
//!   built-in chain's policy would drop it (a FORWARD policy of DROP is common).
//!
//! Writing filter first (new filter, old nat) breaks when the new filter drops traffic the
//! new nat would DNAT but the old does not (a new Service with externalTrafficPolicy Local and
//! no local endpoints: its DROP catches what only the new nat short-circuits; a new LB IP with
//! loadBalancerSourceRanges: the new `KUBE-PROXY-FIREWALL` drop catches the allowed sources
//! the old nat does not DNAT yet), and when it removes an ACCEPT the old nat still needs (the
//! masquerade bit changes: the old nat marks with the old bit, the new `KUBE-FORWARD` accepts
//! only the new one). Writing nat first (old filter, new nat) breaks the other way round: the
//! old filter drops what only the old nat carried (a Service with externalTrafficPolicy Local
//! and no local endpoints, or with source ranges, is removed: its old DROP now catches the
//! pods' and the allowed sources' traffic no nat DNATs), or lacks an ACCEPT the new nat needs
//! (the new masquerade bit). Transitions that only add rejects (a Service loses its endpoints,
//! gains source ranges) drop nothing in either order, and so do those that only remove them
//! (a Service gains endpoints, loses source ranges, is removed), as long as the rest of the
//! table does not change the other way — the harm comes from one table dropping, or failing
//! to accept, what the *other* table's version prepared.
//!
//! # The order chosen
//!
//! In terms of filter's rules, with blocking rules (REJECT, DROP) and passing ones (ACCEPT,
//! RETURN) compared between the filter table kproxy leaves and the one it writes:
//!
//! * the new filter blocks nothing the old did not and accepts everything the old did: filter
//!   first, then nat (the half state blocks no more than the old state and accepts at least
//!   what it did);
//! * the new filter blocks everything the old did and accepts nothing more: nat first, then
//!   filter (the half state blocks no more than the new state);
//! * otherwise three commits: an intermediate filter that keeps only the blocking rules both
//!   tables have and every passing rule of either, then nat, then the new filter. The first
//!   half state blocks a subset of what the old state blocks, the second a subset of what the
//!   new state blocks, and both accept what either accepts.
//!
//! Every half state then drops or rejects only packets that the full state with the same nat
//! table (the old one before nat is committed, the new one after) drops or rejects too, and in
//! the staged order only by a rule the old and the new filter both have: traffic that only the
//! old or only the new rules reject is never rejected half-way. The price: between the commits, traffic that
//! both states reject may briefly go unrejected (it is not DNATed, so it goes where routing
//! sends it, never to a Service's endpoints). A sync whose filter changes only one way costs no
//! extra commit; IPv4 and IPv6 are separate restores with the same reasoning.
//!
//! Rules are compared by their matches and target, insensitive to the way `iptables-save`
//! re-prints a rule kproxy wrote (option order, `/32`, `--reject-with` defaults). A rule that
//! still compares unequal only makes the intermediate filter block less, which keeps it safe.

use rustc_hash::FxHashSet;

use crate::iptables::{write_rule, Chain, ChainName, Table};
use crate::rule_words::arguments;

/// One filter chain as rule lines (`-A NAME …`), as kproxy renders them or as a save shows
/// them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLines {
    pub name: ChainName,
    pub lines: Vec<String>,
}

impl ChainLines {
    /// A typed chain, rendered.
    pub fn rendered(chain: &Chain) -> ChainLines {
        ChainLines {
            name: chain.name,
            lines: chain
                .rules
                .iter()
                .map(|rule| {
                    let mut line = format!("-A {}", chain.name);
                    write_rule(&mut line, rule);
                    line
                })
                .collect(),
        }
    }
}

/// Every chain of a typed table, rendered.
pub fn rendered(table: &Table) -> Vec<ChainLines> {
    table.chains.iter().map(ChainLines::rendered).collect()
}

/// In which order filter and nat are committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Order {
    FilterFirst,
    NatFirst,
    /// An intermediate filter, then nat, then the new filter.
    Staged(Vec<ChainLines>),
}

/// One argument in a comparable form: without quotes, host prefixes (`/32`, `/128`) and
/// leading zeros of hex numbers (`0x00004000` and `0x4000`).
fn normal_argument(arg: &str) -> String {
    let arg = arg.trim_matches('"');
    let arg = arg
        .strip_suffix("/32")
        .or_else(|| arg.strip_suffix("/128"))
        .unwrap_or(arg);
    arg.split('/')
        .map(|part| match part.strip_prefix("0x") {
            Some(hex) => match u64::from_str_radix(hex, 16) {
                Ok(n) => format!("{n:#x}"),
                Err(_) => part.to_string(),
            },
            None => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// A rule's identity for comparing: its options (an option with its values, `!` included),
/// sorted, without the chain and without defaults that `iptables-save` adds.
fn rule_key(line: &str) -> Vec<String> {
    let args = arguments(line);
    let mut options: Vec<String> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut negate = false;
    for arg in args.iter().skip(2) {
        if *arg == "!" {
            negate = true;
            continue;
        }
        if arg.starts_with('-') && !current.is_empty() {
            options.push(current.join(" "));
            current.clear();
        }
        if negate {
            current.push("!".into());
            negate = false;
        }
        current.push(normal_argument(arg));
    }
    if !current.is_empty() {
        options.push(current.join(" "));
    }
    options.retain(|o| {
        o != "--reject-with icmp-port-unreachable" && o != "--reject-with icmp6-port-unreachable"
    });
    options.sort();
    options
}

/// Whether a rule can end a packet's way (REJECT, DROP, a jump elsewhere), as opposed to
/// letting it go on or through (ACCEPT, RETURN, no target).
fn blocks(line: &str) -> bool {
    let args = arguments(line);
    match args
        .windows(2)
        .find(|pair| pair[0] == "-j" || pair[0] == "-g")
    {
        Some(pair) => !matches!(pair[1], "ACCEPT" | "RETURN"),
        None => false,
    }
}

/// How one chain changes: blocking and passing rules added and removed.
#[derive(Debug, Default)]
struct Change {
    blocks_added: bool,
    blocks_removed: bool,
    passes_added: bool,
    passes_removed: bool,
}

fn keys(lines: &[String]) -> Vec<Vec<String>> {
    lines.iter().map(|l| rule_key(l)).collect()
}

fn key_set(keys: &[Vec<String>]) -> FxHashSet<&Vec<String>> {
    keys.iter().collect()
}

/// The order for going from the filter table `old` to `new` (module docs). Chains missing on
/// one side count as empty there.
pub fn order(old: &[ChainLines], new: &[ChainLines]) -> Order {
    let mut change = Change::default();
    let mut names: Vec<ChainName> = new.iter().map(|c| c.name).collect();
    names.extend(
        old.iter()
            .map(|c| c.name)
            .filter(|n| !new.iter().any(|c| c.name == *n)),
    );
    let lines_of = |side: &[ChainLines], name: ChainName| -> Vec<String> {
        side.iter()
            .find(|c| c.name == name)
            .map(|c| c.lines.clone())
            .unwrap_or_default()
    };
    let mut staged = Vec::with_capacity(names.len());
    for name in names {
        let before = lines_of(old, name);
        let after = lines_of(new, name);
        let (before_keys, after_keys) = (keys(&before), keys(&after));
        let (before_set, after_set) = (key_set(&before_keys), key_set(&after_keys));
        // Passing rules only the new chain has go first: accepting earlier never blocks more.
        let mut lines: Vec<String> = Vec::new();
        for (line, key) in after.iter().zip(&after_keys) {
            let known = before_set.contains(key);
            match (blocks(line), known) {
                (true, false) => change.blocks_added = true,
                (false, false) => {
                    change.passes_added = true;
                    lines.push(line.clone());
                }
                _ => {}
            }
        }
        for (line, key) in before.iter().zip(&before_keys) {
            let kept = after_set.contains(key);
            match (blocks(line), kept) {
                (true, true) | (false, _) => lines.push(line.clone()),
                (true, false) => change.blocks_removed = true,
            }
            if !blocks(line) && !kept {
                change.passes_removed = true;
            }
        }
        staged.push(ChainLines { name, lines });
    }
    if !change.blocks_added && !change.passes_removed {
        Order::FilterFirst
    } else if !change.blocks_removed && !change.passes_added {
        Order::NatFirst
    } else {
        Order::Staged(staged)
    }
}

/// The sections of a restore payload, each up to and including its `COMMIT` line: what one
/// commit changes. For tests that interrupt a sync between two commits.
pub fn commit_sections(payload: &str) -> Vec<&str> {
    let mut sections = Vec::new();
    let mut start = 0;
    for (offset, line) in line_offsets(payload) {
        if line == "COMMIT" {
            let end = (offset + line.len() + 1).min(payload.len());
            sections.push(&payload[start..end]);
            start = end;
        }
    }
    sections
}

fn line_offsets(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut offset = 0;
    text.split_inclusive('\n').map(move |line| {
        let at = offset;
        offset += line.len();
        (at, line.trim_end_matches('\n'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(name: &str, lines: &[&str]) -> ChainLines {
        ChainLines {
            name: ChainName::new(name).expect("a chain name"),
            lines: lines.iter().map(|l| l.to_string()).collect(),
        }
    }

    const REJECT_API: &str = "-A KUBE-SERVICES -m comment --comment \"default/api:http has no endpoints\" -m tcp -p tcp -d 10.96.0.11 --dport 80 -j REJECT";
    const SAVED_REJECT_API: &str = "-A KUBE-SERVICES -d 10.96.0.11/32 -p tcp -m comment --comment \"default/api:http has no endpoints\" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable";
    const REJECT_WEB: &str = "-A KUBE-SERVICES -m comment --comment \"default/web:http has no endpoints\" -m tcp -p tcp -d 10.96.0.10 --dport 80 -j REJECT";
    const ACCEPT_OLD_MARK: &str = "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x00004000/0x00004000 -j ACCEPT";
    const SAVED_ACCEPT_OLD_MARK: &str = "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT";
    const ACCEPT_NEW_MARK: &str = "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x00008000/0x00008000 -j ACCEPT";

    #[test]
    fn a_saved_rule_compares_equal_to_the_rendered_one() {
        assert_eq!(rule_key(REJECT_API), rule_key(SAVED_REJECT_API));
        assert_eq!(rule_key(ACCEPT_OLD_MARK), rule_key(SAVED_ACCEPT_OLD_MARK));
        assert_ne!(rule_key(REJECT_API), rule_key(REJECT_WEB));
        assert_ne!(
            rule_key("-A X -m conntrack ! --ctstate NEW -j DROP"),
            rule_key("-A X -m conntrack --ctstate NEW -j DROP")
        );
    }

    #[test]
    fn only_removed_rejects_go_filter_first_only_added_ones_nat_first() {
        let both = [chain("KUBE-SERVICES", &[REJECT_API, REJECT_WEB])];
        let one = [chain("KUBE-SERVICES", &[SAVED_REJECT_API])];
        assert_eq!(order(&both, &one), Order::FilterFirst);
        assert_eq!(order(&one, &both), Order::NatFirst);
        assert_eq!(order(&one, &one), Order::FilterFirst);
    }

    #[test]
    fn rejects_both_ways_or_a_changed_accept_are_staged() {
        let api = [
            chain("KUBE-SERVICES", &[REJECT_API]),
            chain("KUBE-FORWARD", &[SAVED_ACCEPT_OLD_MARK]),
        ];
        let web = [
            chain("KUBE-SERVICES", &[REJECT_WEB]),
            chain("KUBE-FORWARD", &[ACCEPT_OLD_MARK]),
        ];
        let Order::Staged(mid) = order(&api, &web) else {
            panic!("not staged");
        };
        // Neither reject (each is only on one side), the accept once.
        assert_eq!(
            mid,
            vec![
                chain("KUBE-SERVICES", &[]),
                chain("KUBE-FORWARD", &[SAVED_ACCEPT_OLD_MARK]),
            ]
        );
        // The masquerade bit changes: both accepts in the middle, the new one first.
        let old = [chain("KUBE-FORWARD", &[ACCEPT_OLD_MARK])];
        let new = [chain("KUBE-FORWARD", &[ACCEPT_NEW_MARK])];
        assert_eq!(
            order(&old, &new),
            Order::Staged(vec![chain(
                "KUBE-FORWARD",
                &[ACCEPT_NEW_MARK, ACCEPT_OLD_MARK]
            )])
        );
    }

    #[test]
    fn sections_end_at_each_commit() {
        let payload = "*filter\n:A - [0:0]\nCOMMIT\n*nat\nCOMMIT\n*filter\n-A A -j DROP\nCOMMIT\n";
        assert_eq!(
            commit_sections(payload),
            vec![
                "*filter\n:A - [0:0]\nCOMMIT\n",
                "*nat\nCOMMIT\n",
                "*filter\n-A A -j DROP\nCOMMIT\n"
            ]
        );
        assert!(commit_sections("").is_empty());
    }
}
