//! An `nft -f` script back into a typed [`Ruleset`]: the inverse of [`Ruleset::to_nft_script`],
//! for the objects kproxy writes (the tracer reads rendered rules with it). Anything outside
//! that vocabulary is an error naming the line and the words not understood — never skipped.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use super::ruleset::{
    BaseChain, Chain, ChainType, DataType, Direction, Element, ElementData, ElementKey,
    ElementValue, Field, Hook, Joining, Map, Match, Name, Rule, Ruleset, Set, SetFlag, Statement,
    Table, Value, Verdict,
};
use crate::family::IpFamily;
use crate::model::Protocol;
use crate::rule_words::words;

/// Script text kproxy would not have written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}: {text:?}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
    pub text: String,
}

impl Ruleset {
    /// Reads a script of `add` commands for one `kube-proxy` table, as
    /// [`Ruleset::to_nft_script`] writes it (`#` lines are skipped).
    pub fn from_nft_script(text: &str) -> Result<Ruleset, ParseError> {
        let mut ruleset: Option<Ruleset> = None;
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let error = |message: String| ParseError {
                line: index + 1,
                message,
                text: line.to_string(),
            };
            if line.chars().any(char::is_control) {
                return Err(error("a control character".into()));
            }
            let words = words(line).map_err(error)?;
            add_command(&mut ruleset, &words).map_err(error)?;
        }
        ruleset.ok_or(ParseError {
            line: 0,
            message: "no `add table` command".into(),
            text: String::new(),
        })
    }
}

/// A cursor over a line's words.
struct Words<'a> {
    words: &'a [&'a str],
    at: usize,
}

impl<'a> Words<'a> {
    fn next(&mut self, what: &str) -> Result<&'a str, String> {
        let word = self
            .words
            .get(self.at)
            .ok_or(format!("the line ends where {what} belongs"))?;
        self.at += 1;
        Ok(word)
    }

    fn peek(&self) -> Option<&'a str> {
        self.words.get(self.at).copied()
    }

    fn expect(&mut self, wanted: &str) -> Result<(), String> {
        match self.next(wanted)? {
            word if word == wanted => Ok(()),
            word => Err(format!("{word} where {wanted} belongs")),
        }
    }

    fn done(&self) -> bool {
        self.at >= self.words.len()
    }
}

