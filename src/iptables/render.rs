//! The one place where typed iptables rules become `iptables-restore` text.

use super::ruleset::{
    Addr, AddrType, Chain, ChainName, Match, RecentCheck, Rule, Ruleset, Table, Target,
};
use crate::text::{push_ip, push_socket, push_u32};

impl Ruleset {
    /// `iptables-restore` input (or `ip6tables-restore` for IPv6): every table, every chain
    /// declared, then the rules chain by chain.
    pub fn to_restore_text(&self) -> String {
        let mut out = String::with_capacity(self.estimated_len());
        for table in self.tables() {
            write_table(&mut out, table);
        }
        out
    }

    fn estimated_len(&self) -> usize {
        self.tables()
            .iter()
            .map(|t| {
                t.chains
                    .iter()
                    .map(|c| 48 + c.rules.len() * 128)
                    .sum::<usize>()
            })
            .sum()
    }
}

fn write_table(out: &mut String, table: &Table) {
    out.push('*');
    out.push_str(table.name.as_str());
    out.push('\n');
    for chain in &table.chains {
        out.push(':');
        out.push_str(&chain.name);
        out.push_str(" - [0:0]\n");
    }
    // Rules are rendered in parallel chunks of chains, joined in order.
    let parts = crate::parallel::map_chunks(&table.chains, |chains| {
        let mut part = String::with_capacity(chains.iter().map(|c| c.rules.len() * 128).sum());
        for chain in chains {
            write_chain_rules(&mut part, chain);
        }
        part
    });
    for part in parts {
        out.push_str(&part);
    }
    out.push_str("COMMIT\n");
}

fn write_chain_rules(out: &mut String, chain: &Chain) {
    for rule in chain.rules.iter() {
        out.push_str("-A ");
        out.push_str(&chain.name);
        write_rule(out, rule);
        out.push('\n');
    }
}

/// The rules a chain is rewritten with in a [`TablePatch`].
#[derive(Debug, Clone, Copy)]
pub enum ChainContent<'a> {
    /// Typed rules, rendered here.
    Rules(&'a Chain),
    /// Rule lines as `iptables-save` printed them (`-A NAME …`), written back unchanged: a
    /// rollback to what the kernel held before kproxy knew it (spec §4.11, failure).
    Saved {
        name: ChainName,
        lines: &'a [String],
    },
}

impl ChainContent<'_> {
    pub fn name(&self) -> ChainName {
        match self {
            ChainContent::Rules(chain) => chain.name,
            ChainContent::Saved { name, .. } => *name,
        }
    }

    fn len(&self) -> usize {
        match self {
            ChainContent::Rules(chain) => chain.rules.len(),
            ChainContent::Saved { lines, .. } => lines.len(),
        }
    }
}

/// One table's part of an `iptables-restore --noflush` payload (spec §4.11). Under
/// `--noflush` only declared chains are flushed, so a chain left out stays as it is.
#[derive(Debug, Clone, Default)]
pub struct TablePatch<'a> {
    /// `filter`, `nat` or `mangle`.
    pub table: &'static str,
    /// Declared, then rewritten with these rules.
    pub write: Vec<ChainContent<'a>>,
    /// Declared only: created if missing, emptied if not (canaries, retired chains).
    pub flush: Vec<ChainName>,
    /// Declared (which empties them) and deleted with `-X` in the same commit: stale chains.
    pub delete: Vec<ChainName>,
}

impl TablePatch<'_> {
    /// Nothing to send for this table.
    pub fn is_empty(&self) -> bool {
        self.write.is_empty() && self.flush.is_empty() && self.delete.is_empty()
    }
}

/// A rendered restore payload and where each table's commit is, to map the line number
/// `iptables-restore` names in an error back to a table.
#[derive(Debug, Clone, Default)]
pub struct RestorePayload {
    pub text: String,
    /// Number of lines: the objects sent.
    pub lines: usize,
    /// `(table, line of its COMMIT)`, 1-based, in payload order.
    pub commits: Vec<(&'static str, usize)>,
}

impl RestorePayload {
    /// The table a 1-based payload line belongs to.
    pub fn table_of_line(&self, line: usize) -> Option<&'static str> {
        self.commits
            .iter()
            .find(|(_, commit)| line <= *commit)
            .map(|(table, _)| *table)
    }

