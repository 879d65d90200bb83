//! YAML input: each document of the stream is built as a `serde_yaml::Value` whose size is
//! bounded (aliases are expanded by the parser, so a small input could otherwise describe a
//! huge tree), merge keys (`<<: *base`) are applied, and `kind: List` items are moved out, not
//! copied, on their way to the typed objects.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_yaml::value::{Tag, TaggedValue};
use serde_yaml::{Mapping, Value};

use super::bounds::{expansion_limit, MAX_LIST_DEPTH, MAX_YAML_NESTING, UNCHECKED_FLOW_OPENERS};
use super::manifest::{kind_of, line_of, strip_location, ManifestKind, Manifests};
use super::note::{Note, ObjectRef, SourceError};

mod libyaml_events;
mod list_items;

/// Adds every document of the YAML stream `text`. Long streams are split at their document
/// markers and the parts read on every core (anchors do not cross documents, and a `---` at
/// the start of a line is a document marker wherever it is, YAML 1.2 §9.1.3).
pub(super) fn read(text: &str, origin: &str, out: &mut Manifests) -> Result<(), SourceError> {
    check_characters(text, origin)?;
    let starts = document_starts(text);
    check_nesting(text, &starts, origin)?;
    if starts.len() == 1 {
        if let Some(items) = list_items::split(text) {
            if let Some(read) = read_list_items(text, &items, origin) {
                out.append(read);
                return Ok(());
            }
        }
    }
    let budget = Budget {
        limit: expansion_limit(text.len()),
        used: AtomicUsize::new(0),
    };
    let parts = crate::parallel::map_chunks(&starts, |chunk| {
        let (Some(&first), Some(&last)) = (chunk.first(), chunk.last()) else {
            return Ok(Manifests::default());
        };
        let end = starts
            .iter()
            .find(|&&start| start > last)
            .copied()
            .unwrap_or(text.len());
        let mut part = Manifests::default();
        read_part(text, first, end, origin, &budget, &mut part).map(|()| part)
    });
    for part in parts {
        out.append(part?);
    }
    Ok(())
}

/// A single-document `kind: List` (`kubectl get -o yaml`'s shape) read item by item on every
/// core, so that neither the parser's events nor the values of the whole List are held at
/// once. `None` when any part does not read as it should on its own — an alias to another
/// item, a header that is no v1 List, a syntax error: the caller then reads the document
/// whole, which gives the same objects or the error as usual.
fn read_list_items(text: &str, items: &list_items::Split, origin: &str) -> Option<Manifests> {
    let budget = Budget {
        limit: expansion_limit(text.len()),
        used: AtomicUsize::new(0),
    };
    let read_one = |range: &std::ops::Range<usize>| -> Option<Value> {
        let document = serde_yaml::Deserializer::from_str(&text[range.clone()]).next()?;
        let mut value = BoundedValue(&budget).deserialize(document).ok()?;
        value.apply_merge().ok()?;
        Some(value)
    };
    let header = {
        let mut header = String::with_capacity(items.header.iter().map(|r| r.len()).sum());
        items
            .header
            .iter()
            .for_each(|r| header.push_str(&text[r.clone()]));
        let value: Value = serde_yaml::from_str(&header).ok()?;
        let field = |key| value.get(key).and_then(Value::as_str).unwrap_or("");
        matches!(
            kind_of(field("apiVersion"), field("kind")),
            ManifestKind::List
        )
    };
    if !header {
        return None;
    }
    let parts = crate::parallel::map_chunks(&items.items, |chunk| {
        let mut part = Manifests::default();
        for range in chunk {
            let Value::Sequence(mut sequence) = read_one(range)? else {
                return None;
            };
            let item = sequence.pop().filter(|_| sequence.is_empty())?;
            add_value(item, origin, 1, &mut part).ok()?;
        }
        Some(part)
    });
    let mut read = Manifests::default();
    for part in parts {
        read.append(part?);
    }
    Some(read)
}

/// Where the documents of `text` start: 0, then each line starting with `---` (and a space,
/// tab or line end). A stream with directives (`%YAML`) is not split.
fn document_starts(text: &str) -> Vec<usize> {
    let mut starts = vec![0];
    if text.starts_with('%') || text.contains("\n%") {
        return starts;
    }
    let bytes = text.as_bytes();
    let mut at = 0;
    while let Some(found) = text[at..].find("\n---") {
        let start = at + found + 1;
        if matches!(
            bytes.get(start + 3),
            None | Some(b' ' | b'\t' | b'\n' | b'\r')
        ) {
            starts.push(start);
        }
        at = start;
    }
    starts
}