fn add_command(ruleset: &mut Option<Ruleset>, words: &[&str]) -> Result<(), String> {
    let mut w = Words { words, at: 0 };
    w.expect("add")?;
    let kind = w.next("an object kind")?;
    let family = match w.next("a family")? {
        "ip" => IpFamily::V4,
        "ip6" => IpFamily::V6,
        other => return Err(format!("family {other}")),
    };
    let table = w.next("a table")?;
    if kind == "table" {
        let comment = braced_comment(&mut w)?;
        if ruleset.is_some() {
            return Err("a second table".into());
        }
        *ruleset = Some(Ruleset {
            table: Table {
                family,
                name: table.into(),
                comment,
            },
            chains: Vec::new(),
            sets: Vec::new(),
            maps: Vec::new(),
            elements: Vec::new(),
        });
        return finished(&w);
    }
    let ruleset = ruleset.as_mut().ok_or("an object before `add table`")?;
    if family != ruleset.table.family || *ruleset.table.name != *table {
        return Err(format!("an object of another table ({table})"));
    }
    let name: Name = w.next("a name")?.into();
    let declared = match kind {
        "chain" => ruleset.chain(&name).is_some(),
        "set" | "map" => ruleset.set(&name).is_some() || ruleset.map(&name).is_some(),
        _ => false,
    };
    if declared {
        return Err(format!("{kind} {name} declared twice"));
    }
    match kind {
        "chain" => {
            let mut chain = Chain {
                name,
                base: None,
                comment: None,
                rules: Default::default(),
            };
            if w.peek() == Some("{") {
                w.next("{")?;
                while w.peek() != Some("}") {
                    match w.next("a chain property")? {
                        "type" => chain.base = Some(base_chain(&mut w)?),
                        "comment" => chain.comment = Some(w.next("a comment")?.into()),
                        other => return Err(format!("chain property {other}")),
                    }
                    w.expect(";")?;
                }
                w.expect("}")?;
            }
            ruleset.chains.push(chain);
        }
        "set" | "map" => {
            w.expect("{")?;
            let by_expression = match w.next("type or typeof")? {
                "type" => false,
                "typeof" => true,
                other => return Err(format!("{other} where type or typeof belongs")),
            };
            let key_type = declared_types(&mut w, family, by_expression)?;
            let value_type = if kind == "map" {
                w.expect(":")?;
                Some(declared_types(&mut w, family, by_expression)?)
            } else {
                None
            };
            w.expect(";")?;
            let (mut flags, mut timeout, mut size, mut comment) = (Vec::new(), None, None, None);
            while w.peek() != Some("}") {
                match w.next("a property")? {
                    "flags" => {
                        for flag in w.next("flags")?.split(',') {
                            flags.push(match flag {
                                "dynamic" => SetFlag::Dynamic,
                                "timeout" => SetFlag::Timeout,
                                "interval" => SetFlag::Interval,
                                other => return Err(format!("flag {other}")),
                            });
                        }
                    }
                    "timeout" => timeout = Some(seconds(w.next("a timeout")?)?),
                    "size" => {
                        let text = w.next("a size")?;
                        size = Some(text.parse().map_err(|_| format!("size {text}"))?);
                    }
                    "comment" => comment = Some(w.next("a comment")?.into()),
                    other => return Err(format!("property {other}")),
                }
                w.expect(";")?;
            }
            w.expect("}")?;
            match value_type {
                None => ruleset.sets.push(Set {
                    name,
                    key_type,
                    flags,
                    timeout,
                    size,
                    comment,
                }),
                Some(value_type) => ruleset.maps.push(Map {
                    name,
                    key_type,
                    value_type,
                    flags,
                    timeout,
                    size,
                    comment,
                }),
            }
        }
        "rule" => {
            let rule = rule(&mut w, family)?;
            let chain = ruleset
                .chains
                .iter_mut()
                .find(|c| c.name == name)
                .ok_or(format!("a rule of the undeclared chain {name}"))?;
            std::sync::Arc::make_mut(&mut chain.rules).push(rule);
            return Ok(());
        }
        "element" => {
            let (key_type, value_type) = match (ruleset.set(&name), ruleset.map(&name)) {
                (Some(set), _) => (set.key_type.clone(), None),
                (None, Some(map)) => (map.key_type.clone(), Some(map.value_type.clone())),
                (None, None) => return Err(format!("an element of the undeclared {name}")),
            };
            w.expect("{")?;
            let mut key = ElementKey::new();
            for (i, t) in key_type.iter().enumerate() {
                if i > 0 {
                    w.expect(".")?;
                }
                key.push(typed_value(w.next("a key")?, *t)?);
            }
            let mut comment = None;
            if w.peek() == Some("comment") {
                w.next("comment")?;
                comment = Some(w.next("a comment")?.into());
            }
            let mut value = None;
            if w.peek() == Some(":") {
                w.next(":")?;
                value = Some(match value_type.as_deref() {
                    Some([DataType::Verdict]) => ElementValue::Verdict(verdict(&mut w)?),
                    Some(types) => {
                        let mut data = ElementData::new();
                        for (i, t) in types.iter().enumerate() {
                            if i > 0 {
                                w.expect(".")?;
                            }
                            data.push(typed_value(w.next("a value")?, *t)?);
                        }
                        ElementValue::Data(data)
                    }
                    None => return Err("a value for a set element".into()),
                });
            }
            w.expect("}")?;
            ruleset.elements.push(Arc::new(Element {
                container: name,
                key,
                value,
                comment,
            }));
        }
        other => return Err(format!("object kind {other}")),
    }
    finished(&w)
}

fn finished(w: &Words) -> Result<(), String> {
    match w.peek() {
        None => Ok(()),
        Some(extra) => Err(format!("{extra} after the object")),
    }
}

