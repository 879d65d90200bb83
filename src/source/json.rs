//! JSON input (`kubectl get -o json`): read with serde_json straight into the typed objects.
//! Each document, and each item of a `kind: List`, is first read as a small [`Envelope`]
//! (apiVersion, kind, names; a List's items as unparsed slices of the input), then the object
//! is deserialized from its own slice into its type. No generic tree of the input is built.

use std::fmt;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::bounds::MAX_LIST_DEPTH;
use super::manifest::{kind_of, line_of, strip_location, ManifestKind, Manifests};
use super::note::{Note, ObjectRef, SourceError};

/// How reading an input as JSON went, when it did not fail.
pub(super) enum Outcome {
    Read,
    /// The first document is not JSON (e.g. YAML in flow style, `{a: 1}`); nothing was added.
    NotJson(SourceError),
}

/// Adds every document of the JSON stream `text` (usually one).
pub(super) fn read(text: &str, origin: &str, out: &mut Manifests) -> Result<Outcome, SourceError> {
    let mut documents = serde_json::Deserializer::from_str(text).into_iter::<Envelope>();
    let mut first = true;
    loop {
        let start = documents.byte_offset();
        let envelope = match documents.next() {
            None => return Ok(Outcome::Read),
            Some(Ok(envelope)) => envelope,
            Some(Err(err)) => {
                let err = parse_error(origin, text, text, &err);
                return if first {
                    Ok(Outcome::NotJson(err))
                } else {
                    Err(err)
                };
            }
        };
        first = false;
        let object = Object {
            text,
            json: &text[start..documents.byte_offset()],
        };
        add_decoded(classify(envelope, object), origin, 0, out)?;
    }
}

/// One object's JSON, a slice of the whole input `text` (for line numbers).
#[derive(Clone, Copy)]
struct Object<'a> {
    text: &'a str,
    json: &'a str,
}

impl Object<'_> {
    fn line(&self) -> usize {
        line_of(self.text, offset_in(self.text, self.json))
    }
}

/// Adds one document or List item; `lists` is the number of Lists around it.
fn add_decoded<'a>(
    decoded: Decoded<'a>,
    origin: &str,
    lists: usize,
    out: &mut Manifests,
) -> Result<(), SourceError> {
    match decoded {
        Decoded::Service(service) => out.add_service(service.map(|s| *s)),
        Decoded::EndpointSlice(slice) => out.add_endpoint_slice(slice.map(|s| *s)),
        Decoded::Other(kind) => out.ignore_kind(origin, kind),
        Decoded::Null => {}
        Decoded::List(items, list) => {
            if lists >= MAX_LIST_DEPTH {
                return Err(SourceError::ListTooDeep {
                    origin: origin.to_string(),
                    limit: MAX_LIST_DEPTH,
                    line: Some(list.line()),
                });
            }
            // Items are independent: decode them on every core, add them in order.
            let decoded = crate::parallel::map_chunks(&items, |chunk| {
                chunk
                    .iter()
                    .map(|&item| decode(list.text, item.get(), origin))
                    .collect::<Vec<_>>()
            });
            for item in decoded.into_iter().flatten() {
                add_decoded(item?, origin, lists + 1, out)?;
            }
        }
    }
    Ok(())
}

/// A document or List item, decoded on its own.
enum Decoded<'a> {
    Service(Result<Box<Service>, Note>),
    EndpointSlice(Result<Box<EndpointSlice>, Note>),
    Other(String),
    Null,
    /// A List: the JSON of its items, and its own.
    List(Vec<&'a RawValue>, Object<'a>),
}

/// Decodes one List item from its JSON, a slice of the whole input `text`.
fn decode<'a>(text: &'a str, json: &'a str, origin: &str) -> Result<Decoded<'a>, SourceError> {
    let envelope = serde_json::from_str::<Envelope>(json)
        .map_err(|err| parse_error(origin, text, json, &err))?;
    Ok(classify(envelope, Object { text, json }))
}

/// What to do with an object, by its envelope; Services and EndpointSlices are deserialized.
fn classify<'a>(envelope: Envelope<'a>, object: Object<'a>) -> Decoded<'a> {
    if envelope.null {
        return Decoded::Null;
    }
    let field = |field: &Option<String>| field.as_deref().unwrap_or("").to_string();
    match kind_of(&field(&envelope.api_version), &field(&envelope.kind)) {
        ManifestKind::List => Decoded::List(envelope.items.unwrap_or_default(), object),
        ManifestKind::Service => Decoded::Service(typed(&envelope, object.json)),
        ManifestKind::EndpointSlice => Decoded::EndpointSlice(typed(&envelope, object.json)),
        ManifestKind::Other(kind) => Decoded::Other(kind),
    }
}

/// Deserializes one object from its JSON; a field of the wrong type (or an integer too large
/// for its field) makes the object invalid, not the file.
fn typed<T: serde::de::DeserializeOwned>(envelope: &Envelope<'_>, json: &str) -> Result<T, Note> {
    serde_json::from_str(json).map_err(|err| Note::Invalid {
        object: ObjectRef {
            kind: envelope.kind.clone().unwrap_or_default(),
            namespace: envelope
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name: envelope.name.clone().unwrap_or_else(|| "<unnamed>".into()),
        },
        reason: format!(
            "does not match the API schema: {}",
            strip_location(&err.to_string())
        ),
    })
}