/// Reads the documents in `text[start..end]`; messages name lines of the whole `text`.
fn read_part(
    text: &str,
    start: usize,
    end: usize,
    origin: &str,
    budget: &Budget,
    out: &mut Manifests,
) -> Result<(), SourceError> {
    let first_line = line_of(text, start);
    let parse_error = |err: &serde_yaml::Error| SourceError::Parse {
        origin: origin.to_string(),
        line: err.location().map(|l| first_line + l.line() - 1),
        message: strip_location(&err.to_string()),
    };
    for document in serde_yaml::Deserializer::from_str(&text[start..end]) {
        let mut value = BoundedValue(budget).deserialize(document).map_err(|err| {
            if budget.exceeded() {
                SourceError::ExpansionLimit {
                    origin: origin.to_string(),
                    input_bytes: text.len(),
                    limit: budget.limit,
                }
            } else {
                parse_error(&err)
            }
        })?;
        value.apply_merge().map_err(|err| parse_error(&err))?;
        add_value(value, origin, 0, out)?;
    }
    Ok(())
}

/// Adds one document or `kind: List` item; `lists` is the number of Lists around it.
fn add_value(
    value: Value,
    origin: &str,
    lists: usize,
    out: &mut Manifests,
) -> Result<(), SourceError> {
    if value.is_null() {
        return Ok(()); // an empty document, e.g. after a trailing `---`
    }
    let text = |key| value.get(key).and_then(Value::as_str).unwrap_or("");
    match kind_of(text("apiVersion"), text("kind")) {
        ManifestKind::List => {
            if lists >= MAX_LIST_DEPTH {
                return Err(SourceError::ListTooDeep {
                    origin: origin.to_string(),
                    limit: MAX_LIST_DEPTH,
                    line: None,
                });
            }
            if let Value::Mapping(mut list) = value {
                if let Some(Value::Sequence(items)) = list.remove("items") {
                    for item in items {
                        add_value(item, origin, lists + 1, out)?;
                    }
                }
            }
        }
        ManifestKind::Service => out.add_service(typed(value)),
        ManifestKind::EndpointSlice => out.add_endpoint_slice(typed(value)),
        ManifestKind::Other(kind) => out.ignore_kind(origin, kind),
    }
    Ok(())
}

/// Converts a raw manifest into its typed form; a field of the wrong type makes the object
/// invalid, not the file.
fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, Note> {
    let object = object_ref(&value);
    serde_yaml::from_value(value).map_err(|err| Note::Invalid {
        object,
        reason: format!("does not match the API schema: {err}"),
    })
}

/// The object reference of a raw manifest, for messages.
fn object_ref(value: &Value) -> ObjectRef {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    let metadata = value.get("metadata");
    ObjectRef {
        kind: text(value.get("kind")).unwrap_or_default(),
        namespace: text(metadata.and_then(|m| m.get("namespace")))
            .unwrap_or_else(|| "default".to_string()),
        name: text(metadata.and_then(|m| m.get("name"))).unwrap_or_else(|| "<unnamed>".into()),
    }
}

/// Refuses the characters YAML does not allow (YAML 1.1 §5.1, as libyaml checks them), naming
/// the line: libyaml reports them before parsing, as if on line 1.
fn check_characters(text: &str, origin: &str) -> Result<(), SourceError> {
    let allowed = |c: char| {
        matches!(c, '\t' | '\n' | '\r' | ' '..='~' | '\u{85}' | '\u{a0}'..='\u{d7ff}'
            | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
    };
    match text.char_indices().find(|&(_, c)| !allowed(c)) {
        None => Ok(()),
        Some((offset, c)) => Err(SourceError::Parse {
            origin: origin.to_string(),
            line: Some(line_of(text, offset)),
            message: format!(
                "the character {} (byte offset {offset}) is not allowed in YAML; remove it or \
                 write it as an escape in a double-quoted string",
                c.escape_unicode()
            ),
        }),
    }
}

/// Refuses collections nested deeper than [`MAX_YAML_NESTING`] before they are parsed for
/// real: each document with many flow openers is first walked as libyaml events, stopping at
/// the first too deep. A document with few openers cannot be deep enough to be slow.
fn check_nesting(text: &str, starts: &[usize], origin: &str) -> Result<(), SourceError> {
    let ends = starts.iter().skip(1).copied().chain([text.len()]);
    for (&start, end) in starts.iter().zip(ends) {
        let document = &text[start..end];
        let openers = document
            .bytes()
            .filter(|b| matches!(b, b'[' | b'{'))
            .count();
        if openers <= UNCHECKED_FLOW_OPENERS {
            continue;
        }
        if let Some(line) = libyaml_events::first_line_deeper_than(document, MAX_YAML_NESTING) {
            return Err(SourceError::Parse {
                origin: origin.to_string(),
                line: Some(line_of(text, start) + line - 1),
                message: format!(
                    "collections nested more than {MAX_YAML_NESTING} levels deep; kproxy \
                     refuses such input (no Kubernetes object nests that deep)"
                ),
            });
        }
    }
    Ok(())
}

/// What the values of one input may cost, shared by all its documents.
struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    fn charge<E: de::Error>(&self, cost: usize) -> Result<(), E> {
        let used = self
            .used
            .fetch_add(cost, Ordering::Relaxed)
            .saturating_add(cost);
        if used > self.limit {
            return Err(E::custom("the expansion limit is exceeded"));
        }
        Ok(())
    }

    fn exceeded(&self) -> bool {
        self.used.load(Ordering::Relaxed) > self.limit
    }
}