/// `{ comment "C" ; }` after a table, or nothing.
fn braced_comment(w: &mut Words) -> Result<Option<Name>, String> {
    if w.done() {
        return Ok(None);
    }
    w.expect("{")?;
    w.expect("comment")?;
    let comment = w.next("a comment")?.into();
    w.expect(";")?;
    w.expect("}")?;
    Ok(Some(comment))
}

/// `filter hook prerouting priority -110` after `type`.
fn base_chain(w: &mut Words) -> Result<BaseChain, String> {
    let kind = match w.next("a chain type")? {
        "filter" => ChainType::Filter,
        "nat" => ChainType::Nat,
        other => return Err(format!("chain type {other}")),
    };
    w.expect("hook")?;
    let hook = match w.next("a hook")? {
        "prerouting" => Hook::Prerouting,
        "input" => Hook::Input,
        "forward" => Hook::Forward,
        "output" => Hook::Output,
        "postrouting" => Hook::Postrouting,
        other => return Err(format!("hook {other}")),
    };
    w.expect("priority")?;
    let priority = w.next("a priority")?;
    Ok(BaseChain {
        kind,
        hook,
        priority: priority
            .parse()
            .map_err(|_| format!("priority {priority}"))?,
    })
}

fn data_type(word: &str) -> Result<DataType, String> {
    Ok(match word {
        "ipv4_addr" => DataType::Ipv4Addr,
        "ipv6_addr" => DataType::Ipv6Addr,
        "inet_proto" => DataType::InetProto,
        "inet_service" => DataType::InetService,
        "verdict" => DataType::Verdict,
        other => return Err(format!("data type {other}")),
    })
}

/// `T . T . T` after `type`, or `E . E . E` after `typeof` (each expression standing for its
/// type: `ip daddr`, `meta l4proto`, `th dport`, `numgen random mod 1`, `verdict`).
fn declared_types(
    w: &mut Words,
    family: IpFamily,
    by_expression: bool,
) -> Result<Vec<DataType>, String> {
    let mut types = Vec::new();
    loop {
        let t = if !by_expression {
            data_type(w.next("a data type")?)?
        } else if w.peek() == Some("verdict") {
            w.next("verdict")?;
            DataType::Verdict
        } else if w.peek() == Some("tcp") {
            // `tcp dport`: a port in a map's data (see the renderer's `type_expression`).
            w.next("tcp")?;
            w.expect("dport")?;
            DataType::InetService
        } else {
            let field = field(w, family, true)?.ok_or("an expression of a type")?;
            field_type(field, family)
        };
        types.push(t);
        if w.peek() != Some(".") {
            return Ok(types);
        }
        w.next(".")?;
    }
}

/// `10000s`
fn seconds(text: &str) -> Result<u32, String> {
    text.strip_suffix('s')
        .and_then(|s| s.parse().ok())
        .ok_or(format!("timeout {text}"))
}

/// A literal of a known type.
fn typed_value(word: &str, t: DataType) -> Result<Value, String> {
    let bad = || format!("{word} is no {t:?}");
    match t {
        DataType::Ipv4Addr | DataType::Ipv6Addr if word.contains('/') => {
            word.parse::<IpNet>().map(Value::Net).map_err(|_| bad())
        }
        DataType::Ipv4Addr | DataType::Ipv6Addr => {
            word.parse::<IpAddr>().map(Value::Addr).map_err(|_| bad())
        }
        DataType::InetProto => Protocol::from_api(&word.to_uppercase())
            .map(Value::Protocol)
            .ok_or_else(bad),
        DataType::InetService => word.parse().map(Value::Port).map_err(|_| bad()),
        DataType::Slot => word.parse().map(Value::Integer).map_err(|_| bad()),
        DataType::Verdict => Err(bad()),
    }
}

