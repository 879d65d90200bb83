//! `nft -j list table <family> kube-proxy` read into the walker's [`NftablesRules`], with the
//! affinity sets' elements as [`AffinityState`].
//!
//! Declarations, set and map elements are read with the syncer's own reader
//! (`sync::nftables::kernel`); rules are converted here from nft's JSON expression tree into
//! [`crate::nftables::Rule`]. A rule holding anything outside kproxy's vocabulary — another
//! statement, a match on a field kproxy does not use, a lookup in a set whose elements could
//! not be read — becomes [`Entry::Uninterpreted`] as a whole, with the reason and the rule's
//! JSON.
//!
//! Pure: bytes in, rules out. The thin I/O part ([`read`]) runs `nft`.

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde_json::{Map as JsonObject, Value as Json};

use crate::family::IpFamily;
use crate::model::Protocol;
use crate::nftables::{
    DataType, Direction, Field, Joining, Match, Name, Rule, SetFlag, Statement, Value, Verdict,
};
use crate::sync::nftables::kernel::{
    parse_chain, parse_container, parse_key, parse_value, parse_verdict, ChainKind, ContainerDecl,
};
use crate::trace::{AffinityState, Entry, NftablesRules, SetContent};

/// One family's `kube-proxy` table as listed.
#[derive(Debug, Clone)]
pub struct ListedTable {
    pub rules: NftablesRules,
    pub affinity: AffinityState,
    pub notes: Vec<String>,
}

/// A listing that is not nft's JSON at all.
#[derive(Debug, thiserror::Error)]
#[error("cannot read `nft -j list table` output: {0}")]
pub struct ListingError(pub String);

/// Reads `nft -j list table <family> kube-proxy` output.
pub fn read_listing(listing: &[u8], family: IpFamily) -> Result<ListedTable, ListingError> {
    let json: Json =
        serde_json::from_slice(listing).map_err(|e| ListingError(format!("not JSON: {e}")))?;
    let items = json
        .get("nftables")
        .and_then(Json::as_array)
        .ok_or_else(|| ListingError("no `nftables` array".into()))?;

    let mut notes = Vec::new();
    let mut chains: Vec<(Name, Option<(crate::nftables::Hook, i32)>)> = Vec::new();
    let mut rules: Vec<(String, &Json)> = Vec::new();
    let mut containers = Vec::new();
    for item in items {
        let Some(object) = item.as_object() else {
            continue;
        };
        if let Some(chain) = object.get("chain") {
            match parse_chain(chain) {
                Ok(chain) => {
                    let base = match chain.kind {
                        ChainKind::Regular => None,
                        ChainKind::Base(base) => Some((base.hook, base.priority)),
                        ChainKind::Other => {
                            notes.push(format!(
                                "chain {} is a base chain of a kind the tracer does not walk \
                                 (type, hook or priority); it is read as a regular chain",
                                chain.name
                            ));
                            None
                        }
                    };
                    chains.push((chain.name, base));
                }
                Err(e) => notes.push(format!("a chain not understood: {e}")),
            }
        } else if let Some(rule) = object.get("rule") {
            match rule.get("chain").and_then(Json::as_str) {
                Some(chain) => rules.push((chain.to_string(), rule)),
                None => notes.push(format!("a rule without its chain: {rule}")),
            }
        } else if let Some(set) = object.get("set") {
            containers.push((set, false));
        } else if let Some(map) = object.get("map") {
            containers.push((map, true));
        }
    }

    // Sets filled from the packet path: nft 1.0.6 leaves the `dynamic` flag out of its JSON, so
    // a set some rule updates counts as dynamic too.
    let updated: HashSet<String> = rules
        .iter()
        .filter_map(|(_, rule)| rule.get("expr").and_then(Json::as_array))
        .flatten()
        .filter_map(|e| e.get("set"))
        .filter_map(|s| s.get("set").and_then(Json::as_str))
        .filter_map(|s| s.strip_prefix('@'))
        .map(str::to_string)
        .collect();

    let mut walker = NftablesRules::new(family);
    let mut affinity = AffinityState::default();
    // Containers whose elements could not be read: rules that look into them are not
    // interpreted (a lookup would miss where the kernel's may hit).
    let mut unreadable: HashSet<String> = HashSet::new();
    let mut known: HashSet<String> = HashSet::new();
    for (json, is_map) in containers {
        let container = match parse_container(json, is_map) {
            Ok(container) => container,
            Err(e) => {
                notes.push(format!("a set or map not understood: {e}"));
                continue;
            }
        };
        let name = container.name.to_string();
        known.insert(name.clone());
        match &container.decl {
            ContainerDecl::Set(set) => {
                let dynamic = set.flags.contains(&SetFlag::Dynamic) || updated.contains(&name);
                if dynamic && set.timeout.is_some() {
                    walker.insert_set(
                        &name,
                        SetContent {
                            timeout: set.timeout,
                            dynamic: true,
                            elements: Vec::new(),
                        },
                    );
                    let skipped = affinity_elements(json, family, &name, &mut affinity);
                    if skipped > 0 {
                        notes.push(format!(
                            "affinity set {name}: {skipped} element(s) not understood"
                        ));
                    }
                    continue;
                }
                match &container.elements {
                    Some(elements) => walker.insert_set(
                        &name,
                        SetContent {
                            timeout: set.timeout,
                            dynamic,
                            elements: elements.iter().map(|e| e.key.to_vec()).collect(),
                        },
                    ),
                    None => {
                        notes.push(format!(
                            "the elements of set {name} were not understood: rules looking \
                             into it are not interpreted"
                        ));
                        unreadable.insert(name);
                    }
                }
            }
            // The maps layout's affinity map: its elements are live state.
            ContainerDecl::Map(map)
                if map.flags.contains(&SetFlag::Timeout)
                    || map.flags.contains(&SetFlag::Dynamic) =>
            {
                walker.insert_map(&name);
                walker.set_dynamic_map(&name);
                let skipped =
                    affinity_mappings(json, &map.key_type, &map.value_type, &name, &mut affinity);
                if skipped > 0 {
                    notes.push(format!(
                        "affinity map {name}: {skipped} element(s) not understood"
                    ));
                }
            }
            ContainerDecl::Map(_) => match &container.elements {
                Some(elements) => {
                    walker.insert_map(&name);
                    for element in elements {
                        walker.insert_element(&name, element.key.to_vec(), element.value.clone());
                    }
                }
                None => {
                    notes.push(format!(
                        "the elements of map {name} were not understood: rules looking into \
                         it are not interpreted"
                    ));
                    unreadable.insert(name);
                }
            },
            ContainerDecl::Other => {
                notes.push(format!(
                    "{} {name} is of a type or with flags kproxy does not write: rules looking \
                     into it are not interpreted",
                    if is_map { "map" } else { "set" }
                ));
                unreadable.insert(name);
            }
        }
    }

    let context = Context {
        family,
        unreadable: &unreadable,
        known: &known,
    };
    for (name, base) in &chains {
        let entries = rules
            .iter()
            .filter(|(chain, _)| chain == &**name)
            .map(|(_, rule)| match context.rule(rule) {
                Ok(rule) => Entry::Rule(rule),
                Err(why) => Entry::Uninterpreted(format!(
                    "{why}: {}",
                    rule.get("expr").unwrap_or(&Json::Null)
                )),
            })
            .collect();
        walker.insert_chain(name, *base, entries);
    }
    let declared: BTreeSet<&str> = chains.iter().map(|(n, _)| &**n).collect();
    let orphans: BTreeSet<&str> = rules
        .iter()
        .map(|(chain, _)| chain.as_str())
        .filter(|chain| !declared.contains(chain))
        .collect();
    for chain in orphans {
        notes.push(format!("rules of an undeclared chain {chain} are left out"));
    }
    Ok(ListedTable {
        rules: walker,
        affinity,
        notes,
    })
}