/// Builds a `Value` as serde_yaml's own `Deserialize` does, charging each node (and each
/// scalar's bytes) to the budget, so that alias expansion stops at the limit instead of
/// exhausting memory. Integers beyond 64 bits become floats, so that the typed conversion
/// rejects the one object (as for any value of the wrong type), not the whole file.
struct BoundedValue<'b>(&'b Budget);

impl<'de> DeserializeSeed<'de> for BoundedValue<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BoundedValue<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.0.charge(1)?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.0.charge(1)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.0.charge(1)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        self.visit_f64(v as f64)
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        self.visit_f64(v as f64)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.0.charge(1)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.visit_string(v.to_string())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.0.charge(1 + v.len())?;
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.0.charge(1)?;
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.0.charge(1)?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(BoundedValue(self.0))? {
            items.push(item);
        }
        Ok(Value::Sequence(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.0.charge(1)?;
        let mut mapping = Mapping::new();
        while let Some(key) = map.next_key_seed(BoundedValue(self.0))? {
            let value = map.next_value_seed(BoundedValue(self.0))?;
            if mapping.contains_key(&key) {
                return Err(de::Error::custom(format_args!(
                    "duplicate key {}",
                    serde_yaml::to_string(&key).unwrap_or_default().trim_end()
                )));
            }
            mapping.insert(key, value);
        }
        Ok(Value::Mapping(mapping))
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        // serde_yaml hands a tagged node (`!tag value`) over as an enum.
        let (tag, variant) = data.variant::<String>()?;
        let value = de::VariantAccess::newtype_variant_seed(variant, BoundedValue(self.0))?;
        Ok(Value::Tagged(Box::new(TaggedValue {
            tag: Tag::new(tag),
            value,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_str(text: &str) -> Result<Manifests, SourceError> {
        let mut manifests = Manifests::default();
        read(text, "test.yaml", &mut manifests).map(|()| manifests)
    }

    #[test]
    fn an_alias_bomb_is_refused_by_the_expansion_limit() {
        // 1,000 items referenced 2,000 times: 2 million nodes from 10 kB.
        let items = vec!["1"; 1000].join(",");
        let refs = vec!["*a"; 2000].join(",");
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: a, annotations: {{x: &a [{items}]}}}}\nspec: {{x: [{refs}]}}\n"
        );
        match read_str(&text) {
            Err(SourceError::ExpansionLimit {
                limit, input_bytes, ..
            }) => {
                assert_eq!(input_bytes, text.len());
                assert_eq!(limit, super::super::bounds::MIN_EXPANSION);
            }
            other => panic!("expected the expansion limit, got {other:?}"),
        }
    }

    #[test]
    fn moderate_alias_use_reads() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns, labels: &l {app: x}}\nspec: {clusterIP: 10.0.0.1, selector: *l, ports: [{port: 80}]}\n";
        let m = read_str(text).unwrap();
        assert_eq!(m.state.services.len(), 1);
        let selector = m.state.services[0].spec.as_ref().unwrap().selector.as_ref();
        assert_eq!(selector.unwrap()["app"], "x");
    }

    #[test]
    fn a_nul_is_reported_on_its_own_line() {
        let text = format!("{}b: \"x\0y\"\n", "a: 1\n".repeat(12));
        let err = read_str(&text).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "test.yaml: malformed YAML/JSON at line 13: the character \\u{0} (byte offset 65)"
            ),
            "{err}"
        );
    }

    #[test]
    fn a_long_stream_read_in_parts_keeps_order_counts_and_lines() {
        let service = |i: usize| {
            format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: ns}}\nspec: {{clusterIP: 10.0.0.1}}\n")
        };
        let mut text: String = (0..3000).map(service).collect();
        text.push_str("--- # a comment\napiVersion: v1\nkind: ConfigMap\n");
        text.push_str(&"---\napiVersion: v1\nkind: ConfigMap\n".repeat(2));
        let m = read_str(&text).unwrap();
        let names: Vec<String> = m
            .state
            .services
            .iter()
            .map(|s| s.metadata.name.clone().unwrap_or_default())
            .collect();
        let expected: Vec<String> = (0..3000).map(|i| format!("s{i}")).collect();
        assert_eq!(names, expected);
        assert_eq!(
            m.notes,
            [Note::IgnoredKind {
                origin: "test.yaml".into(),
                kind: "v1/ConfigMap".into(),
                count: 3,
            }]
        );
        // An error in the last part names its line in the whole stream.
        text.push_str("---\nkind: [\n");
        let lines = text.lines().count();
        match read_str(&text) {
            Err(SourceError::Parse { line, .. }) => assert_eq!(line, Some(lines + 1)),
            other => panic!("expected a parse error, got {other:?}"),
        }
    }
}