fn verdict(w: &mut Words) -> Result<Verdict, String> {
    Ok(match w.next("a verdict")? {
        "jump" => Verdict::Jump(w.next("a chain")?.into()),
        "goto" => Verdict::Goto(w.next("a chain")?.into()),
        "drop" => Verdict::Drop,
        "reject" => Verdict::Reject,
        other => return Err(format!("verdict {other}")),
    })
}

/// A packet field (or `numgen random mod N`, with `numbers`), or `None` when the words there
/// are no field.
fn field(w: &mut Words, family: IpFamily, numbers: bool) -> Result<Option<Field>, String> {
    let family_word = match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    };
    let word = |i: usize| w.words.get(w.at + i).copied();
    let (field, length) = match (word(0), word(1), word(2), word(3)) {
        (Some(f), Some("saddr"), _, _) if f == family_word => (Field::SourceAddr, 2),
        (Some(f), Some("daddr"), _, _) if f == family_word => (Field::DestinationAddr, 2),
        (Some("meta"), Some("l4proto"), _, _) => (Field::L4Proto, 2),
        (Some("th"), Some("dport"), _, _) => (Field::DestinationPort, 2),
        (Some("ct"), Some("original"), Some(f), Some("daddr")) if f == family_word => {
            (Field::OriginalDestinationAddr, 4)
        }
        (Some("ct"), Some("original"), Some("proto-dst"), _) => (Field::OriginalDestinationPort, 3),
        (Some("numgen"), Some("random"), Some("mod"), Some(n)) if numbers => {
            let n = n
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or(format!("numgen mod {n}"))?;
            (Field::RandomNumber(n), 4)
        }
        _ => return Ok(None),
    };
    w.at += length;
    Ok(Some(field))
}

/// Fields joined by ` . `, the first already read.
fn more_fields(w: &mut Words, family: IpFamily, first: Field) -> Result<Vec<Field>, String> {
    let mut key = vec![first];
    while w.peek() == Some(".") {
        w.next(".")?;
        key.push(field(w, family, true)?.ok_or("a field after .")?);
    }
    Ok(key)
}

/// The data type a field's values have.
fn field_type(field: Field, family: IpFamily) -> DataType {
    match field {
        Field::SourceAddr | Field::DestinationAddr | Field::OriginalDestinationAddr => {
            DataType::addr(family)
        }
        Field::L4Proto => DataType::InetProto,
        Field::DestinationPort | Field::OriginalDestinationPort => DataType::InetService,
        Field::RandomNumber(_) => DataType::Slot,
    }
}

