//! The one place where typed nftables objects become `nft` text, in knftables' command forms
//! (§5.11): one command per line, tokens joined by single spaces.

use std::fmt::{self, Write};

use super::ruleset::{
    BaseChain, Chain, ChainType, DataType, Direction, Element, ElementValue, Field, Hook, Joining,
    Map, Match, ObjectId, Rule, Ruleset, Set, SetFlag, Statement, Table, Value, Verdict,
};
use crate::family::IpFamily;

/// One `nft` command on one object of a table (`kube-proxy`, or `kproxy` for the maps layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// `add table|chain|set|map|rule|element …`; `add chain` declares the chain only.
    Add(Object<'a>),
    /// `flush chain|set|map …`: empties the object and keeps it.
    Flush(&'a ObjectId),
    /// `delete table|chain|set|map|element …`
    Delete(&'a ObjectId),
}

/// Something `add` can create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Object<'a> {
    Table(&'a Table),
    Chain(&'a Chain),
    Rule { chain: &'a str, rule: &'a Rule },
    Set(&'a Set),
    Map(&'a Map),
    Element(&'a Element),
}

impl Ruleset {
    /// The `add` commands that create this ruleset in an empty `kube-proxy` table, in an order
    /// `nft` accepts in one transaction: the table, every chain, sets, maps, then rules (which
    /// refer to chains, sets and maps) and elements (whose verdicts refer to chains).
    pub fn creation_commands(&self) -> Vec<Command<'_>> {
        let rules = self.chains.iter().map(|c| c.rules.len()).sum::<usize>();
        let mut commands = Vec::with_capacity(
            1 + self.chains.len() + self.sets.len() + self.maps.len() + rules + self.elements.len(),
        );
        commands.push(Command::Add(Object::Table(&self.table)));
        commands.extend(self.chains.iter().map(|c| Command::Add(Object::Chain(c))));
        commands.extend(self.sets.iter().map(|s| Command::Add(Object::Set(s))));
        commands.extend(self.maps.iter().map(|m| Command::Add(Object::Map(m))));
        for chain in &self.chains {
            commands.extend(chain.rules.iter().map(|rule| {
                Command::Add(Object::Rule {
                    chain: &chain.name,
                    rule,
                })
            }));
        }
        commands.extend(
            self.elements
                .iter()
                .map(|e| Command::Add(Object::Element(e))),
        );
        commands
    }

    /// A script for `nft -f` that creates the whole table on a node that has none. Each line is
    /// also the form in which a dump of the table lists that object, as kube-proxy's tests and
    /// the conformance vectors write it.
    pub fn to_nft_script(&self) -> String {
        let commands = self.creation_commands();
        // Commands are written on every core, each chunk into its own text, joined in order.
        let chunks = crate::parallel::map_chunks(&commands, |commands| {
            let mut out = String::with_capacity(commands.len() * 120);
            for command in commands {
                // Writing into a String cannot fail.
                let _ = write_command(&mut out, self.family(), &self.table.name, command);
                out.push('\n');
            }
            out
        });
        chunks.concat()
    }
}

/// Writes one command (without the newline) for the table `table` of `family`.
pub fn write_command(
    out: &mut String,
    family: IpFamily,
    table: &str,
    command: &Command,
) -> fmt::Result {
    let f = family_word(family);
    match command {
        Command::Add(object) => write_add(out, family, table, object),
        Command::Flush(id) => match id {
            ObjectId::Table => write!(out, "flush table {f} {table}"),
            ObjectId::Chain(name) | ObjectId::Set(name) | ObjectId::Map(name) => {
                write!(out, "flush {} {f} {table} {name}", id.kind())
            }
            // Elements have no contents; flushing one means nothing to nft.
            ObjectId::Element { .. } => Err(fmt::Error),
        },
        Command::Delete(id) => match id {
            ObjectId::Table => write!(out, "delete table {f} {table}"),
            ObjectId::Chain(name) | ObjectId::Set(name) | ObjectId::Map(name) => {
                write!(out, "delete {} {f} {table} {name}", id.kind())
            }
            ObjectId::Element { container, key } => {
                write!(out, "delete element {f} {table} {container} {{ ")?;
                write_key(out, key)?;
                out.write_str(" }")
            }
        },
    }
}

fn write_add(out: &mut String, family: IpFamily, table: &str, object: &Object) -> fmt::Result {
    let f = family_word(family);
    match object {
        Object::Table(table) => {
            write!(
                out,
                "add table {} {}",
                family_word(table.family),
                table.name
            )?;
            if let Some(comment) = &table.comment {
                write!(out, " {{ comment {} ; }}", quoted(comment))?;
            }
            Ok(())
        }
        Object::Chain(chain) => {
            write!(out, "add chain {f} {table} {}", chain.name)?;
            if chain.base.is_some() || chain.comment.is_some() {
                out.write_str(" {")?;
                if let Some(base) = &chain.base {
                    write_base_chain(out, base)?;
                }
                if let Some(comment) = &chain.comment {
                    write!(out, " comment {} ;", quoted(comment))?;
                }
                out.write_str(" }")?;
            }
            Ok(())
        }
        Object::Set(set) => {
            write!(out, "add set {f} {table} {} {{ ", set.name)?;
            write_declaration(out, &set.key_type, None)?;
            write_set_options(out, &set.flags, set.timeout, set.size)?;
            if let Some(comment) = &set.comment {
                write!(out, " comment {} ;", quoted(comment))?;
            }
            out.write_str(" }")
        }
        Object::Map(map) => {
            write!(out, "add map {f} {table} {} {{ ", map.name)?;
            write_declaration(out, &map.key_type, Some(&map.value_type))?;
            write_set_options(out, &map.flags, map.timeout, map.size)?;
            if let Some(comment) = &map.comment {
                write!(out, " comment {} ;", quoted(comment))?;
            }
            out.write_str(" }")
        }
        Object::Rule { chain, rule } => {
            write!(out, "add rule {f} {table} {chain} ")?;
            write_rule(out, family, rule)
        }
        Object::Element(element) => {
            write!(out, "add element {f} {table} {} {{ ", element.container)?;
            write_key(out, &element.key)?;
            if let Some(comment) = &element.comment {
                write!(out, " comment {}", quoted(comment))?;
            }
            match &element.value {
                None => {}
                Some(ElementValue::Verdict(verdict)) => {
                    out.write_str(" : ")?;
                    write_verdict(out, verdict)?;
                }
                Some(ElementValue::Data(data)) => {
                    out.write_str(" : ")?;
                    write_key(out, data)?;
                }
            }
            out.write_str(" }")
        }
    }
}

/// Writes a rule's body: matches, statements, then ` comment "…"`.
pub fn write_rule(out: &mut String, family: IpFamily, rule: &Rule) -> fmt::Result {
    let mut first = true;
    let mut space = |out: &mut String| {
        if !std::mem::take(&mut first) {
            out.push(' ');
        }
    };
    for m in &rule.matches {
        space(out);
        write_match(out, family, m)?;
    }
    for s in &rule.statements {
        space(out);
        write_statement(out, family, s)?;
    }
    if let Some(comment) = &rule.comment {
        space(out);
        write!(out, "comment {}", quoted(comment))?;
    }
    Ok(())
}

fn family_word(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

/// A comment in double quotes. Comments come from fixed texts and validated Kubernetes names;
/// a stray double quote, which nft strings cannot hold, becomes a single one.
fn quoted(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "'"))
}

fn write_base_chain(out: &mut String, base: &BaseChain) -> fmt::Result {
    let kind = match base.kind {
        ChainType::Filter => "filter",
        ChainType::Nat => "nat",
    };
    let hook = match base.hook {
        Hook::Prerouting => "prerouting",
        Hook::Input => "input",
        Hook::Forward => "forward",
        Hook::Output => "output",
        Hook::Postrouting => "postrouting",
    };
    write!(out, " type {kind} hook {hook} priority {} ;", base.priority)
}

fn data_type(t: DataType) -> &'static str {
    match t {
        DataType::Ipv4Addr => "ipv4_addr",
        DataType::Ipv6Addr => "ipv6_addr",
        DataType::InetProto => "inet_proto",
        DataType::InetService => "inet_service",
        DataType::Verdict => "verdict",
        // Only inside `typeof` (see `write_declaration`); nft has no type name for it.
        DataType::Slot => "integer",
    }
}

/// An expression of the type, for `typeof` declarations of a key or (`value`) a map's data.
/// A port in the data is written `tcp dport`, not `th dport`: nft 1.0.6 refuses rules that use
/// a map in the kernel declared with `ip daddr . th dport` data ("conflicting protocols
/// specified: ip vs. th") — the type is the same.
fn type_expression(t: DataType, value: bool) -> &'static str {
    match t {
        DataType::Ipv4Addr => "ip daddr",
        DataType::Ipv6Addr => "ip6 daddr",
        DataType::InetProto => "meta l4proto",
        DataType::InetService if value => "tcp dport",
        DataType::InetService => "th dport",
        DataType::Verdict => "verdict",
        DataType::Slot => "numgen random mod 1",
    }
}

/// `type K . K [: V . V] ;`, or `typeof …` when a part has no type name (a slot number).
fn write_declaration(
    out: &mut String,
    key: &[DataType],
    value: Option<&Vec<DataType>>,
) -> fmt::Result {
    let by_expression = key
        .iter()
        .chain(value.into_iter().flatten())
        .any(|t| *t == DataType::Slot);
    let write_parts = |out: &mut String, types: &[DataType], value: bool| -> fmt::Result {
        for (i, t) in types.iter().enumerate() {
            if i > 0 {
                out.write_str(" . ")?;
            }
            out.write_str(if by_expression {
                type_expression(*t, value)
            } else {
                data_type(*t)
            })?;
        }
        Ok(())
    };
    out.write_str(if by_expression { "typeof " } else { "type " })?;
    write_parts(out, key, false)?;
    if let Some(value) = value {
        out.write_str(" : ")?;
        write_parts(out, value, true)?;
    }
    out.write_str(" ;")
}

fn write_set_options(
    out: &mut String,
    flags: &[SetFlag],
    timeout: Option<u32>,
    size: Option<u32>,
) -> fmt::Result {
    if !flags.is_empty() {
        out.write_str(" flags ")?;
        for (i, flag) in flags.iter().enumerate() {
            if i > 0 {
                out.write_char(',')?;
            }
            out.write_str(match flag {
                SetFlag::Dynamic => "dynamic",
                SetFlag::Timeout => "timeout",
                SetFlag::Interval => "interval",
            })?;
        }
        out.write_str(" ;")?;
    }
    if let Some(seconds) = timeout {
        write!(out, " timeout {seconds}s ;")?;
    }
    if let Some(size) = size {
        write!(out, " size {size} ;")?;
    }
    Ok(())
}

fn write_key(out: &mut String, key: &[Value]) -> fmt::Result {
    for (i, v) in key.iter().enumerate() {
        if i > 0 {
            out.write_str(" . ")?;
        }
        write_value(out, v)?;
    }
    Ok(())
}

fn write_value(out: &mut String, value: &Value) -> fmt::Result {
    match value {
        Value::Addr(ip) => write!(out, "{ip}"),
        Value::Net(net) => write!(out, "{net}"),
        Value::Protocol(p) => out.write_str(p.lower()),
        Value::Port(port) => write!(out, "{port}"),
        Value::Integer(n) => write!(out, "{n}"),
        Value::Set { members, joining } => {
            let separator = match joining {
                Joining::Tight => ",",
                Joining::Spaced => " , ",
            };
            out.write_str("{ ")?;
            for (i, member) in members.iter().enumerate() {
                if i > 0 {
                    out.write_str(separator)?;
                }
                write_value(out, member)?;
            }
            out.write_str(" }")
        }
    }
}

fn write_field(out: &mut String, family: IpFamily, field: Field) -> fmt::Result {
    let f = family_word(family);
    match field {
        Field::SourceAddr => write!(out, "{f} saddr"),
        Field::DestinationAddr => write!(out, "{f} daddr"),
        Field::L4Proto => out.write_str("meta l4proto"),
        Field::DestinationPort => out.write_str("th dport"),
        Field::OriginalDestinationAddr => write!(out, "ct original {f} daddr"),
        Field::OriginalDestinationPort => out.write_str("ct original proto-dst"),
        Field::RandomNumber(modulus) => write!(out, "numgen random mod {modulus}"),
    }
}

fn write_fields(out: &mut String, family: IpFamily, fields: &[Field]) -> fmt::Result {
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            out.write_str(" . ")?;
        }
        write_field(out, family, *field)?;
    }
    Ok(())
}

