//! Where objects come from. Reading Kubernetes manifests: files, directories and stdin, YAML
//! (multi-document) or JSON, single objects or `kind: List`; the result is a [`ClusterState`]:
//! the Services and EndpointSlices as the API would hand them over, not yet validated. For the
//! agent, [`kube`] watches the API server and [`dir`] a directory; both send [`SourceEvent`]s.

pub mod dir;
pub mod kube;

use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use serde_yaml::Value;

/// The kinds of object the agent reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    /// The API's resource name, for messages.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
        }
    }
}

/// An object of one of the kinds the agent reads.
#[derive(Debug, Clone)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<k8s_openapi::api::core::v1::Node>),
}

/// What a source tells the agent.
#[derive(Debug, Clone)]
pub enum SourceEvent {
    /// An object was added or changed.
    Applied(Object),
    /// An object was deleted.
    Deleted {
        kind: Kind,
        namespace: String,
        name: String,
    },
    /// The complete list of one kind: everything else of that kind is gone.
    Listed { kind: Kind, objects: Vec<Object> },
}

/// The objects kproxy proxies, as read.
#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
}

/// Which object a message is about: `Service default/my-service`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Something in the input that was left out, with the reason. Printed one per line on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// A well-formed manifest of a kind kproxy does not use.
    IgnoredKind { origin: String, kind: String },
    /// An object that was read but is invalid; it is skipped, everything else goes on.
    Invalid { object: ObjectRef, reason: String },
    /// A part of an object (one endpoint, one address, one frontend) was left out; the rest
    /// of the object is used.
    PartlyInvalid { object: ObjectRef, reason: String },
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Note::IgnoredKind { origin, kind } => {
                write!(f, "note: {origin}: ignoring object of kind {kind}")
            }
            Note::Invalid { object, reason } => write!(f, "skipped {object}: {reason}"),
            Note::PartlyInvalid { object, reason } => {
                write!(f, "skipped part of {object}: {reason}")
            }
        }
    }
}

/// An input that cannot be used at all. The caller must not act on a partial read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: malformed YAML/JSON{at}: {message}", at = line_suffix(*.line))]
    Parse {
        origin: String,
        line: Option<usize>,
        message: String,
    },
}

fn line_suffix(line: Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

/// Manifests read so far, with notes about what was left out.
#[derive(Debug, Clone, Default)]
pub struct Manifests {
    pub state: ClusterState,
    pub notes: Vec<Note>,
}

impl Manifests {
    /// Reads every path: `-` is stdin, a directory contributes its `.yaml`, `.yml` and `.json`
    /// files (not recursing, in name order), anything else is read as one file.
    pub fn read_paths<P: AsRef<Path>>(paths: &[P]) -> Result<Manifests, SourceError> {
        let mut manifests = Manifests::default();
        for path in paths {
            manifests.read_path(path.as_ref())?;
        }
        Ok(manifests)
    }

    fn read_path(&mut self, path: &Path) -> Result<(), SourceError> {
        if path == Path::new("-") {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|source| SourceError::Read {
                    path: "<stdin>".into(),
                    source,
                })?;
            return self.add_text(&text, "<stdin>");
        }
        let read_err = |source| SourceError::Read {
            path: path.display().to_string(),
            source,
        };
        if path.is_dir() {
            let mut files: Vec<PathBuf> = fs::read_dir(path)
                .map_err(read_err)?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_manifest_file(p))
                .collect();
            files.sort();
            for file in files {
                self.read_path(&file)?;
            }
            return Ok(());
        }
        let text = fs::read_to_string(path).map_err(read_err)?;
        self.add_text(&text, &path.display().to_string())
    }

    /// Adds every object of a YAML stream or JSON document. `origin` names the input in messages.
    pub fn add_text(&mut self, text: &str, origin: &str) -> Result<(), SourceError> {
        for document in serde_yaml::Deserializer::from_str(text) {
            let value = Value::deserialize(document).map_err(|e| SourceError::Parse {
                origin: origin.to_string(),
                line: e.location().map(|l| l.line()),
                message: strip_location(&e.to_string()),
            })?;
            self.add_value(value, origin);
        }
        Ok(())
    }

    fn add_value(&mut self, value: Value, origin: &str) {
        if value.is_null() {
            return; // an empty document, e.g. after a trailing `---`
        }
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
        let api_version = value
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        match (api_version, kind) {
            ("v1", "List") => {
                if let Some(Value::Sequence(items)) = value.get("items") {
                    for item in items.clone() {
                        self.add_value(item, origin);
                    }
                }
            }
            ("v1", "Service") => match typed::<Service>(value) {
                Ok(service) => self.state.services.push(service),
                Err(note) => self.notes.push(note),
            },
            ("discovery.k8s.io/v1", "EndpointSlice") => match typed::<EndpointSlice>(value) {
                Ok(slice) => self.state.endpoint_slices.push(slice),
                Err(note) => self.notes.push(note),
            },
            _ => {
                let kind = if kind.is_empty() {
                    "<none>".to_string()
                } else if api_version.is_empty() {
                    kind.to_string()
                } else {
                    format!("{api_version}/{kind}")
                };
                self.notes.push(Note::IgnoredKind {
                    origin: origin.to_string(),
                    kind,
                });
            }
        }
    }
}

pub(crate) fn is_manifest_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
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

/// Converts a raw manifest into its typed form; a field of the wrong type makes the object
/// invalid, not the file.
fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, Note> {
    let object = object_ref(&value);
    serde_yaml::from_value(value).map_err(|e| Note::Invalid {
        object,
        reason: format!("does not match the API schema: {e}"),
    })
}

/// serde_yaml appends " at line L column C" to messages; the line is reported separately.
fn strip_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_multi_document_yaml_lists_and_json() {
        let mut m = Manifests::default();
        m.add_text(
            r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: a, namespace: ns}
  spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}
---
---
apiVersion: v1
kind: ConfigMap
metadata: {name: c}
"#,
            "test.yaml",
        )
        .unwrap();
        m.add_text(
            r#"{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"a-1","namespace":"ns"},"addressType":"IPv4","endpoints":[]}"#,
            "test.json",
        )
        .unwrap();
        assert_eq!(m.state.services.len(), 1);
        assert_eq!(m.state.endpoint_slices.len(), 1);
        assert_eq!(
            m.notes,
            vec![Note::IgnoredKind {
                origin: "test.yaml".into(),
                kind: "v1/ConfigMap".into()
            }]
        );
    }

    #[test]
    fn malformed_yaml_names_file_and_line() {
        let mut m = Manifests::default();
        let err = m
            .add_text("apiVersion: v1\nkind: Service\nmetadata: [\n", "bad.yaml")
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("bad.yaml: malformed YAML/JSON at line "),
            "{text}"
        );
    }

    #[test]
    fn wrong_field_type_skips_only_that_object() {
        let mut m = Manifests::default();
        m.add_text(
            "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: ns}\nspec: {ports: [{port: eighty}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: good}\nspec: {clusterIP: 10.0.0.1}\n",
            "x.yaml",
        )
        .unwrap();
        assert_eq!(m.state.services.len(), 1);
        match &m.notes[..] {
            [Note::Invalid { object, reason }] => {
                assert_eq!(object.to_string(), "Service ns/bad");
                assert!(reason.contains("does not match the API schema"), "{reason}");
            }
            other => panic!("unexpected notes {other:?}"),
        }
    }
}