fn rule(w: &mut Words, family: IpFamily) -> Result<Rule, String> {
    let mut rule = Rule::new(Vec::new(), Vec::new());
    while let Some(word) = w.peek() {
        if let Some(first) = field(w, family, false)? {
            let key = more_fields(w, family, first)?;
            match w.next("@set, vmap or a value")? {
                "vmap" => {
                    let map = w.next("@map")?;
                    let map = map.strip_prefix('@').ok_or(format!("vmap {map}"))?;
                    rule.statements.push(Statement::VerdictMap {
                        key,
                        map: map.into(),
                    });
                }
                set if set.starts_with('@') && set.len() > 1 => rule.matches.push(Match::InSet {
                    key,
                    set: set[1..].into(),
                    negated: false,
                }),
                "!=" if w
                    .peek()
                    .is_some_and(|set| set.starts_with('@') && set.len() > 1) =>
                {
                    let set = w.next("@set")?;
                    rule.matches.push(Match::InSet {
                        key,
                        set: set[1..].into(),
                        negated: true,
                    });
                }
                value => {
                    let [field] = key[..] else {
                        return Err("a value compared with several fields".into());
                    };
                    let t = field_type(field, family);
                    let negated = value == "!=";
                    let value = if negated { w.next("a value")? } else { value };
                    let value = if value == "{" {
                        anonymous_set(w, t)?
                    } else {
                        typed_value(value, t)?
                    };
                    rule.matches.push(Match::Compare {
                        field,
                        negated,
                        value,
                    });
                }
            }
            continue;
        }
        w.next(word)?;
        match word {
            "ct" => match (w.next("state or status")?, w.next("a value")?) {
                ("state", "new") => rule.matches.push(Match::CtStateNew),
                ("status", "dnat") => rule.matches.push(Match::CtStatusDnat),
                (a, b) => return Err(format!("ct {a} {b}")),
            },
            "mark" => match w.next("and or set")? {
                "and" => {
                    let mark = w.next("a mark")?;
                    w.expect("!=")?;
                    w.expect("0")?;
                    rule.matches.push(Match::MarkBitSet(mark.into()));
                }
                "set" => {
                    w.expect("mark")?;
                    let op = w.next("or or xor")?;
                    let mark: Name = w.next("a mark")?.into();
                    rule.statements.push(match op {
                        "or" => Statement::MarkOr(mark),
                        "xor" => Statement::MarkXor(mark),
                        other => return Err(format!("mark set mark {other}")),
                    });
                }
                other => return Err(format!("mark {other}")),
            },
            "fib" => {
                let direction = match w.next("saddr or daddr")? {
                    "saddr" => Direction::Source,
                    "daddr" => Direction::Destination,
                    other => return Err(format!("fib {other}")),
                };
                w.expect("type")?;
                w.expect("local")?;
                rule.matches.push(Match::FibLocal(direction));
            }
            "jump" | "goto" | "drop" | "reject" => {
                w.at -= 1;
                rule.statements.push(Statement::Verdict(verdict(w)?));
            }
            "numgen" => {
                let count = numgen(w)?;
                w.expect("vmap")?;
                w.expect("{")?;
                let mut verdicts = Vec::with_capacity(count);
                for i in 0..count {
                    if i > 0 {
                        w.expect(",")?;
                    }
                    w.expect(&i.to_string())?;
                    w.expect(":")?;
                    verdicts.push(verdict(w)?);
                }
                w.expect("}")?;
                rule.statements.push(Statement::RandomVerdict(verdicts));
            }
            "masquerade" => {
                w.expect("fully-random")?;
                rule.statements.push(Statement::MasqueradeFullyRandom);
            }
            "update" => {
                let set = w.next("@set")?;
                let set = set.strip_prefix('@').ok_or(format!("update {set}"))?;
                w.expect("{")?;
                let first = field(w, family, true)?.ok_or("a field")?;
                let key = more_fields(w, family, first)?;
                if w.peek() == Some("timeout") {
                    w.next("timeout")?;
                    let timeout = seconds(w.next("a timeout")?)?;
                    w.expect(":")?;
                    let first = field(w, family, true)?.ok_or("a field")?;
                    let value = more_fields(w, family, first)?;
                    w.expect("}")?;
                    rule.statements.push(Statement::UpdateMap {
                        map: set.into(),
                        key,
                        timeout,
                        value,
                    });
                } else {
                    w.expect("}")?;
                    let [field] = key[..] else {
                        return Err("update of a set with several fields".into());
                    };
                    rule.statements.push(Statement::UpdateSet {
                        set: set.into(),
                        field,
                    });
                }
            }
            "dnat" => {
                if w.peek() == Some("to") {
                    w.next("to")?;
                    let to = w.next("an address")?;
                    let to = to.parse().map_err(|_| format!("dnat to {to}"))?;
                    rule.statements.push(Statement::Dnat(to));
                } else {
                    w.next("a family")?;
                    for word in ["addr", ".", "port", "to"] {
                        w.expect(word)?;
                    }
                    if w.peek() != Some("numgen") || w.words.get(w.at + 4).copied() == Some(".") {
                        let first = field(w, family, true)?.ok_or("a key")?;
                        let key = more_fields(w, family, first)?;
                        w.expect("map")?;
                        let map = w.next("@map")?;
                        let map = map.strip_prefix('@').ok_or(format!("map {map}"))?;
                        rule.statements.push(Statement::DnatMap {
                            key,
                            map: map.into(),
                        });
                        continue;
                    }
                    w.expect("numgen")?;
                    let count = numgen(w)?;
                    w.expect("map")?;
                    w.expect("{")?;
                    let mut endpoints = Vec::with_capacity(count);
                    for i in 0..count {
                        if i > 0 {
                            w.expect(",")?;
                        }
                        w.expect(&i.to_string())?;
                        w.expect(":")?;
                        let ip = w.next("an address")?;
                        w.expect(".")?;
                        let port = w.next("a port")?;
                        let ip: IpAddr = ip.parse().map_err(|_| format!("address {ip}"))?;
                        let port: u16 = port.parse().map_err(|_| format!("port {port}"))?;
                        endpoints.push(SocketAddr::new(ip, port));
                    }
                    w.expect("}")?;
                    rule.statements.push(Statement::RandomDnat(endpoints));
                }
            }
            "comment" => {
                rule.comment = Some(w.next("a comment")?.into());
                if !w.done() {
                    return Err("words after the comment".into());
                }
            }
            other => return Err(format!("{other} is no match or statement kproxy writes")),
        }
    }
    Ok(rule)
}

