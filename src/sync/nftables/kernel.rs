//! What the kernel holds in one `kube-proxy` table, as far as a full sync needs to know it:
//! chain names with their declarations, rule counts and whether a set element jumps to them;
//! set and map declarations; the elements of every container whose elements kproxy manages
//! (not the affinity sets, whose elements are live state). Read from `nft -j list table`.

use rustc_hash::{FxHashMap, FxHashSet};
use serde_json::Value as Json;

use crate::model::Protocol;
use crate::nftables::{
    BaseChain, ChainType, DataType, Element, ElementValue, Hook, Map, Name, Set, SetFlag, Value,
    Verdict,
};

/// One family's `kube-proxy` table as read from the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelTable {
    pub chains: Vec<KernelChain>,
    pub containers: Vec<KernelContainer>,
}

impl KernelTable {
    pub fn chain(&self, name: &str) -> Option<&KernelChain> {
        self.chains.iter().find(|c| &*c.name == name)
    }

    pub fn container(&self, name: &str) -> Option<&KernelContainer> {
        self.containers.iter().find(|c| &*c.name == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelChain {
    pub name: Name,
    pub kind: ChainKind,
    /// Number of rules in the chain.
    pub rules: usize,
    /// An element of a set or map (named, or anonymous inside a rule) jumps to this chain. Such
    /// a chain may not be deletable in the transaction that deletes the element on older kernels
    /// (§5.11, "stale objects").
    pub in_element: bool,
}

/// How a chain in the kernel is declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainKind {
    Regular,
    Base(BaseChain),
    /// A base chain kproxy cannot describe (another type, hook or a symbolic priority).
    Other,
}

impl ChainKind {
    /// Whether a chain declared `base` (from the desired ruleset) can be kept as it is.
    pub fn matches(&self, base: Option<&BaseChain>) -> bool {
        match (self, base) {
            (ChainKind::Regular, None) => true,
            (ChainKind::Base(have), Some(want)) => have == want,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelContainer {
    pub name: Name,
    /// Declared as a map (else a set).
    pub is_map: bool,
    pub decl: ContainerDecl,
    /// The elements, when read and understood; `None` for dynamic sets (not read) and for
    /// containers whose elements kproxy could not parse (a full sync then flushes them).
    pub elements: Option<Vec<Element>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerDecl {
    Set(Set),
    Map(Map),
    /// A declaration kproxy does not write (other types or flags): never kept.
    Other,
}

impl ContainerDecl {
    /// Whether `add set` of `set` over this declaration is accepted and keeps the elements:
    /// same key type, flags and, when `set` declares one, size. `dynamic` is not compared: nft
    /// 1.0.6 leaves it out of its JSON listing, and kproxy (like kube-proxy, §5.9) always
    /// writes it on affinity sets.
    pub fn accepts_set(&self, set: &Set) -> bool {
        match self {
            ContainerDecl::Set(have) => {
                have.key_type == set.key_type
                    && same_flags(&have.flags, &set.flags)
                    && same_size(have.size, set.size)
            }
            _ => false,
        }
    }

    /// Whether `add map` of `map` over this declaration is accepted: same key and value types,
    /// flags (`dynamic` aside, as for sets) and, when `map` declares one, size.
    pub fn accepts_map(&self, map: &Map) -> bool {
        match self {
            ContainerDecl::Map(have) => {
                have.key_type == map.key_type
                    && have.value_type == map.value_type
                    && same_flags(&have.flags, &map.flags)
                    && same_size(have.size, map.size)
            }
            _ => false,
        }
    }
}

/// The same flags, `dynamic` aside (see [`ContainerDecl::accepts_set`]).
fn same_flags(have: &[SetFlag], want: &[SetFlag]) -> bool {
    let comparable = |flags: &[SetFlag]| {
        let mut flags: Vec<SetFlag> = flags
            .iter()
            .copied()
            .filter(|f| *f != SetFlag::Dynamic)
            .collect();
        flags.sort();
        flags.dedup();
        flags
    };
    comparable(have) == comparable(want)
}

/// The size wanted, when one is declared (the kernel lists a default for some containers that
/// declare none).
fn same_size(have: Option<u32>, want: Option<u32>) -> bool {
    want.is_none() || have == want
}

/// Why a listing could not be understood.
#[derive(Debug, thiserror::Error)]
#[error("unexpected `nft -j` output: {0}")]
pub struct ParseError(pub String);

/// Parses the output of `nft -j list table <family> kube-proxy`. Elements of sets flagged
/// `timeout` or `dynamic` (the affinity sets) are not parsed.
pub fn parse_listing(text: &[u8]) -> Result<KernelTable, ParseError> {
    let json: Json =
        serde_json::from_slice(text).map_err(|e| ParseError(format!("not JSON: {e}")))?;
    let items = json
        .get("nftables")
        .and_then(Json::as_array)
        .ok_or_else(|| ParseError("no `nftables` array".into()))?;
    let mut table = KernelTable::default();
    let mut rule_counts: FxHashMap<String, usize> = FxHashMap::default();
    let mut element_targets: FxHashSet<String> = FxHashSet::default();
    for item in items {
        let Some(object) = item.as_object() else {
            continue;
        };
        if let Some(chain) = object.get("chain") {
            table.chains.push(parse_chain(chain)?);
        } else if let Some(rule) = object.get("rule") {
            let chain = str_field(rule, "chain")?;
            *rule_counts.entry(chain.to_string()).or_default() += 1;
            if let Some(expr) = rule.get("expr") {
                collect_targets(expr, false, &mut element_targets);
            }
        } else if let Some(set) = object.get("set") {
            table.containers.push(parse_container(set, false)?);
            if let Some(elem) = set.get("elem") {
                collect_targets(elem, true, &mut element_targets);
            }
        } else if let Some(map) = object.get("map") {
            table.containers.push(parse_container(map, true)?);
            if let Some(elem) = map.get("elem") {
                collect_targets(elem, true, &mut element_targets);
            }
        }
    }
    for chain in &mut table.chains {
        chain.rules = rule_counts.get(&*chain.name).copied().unwrap_or(0);
        chain.in_element = element_targets.contains(&*chain.name);
    }
    Ok(table)
}

/// Parses `nft -j list chain …` and returns the number of rules listed.
pub fn count_rules(text: &[u8]) -> Result<usize, ParseError> {
    let json: Json =
        serde_json::from_slice(text).map_err(|e| ParseError(format!("not JSON: {e}")))?;
    let items = json
        .get("nftables")
        .and_then(Json::as_array)
        .ok_or_else(|| ParseError("no `nftables` array".into()))?;
    Ok(items.iter().filter(|i| i.get("rule").is_some()).count())
}

fn str_field<'j>(object: &'j Json, key: &str) -> Result<&'j str, ParseError> {
    object
        .get(key)
        .and_then(Json::as_str)
        .ok_or_else(|| ParseError(format!("missing `{key}` in {object}")))
}

pub(crate) fn parse_chain(chain: &Json) -> Result<KernelChain, ParseError> {
    let name: Name = str_field(chain, "name")?.into();
    let kind = match chain.get("hook") {
        None => ChainKind::Regular,
        Some(hook) => {
            let kind = match chain.get("type").and_then(Json::as_str) {
                Some("filter") => Some(ChainType::Filter),
                Some("nat") => Some(ChainType::Nat),
                _ => None,
            };
            let hook = match hook.as_str() {
                Some("prerouting") => Some(Hook::Prerouting),
                Some("input") => Some(Hook::Input),
                Some("forward") => Some(Hook::Forward),
                Some("output") => Some(Hook::Output),
                Some("postrouting") => Some(Hook::Postrouting),
                _ => None,
            };
            let priority = chain
                .get("prio")
                .and_then(Json::as_i64)
                .and_then(|p| i32::try_from(p).ok());
            match (kind, hook, priority) {
                (Some(kind), Some(hook), Some(priority)) => ChainKind::Base(BaseChain {
                    kind,
                    hook,
                    priority,
                }),
                _ => ChainKind::Other,
            }
        }
    };
    Ok(KernelChain {
        name,
        kind,
        rules: 0,
        in_element: false,
    })
}

pub(crate) fn data_type(text: &str) -> Option<DataType> {
    Some(match text {
        "ipv4_addr" => DataType::Ipv4Addr,
        "ipv6_addr" => DataType::Ipv6Addr,
        "inet_proto" => DataType::InetProto,
        "inet_service" => DataType::InetService,
        "verdict" => DataType::Verdict,
        // A `typeof … numgen …` key part (the maps layout's endpoint slot).
        "integer" => DataType::Slot,
        _ => return None,
    })
}

/// `"type": "ipv4_addr"` or `"type": ["ipv4_addr", "inet_proto", …]`.
fn key_type(json: Option<&Json>) -> Option<Vec<DataType>> {
    match json? {
        Json::String(s) => Some(vec![data_type(s)?]),
        Json::Array(parts) => parts.iter().map(|p| data_type(p.as_str()?)).collect(),
        _ => None,
    }
}

pub(crate) fn parse_container(json: &Json, is_map: bool) -> Result<KernelContainer, ParseError> {
    let name: Name = str_field(json, "name")?.into();
    let comment: Option<Name> = json.get("comment").and_then(Json::as_str).map(Name::from);
    let key = key_type(json.get("type"));
    let mut flags = Vec::new();
    let mut known_flags = true;
    for flag in json
        .get("flags")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        match flag.as_str() {
            Some("dynamic") => flags.push(SetFlag::Dynamic),
            Some("timeout") => flags.push(SetFlag::Timeout),
            Some("interval") => flags.push(SetFlag::Interval),
            _ => known_flags = false,
        }
    }
    let timeout = json
        .get("timeout")
        .and_then(Json::as_u64)
        .and_then(|t| u32::try_from(t).ok());
    let size = json
        .get("size")
        .and_then(Json::as_u64)
        .and_then(|t| u32::try_from(t).ok());
    // Timeout sets and maps are filled from the packet path (affinity).
    let live_state = flags.contains(&SetFlag::Timeout) || flags.contains(&SetFlag::Dynamic);
    let decl = match (key, is_map, known_flags) {
        (Some(key_type), false, true) => ContainerDecl::Set(Set {
            name: name.clone(),
            key_type,
            flags,
            timeout,
            size,
            comment,
        }),
        // `"map": "verdict"`, or data such as `"ipv4_addr . inet_service"`.
        (Some(key_type), true, true) => match json.get("map").and_then(Json::as_str).map(|value| {
            value
                .split(" . ")
                .map(data_type)
                .collect::<Option<Vec<_>>>()
        }) {
            Some(Some(value_type)) => ContainerDecl::Map(Map {
                name: name.clone(),
                key_type,
                value_type,
                flags,
                timeout,
                size,
                comment,
            }),
            _ => ContainerDecl::Other,
        },
        _ => ContainerDecl::Other,
    };
    let elements = match &decl {
        ContainerDecl::Set(set) if !live_state => parse_elements(&name, &set.key_type, json, None),
        ContainerDecl::Map(map) if !live_state => {
            parse_elements(&name, &map.key_type, json, Some(&map.value_type))
        }
        _ => None,
    };
    Ok(KernelContainer {
        name,
        is_map,
        decl,
        elements,
    })
}

/// Every element of a set or map (`value_type` given), or `None` if one of them is not
/// understood.
fn parse_elements(
    container: &Name,
    key_type: &[DataType],
    json: &Json,
    value_type: Option<&[DataType]>,
) -> Option<Vec<Element>> {
    let Some(list) = json.get("elem") else {
        return Some(Vec::new());
    };
    list.as_array()?
        .iter()
        .map(|entry| {
            let (key, value) = if let Some(value_type) = value_type {
                let pair = entry.as_array()?;
                let [key, value] = pair.as_slice() else {
                    return None;
                };
                let value = match value_type {
                    [DataType::Verdict] => ElementValue::Verdict(parse_verdict(value)?),
                    types => ElementValue::Data(parse_key(value, types)?.into_iter().collect()),
                };
                (key, Some(value))
            } else {
                (entry, None)
            };
            // `{"elem": {"val": KEY, "comment": …}}` when the element has a comment.
            let (key, comment) = match key.get("elem") {
                Some(elem) => (
                    elem.get("val")?,
                    elem.get("comment").and_then(Json::as_str).map(Name::from),
                ),
                None => (key, None),
            };
            Some(Element {
                container: container.clone(),
                key: parse_key(key, key_type)?.into_iter().collect(),
                value,
                comment,
            })
        })
        .collect()
}

pub(crate) fn parse_key(json: &Json, key_type: &[DataType]) -> Option<Vec<Value>> {
    let parts: Vec<&Json> = match json.get("concat") {
        Some(concat) => concat.as_array()?.iter().collect(),
        None => vec![json],
    };
    if parts.len() != key_type.len() {
        return None;
    }
    parts
        .iter()
        .zip(key_type)
        .map(|(part, t)| parse_value(part, *t))
        .collect()
}

pub(crate) fn parse_value(json: &Json, t: DataType) -> Option<Value> {
    match t {
        DataType::Slot => json
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Value::Integer),
        DataType::Ipv4Addr | DataType::Ipv6Addr => {
            let ip: std::net::IpAddr = json.as_str()?.parse().ok()?;
            (crate::family::IpFamily::of(&ip) == family_of(t)).then_some(Value::Addr(ip))
        }
        DataType::InetProto => match json {
            Json::String(s) => Protocol::from_lower(s).map(Value::Protocol),
            Json::Number(n) => {
                Protocol::from_number(u8::try_from(n.as_u64()?).ok()?).map(Value::Protocol)
            }
            _ => None,
        },
        DataType::InetService => match json {
            Json::Number(n) => Some(Value::Port(u16::try_from(n.as_u64()?).ok()?)),
            Json::String(s) => Some(Value::Port(s.parse().ok()?)),
            _ => None,
        },
        DataType::Verdict => None,
    }
}

fn family_of(t: DataType) -> crate::family::IpFamily {
    match t {
        DataType::Ipv6Addr => crate::family::IpFamily::V6,
        _ => crate::family::IpFamily::V4,
    }
}

pub(crate) fn parse_verdict(json: &Json) -> Option<Verdict> {
    let object = json.as_object()?;
    if let Some(target) = object.get("goto") {
        return Some(Verdict::Goto(target.get("target")?.as_str()?.into()));
    }
    if let Some(target) = object.get("jump") {
        return Some(Verdict::Jump(target.get("target")?.as_str()?.into()));
    }
    if object.contains_key("drop") {
        return Some(Verdict::Drop);
    }
    None
}

/// Collects the chains that `jump`/`goto` verdicts inside set literals (`inside_set`) name.
/// Direct verdicts of a rule do not count: a flush of the rule releases them at once.
fn collect_targets(json: &Json, inside_set: bool, out: &mut FxHashSet<String>) {
    match json {
        Json::Object(object) => {
            for (key, value) in object {
                if inside_set && (key == "goto" || key == "jump") {
                    if let Some(target) = value.get("target").and_then(Json::as_str) {
                        out.insert(target.to_string());
                    }
                }
                collect_targets(value, inside_set || key == "set", out);
            }
        }
        Json::Array(items) => {
            for item in items {
                collect_targets(item, inside_set, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `nft -j list table ip kube-proxy` of nft 1.0.6 (shortened).
    const LISTING: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
{"table": {"family": "ip", "name": "kube-proxy", "handle": 1}},
{"set": {"family": "ip", "name": "affinity-a", "table": "kube-proxy", "type": "ipv4_addr", "handle": 3, "size": 65535, "flags": ["timeout"], "timeout": 100, "elem": [{"elem": {"val": "10.1.1.1", "expires": 99}}]}},
{"map": {"family": "ip", "name": "service-ips", "table": "kube-proxy", "type": ["ipv4_addr", "inet_proto", "inet_service"], "handle": 4, "comment": "ClusterIP", "map": "verdict", "elem": [[{"concat": ["10.96.0.10", "tcp", 80]}, {"goto": {"target": "ep-a"}}]]}},
{"map": {"family": "ip", "name": "no-endpoint-services", "table": "kube-proxy", "type": ["ipv4_addr", "inet_proto", "inet_service"], "handle": 5, "comment": "x", "map": "verdict", "elem": [[{"elem": {"val": {"concat": ["10.96.0.11", "udp", 53]}, "comment": "ns/svc:p"}}, {"drop": null}]]}},
{"set": {"family": "ip", "name": "cluster-ips", "table": "kube-proxy", "type": "ipv4_addr", "handle": 6, "comment": "Active ClusterIPs", "elem": ["10.96.0.10"]}},
{"set": {"family": "ip", "name": "nodeport-ips", "table": "kube-proxy", "type": "ipv4_addr", "handle": 7}},
{"chain": {"family": "ip", "table": "kube-proxy", "name": "nat-prerouting", "handle": 8, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
{"chain": {"family": "ip", "table": "kube-proxy", "name": "services", "handle": 1}},
{"chain": {"family": "ip", "table": "kube-proxy", "name": "ep-a", "handle": 2}},
{"chain": {"family": "ip", "table": "kube-proxy", "name": "ep-b", "handle": 9}},
{"chain": {"family": "ip", "table": "kube-proxy", "name": "ep-c", "handle": 10}},
{"rule": {"family": "ip", "table": "kube-proxy", "chain": "services", "handle": 7, "expr": [{"vmap": {"key": {"concat": [{"payload": {"protocol": "ip", "field": "daddr"}}, {"meta": {"key": "l4proto"}}, {"payload": {"protocol": "th", "field": "dport"}}]}, "data": "@service-ips"}}]}},
{"rule": {"family": "ip", "table": "kube-proxy", "chain": "services", "handle": 9, "expr": [{"vmap": {"key": {"numgen": {"mode": "random", "mod": 1, "offset": 0}}, "data": {"set": [[0, {"goto": {"target": "ep-b"}}]]}}}]}},
{"rule": {"family": "ip", "table": "kube-proxy", "chain": "services", "handle": 11, "expr": [{"goto": {"target": "ep-c"}}]}},
{"rule": {"family": "ip", "table": "kube-proxy", "chain": "ep-a", "handle": 10, "expr": [{"set": {"op": "update", "elem": {"payload": {"protocol": "ip", "field": "saddr"}}, "set": "@affinity-a"}}]}}
]}"#;

    #[test]
    fn listing_is_understood() {
        let table = parse_listing(LISTING.as_bytes()).unwrap();
        let services = table.chain("services").unwrap();
        assert_eq!((services.rules, services.in_element), (3, false));
        assert_eq!(services.kind, ChainKind::Regular);
        // ep-a from a named map element, ep-b from an anonymous vmap; ep-c only from a rule.
        assert!(table.chain("ep-a").unwrap().in_element);
        assert!(table.chain("ep-b").unwrap().in_element);
        assert!(!table.chain("ep-c").unwrap().in_element);
        assert_eq!(
            table.chain("nat-prerouting").unwrap().kind,
            ChainKind::Base(BaseChain {
                kind: ChainType::Nat,
                hook: Hook::Prerouting,
                priority: -100
            })
        );

        let affinity = table.container("affinity-a").unwrap();
        assert_eq!(affinity.elements, None, "live state is not read");
        let ContainerDecl::Set(set) = &affinity.decl else {
            panic!("{affinity:?}")
        };
        assert_eq!(set.timeout, Some(100));
        assert!(affinity.decl.accepts_set(&Set {
            name: "affinity-a".into(),
            key_type: vec![DataType::Ipv4Addr],
            flags: vec![SetFlag::Dynamic, SetFlag::Timeout],
            timeout: Some(10800),
            size: None,
            comment: None,
        }));

        let no_endpoint = table.container("no-endpoint-services").unwrap();
        let elements = no_endpoint.elements.as_ref().unwrap();
        assert_eq!(
            elements[0],
            Element {
                container: "no-endpoint-services".into(),
                key: smallvec::smallvec![
                    Value::Addr("10.96.0.11".parse().unwrap()),
                    Value::Protocol(Protocol::Udp),
                    Value::Port(53)
                ],
                value: Some(ElementValue::Verdict(Verdict::Drop)),
                comment: Some("ns/svc:p".into()),
            }
        );
        let service_ips = table.container("service-ips").unwrap();
        assert_eq!(
            service_ips.elements.as_ref().unwrap()[0].value,
            Some(ElementValue::Verdict(Verdict::Goto("ep-a".into())))
        );
        assert_eq!(
            table
                .container("cluster-ips")
                .unwrap()
                .elements
                .as_ref()
                .unwrap()[0]
                .key
                .as_slice(),
            [Value::Addr("10.96.0.10".parse().unwrap())]
        );
        assert_eq!(
            table.container("nodeport-ips").unwrap().elements,
            Some(vec![])
        );
    }

    #[test]
    fn unknown_elements_are_reported_as_unreadable() {
        let odd = r#"{"nftables": [{"map": {"name": "m", "type": ["inet_proto", "inet_service"], "map": "verdict", "elem": [[{"concat": ["tcp", 80]}, {"accept": null}]]}}]}"#;
        let table = parse_listing(odd.as_bytes()).unwrap();
        assert_eq!(table.container("m").unwrap().elements, None);
        let other_type = r#"{"nftables": [{"set": {"name": "s", "type": "ether_addr"}}]}"#;
        let table = parse_listing(other_type.as_bytes()).unwrap();
        assert_eq!(table.container("s").unwrap().decl, ContainerDecl::Other);
        assert!(parse_listing(b"garbage").is_err());
    }

    #[test]
    fn rule_count_of_a_chain_listing() {
        let text = r#"{"nftables": [{"metainfo": {}}, {"chain": {"name": "services"}}, {"rule": {"chain": "services"}}, {"rule": {"chain": "services"}}]}"#;
        assert_eq!(count_rules(text.as_bytes()).unwrap(), 2);
    }
}