/// Puts the clients of an affinity set's elements into `affinity`; returns how many elements
/// were not understood. The kernel lists no expired element, so every one listed is live.
fn affinity_elements(
    json: &Json,
    family: IpFamily,
    name: &str,
    affinity: &mut AffinityState,
) -> usize {
    let mut skipped = 0;
    for element in json
        .get("elem")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        // `"10.0.0.9"` or `{"elem": {"val": "10.0.0.9", "expires": 9998, …}}`.
        let value = match element.get("elem") {
            Some(elem) => elem.get("val"),
            None => Some(element),
        };
        let client: Option<IpAddr> = value
            .and_then(Json::as_str)
            .and_then(|text| text.parse().ok())
            .filter(|ip| IpFamily::of(ip) == family);
        match client {
            Some(client) => affinity.insert(name, client),
            None => skipped += 1,
        }
    }
    skipped
}

/// Puts a dynamic map's elements (client . frontend : endpoint) into `affinity`; returns how
/// many were not understood.
fn affinity_mappings(
    json: &Json,
    key_type: &[DataType],
    value_type: &[DataType],
    name: &str,
    affinity: &mut AffinityState,
) -> usize {
    let mut skipped = 0;
    for element in json
        .get("elem")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        // `[{"elem": {"val": KEY, "timeout": …, "expires": …}}, VALUE]` or `[KEY, VALUE]`.
        let pair = element.as_array().map(Vec::as_slice).unwrap_or_default();
        let parsed = match pair {
            [key, value] => {
                let key = key.get("elem").and_then(|e| e.get("val")).unwrap_or(key);
                parse_key(key, key_type).zip(parse_key(value, value_type))
            }
            _ => None,
        };
        match parsed {
            Some((key, value)) => affinity.insert_mapping(name, key, value),
            None => skipped += 1,
        }
    }
    skipped
}

struct Context<'a> {
    family: IpFamily,
    unreadable: &'a HashSet<String>,
    known: &'a HashSet<String>,
}

/// The protocol of a `tcp dport` (`udp`, `sctp`) payload expression.
fn port_of_protocol(json: &Json) -> Option<Protocol> {
    let payload = json.get("payload")?;
    if payload.get("field").and_then(Json::as_str) != Some("dport") {
        return None;
    }
    Protocol::from_lower(payload.get("protocol").and_then(Json::as_str)?)
}

/// The protocol folded into the key of a `dnat … map @m` expression (see
/// [`Context::lookup_key`]), if any.
fn lookup_key_protocol(expr: &Json) -> Option<Protocol> {
    let key = expr.get("dnat")?.get("addr")?.get("map")?.get("key")?;
    match key.get("concat") {
        Some(parts) => parts.as_array()?.iter().find_map(port_of_protocol),
        None => port_of_protocol(key),
    }
}