fn write_match(out: &mut String, family: IpFamily, m: &Match) -> fmt::Result {
    match m {
        Match::CtStateNew => out.write_str("ct state new"),
        Match::CtStatusDnat => out.write_str("ct status dnat"),
        Match::MarkBitSet(mark) => write!(out, "mark and {mark} != 0"),
        Match::FibLocal(direction) => match direction {
            Direction::Source => out.write_str("fib saddr type local"),
            Direction::Destination => out.write_str("fib daddr type local"),
        },
        Match::Compare {
            field,
            negated,
            value,
        } => {
            write_field(out, family, *field)?;
            out.write_str(if *negated { " != " } else { " " })?;
            write_value(out, value)
        }
        Match::InSet { key, set, negated } => {
            write_fields(out, family, key)?;
            write!(out, "{} @{set}", if *negated { " !=" } else { "" })
        }
    }
}

fn write_verdict(out: &mut String, verdict: &Verdict) -> fmt::Result {
    match verdict {
        Verdict::Jump(chain) => write!(out, "jump {chain}"),
        Verdict::Goto(chain) => write!(out, "goto {chain}"),
        Verdict::Drop => out.write_str("drop"),
        Verdict::Reject => out.write_str("reject"),
    }
}

fn write_statement(out: &mut String, family: IpFamily, statement: &Statement) -> fmt::Result {
    match statement {
        Statement::Verdict(verdict) => write_verdict(out, verdict),
        Statement::VerdictMap { key, map } => {
            write_fields(out, family, key)?;
            write!(out, " vmap @{map}")
        }
        Statement::RandomVerdict(verdicts) => {
            write!(out, "numgen random mod {} vmap {{ ", verdicts.len())?;
            for (i, verdict) in verdicts.iter().enumerate() {
                if i > 0 {
                    out.write_str(" , ")?;
                }
                write!(out, "{i} : ")?;
                write_verdict(out, verdict)?;
            }
            out.write_str(" }")
        }
        Statement::MarkOr(mark) => write!(out, "mark set mark or {mark}"),
        Statement::MarkXor(mark) => write!(out, "mark set mark xor {mark}"),
        Statement::MasqueradeFullyRandom => out.write_str("masquerade fully-random"),
        Statement::UpdateSet { set, field } => {
            write!(out, "update @{set} {{ ")?;
            write_field(out, family, *field)?;
            out.write_str(" }")
        }
        Statement::Dnat(addr) => write!(out, "dnat to {addr}"),
        Statement::RandomDnat(endpoints) => {
            write!(
                out,
                "dnat {} addr . port to numgen random mod {} map {{ ",
                family_word(family),
                endpoints.len()
            )?;
            for (i, endpoint) in endpoints.iter().enumerate() {
                if i > 0 {
                    out.write_str(" , ")?;
                }
                write!(out, "{i} : {} . {}", endpoint.ip(), endpoint.port())?;
            }
            out.write_str(" }")
        }
        Statement::DnatMap { key, map } => {
            write!(out, "dnat {} addr . port to ", family_word(family))?;
            write_fields(out, family, key)?;
            write!(out, " map @{map}")
        }
        Statement::UpdateMap {
            map,
            key,
            timeout,
            value,
        } => {
            write!(out, "update @{map} {{ ")?;
            write_fields(out, family, key)?;
            write!(out, " timeout {timeout}s : ")?;
            write_fields(out, family, value)?;
            out.write_str(" }")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn rule_text(family: IpFamily, rule: &Rule) -> String {
        let mut s = String::new();
        write_rule(&mut s, family, rule).unwrap();
        s
    }

    #[test]
    fn anonymous_sets_keep_kube_proxys_separators() {
        let nets = |joining| Value::Set {
            members: Box::new([
                Value::Net("10.96.0.0/16".parse().unwrap()),
                Value::Addr("1.2.3.4".parse().unwrap()),
            ]),
            joining,
        };
        let rule = |joining| {
            Rule::new(
                vec![Match::Compare {
                    field: Field::DestinationAddr,
                    negated: true,
                    value: nets(joining),
                }],
                vec![Statement::Verdict(Verdict::Drop)],
            )
        };
        assert_eq!(
            rule_text(IpFamily::V4, &rule(Joining::Tight)),
            "ip daddr != { 10.96.0.0/16,1.2.3.4 } drop"
        );
        assert_eq!(
            rule_text(IpFamily::V6, &rule(Joining::Spaced)),
            "ip6 daddr != { 10.96.0.0/16 , 1.2.3.4 } drop"
        );
    }

    #[test]
    fn ipv6_dnat_map_uses_ip6_and_bare_addresses() {
        let rule = Rule::new(
            vec![Match::Compare {
                field: Field::L4Proto,
                negated: false,
                value: Value::Protocol(crate::model::Protocol::Udp),
            }],
            vec![Statement::RandomDnat(vec![
                "[fd00::1]:53".parse().unwrap(),
                "[fd00::2]:53".parse().unwrap(),
            ])],
        );
        assert_eq!(
            rule_text(IpFamily::V6, &rule),
            "meta l4proto udp dnat ip6 addr . port to numgen random mod 2 map { 0 : fd00::1 . 53 , 1 : fd00::2 . 53 }"
        );
        let single = Rule::new(
            vec![],
            vec![Statement::Dnat("[fd00::1]:53".parse().unwrap())],
        );
        assert_eq!(rule_text(IpFamily::V6, &single), "dnat to [fd00::1]:53");
    }

    #[test]
    fn delete_and_flush_commands() {
        let text = |command: Command| {
            let mut s = String::new();
            write_command(&mut s, IpFamily::V4, "kube-proxy", &command).unwrap();
            s
        };
        let chain = ObjectId::Chain(Arc::from("service-X-ns/svc/tcp/p"));
        let set = ObjectId::Set(Arc::from("affinity-Y"));
        let element = ObjectId::Element {
            container: Arc::from("hairpin-connections"),
            key: vec![
                Value::Addr("10.0.0.1".parse().unwrap()),
                Value::Addr("10.0.0.1".parse().unwrap()),
                Value::Protocol(crate::model::Protocol::Tcp),
                Value::Port(80),
            ],
        };
        assert_eq!(
            text(Command::Flush(&chain)),
            "flush chain ip kube-proxy service-X-ns/svc/tcp/p"
        );
        assert_eq!(
            text(Command::Delete(&set)),
            "delete set ip kube-proxy affinity-Y"
        );
        assert_eq!(
            text(Command::Delete(&element)),
            "delete element ip kube-proxy hairpin-connections { 10.0.0.1 . 10.0.0.1 . tcp . 80 }"
        );
        assert_eq!(
            text(Command::Delete(&ObjectId::Table)),
            "delete table ip kube-proxy"
        );
    }
}