    /// The text of a 1-based payload line.
    pub fn line(&self, line: usize) -> Option<&str> {
        line.checked_sub(1).and_then(|i| self.text.lines().nth(i))
    }
}

/// Renders a `--noflush` payload: per table, the declarations (written, flushed, then stale
/// chains), the rules of the written chains in order, the `-X` lines, `COMMIT`. Empty patches
/// are left out. Spec §4.11.
pub fn restore_payload(patches: &[TablePatch<'_>]) -> RestorePayload {
    let mut payload = RestorePayload {
        text: String::with_capacity(
            patches
                .iter()
                .flat_map(|p| &p.write)
                .map(|c| 48 + c.len() * 128)
                .sum::<usize>()
                + 64,
        ),
        ..RestorePayload::default()
    };
    for patch in patches.iter().filter(|p| !p.is_empty()) {
        let out = &mut payload.text;
        out.push('*');
        out.push_str(patch.table);
        out.push('\n');
        let declared = patch
            .write
            .iter()
            .map(ChainContent::name)
            .chain(patch.flush.iter().copied())
            .chain(patch.delete.iter().copied());
        for name in declared {
            out.push(':');
            out.push_str(&name);
            out.push_str(" - [0:0]\n");
        }
        let parts = crate::parallel::map_chunks(&patch.write, |chains| {
            let mut part = String::with_capacity(chains.iter().map(|c| c.len() * 128).sum());
            for chain in chains {
                match chain {
                    ChainContent::Rules(chain) => write_chain_rules(&mut part, chain),
                    ChainContent::Saved { lines, .. } => {
                        for line in *lines {
                            part.push_str(line);
                            part.push('\n');
                        }
                    }
                }
            }
            part
        });
        for part in parts {
            out.push_str(&part);
        }
        for name in &patch.delete {
            out.push_str("-X ");
            out.push_str(name);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
        let rules: usize = patch.write.iter().map(ChainContent::len).sum();
        payload.lines += 2 + patch.write.len() + patch.flush.len() + 2 * patch.delete.len() + rules;
        payload.commits.push((patch.table, payload.lines));
    }
    payload
}

/// Writes the part of a rule after `-A CHAIN`, each piece preceded by a space.
pub fn write_rule(out: &mut String, rule: &Rule) {
    for m in &rule.matches {
        write_match(out, m);
    }
    if let Some(target) = &rule.target {
        write_target(out, target);
    }
}

fn push_not(out: &mut String, negated: bool) {
    if negated {
        out.push_str(" !");
    }
}

fn push_addr(out: &mut String, addr: &Addr) {
    match addr {
        Addr::Host(ip) => push_ip(out, *ip),
        Addr::Net(net) => {
            push_ip(out, net.addr());
            out.push('/');
            push_u32(out, net.prefix_len().into());
        }
    }
}

fn write_match(out: &mut String, m: &Match) {
    match m {
        Match::Comment(text) => {
            // iptables-restore splits on blanks; names are validated, so a space is the only
            // character that needs quoting.
            out.push_str(" -m comment --comment ");
            if text.contains(' ') {
                out.push('"');
                out.push_str(text);
                out.push('"');
            } else {
                out.push_str(text);
            }
        }
        Match::Protocol(p) => {
            out.push_str(" -m ");
            out.push_str(p.lower());
            out.push_str(" -p ");
            out.push_str(p.lower());
        }
        Match::Source { addr, negated } => {
            push_not(out, *negated);
            out.push_str(" -s ");
            push_addr(out, addr);
        }
        Match::Destination { addr, negated } => {
            push_not(out, *negated);
            out.push_str(" -d ");
            push_addr(out, addr);
        }
        Match::DestinationPort(port) => {
            out.push_str(" --dport ");
            push_u32(out, (*port).into());
        }
        Match::AddrType(AddrType::SourceLocal) => out.push_str(" -m addrtype --src-type LOCAL"),
        Match::AddrType(AddrType::DestinationLocal) => {
            out.push_str(" -m addrtype --dst-type LOCAL")
        }
        Match::Recent { list, check } => {
            out.push_str(" -m recent --name ");
            out.push_str(list);
            match check {
                RecentCheck::Set => out.push_str(" --set"),
                RecentCheck::SeenWithin(seconds) => {
                    out.push_str(" --rcheck --seconds ");
                    push_u32(out, *seconds);
                    out.push_str(" --reap");
                }
            }
        }
        Match::RandomProbability(p) => {
            // Go's %0.10f: correctly rounded, ties to even, as Rust's fixed precision is.
            out.push_str(&format!(
                " -m statistic --mode random --probability {p:.10}"
            ));
        }
        Match::Mark { mark, negated } => {
            out.push_str(" -m mark");
            push_not(out, *negated);
            out.push_str(" --mark ");
            out.push_str(mark);
            out.push('/');
            out.push_str(mark);
        }
        Match::ConntrackState { states, negated } => {
            out.push_str(" -m conntrack");
            push_not(out, *negated);
            out.push_str(" --ctstate ");
            out.push_str(states);
        }
        Match::Nfacct(name) => {
            out.push_str(" -m nfacct --nfacct-name ");
            out.push_str(name);
        }
    }
}

fn write_target(out: &mut String, target: &Target) {
    match target {
        Target::Jump(chain) => {
            out.push_str(" -j ");
            out.push_str(chain);
        }
        Target::Accept => out.push_str(" -j ACCEPT"),
        Target::Drop => out.push_str(" -j DROP"),
        Target::Reject => out.push_str(" -j REJECT"),
        Target::Return => out.push_str(" -j RETURN"),
        Target::Dnat(addr) => {
            out.push_str(" -j DNAT --to-destination ");
            push_socket(out, *addr);
        }
        Target::MarkOr(mark) => {
            out.push_str(" -j MARK --or-mark ");
            out.push_str(mark);
        }
        Target::MarkXor(mark) => {
            out.push_str(" -j MARK --xor-mark ");
            out.push_str(mark);
        }
        Target::Masquerade { random_fully } => {
            out.push_str(" -j MASQUERADE");
            if *random_fully {
                out.push_str(" --random-fully");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probability_has_ten_decimals_rounded_like_go() {
        let text = |p: f64| {
            let mut s = String::new();
            write_match(&mut s, &Match::RandomProbability(p));
            s.rsplit(' ').next().unwrap().to_string()
        };
        assert_eq!(text(1.0 / 2.0), "0.5000000000");
        assert_eq!(text(1.0 / 3.0), "0.3333333333");
        assert_eq!(text(1.0 / 7.0), "0.1428571429");
        // An exact tie at the 11th decimal: Go's strconv rounds half to even.
        assert_eq!(text(1.0 / 2048.0), "0.0004882812");
    }

    #[test]
    fn payload_counts_lines_and_commits() {
        let chain = Chain {
            name: ChainName::fixed("KUBE-SERVICES"),
            rules: std::sync::Arc::new(vec![Rule::new(Default::default(), Target::Return)]),
        };
        let saved = vec!["-A KUBE-FORWARD -j ACCEPT".to_string()];
        let patches = [
            TablePatch {
                table: "filter",
                write: vec![ChainContent::Saved {
                    name: ChainName::fixed("KUBE-FORWARD"),
                    lines: &saved,
                }],
                ..TablePatch::default()
            },
            TablePatch {
                table: "mangle",
                ..TablePatch::default()
            },
            TablePatch {
                table: "nat",
                write: vec![ChainContent::Rules(&chain)],
                flush: vec![ChainName::fixed("KUBE-PROXY-CANARY")],
                delete: vec![ChainName::fixed("KUBE-SEP-X")],
            },
        ];
        let payload = restore_payload(&patches);
        assert_eq!(
            payload.text,
            "*filter\n:KUBE-FORWARD - [0:0]\n-A KUBE-FORWARD -j ACCEPT\nCOMMIT\n\
             *nat\n:KUBE-SERVICES - [0:0]\n:KUBE-PROXY-CANARY - [0:0]\n:KUBE-SEP-X - [0:0]\n\
             -A KUBE-SERVICES -j RETURN\n-X KUBE-SEP-X\nCOMMIT\n"
        );
        assert_eq!(payload.lines, payload.text.lines().count());
        assert_eq!(payload.commits, vec![("filter", 4), ("nat", 11)]);
        assert_eq!(payload.table_of_line(5), Some("nat"));
        assert_eq!(payload.line(9), Some("-A KUBE-SERVICES -j RETURN"));
        assert_eq!(payload.table_of_line(12), None);
    }
}