impl Context<'_> {
    /// One listed rule (`{"family": …, "chain": …, "expr": [...], "comment": …}`).
    fn rule(&self, rule: &Json) -> Result<Rule, String> {
        let expr = rule
            .get("expr")
            .and_then(Json::as_array)
            .ok_or("a rule without expressions")?;
        let mut matches = Vec::new();
        let mut statements = Vec::new();
        for e in expr {
            if let Some(text) = e.as_str() {
                // nft 1.0.6 prints statements it has no JSON form for as their text, e.g.
                // `update @affinity { … : … }`: read that with the script reader.
                statements.extend(self.statement_text(text)?);
                continue;
            }
            let (key, value) = single(e).ok_or("an expression of another form")?;
            if key == "match" {
                if !statements.is_empty() {
                    return Err("a match after a statement".into());
                }
                matches.push(self.match_(value)?);
            } else {
                statements.push(self.statement(key, value)?);
            }
        }
        // `meta l4proto udp` before a map lookup keyed by `th dport` is listed as `udp dport` in
        // the key, the protocol match folded into it: put the match back.
        if let Some(protocol) = expr.iter().find_map(lookup_key_protocol) {
            let has_protocol_match = matches.iter().any(|m| {
                matches!(
                    m,
                    Match::Compare {
                        field: Field::L4Proto,
                        ..
                    }
                )
            });
            if !has_protocol_match {
                matches.push(Match::Compare {
                    field: Field::L4Proto,
                    negated: false,
                    value: Value::Protocol(protocol),
                });
            }
        }
        let comment = match rule.get("comment") {
            None => None,
            Some(comment) => Some(Name::from(comment.as_str().ok_or("a comment")?)),
        };
        Ok(Rule {
            matches,
            statements,
            comment,
        })
    }

    /// Statements nft printed as text, read with kproxy's script reader.
    fn statement_text(&self, text: &str) -> Result<Vec<Statement>, String> {
        let family = match self.family {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        };
        // The listing prints timeouts as `2h46m40s`; the script form wants seconds. It names
        // the port of an update's data by the rule's protocol (`ip daddr . udp dport`): data
        // is bytes, so that is the transport header's port, as kproxy writes it.
        let text = seconds_timeouts(text).ok_or(format!("a timeout in {text:?}"))?;
        let text = match text.split_once(" : ") {
            Some((key, data)) => {
                let mut data = data.to_string();
                for protocol in ["tcp", "udp", "sctp"] {
                    data = data.replace(&format!("{protocol} dport"), "th dport");
                }
                format!("{key} : {data}")
            }
            None => text,
        };
        let script =
            format!("add table {family} t\nadd chain {family} t c\nadd rule {family} t c {text}\n");
        let ruleset = crate::nftables::Ruleset::from_nft_script(&script)
            .map_err(|e| format!("{text:?}: {}", e.message))?;
        let rule = ruleset
            .chain("c")
            .and_then(|c| c.rules.first())
            .ok_or("no rule")?;
        if !rule.matches.is_empty() {
            return Err(format!("matches in a statement: {text:?}"));
        }
        for statement in &rule.statements {
            if let Statement::UpdateMap { map, .. } | Statement::UpdateSet { set: map, .. } =
                statement
            {
                self.container(&Json::String(format!("@{map}")))?;
            }
        }
        Ok(rule.statements.clone())
    }

    /// A container a rule names (`@name`), which must be declared and readable.
    fn container(&self, json: &Json) -> Result<Name, String> {
        let name = json
            .as_str()
            .and_then(|s| s.strip_prefix('@'))
            .ok_or("not a named set or map")?;
        if self.unreadable.contains(name) {
            return Err(format!("@{name} was not understood"));
        }
        if !self.known.contains(name) {
            return Err(format!("@{name} is not declared"));
        }
        Ok(Name::from(name))
    }

    fn match_(&self, json: &Json) -> Result<Match, String> {
        let object = only_keys(json, &["op", "left", "right"])?;
        let op = object.get("op").and_then(Json::as_str).ok_or("no op")?;
        let left = object.get("left").ok_or("no left")?;
        let right = object.get("right").ok_or("no right")?;
        let positive = matches!(op, "==" | "in");
        if let Some(ct) = left.get("ct") {
            let key = only_keys(ct, &["key"])?
                .get("key")
                .and_then(Json::as_str)
                .ok_or("ct without key")?;
            let flag = one_word(right).ok_or("a ct value of another form")?;
            return match (positive, key, flag) {
                (true, "state", "new") => Ok(Match::CtStateNew),
                (true, "status", "dnat") => Ok(Match::CtStatusDnat),
                _ => Err(format!("ct {key} {op} {flag}")),
            };
        }
        if let Some([mark, bits]) = left.get("&").and_then(Json::as_array).map(Vec::as_slice) {
            let bits = bits.as_u64().and_then(|b| u32::try_from(b).ok());
            return match (is_meta(mark, "mark"), bits, op, right.as_u64()) {
                (true, Some(bits), "!=", Some(0)) if bits != 0 => {
                    Ok(Match::MarkBitSet(Name::from(format!("0x{bits:08x}"))))
                }
                _ => Err("a mark test of another form".into()),
            };
        }
        if let Some(fib) = left.get("fib") {
            let fib = only_keys(fib, &["result", "flags"])?;
            let flags = one_word(fib.get("flags").ok_or("fib without flags")?);
            let direction = match flags {
                Some("saddr") => Direction::Source,
                Some("daddr") => Direction::Destination,
                _ => return Err("fib of another form".into()),
            };
            return match (
                fib.get("result").and_then(Json::as_str),
                positive,
                one_word(right),
            ) {
                (Some("type"), true, Some("local")) => Ok(Match::FibLocal(direction)),
                _ => Err("fib of another form".into()),
            };
        }
        let key = self.fields(left)?;
        if right.as_str().is_some_and(|s| s.starts_with('@')) {
            return Ok(Match::InSet {
                key,
                set: self.container(right)?,
                negated: !positive,
            });
        }
        let [field] = key.as_slice() else {
            return Err("a comparison of concatenated fields".into());
        };
        let negated = match op {
            "==" | "in" => false,
            "!=" => true,
            _ => return Err(format!("operator {op}")),
        };
        Ok(Match::Compare {
            field: *field,
            negated,
            value: self.value(right, *field, true)?,
        })
    }

    /// A field (`ip saddr`, `ip daddr`, `meta l4proto`, `th dport`) or a concatenation of them.
    fn fields(&self, json: &Json) -> Result<Vec<Field>, String> {
        match json.get("concat") {
            Some(parts) => parts
                .as_array()
                .ok_or("concat of another form")?
                .iter()
                .map(|part| self.field(part))
                .collect(),
            None => Ok(vec![self.field(json)?]),
        }
    }

    /// The key of a map lookup. nft lists kproxy's `th dport` there as `tcp dport` (or `udp`,
    /// `sctp`) when the rule matches that protocol first, folding the match into the key
    /// ([`lookup_key_protocol`] puts it back): the transport header's port.
    fn lookup_key(&self, json: &Json) -> Result<Vec<Field>, String> {
        let parts: Vec<&Json> = match json.get("concat") {
            Some(parts) => parts
                .as_array()
                .ok_or("concat of another form")?
                .iter()
                .collect(),
            None => vec![json],
        };
        parts
            .into_iter()
            .map(|part| {
                if port_of_protocol(part).is_some() {
                    Ok(Field::DestinationPort)
                } else {
                    self.field(part)
                }
            })
            .collect()
    }

    fn field(&self, json: &Json) -> Result<Field, String> {
        if is_meta(json, "l4proto") {
            return Ok(Field::L4Proto);
        }
        if let Some(n) = random_modulus(json)? {
            return Ok(Field::RandomNumber(
                u32::try_from(n).map_err(|_| format!("numgen mod {n}"))?,
            ));
        }
        if let Some(ct) = json.get("ct") {
            let ct = only_keys(ct, &["key", "dir"])?;
            let ip = match self.family {
                IpFamily::V4 => "ip daddr",
                IpFamily::V6 => "ip6 daddr",
            };
            return match (
                ct.get("key").and_then(Json::as_str),
                ct.get("dir").and_then(Json::as_str),
            ) {
                (Some(key), Some("original")) if key == ip => Ok(Field::OriginalDestinationAddr),
                (Some("proto-dst"), Some("original")) => Ok(Field::OriginalDestinationPort),
                _ => Err(format!("ct {json}")),
            };
        }
        let payload = json.get("payload").ok_or("a field kproxy does not use")?;
        let payload = only_keys(payload, &["protocol", "field"])?;
        let protocol = payload.get("protocol").and_then(Json::as_str);
        let field = payload.get("field").and_then(Json::as_str);
        let ip = match self.family {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        };
        match (protocol, field) {
            (Some(p), Some("saddr")) if p == ip => Ok(Field::SourceAddr),
            (Some(p), Some("daddr")) if p == ip => Ok(Field::DestinationAddr),
            (Some("th"), Some("dport")) => Ok(Field::DestinationPort),
            (p, f) => Err(format!("field {} {}", p.unwrap_or("?"), f.unwrap_or("?"))),
        }
    }

    /// A literal for `field`: a value, a prefix, or (at the top) an anonymous set of them.
    fn value(&self, json: &Json, field: Field, set_allowed: bool) -> Result<Value, String> {
        if let Some(members) = json.get("set") {
            if !set_allowed {
                return Err("a set inside a set".into());
            }
            let members = members
                .as_array()
                .ok_or("a set of another form")?
                .iter()
                .map(|m| self.value(m, field, false))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(Value::Set {
                members: members.into(),
                joining: Joining::Spaced,
            });
        }
        let data_type = match field {
            Field::SourceAddr | Field::DestinationAddr | Field::OriginalDestinationAddr => {
                DataType::addr(self.family)
            }
            Field::L4Proto => DataType::InetProto,
            Field::DestinationPort | Field::OriginalDestinationPort => DataType::InetService,
            Field::RandomNumber(_) => DataType::Slot,
        };
        if let Some(prefix) = json.get("prefix") {
            if data_type != DataType::addr(self.family) {
                return Err("a prefix of a non-address field".into());
            }
            let prefix = only_keys(prefix, &["addr", "len"])?;
            let addr: IpAddr = prefix
                .get("addr")
                .and_then(Json::as_str)
                .and_then(|a| a.parse().ok())
                .ok_or("a prefix address")?;
            let len = prefix
                .get("len")
                .and_then(Json::as_u64)
                .and_then(|l| u8::try_from(l).ok())
                .ok_or("a prefix length")?;
            if IpFamily::of(&addr) != self.family {
                return Err(format!("{addr} in an {} table", self.family));
            }
            let net = IpNet::new(addr, len).map_err(|_| format!("prefix {addr}/{len}"))?;
            return Ok(Value::Net(net));
        }
        parse_value(json, data_type).ok_or_else(|| format!("value {json}"))
    }

    fn statement(&self, key: &str, json: &Json) -> Result<Statement, String> {
        match key {
            "jump" | "goto" | "drop" | "reject" => Ok(Statement::Verdict(self.verdict(key, json)?)),
            "vmap" => {
                let vmap = only_keys(json, &["key", "data"])?;
                let map_key = vmap.get("key").ok_or("vmap without key")?;
                let data = vmap.get("data").ok_or("vmap without data")?;
                if let Some(n) = random_modulus(map_key)? {
                    let verdicts = numbered(data, n)?
                        .into_iter()
                        .map(|v| {
                            let (key, value) = single(v).ok_or("a verdict of another form")?;
                            self.verdict(key, value)
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    return Ok(Statement::RandomVerdict(verdicts));
                }
                Ok(Statement::VerdictMap {
                    key: self.fields(map_key)?,
                    map: self.container(data)?,
                })
            }
            "mangle" => {
                let mangle = only_keys(json, &["key", "value"])?;
                if !mangle.get("key").is_some_and(|k| is_meta(k, "mark")) {
                    return Err("a mangle of another field".into());
                }
                let value = mangle.get("value").ok_or("mangle without value")?;
                let (op, operands) = single(value).ok_or("a mark value of another form")?;
                let [mark, bits] = operands.as_array().map(Vec::as_slice).unwrap_or_default()
                else {
                    return Err("a mark value of another form".into());
                };
                let bits = bits
                    .as_u64()
                    .and_then(|b| u32::try_from(b).ok())
                    .filter(|_| is_meta(mark, "mark"))
                    .ok_or("a mark value of another form")?;
                let bits = Name::from(format!("0x{bits:08x}"));
                match op {
                    "|" => Ok(Statement::MarkOr(bits)),
                    "^" => Ok(Statement::MarkXor(bits)),
                    _ => Err(format!("mark set mark {op}")),
                }
            }
            "masquerade" => {
                let flags = only_keys(json, &["flags"])?.get("flags");
                match flags.and_then(one_word) {
                    Some("fully-random") => Ok(Statement::MasqueradeFullyRandom),
                    _ => Err("masquerade without fully-random alone".into()),
                }
            }
            "set" => {
                let set = only_keys(json, &["op", "elem", "set"])?;
                if set.get("op").and_then(Json::as_str) != Some("update") {
                    return Err("a set statement other than update".into());
                }
                let field = self.field(set.get("elem").ok_or("update without elem")?)?;
                Ok(Statement::UpdateSet {
                    set: self.container(set.get("set").ok_or("update without set")?)?,
                    field,
                })
            }
            "dnat" => self.dnat(json),
            other => Err(format!("statement {other}")),
        }
    }

    fn verdict(&self, key: &str, json: &Json) -> Result<Verdict, String> {
        if key == "reject" {
            let default = match self.family {
                IpFamily::V4 => "icmp",
                IpFamily::V6 => "icmpv6",
            };
            return match json {
                Json::Null => Ok(Verdict::Reject),
                _ => {
                    let reject = only_keys(json, &["type", "expr"])?;
                    match (
                        reject.get("type").and_then(Json::as_str),
                        reject.get("expr").and_then(Json::as_str),
                    ) {
                        (Some(t), Some("port-unreachable")) if t == default || t == "icmpx" => {
                            Ok(Verdict::Reject)
                        }
                        _ => Err(format!("reject {json}")),
                    }
                }
            };
        }
        let mut object = JsonObject::new();
        object.insert(key.to_string(), json.clone());
        let verdict = parse_verdict(&Json::Object(object)).ok_or(format!("verdict {key}"))?;
        if let Verdict::Jump(_) | Verdict::Goto(_) = &verdict {
            only_keys(json, &["target"])?;
        } else if !json.is_null() {
            return Err(format!("{key} {json}"));
        }
        Ok(verdict)
    }

    /// `dnat to ADDR:PORT`, or `dnat ip addr . port to numgen random mod N map { … }`.
    fn dnat(&self, json: &Json) -> Result<Statement, String> {
        let dnat = only_keys(json, &["family", "addr", "port"])?;
        if let Some(family) = dnat.get("family") {
            let word = match self.family {
                IpFamily::V4 => "ip",
                IpFamily::V6 => "ip6",
            };
            if family.as_str() != Some(word) {
                return Err(format!("dnat family {family}"));
            }
        }
        let addr = dnat.get("addr").ok_or("dnat without addr")?;
        if let Some(map) = addr.get("map") {
            if dnat.contains_key("port") {
                return Err("dnat map with a port".into());
            }
            let map = only_keys(map, &["key", "data"])?;
            let data = map.get("data").ok_or("map without data")?;
            if data.is_string() {
                // `dnat ip addr . port to KEY map @map` (the maps layout).
                return Ok(Statement::DnatMap {
                    key: self.lookup_key(map.get("key").ok_or("map without key")?)?,
                    map: self.container(data)?,
                });
            }
            let n = random_modulus(map.get("key").ok_or("map without key")?)?
                .ok_or("a dnat map not keyed by numgen")?;
            let targets = numbered(map.get("data").ok_or("map without data")?, n)?
                .into_iter()
                .map(|target| {
                    let parts = target
                        .get("concat")
                        .and_then(Json::as_array)
                        .map(Vec::as_slice)
                        .unwrap_or_default();
                    match parts {
                        [addr, port] => self.socket(addr, port),
                        _ => Err(format!("dnat target {target}")),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(Statement::RandomDnat(targets));
        }
        let port = dnat.get("port").ok_or("dnat without port")?;
        Ok(Statement::Dnat(self.socket(addr, port)?))
    }

    fn socket(&self, addr: &Json, port: &Json) -> Result<SocketAddr, String> {
        let ip: IpAddr = addr
            .as_str()
            .and_then(|a| a.parse().ok())
            .ok_or(format!("address {addr}"))?;
        if IpFamily::of(&ip) != self.family {
            return Err(format!("{ip} in an {} table", self.family));
        }
        let port = port
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or(format!("port {port}"))?;
        Ok(SocketAddr::new(ip, port))
    }
}

/// `timeout 2h46m40s` (as nft lists it) → `timeout 10000s`; text without timeouts unchanged.
fn seconds_timeouts(text: &str) -> Option<String> {
    let mut words: Vec<String> = Vec::new();
    let mut after_timeout = false;
    for word in text.split(' ') {
        if after_timeout {
            words.push(format!("{}s", duration_seconds(word)?));
        } else {
            words.push(word.to_string());
        }
        after_timeout = word == "timeout";
    }
    Some(words.join(" "))
}

/// `2h46m40s`, `10m`, `5s`, `1d` → seconds.
fn duration_seconds(text: &str) -> Option<u64> {
    let mut total: u64 = 0;
    let mut number = String::new();
    let mut seen = false;
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            'd' => 86_400,
            'h' => 3_600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        total = total.checked_add(number.parse::<u64>().ok()?.checked_mul(unit)?)?;
        number.clear();
        seen = true;
    }
    (seen && number.is_empty()).then_some(total)
}

/// `{"numgen": {"mode": "random", "mod": N, "offset": 0}}` → `Some(N)`; another key → `None`.
fn random_modulus(json: &Json) -> Result<Option<usize>, String> {
    let Some(numgen) = json.get("numgen") else {
        return Ok(None);
    };
    let numgen = only_keys(numgen, &["mode", "mod", "offset"])?;
    let modulus = numgen
        .get("mod")
        .and_then(Json::as_u64)
        .and_then(|m| usize::try_from(m).ok())
        .filter(|m| *m > 0);
    match (
        numgen.get("mode").and_then(Json::as_str),
        modulus,
        numgen.get("offset").map_or(Some(0), Json::as_u64),
    ) {
        (Some("random"), Some(n), Some(0)) => Ok(Some(n)),
        _ => Err(format!("numgen {}", Json::Object(numgen.clone()))),
    }
}

/// An anonymous map `{"set": [[0, V0], [1, V1], …]}` with exactly the keys `0..n` in order.
fn numbered(json: &Json, n: usize) -> Result<Vec<&Json>, String> {
    let pairs = json
        .get("set")
        .and_then(Json::as_array)
        .ok_or("an anonymous map of another form")?;
    if pairs.len() != n {
        return Err(format!(
            "numgen mod {n} with {} element(s): some numbers would find nothing",
            pairs.len()
        ));
    }
    pairs
        .iter()
        .enumerate()
        .map(|(i, pair)| match pair.as_array().map(Vec::as_slice) {
            Some([key, value]) if key.as_u64() == Some(i as u64) => Ok(value),
            _ => Err(format!("numgen map element {pair}")),
        })
        .collect()
}

/// `{"meta": {"key": KEY}}`.
fn is_meta(json: &Json, key: &str) -> bool {
    json.get("meta")
        .and_then(Json::as_object)
        .is_some_and(|m| m.len() == 1 && m.get("key").and_then(Json::as_str) == Some(key))
}

/// An object of one key: `{"drop": null}` → `("drop", null)`.
fn single(json: &Json) -> Option<(&str, &Json)> {
    let object = json.as_object()?;
    if object.len() != 1 {
        return None;
    }
    object.iter().next().map(|(k, v)| (k.as_str(), v))
}

/// `"new"` or `["new"]`.
fn one_word(json: &Json) -> Option<&str> {
    match json {
        Json::String(s) => Some(s),
        Json::Array(items) => match items.as_slice() {
            [Json::String(s)] => Some(s),
            _ => None,
        },
        _ => None,
    }
}

/// The object, if it has no keys but `allowed` (more would be something not understood).
fn only_keys<'j>(json: &'j Json, allowed: &[&str]) -> Result<&'j JsonObject<String, Json>, String> {
    let object = json.as_object().ok_or(format!("{json} is not an object"))?;
    match object.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(key) => Err(format!("\"{key}\" in {json}")),
        None => Ok(object),
    }
}

