//! `iptables-restore` text back into a typed [`Ruleset`]: the inverse of [`super::render`],
//! for the rules kproxy writes (the tracer reads rendered and live rules with it). Anything
//! outside that vocabulary is an error naming the line and the words not understood — never
//! skipped, so a walker over the result sees every rule the text holds.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use super::ruleset::{
    Addr, AddrType, Chain, ChainName, Match, Matches, RecentCheck, Rule, Ruleset, Table, TableName,
    Target,
};
use super::translate::{NFACCT_INVALID_DROPPED, NFACCT_LOCALHOST_NODEPORTS};
use crate::family::IpFamily;
use crate::model::Protocol;
use crate::rule_words::words;

/// Restore text kproxy would not have written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}: {text:?}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
    pub text: String,
}

/// The conntrack state lists kproxy writes (`NEW` in its jump rules); the rule type keeps them
/// as static text.
const CTSTATES: [&str; 4] = [
    "NEW",
    "INVALID",
    "RELATED,ESTABLISHED",
    "RELATED,ESTABLISHED,DNAT",
];

impl Ruleset {
    /// Reads `iptables-restore` input of one family holding the `filter` and `nat` tables,
    /// as [`Ruleset::to_restore_text`] writes it (`#` lines are skipped).
    pub fn from_restore_text(text: &str, family: IpFamily) -> Result<Ruleset, ParseError> {
        let mut filter = Table {
            name: TableName::Filter,
            chains: Vec::new(),
        };
        let mut nat = Table {
            name: TableName::Nat,
            chains: Vec::new(),
        };
        let mut current: Option<TableName> = None;
        let mut seen: Vec<TableName> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let error = |message: &str| ParseError {
                line: index + 1,
                message: message.to_string(),
                text: line.to_string(),
            };
            let table = match current {
                Some(TableName::Filter) => &mut filter,
                Some(TableName::Nat) => &mut nat,
                None => &mut filter,
            };
            if line.is_empty() || line.starts_with('#') {
                continue;
            } else if line.chars().any(char::is_control) {
                return Err(error("a control character"));
            } else if let Some(name) = line.strip_prefix('*') {
                let name = match name {
                    "filter" => TableName::Filter,
                    "nat" => TableName::Nat,
                    _ => return Err(error("a table kproxy does not write")),
                };
                if seen.contains(&name) || current.is_some() {
                    return Err(error("a table twice, or inside another"));
                }
                seen.push(name);
                current = Some(name);
            } else if line == "COMMIT" {
                current = None;
            } else if current.is_none() {
                return Err(error("outside a table"));
            } else if let Some(declaration) = line.strip_prefix(':') {
                let name = declaration
                    .split(' ')
                    .next()
                    .and_then(ChainName::new)
                    .ok_or_else(|| error("not a chain declaration"))?;
                if table.chains.iter().any(|c| c.name == name) {
                    return Err(error("a chain declared twice"));
                }
                table.chains.push(Chain::new(name, 0));
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let (chain, rule) = parse_rule(rule).map_err(|message| error(&message))?;
                let declared = table
                    .chains
                    .iter_mut()
                    .find(|c| c.name == chain)
                    .ok_or_else(|| error("a rule of an undeclared chain"))?;
                declared.push(rule);
            } else {
                return Err(error("not a restore command kproxy writes"));
            }
        }
        Ok(Ruleset {
            family,
            filter,
            nat,
        })
    }
}

impl Rule {
    /// One rule line as kproxy writes it, `-A CHAIN match… [-j target…]`, with its chain.
    pub fn from_restore_line(line: &str) -> Result<(ChainName, Rule), String> {
        let rule = line.strip_prefix("-A ").ok_or("not an -A line")?;
        parse_rule(rule)
    }
}