/// `random mod N` after `numgen`.
fn numgen(w: &mut Words) -> Result<usize, String> {
    w.expect("random")?;
    w.expect("mod")?;
    let count = w.next("a count")?;
    count
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or(format!("numgen mod {count}"))
}

/// `{ a , b }` (spaced) or `{ a,b }` (tight), after its `{`.
fn anonymous_set(w: &mut Words, t: DataType) -> Result<Value, String> {
    let mut members = Vec::new();
    let mut joining = Joining::Spaced;
    loop {
        let word = w.next("a member or }")?;
        match word {
            "}" => break,
            "," => {}
            list if list.contains(',') => {
                joining = Joining::Tight;
                for member in list.split(',') {
                    members.push(typed_value(member, t)?);
                }
            }
            member => members.push(typed_value(member, t)?),
        }
    }
    Ok(Value::Set {
        members: members.into(),
        joining,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The constructs of the `maps` layout (docs/maps-layout.md) read and render back
    /// unchanged; tests/nft_check.rs loads the same file into the kernel.
    #[test]
    fn maps_layout_constructs_read_back() {
        let text = include_str!("../../tests/data/nft/maps-layout-constructs.nft");
        let ruleset = Ruleset::from_nft_script(text).expect("reads");
        assert_eq!(ruleset.to_nft_script(), text);
        let affinity = ruleset.map("affinity").expect("the affinity map");
        assert_eq!(affinity.flags, [SetFlag::Dynamic, SetFlag::Timeout]);
        assert_eq!(
            (affinity.timeout, affinity.size),
            (Some(10800), Some(1048576))
        );
        let endpoints = ruleset.map("cluster-endpoints").expect("the endpoint map");
        assert_eq!(endpoints.key_type.last(), Some(&DataType::Slot));
        let pick = &ruleset.chain("pick-3").expect("pick-3").rules[1];
        assert!(matches!(
            &pick.statements[..],
            [Statement::DnatMap { key, .. }] if key.last() == Some(&Field::RandomNumber(3))
        ));
        let firewall = &ruleset.chain("firewall-check").expect("chain").rules[0];
        assert!(matches!(
            &firewall.matches[1],
            Match::InSet { negated: true, .. }
        ));
        assert!(ruleset.elements.iter().any(|e| matches!(
            &e.value,
            Some(ElementValue::Data(data)) if data.len() == 2
        )));
    }

    #[test]
    fn refuses_what_it_does_not_know_naming_the_line() {
        let text = "add table ip kube-proxy\nadd chain ip kube-proxy x\nadd rule ip kube-proxy x meta mark 1 accept\n";
        let err = Ruleset::from_nft_script(text).unwrap_err();
        assert_eq!(err.line, 3, "{err}");
        let text = "add table ip kube-proxy\nadd rule ip kube-proxy y drop\n";
        assert_eq!(Ruleset::from_nft_script(text).unwrap_err().line, 2);
        let text = "add chain ip kube-proxy x\n";
        assert!(Ruleset::from_nft_script(text).is_err());
    }
}
