//! The one place where typed iptables rules become `iptables-restore` text.

use super::ruleset::{Addr, AddrType, Chain, Match, RecentCheck, Rule, Ruleset, Table, Target};
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
    for rule in &chain.rules {
        out.push_str("-A ");
        out.push_str(&chain.name);
        write_rule(out, rule);
        out.push('\n');
    }
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
}