/// `CHAIN match… [-j target…]` after `-A `.
fn parse_rule(text: &str) -> Result<(ChainName, Rule), String> {
    let words = words(text)?;
    let mut words = words.into_iter().peekable();
    let chain = words
        .next()
        .and_then(ChainName::new)
        .ok_or("no chain name")?;
    let mut matches = Matches::new();
    let mut target = None;
    let mut negated = false;
    while let Some(word) = words.next() {
        let mut next = |what: &str| words.next().ok_or(format!("{word} without {what}"));
        let negation = std::mem::take(&mut negated);
        if negation && !matches!(word, "-s" | "-d") {
            return Err(format!("! before {word}"));
        }
        match word {
            "!" => negated = true,
            "-s" | "-d" => {
                let addr = address(next("an address")?)?;
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
            "--dport" => {
                let port = next("a port")?;
                matches.push(Match::DestinationPort(
                    port.parse().map_err(|_| format!("port {port:?}"))?,
                ));
            }
            "-m" => {
                let module = next("a module")?;
                matches.push(match module {
                    "comment" => {
                        expect(next("--comment")?, "--comment")?;
                        match next("a comment")? {
                            "" => return Err("an empty comment".into()),
                            comment => Match::Comment(Arc::from(comment)),
                        }
                    }
                    "tcp" | "udp" | "sctp" => {
                        expect(next("-p")?, "-p")?;
                        expect(next("a protocol")?, module)?;
                        Match::Protocol(
                            Protocol::from_api(&module.to_uppercase()).ok_or("a protocol")?,
                        )
                    }
                    "addrtype" => match (next("--src-type or --dst-type")?, next("LOCAL")?) {
                        ("--src-type", "LOCAL") => Match::AddrType(AddrType::SourceLocal),
                        ("--dst-type", "LOCAL") => Match::AddrType(AddrType::DestinationLocal),
                        (option, value) => return Err(format!("addrtype {option} {value}")),
                    },
                    "recent" => {
                        expect(next("--name")?, "--name")?;
                        let list = ChainName::new(next("a list name")?).ok_or("a list name")?;
                        let check = match next("--set or --rcheck")? {
                            "--set" => RecentCheck::Set,
                            "--rcheck" => {
                                expect(next("--seconds")?, "--seconds")?;
                                let seconds = next("seconds")?;
                                let seconds = seconds
                                    .parse()
                                    .map_err(|_| format!("seconds {seconds:?}"))?;
                                expect(next("--reap")?, "--reap")?;
                                RecentCheck::SeenWithin(seconds)
                            }
                            other => return Err(format!("recent {other}")),
                        };
                        Match::Recent { list, check }
                    }
                    "statistic" => {
                        expect(next("--mode")?, "--mode")?;
                        expect(next("random")?, "random")?;
                        expect(next("--probability")?, "--probability")?;
                        let text = next("a probability")?;
                        // Exactly as kproxy prints it (10 decimals), so that it reads back
                        // to the same rule.
                        let p: f64 = text
                            .parse()
                            .ok()
                            .filter(|p: &f64| format!("{p:.10}") == text)
                            .ok_or(format!("probability {text:?}"))?;
                        Match::RandomProbability(p)
                    }
                    "mark" => {
                        let mut option = next("--mark")?;
                        let negated = option == "!";
                        if negated {
                            option = next("--mark")?;
                        }
                        expect(option, "--mark")?;
                        let value = next("a mark")?;
                        let (mark, mask) = value.split_once('/').ok_or("a mark/mask")?;
                        if mark != mask {
                            return Err(format!("mark {value} with another mask"));
                        }
                        Match::Mark {
                            mark: Arc::from(mark),
                            negated,
                        }
                    }
                    "conntrack" => {
                        let mut option = next("--ctstate")?;
                        let negated = option == "!";
                        if negated {
                            option = next("--ctstate")?;
                        }
                        expect(option, "--ctstate")?;
                        let states = next("states")?;
                        let states = CTSTATES
                            .into_iter()
                            .find(|s| *s == states)
                            .ok_or(format!("conntrack states {states}"))?;
                        Match::ConntrackState { states, negated }
                    }
                    "nfacct" => {
                        expect(next("--nfacct-name")?, "--nfacct-name")?;
                        let name = next("a counter")?;
                        Match::Nfacct(
                            [NFACCT_INVALID_DROPPED, NFACCT_LOCALHOST_NODEPORTS]
                                .into_iter()
                                .find(|n| *n == name)
                                .ok_or(format!("nfacct counter {name}"))?,
                        )
                    }
                    other => return Err(format!("match module {other}")),
                });
            }
            "-j" => {
                let name = next("a target")?;
                target = Some(match name {
                    "ACCEPT" => Target::Accept,
                    "DROP" => Target::Drop,
                    "REJECT" => Target::Reject,
                    "RETURN" => Target::Return,
                    "DNAT" => {
                        expect(next("--to-destination")?, "--to-destination")?;
                        let to = next("an address")?;
                        Target::Dnat(
                            to.parse::<SocketAddr>()
                                .map_err(|_| format!("DNAT to {to:?}"))?,
                        )
                    }
                    "MARK" => {
                        let option = next("--or-mark or --xor-mark")?;
                        let mark = Arc::from(next("a mark")?);
                        match option {
                            "--or-mark" => Target::MarkOr(mark),
                            "--xor-mark" => Target::MarkXor(mark),
                            other => return Err(format!("MARK {other}")),
                        }
                    }
                    "MASQUERADE" => {
                        let random_fully = words.peek() == Some(&"--random-fully");
                        if random_fully {
                            words.next();
                        }
                        Target::Masquerade { random_fully }
                    }
                    chain => Target::Jump(ChainName::new(chain).ok_or("a chain name")?),
                });
                if let Some(extra) = words.next() {
                    return Err(format!("{extra} after the target"));
                }
            }
            other => return Err(format!("option {other}")),
        }
    }
    if negated {
        return Err("a ! at the end".into());
    }
    Ok((chain, Rule { matches, target }))
}

fn expect(word: &str, wanted: &str) -> Result<(), String> {
    if word == wanted {
        Ok(())
    } else {
        Err(format!("{word} where {wanted} belongs"))
    }
}

fn address(text: &str) -> Result<Addr, String> {
    if text.contains('/') {
        text.parse::<IpNet>()
            .map(Addr::Net)
            .map_err(|_| format!("network {text:?}"))
    } else {
        text.parse::<IpAddr>()
            .map(Addr::Host)
            .map_err(|_| format!("address {text:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_what_render_writes() {
        let text = "*filter\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -m comment --comment \"ns/a:p has no endpoints\" -m tcp -p tcp -d 10.0.0.1 --dport 80 -j REJECT\nCOMMIT\n*nat\n:KUBE-SVC-X - [0:0]\n:KUBE-SEP-Y - [0:0]\n-A KUBE-SVC-X -m recent --name KUBE-SEP-Y --rcheck --seconds 10000 --reap -j KUBE-SEP-Y\n-A KUBE-SVC-X -m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-Y\n-A KUBE-SEP-Y -m mark ! --mark 0x00004000/0x00004000 ! -s 10.244.0.0/16 -j MARK --or-mark 0x00004000\n-A KUBE-SEP-Y -m recent --name KUBE-SEP-Y --set -m tcp -p tcp -j DNAT --to-destination 10.244.1.5:80\nCOMMIT\n";
        let ruleset = Ruleset::from_restore_text(text, IpFamily::V4).expect("parses");
        assert_eq!(ruleset.filter.chains.len(), 1);
        assert_eq!(ruleset.nat.chains[1].rules.len(), 2);
        assert_eq!(ruleset.to_restore_text(), text);
    }

    #[test]
    fn refuses_what_it_does_not_know_naming_the_line() {
        let text = "*filter\n:KUBE-X - [0:0]\n-A KUBE-X -m physdev --physdev-is-bridged -j ACCEPT\nCOMMIT\n";
        let err = Ruleset::from_restore_text(text, IpFamily::V4).unwrap_err();
        assert_eq!(err.line, 3);
        assert!(err.message.contains("physdev"), "{err}");
        let text = "*filter\n-A KUBE-X -j ACCEPT\nCOMMIT\n";
        assert!(Ruleset::from_restore_text(text, IpFamily::V4).is_err());
        let text = "*filter\n:KUBE-X - [0:0]\n-A KUBE-X ! --dport 80 -j ACCEPT\nCOMMIT\n";
        assert!(Ruleset::from_restore_text(text, IpFamily::V4).is_err());
        let text = "*mangle\nCOMMIT\n";
        assert!(Ruleset::from_restore_text(text, IpFamily::V4).is_err());
    }
}
