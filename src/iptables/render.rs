//! The one place where typed iptables rules become `iptables-restore` text.

use std::fmt::{self, Write};

use super::ruleset::{Addr, AddrType, Match, RecentCheck, Rule, Ruleset, Table, Target};

impl Ruleset {
    /// `iptables-restore` input (or `ip6tables-restore` for IPv6): every table, every chain
    /// declared, then the rules chain by chain.
    pub fn to_restore_text(&self) -> String {
        let mut out = String::with_capacity(self.estimated_len());
        for table in self.tables() {
            // Writing into a String cannot fail.
            let _ = write_table(&mut out, table);
        }
        out
    }

    fn estimated_len(&self) -> usize {
        self.tables()
            .iter()
            .map(|t| {
                t.chains
                    .iter()
                    .map(|c| 40 + c.rules.len() * 130)
                    .sum::<usize>()
            })
            .sum()
    }
}

fn write_table(out: &mut String, table: &Table) -> fmt::Result {
    writeln!(out, "*{}", table.name.as_str())?;
    for chain in &table.chains {
        writeln!(out, ":{} - [0:0]", chain.name)?;
    }
    for chain in &table.chains {
        for rule in &chain.rules {
            write!(out, "-A {}", chain.name)?;
            write_rule(out, rule)?;
            out.push('\n');
        }
    }
    out.push_str("COMMIT\n");
    Ok(())
}

/// Writes the part of a rule after `-A CHAIN`, each piece preceded by a space.
pub fn write_rule(out: &mut String, rule: &Rule) -> fmt::Result {
    for m in &rule.matches {
        write_match(out, m)?;
    }
    if let Some(target) = &rule.target {
        write_target(out, target)?;
    }
    Ok(())
}

fn not(negated: bool) -> &'static str {
    if negated {
        " !"
    } else {
        ""
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Host(ip) => write!(f, "{ip}"),
            Addr::Net(net) => write!(f, "{net}"),
        }
    }
}

fn write_match(out: &mut String, m: &Match) -> fmt::Result {
    match m {
        Match::Comment(text) => {
            // iptables-restore splits on blanks; names are validated, so a space is the only
            // character that needs quoting.
            if text.contains(' ') {
                write!(out, " -m comment --comment \"{text}\"")
            } else {
                write!(out, " -m comment --comment {text}")
            }
        }
        Match::Protocol(p) => write!(out, " -m {0} -p {0}", p.lower()),
        Match::Source { addr, negated } => write!(out, "{} -s {addr}", not(*negated)),
        Match::Destination { addr, negated } => write!(out, "{} -d {addr}", not(*negated)),
        Match::DestinationPort(port) => write!(out, " --dport {port}"),
        Match::AddrType(AddrType::SourceLocal) => out.write_str(" -m addrtype --src-type LOCAL"),
        Match::AddrType(AddrType::DestinationLocal) => {
            out.write_str(" -m addrtype --dst-type LOCAL")
        }
        Match::Recent { list, check } => match check {
            RecentCheck::Set => write!(out, " -m recent --name {list} --set"),
            RecentCheck::SeenWithin(seconds) => write!(
                out,
                " -m recent --name {list} --rcheck --seconds {seconds} --reap"
            ),
        },
        Match::RandomProbability(p) => {
            write!(out, " -m statistic --mode random --probability {p:.10}")
        }
        Match::Mark { mark, negated } => {
            write!(out, " -m mark{} --mark {mark}/{mark}", not(*negated))
        }
        Match::ConntrackState { states, negated } => {
            write!(out, " -m conntrack{} --ctstate {states}", not(*negated))
        }
        Match::Nfacct(name) => write!(out, " -m nfacct --nfacct-name {name}"),
    }
}

fn write_target(out: &mut String, target: &Target) -> fmt::Result {
    match target {
        Target::Jump(chain) => write!(out, " -j {chain}"),
        Target::Accept => out.write_str(" -j ACCEPT"),
        Target::Drop => out.write_str(" -j DROP"),
        Target::Reject => out.write_str(" -j REJECT"),
        Target::Return => out.write_str(" -j RETURN"),
        Target::Dnat(addr) => write!(out, " -j DNAT --to-destination {addr}"),
        Target::MarkOr(mark) => write!(out, " -j MARK --or-mark {mark}"),
        Target::MarkXor(mark) => write!(out, " -j MARK --xor-mark {mark}"),
        Target::Masquerade { random_fully } => {
            out.write_str(" -j MASQUERADE")?;
            if *random_fully {
                out.write_str(" --random-fully")?;
            }
            Ok(())
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
            write_match(&mut s, &Match::RandomProbability(p)).unwrap();
            s.rsplit(' ').next().unwrap().to_string()
        };
        assert_eq!(text(1.0 / 2.0), "0.5000000000");
        assert_eq!(text(1.0 / 3.0), "0.3333333333");
        assert_eq!(text(1.0 / 7.0), "0.1428571429");
        // An exact tie at the 11th decimal: Go's strconv rounds half to even.
        assert_eq!(text(1.0 / 2048.0), "0.0004882812");
    }
}