/// Runs `nft -j list table <family> <table>` in this network namespace and reads it.
pub fn read(family: IpFamily, table: &str) -> anyhow::Result<ListedTable> {
    let listing = crate::sync::nftables::NftApplier::new()
        .with_table(table, None)
        .list_table(family)?;
    let Some(listing) = listing else {
        anyhow::bail!(
            "no {table} table ({} family) in this network namespace: is kproxy running in \
             nftables mode here, with this --nftables-layout?",
            crate::sync::nftables::family_word(family)
        );
    };
    Ok(read_listing(&listing, family)?)
}

#[cfg(test)]
mod tests_support {
    pub use super::*;
    pub use crate::nftables::write_rule;

    /// A listing with one chain holding the given rules (JSON expression arrays), the sets
    /// `s` (addresses), `aff` (an affinity set holding 10.0.0.9) and the map `m`.
    pub fn listing(rules: &[&str]) -> String {
        let mut items = vec![
            r#"{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}"#.to_string(),
            r#"{"table": {"family": "ip", "name": "kube-proxy", "handle": 1}}"#.to_string(),
            r#"{"set": {"family": "ip", "name": "s", "table": "kube-proxy", "type": "ipv4_addr", "handle": 2, "elem": ["10.1.0.1"]}}"#.to_string(),
            r#"{"set": {"family": "ip", "name": "aff", "table": "kube-proxy", "type": "ipv4_addr", "handle": 3, "size": 65535, "flags": ["timeout"], "timeout": 100, "elem": [{"elem": {"val": "10.0.0.9", "expires": 99}}, "10.0.0.8", {"elem": {"val": "fd00::1"}}]}}"#.to_string(),
            r#"{"map": {"family": "ip", "name": "m", "table": "kube-proxy", "type": ["ipv4_addr", "inet_proto", "inet_service"], "handle": 4, "map": "verdict", "elem": [[{"concat": ["10.1.0.1", "tcp", 80]}, {"goto": {"target": "c"}}]]}}"#.to_string(),
            r#"{"set": {"family": "ip", "name": "odd", "table": "kube-proxy", "type": "ether_addr", "handle": 5}}"#.to_string(),
            r#"{"chain": {"family": "ip", "table": "kube-proxy", "name": "c", "handle": 6, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}}"#.to_string(),
        ];
        for (i, expr) in rules.iter().enumerate() {
            items.push(format!(
                r#"{{"rule": {{"family": "ip", "table": "kube-proxy", "chain": "c", "handle": {}, "expr": {expr}}}}}"#,
                10 + i
            ));
        }
        format!(r#"{{"nftables": [{}]}}"#, items.join(",\n"))
    }

    pub fn read_rules(rules: &[&str]) -> (ListedTable, Vec<Result<String, String>>) {
        let listed = read_listing(listing(rules).as_bytes(), IpFamily::V4).expect("listing");
        let texts = (0..rules.len())
            .map(|i| match listed.rules.chain("c").and_then(|c| c.get(i)) {
                Some(Entry::Rule(rule)) => {
                    let mut text = String::new();
                    let _ = write_rule(&mut text, IpFamily::V4, rule);
                    Ok(text)
                }
                Some(Entry::Uninterpreted(text)) => Err(text.clone()),
                None => Err("missing".into()),
            })
            .collect();
        (listed, texts)
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;

    #[test]
    fn kproxys_expressions_are_read() {
        let rules = [
            r#"[{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}}, {"jump": {"target": "c"}}]"#,
            r#"[{"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": ["dnat"]}}, {"masquerade": {"flags": ["fully-random"]}}]"#,
            r#"[{"match": {"op": "!=", "left": {"&": [{"meta": {"key": "mark"}}, 16384]}, "right": 0}}, {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"^": [{"meta": {"key": "mark"}}, 16384]}}}, {"masquerade": {"flags": "fully-random"}}]"#,
            r#"[{"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}}, {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"|": [{"meta": {"key": "mark"}}, 16384]}}}]"#,
            r#"[{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "@s"}}, {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"set": [{"prefix": {"addr": "10.244.0.0", "len": 16}}, "192.0.2.1"]}}}, {"drop": null}]"#,
            r#"[{"vmap": {"key": {"concat": [{"payload": {"protocol": "ip", "field": "daddr"}}, {"meta": {"key": "l4proto"}}, {"payload": {"protocol": "th", "field": "dport"}}]}, "data": "@m"}}]"#,
            r#"[{"vmap": {"key": {"numgen": {"mode": "random", "mod": 2, "offset": 0}}, "data": {"set": [[0, {"goto": {"target": "c"}}], [1, {"jump": {"target": "c"}}]]}}}]"#,
            r#"[{"set": {"op": "update", "elem": {"payload": {"protocol": "ip", "field": "saddr"}}, "set": "@aff"}}, {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}]"#,
            r#"[{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}, {"dnat": {"addr": "10.244.1.5", "port": 80}}]"#,
            r#"[{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}}, {"dnat": {"family": "ip", "addr": {"map": {"key": {"numgen": {"mode": "random", "mod": 2, "offset": 0}}, "data": {"set": [[0, {"concat": ["10.244.1.5", 53]}], [1, {"concat": ["10.244.2.7", 53]}]]}}}}}]"#,
            r#"[{"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 8080}}, {"reject": {"type": "icmp", "expr": "port-unreachable"}}]"#,
            r#"[{"reject": null}]"#,
        ];
        let (listed, texts) = read_rules(&rules);
        let expected = [
            Ok("ct state new jump c"),
            Ok("ct status dnat masquerade fully-random"),
            Ok("mark and 0x00004000 != 0 mark set mark xor 0x00004000 masquerade fully-random"),
            Ok("fib daddr type local mark set mark or 0x00004000"),
            Ok("ip daddr @s ip saddr != { 10.244.0.0/16 , 192.0.2.1 } drop"),
            Ok("ip daddr . meta l4proto . th dport vmap @m"),
            Ok("numgen random mod 2 vmap { 0 : goto c , 1 : jump c }"),
            // The rule type holds matches before statements.
            Err("a match after a statement"),
            Ok("meta l4proto tcp dnat to 10.244.1.5:80"),
            Ok("meta l4proto udp dnat ip addr . port to numgen random mod 2 map { 0 : 10.244.1.5 . 53 , 1 : 10.244.2.7 . 53 }"),
            Ok("th dport 8080 reject"),
            Ok("reject"),
        ];
        for ((text, want), expr) in texts.iter().zip(expected).zip(rules) {
            match (text, want) {
                (Ok(text), Ok(want)) => assert_eq!(text, want, "{expr}"),
                (Err(text), Err(want)) => assert!(text.contains(want), "{text}"),
                _ => panic!("{expr}: {text:?}, wanted {want:?}"),
            }
        }
        assert!(listed.affinity.contains("aff", "10.0.0.9".parse().unwrap()));
        assert!(listed.affinity.contains("aff", "10.0.0.8".parse().unwrap()));
        assert!(
            listed.notes.iter().any(|n| n.contains("aff: 1 element")),
            "{:?}",
            listed.notes
        );
        assert!(
            listed.notes.iter().any(|n| n.contains("odd")),
            "{:?}",
            listed.notes
        );
    }
}

#[cfg(test)]
mod refusals {
    use super::tests_support::*;

    /// Expressions outside kproxy's vocabulary make the whole rule uninterpreted, with why.
    #[test]
    fn other_expressions_are_not_interpreted() {
        let refused = [
            (
                r#"[{"counter": {"packets": 0, "bytes": 0}}, {"accept": null}]"#,
                "statement counter",
            ),
            (r#"[{"accept": null}]"#, "statement accept"),
            (
                r#"[{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "eth0"}}, {"drop": null}]"#,
                "a field kproxy does not use",
            ),
            (
                r#"[{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 80}}, {"drop": null}]"#,
                "field tcp dport",
            ),
            (
                r#"[{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}}, "right": "fd00::1"}}, {"drop": null}]"#,
                "field ip6 saddr",
            ),
            (
                r#"[{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "@odd"}}, {"drop": null}]"#,
                "@odd was not understood",
            ),
            (
                r#"[{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "@nothere"}}, {"drop": null}]"#,
                "not declared",
            ),
            (
                r#"[{"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": {"range": [80, 90]}}}, {"drop": null}]"#,
                "value",
            ),
            (
                r#"[{"match": {"op": "<", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 80}}, {"drop": null}]"#,
                "operator <",
            ),
            (
                r#"[{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["new", "established"]}}, {"drop": null}]"#,
                "ct value",
            ),
            (
                r#"[{"match": {"op": "!=", "left": {"&": [{"meta": {"key": "mark"}}, 16384]}, "right": 1}}, {"drop": null}]"#,
                "mark test",
            ),
            (
                r#"[{"mangle": {"key": {"meta": {"key": "mark"}}, "value": 5}}]"#,
                "mark value",
            ),
            (r#"[{"masquerade": null}]"#, "not an object"),
            (
                r#"[{"masquerade": {"flags": ["random", "fully-random"]}}]"#,
                "fully-random alone",
            ),
            (
                r#"[{"set": {"op": "add", "elem": {"payload": {"protocol": "ip", "field": "saddr"}}, "set": "@aff"}}]"#,
                "other than update",
            ),
            (
                r#"[{"dnat": {"addr": "10.244.1.5", "port": 80, "flags": ["random"]}}]"#,
                "flags",
            ),
            (r#"[{"dnat": {"addr": "10.244.1.5"}}]"#, "without port"),
            (
                r#"[{"dnat": {"addr": "fd00::5", "port": 80}}]"#,
                "IPv4 table",
            ),
            (
                r#"[{"dnat": {"family": "ip", "addr": {"map": {"key": {"numgen": {"mode": "random", "mod": 3, "offset": 0}}, "data": {"set": [[0, {"concat": ["10.244.1.5", 53]}], [1, {"concat": ["10.244.2.7", 53]}]]}}}}}]"#,
                "mod 3 with 2",
            ),
            (
                r#"[{"vmap": {"key": {"numgen": {"mode": "inc", "mod": 2, "offset": 0}}, "data": {"set": []}}}]"#,
                "numgen",
            ),
            (
                r#"[{"vmap": {"key": {"numgen": {"mode": "random", "mod": 2, "offset": 0}}, "data": {"set": [[1, {"goto": {"target": "c"}}], [0, {"goto": {"target": "c"}}]]}}}]"#,
                "element",
            ),
            (r#"[{"reject": {"type": "tcp reset"}}]"#, "reject"),
            (r#"[{"jump": {"target": "c", "extra": 1}}]"#, "extra"),
            (r#"[{"drop": 1}]"#, "drop 1"),
            (r#"[{"drop": null, "accept": null}]"#, "another form"),
            (r#"{"not": "an array"}"#, "without expressions"),
        ];
        let exprs: Vec<&str> = refused.iter().map(|(e, _)| *e).collect();
        let (_, texts) = read_rules(&exprs);
        for (text, (expr, why)) in texts.iter().zip(refused) {
            match text {
                Ok(text) => panic!("{expr} read as {text}"),
                Err(text) => assert!(text.contains(why), "{expr}: {text} (wanted {why})"),
            }
        }
    }

    #[test]
    fn listings_that_are_not_nfts_json_are_errors() {
        assert!(super::read_listing(b"garbage", crate::family::IpFamily::V4).is_err());
        assert!(super::read_listing(b"{}", crate::family::IpFamily::V4).is_err());
        let empty = super::read_listing(br#"{"nftables": []}"#, crate::family::IpFamily::V4)
            .expect("an empty listing reads");
        assert!(empty.notes.is_empty());
    }
}