/// A parse error in `part`, a slice of the whole input `text`, with the line in `text`.
fn parse_error(origin: &str, text: &str, part: &str, err: &serde_json::Error) -> SourceError {
    let line = (err.line() > 0).then(|| line_of(text, offset_in(text, part)) + err.line() - 1);
    SourceError::Parse {
        origin: origin.to_string(),
        line,
        message: strip_location(&err.to_string()),
    }
}

/// Where `part`, a slice of `text`, starts in it.
fn offset_in(text: &str, part: &str) -> usize {
    (part.as_ptr() as usize)
        .saturating_sub(text.as_ptr() as usize)
        .min(text.len())
}

/// The visitor methods of a lenient field for the scalars it does not want: they read as
/// `$absent` (the typed conversion reports a wrong type, if it matters).
macro_rules! scalars_read_as {
    ($absent:expr) => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($absent)
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($absent)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($absent)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($absent)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($absent)
        }
    };
}

/// What kproxy needs of an object before choosing its type. Fields of unexpected types are
/// left out (the typed conversion reports them); any JSON value reads as an envelope.
#[derive(Debug, Default)]
struct Envelope<'a> {
    null: bool,
    api_version: Option<String>,
    kind: Option<String>,
    /// A List's items, each the unparsed JSON of one object.
    items: Option<Vec<&'a RawValue>>,
    name: Option<String>,
    namespace: Option<String>,
}

impl<'de> Deserialize<'de> for Envelope<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(EnvelopeVisitor)
    }
}

struct EnvelopeVisitor;

impl<'de> Visitor<'de> for EnvelopeVisitor {
    type Value = Envelope<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a Kubernetes object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope<'de>, A::Error> {
        let mut envelope = Envelope::default();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "apiVersion" => envelope.api_version = map.next_value::<Lenient>()?.0,
                "kind" => envelope.kind = map.next_value::<Lenient>()?.0,
                "items" => envelope.items = map.next_value::<Items>()?.0,
                "metadata" => {
                    let names = map.next_value::<Names>()?;
                    envelope.name = names.name;
                    envelope.namespace = names.namespace;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(envelope)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Envelope<'de>, E> {
        Ok(Envelope {
            null: true,
            ..Envelope::default()
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Envelope<'de>, A::Error> {
        IgnoredAny.visit_seq(seq)?;
        Ok(Envelope::default())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Envelope<'de>, E> {
        Ok(Envelope::default())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Envelope<'de>, E> {
        Ok(Envelope::default())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Envelope<'de>, E> {
        Ok(Envelope::default())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Envelope<'de>, E> {
        Ok(Envelope::default())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Envelope<'de>, E> {
        Ok(Envelope::default())
    }
}

/// A string field; any other value reads as absent.
struct Lenient(Option<String>);

impl<'de> Deserialize<'de> for Lenient {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LenientVisitor;
        impl<'de> Visitor<'de> for LenientVisitor {
            type Value = Lenient;
            scalars_read_as!(Lenient(None));
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Lenient, E> {
                Ok(Lenient(Some(v.to_string())))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Lenient, A::Error> {
                IgnoredAny.visit_map(map)?;
                Ok(Lenient(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Lenient, A::Error> {
                IgnoredAny.visit_seq(seq)?;
                Ok(Lenient(None))
            }
        }
        deserializer.deserialize_any(LenientVisitor)
    }
}

/// A List's `items`: the unparsed JSON of each; anything but an array reads as absent.
struct Items<'a>(Option<Vec<&'a RawValue>>);

impl<'de> Deserialize<'de> for Items<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ItemsVisitor;
        impl<'de> Visitor<'de> for ItemsVisitor {
            type Value = Items<'de>;
            scalars_read_as!(Items(None));
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of objects")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Items<'de>, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(item) = seq.next_element::<&'de RawValue>()? {
                    items.push(item);
                }
                Ok(Items(Some(items)))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Items<'de>, A::Error> {
                IgnoredAny.visit_map(map)?;
                Ok(Items(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Items<'de>, E> {
                Ok(Items(None))
            }
        }
        deserializer.deserialize_any(ItemsVisitor)
    }
}

/// `metadata.name` and `metadata.namespace`, for messages.
#[derive(Default)]
struct Names {
    name: Option<String>,
    namespace: Option<String>,
}

impl<'de> Deserialize<'de> for Names {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NamesVisitor;
        impl<'de> Visitor<'de> for NamesVisitor {
            type Value = Names;
            scalars_read_as!(Names::default());
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("object metadata")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Names, A::Error> {
                let mut names = Names::default();
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "name" => names.name = map.next_value::<Lenient>()?.0,
                        "namespace" => names.namespace = map.next_value::<Lenient>()?.0,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(names)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Names, A::Error> {
                IgnoredAny.visit_seq(seq)?;
                Ok(Names::default())
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Names, E> {
                Ok(Names::default())
            }
        }
        deserializer.deserialize_any(NamesVisitor)
    }
}
