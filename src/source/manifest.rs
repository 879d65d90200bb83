//! Reading manifests: files, directories and stdin, as raw bytes, into [`Manifests`]. One
//! entry point, [`Manifests::add_bytes`], checks UTF-8, tells JSON from YAML (the formats'
//! readers are [`super::json`] and [`super::yaml`]) and applies the bounds of
//! [`super::bounds`].

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::listing::{list_manifest_dir, read_regular_file};
use super::note::{Note, SourceError};
use super::{json, yaml, ClusterState};

/// Manifests read so far, with notes about what was left out.
#[derive(Debug, Clone, Default)]
pub struct Manifests {
    pub state: ClusterState,
    pub notes: Vec<Note>,
    /// Where the note counting the objects of each (origin, kind) left out is in `notes`.
    ignored: HashMap<(String, String), usize>,
}

impl Manifests {
    /// Reads every path: `-` is stdin, a directory contributes its `.yaml`, `.yml` and `.json`
    /// files (not recursing, in name order; see [`list_manifest_dir`] for what is skipped
    /// with a note), anything else is read as one file (also a pipe, e.g. `<(kubectl ...)`).
    pub fn read_paths<P: AsRef<Path>>(paths: &[P]) -> Result<Manifests, SourceError> {
        let mut manifests = Manifests::default();
        for path in paths {
            manifests.read_path(path.as_ref())?;
        }
        Ok(manifests)
    }

    /// True when no Service was read: an empty stdin, or a directory with nothing usable.
    pub fn has_no_services(&self) -> bool {
        self.state.services.is_empty()
    }

    fn read_path(&mut self, path: &Path) -> Result<(), SourceError> {
        let read_err = |source| SourceError::Read {
            path: path.display().to_string(),
            source,
        };
        if path == Path::new("-") {
            let mut data = Vec::new();
            std::io::stdin()
                .read_to_end(&mut data)
                .map_err(|source| SourceError::Read {
                    path: "<stdin>".into(),
                    source,
                })?;
            return self.add_bytes(&data, "<stdin>");
        }
        if path.is_dir() {
            let listing = list_manifest_dir(path).map_err(read_err)?;
            self.notes.extend(listing.skipped.iter().map(|s| s.note()));
            for file in &listing.files {
                let origin = file.display().to_string();
                match read_regular_file(file) {
                    Ok(Some(data)) => self.add_bytes(&data, &origin)?,
                    Ok(None) => self.notes.push(Note::SkippedEntry {
                        path: origin,
                        reason: "it is no longer a regular file".into(),
                    }),
                    Err(source) => {
                        return Err(SourceError::Read {
                            path: origin,
                            source,
                        })
                    }
                }
            }
            return Ok(());
        }
        let data = std::fs::read(path).map_err(read_err)?;
        self.add_bytes(&data, &path.display().to_string())
    }

    /// Adds every object of a YAML stream or JSON document, given as raw bytes. `origin`
    /// names the input in messages. Never panics; what one input may build is bounded.
    /// On an error the caller must not use what was added (it may be part of the input).
    pub fn add_bytes(&mut self, data: &[u8], origin: &str) -> Result<(), SourceError> {
        let text = std::str::from_utf8(data).map_err(|err| {
            let offset = err.valid_up_to();
            SourceError::NotUtf8 {
                origin: origin.to_string(),
                byte: data.get(offset).copied().unwrap_or_default(),
                offset,
                line: 1 + data[..offset].iter().filter(|&&b| b == b'\n').count(),
            }
        })?;
        self.add_text(text, origin)
    }

    /// [`Manifests::add_bytes`] for text. A document whose first non-space character is `{`
    /// or `[` is JSON (YAML in flow style, which also starts so, is read as YAML when it is
    /// not JSON); anything else is YAML.
    pub fn add_text(&mut self, text: &str, origin: &str) -> Result<(), SourceError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        if !text.trim_start().starts_with(['{', '[']) {
            return yaml::read(text, origin, self);
        }
        match json::read(text, origin, self)? {
            json::Outcome::Read => Ok(()),
            json::Outcome::NotJson(json_err) => match yaml::read(text, origin, self) {
                Ok(()) => Ok(()),
                Err(yaml_err @ SourceError::ExpansionLimit { .. }) => Err(yaml_err),
                Err(_) => Err(json_err),
            },
        }
    }

    /// Adds what another reading of (part of) an input found, after what this one found.
    pub(super) fn append(&mut self, other: Manifests) {
        self.state.services.extend(other.state.services);
        self.state
            .endpoint_slices
            .extend(other.state.endpoint_slices);
        for note in other.notes {
            match note {
                Note::IgnoredKind {
                    origin,
                    kind,
                    count,
                } => self.ignore_kinds(&origin, kind, count),
                note => self.notes.push(note),
            }
        }
    }

    pub(super) fn add_service(&mut self, service: Result<Service, Note>) {
        match service {
            Ok(service) => self.state.services.push(service),
            Err(note) => self.notes.push(note),
        }
    }

    pub(super) fn add_endpoint_slice(&mut self, slice: Result<EndpointSlice, Note>) {
        match slice {
            Ok(slice) => self.state.endpoint_slices.push(slice),
            Err(note) => self.notes.push(note),
        }
    }

    /// Notes an object of a kind kproxy does not use: one note per (origin, kind), counting.
    pub(super) fn ignore_kind(&mut self, origin: &str, kind: String) {
        self.ignore_kinds(origin, kind, 1);
    }

    fn ignore_kinds(&mut self, origin: &str, kind: String, objects: usize) {
        let key = (origin.to_string(), kind);
        if let Some(&at) = self.ignored.get(&key) {
            if let Some(Note::IgnoredKind { count, .. }) = self.notes.get_mut(at) {
                *count += objects;
                return;
            }
        }
        self.ignored.insert(key.clone(), self.notes.len());
        self.notes.push(Note::IgnoredKind {
            origin: key.0,
            kind: key.1,
            count: objects,
        });
    }
}

/// What a manifest is, by its apiVersion and kind.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ManifestKind {
    List,
    Service,
    EndpointSlice,
    /// Anything else, as named in messages: `v1/ConfigMap`, `<none>`.
    Other(String),
}

pub(super) fn kind_of(api_version: &str, kind: &str) -> ManifestKind {
    match (api_version, kind) {
        ("v1", "List") => ManifestKind::List,
        ("v1", "Service") => ManifestKind::Service,
        ("discovery.k8s.io/v1", "EndpointSlice") => ManifestKind::EndpointSlice,
        (_, "") => ManifestKind::Other("<none>".into()),
        ("", kind) => ManifestKind::Other(kind.into()),
        (api_version, kind) => ManifestKind::Other(format!("{api_version}/{kind}")),
    }
}

/// The line (from 1) of the byte at `offset` in `text`.
pub(super) fn line_of(text: &str, offset: usize) -> usize {
    let before = text.as_bytes().get(..offset).unwrap_or(text.as_bytes());
    1 + before.iter().filter(|&&b| b == b'\n').count()
}

/// serde_yaml and serde_json append " at line L column C" to messages; kproxy reports the
/// line separately (and relative to the whole input).
pub(super) fn strip_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::bounds::MAX_LIST_DEPTH;

    fn read(text: &str, origin: &str) -> Result<Manifests, SourceError> {
        let mut m = Manifests::default();
        m.add_bytes(text.as_bytes(), origin).map(|()| m)
    }

    const SERVICE_A: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n";

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
                kind: "v1/ConfigMap".into(),
                count: 1,
            }]
        );
    }

    #[test]
    fn a_json_list_reads_into_typed_objects_in_order() {
        let json = r#"{
  "apiVersion": "v1",
  "items": [
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "namespace": "ns"},
     "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 80}]}},
    null,
    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}},
    {"apiVersion": "v1", "kind": "List", "items": [
      {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b", "namespace": "ns"},
       "spec": {"clusterIP": "10.0.0.2", "ports": [{"port": 81}]}},
      {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "d"}}
    ]},
    {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
     "metadata": {"name": "a-1", "namespace": "ns"}, "addressType": "IPv4", "endpoints": []},
    {"kind": 5},
    "text"
  ],
  "kind": "List",
  "metadata": {"resourceVersion": ""}
}"#;
        let m = read(json, "list.json").unwrap();
        let names: Vec<_> = m
            .state
            .services
            .iter()
            .map(|s| s.metadata.name.as_deref().unwrap_or(""))
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(
            m.state.services[1]
                .spec
                .as_ref()
                .unwrap()
                .ports
                .as_ref()
                .unwrap()[0]
                .port,
            81
        );
        assert_eq!(m.state.endpoint_slices.len(), 1);
        let notes: Vec<String> = m.notes.iter().map(ToString::to_string).collect();
        assert_eq!(
            notes,
            [
                "note: list.json: ignoring 2 objects of kind v1/ConfigMap",
                "note: list.json: ignoring 2 objects of kind <none>",
            ]
        );
    }

    #[test]
    fn flow_style_yaml_is_not_mistaken_for_json() {
        let m = read(
            "{apiVersion: v1, kind: Service, metadata: {name: a, namespace: ns}, spec: {clusterIP: 10.0.0.1}}\n",
            "flow.yaml",
        )
        .unwrap();
        assert_eq!(m.state.services.len(), 1);
        // Not JSON and not YAML either: the JSON error is reported.
        let err = read("{\"apiVersion\": \"v1\",\n\"kind\": [}\n", "bad.json").unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad.json: malformed YAML/JSON at line 2: expected value"
        );
    }

    #[test]
    fn malformed_yaml_names_file_and_line() {
        let err = read("apiVersion: v1\nkind: Service\nmetadata: [\n", "bad.yaml").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("bad.yaml: malformed YAML/JSON at line "),
            "{text}"
        );
    }

    #[test]
    fn wrong_field_type_skips_only_that_object() {
        let m = read(
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

    /// The objects skipped as not matching the schema, by name; the others must be read.
    fn schema_skips(m: &Manifests) -> Vec<String> {
        m.notes
            .iter()
            .map(|note| match note {
                Note::Invalid { object, reason } => {
                    assert!(
                        reason.starts_with("does not match the API schema: "),
                        "{reason}"
                    );
                    assert!(!reason.contains(" at line "), "{reason}");
                    object.to_string()
                }
                other => panic!("unexpected note {other}"),
            })
            .collect()
    }

    #[test]
    fn an_integer_too_large_for_its_field_skips_only_that_object() {
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: port, namespace: ns}}\nspec: {{clusterIP: 10.0.0.1, ports: [{{port: 99999999999999999999}}]}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: timeout, namespace: ns}}\nspec: {{clusterIP: 10.0.0.2, ports: [{{port: 80}}], sessionAffinity: ClientIP, sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 3000000000}}}}}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: negative, namespace: ns}}\nspec: {{clusterIP: 10.0.0.3, ports: [{{port: -99999999999999999999}}]}}\n---\n{SERVICE_A}"
        );
        let m = read(&yaml, "int.yaml").unwrap();
        assert_eq!(m.state.services.len(), 1);
        assert_eq!(
            schema_skips(&m),
            [
                "Service ns/port",
                "Service ns/timeout",
                "Service ns/negative"
            ]
        );

        let json = r#"{"apiVersion": "v1", "kind": "List", "items": [
  {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "port", "namespace": "ns"},
   "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 99999999999999999999}]}},
  {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "timeout", "namespace": "ns"},
   "spec": {"clusterIP": "10.0.0.2", "ports": [{"port": 80}], "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 3000000000}}}},
  {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "good", "namespace": "ns"},
   "spec": {"clusterIP": "10.0.0.3", "ports": [{"port": 80}]}}
]}"#;
        let m = read(json, "int.json").unwrap();
        assert_eq!(m.state.services.len(), 1);
        assert_eq!(schema_skips(&m), ["Service ns/port", "Service ns/timeout"]);
    }

    fn nested_lists(levels: usize, inner: &str) -> (String, String) {
        let mut yaml = inner.to_string();
        let mut json = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"a","namespace":"ns"},"spec":{"clusterIP":"10.0.0.1"}}"#.to_string();
        for _ in 0..levels {
            let indented: String = yaml.lines().map(|l| format!("  {l}\n")).collect();
            yaml = format!("apiVersion: v1\nkind: List\nitems:\n-\n{indented}");
            json = format!(r#"{{"apiVersion":"v1","kind":"List","items":[{json}]}}"#);
        }
        (yaml, json)
    }

    #[test]
    fn lists_nest_up_to_the_limit() {
        let (yaml, json) = nested_lists(MAX_LIST_DEPTH, SERVICE_A);
        assert_eq!(read(&yaml, "n.yaml").unwrap().state.services.len(), 1);
        assert_eq!(read(&json, "n.json").unwrap().state.services.len(), 1);

        let (yaml, json) = nested_lists(MAX_LIST_DEPTH + 1, SERVICE_A);
        let refused = |err: SourceError| match err {
            SourceError::ListTooDeep { limit, .. } => assert_eq!(limit, MAX_LIST_DEPTH),
            other => panic!("expected ListTooDeep, got {other}"),
        };
        refused(read(&yaml, "n.yaml").unwrap_err());
        let err = read(&json, "n.json").unwrap_err();
        assert_eq!(
            err.to_string(),
            "n.json: refused: `kind: List` nested more than 8 levels deep at line 1; kubectl \
             never nests Lists, flatten the input"
        );
        refused(err);
    }

    #[test]
    fn merge_keys_are_applied() {
        // Anchors are per document: the two Services are items of one List.
        let yaml = "apiVersion: v1\nkind: List\nitems:\n\
                    - {apiVersion: v1, kind: Service, metadata: {name: a, namespace: ns}, spec: &base {clusterIP: 10.0.0.1, ports: [{port: 80}]}}\n\
                    - apiVersion: v1\n  kind: Service\n  metadata: {name: b, namespace: ns}\n  spec:\n    <<: *base\n    clusterIP: 10.0.0.2\n";
        let m = read(yaml, "merge.yaml").unwrap();
        assert!(m.notes.is_empty(), "{:?}", m.notes);
        let b = m.state.services[1].spec.as_ref().unwrap();
        assert_eq!(b.cluster_ip.as_deref(), Some("10.0.0.2"), "own keys win");
        assert_eq!(b.ports.as_ref().unwrap()[0].port, 80, "merged from base");
    }

    #[test]
    fn ignored_kinds_are_counted_per_origin_and_kind() {
        let config_map = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\n";
        let mut m = Manifests::default();
        m.add_text(&config_map.repeat(1000), "big.yaml").unwrap();
        m.add_text(&format!("{config_map}kind: Secret\n"), "small.yaml")
            .unwrap();
        let notes: Vec<String> = m.notes.iter().map(ToString::to_string).collect();
        assert_eq!(
            notes,
            [
                "note: big.yaml: ignoring 1000 objects of kind v1/ConfigMap",
                "note: small.yaml: ignoring object of kind v1/ConfigMap",
                "note: small.yaml: ignoring object of kind Secret",
            ]
        );
    }

    #[test]
    fn invalid_utf8_names_its_offset_and_line() {
        let mut m = Manifests::default();
        let err = m
            .add_bytes(
                b"apiVersion: v1\nkind: Service\nmetadata: {name: \xff}\n",
                "bad.yaml",
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad.yaml: not UTF-8: invalid byte 0xff at byte offset 46 (line 3); save the file \
             as UTF-8"
        );
    }

    #[test]
    fn empty_inputs_read_as_no_services() {
        for text in ["", "\n", "---\n", "# only a comment\n", "\u{feff}"] {
            let m = read(text, "empty.yaml").unwrap();
            assert!(m.has_no_services(), "{text:?}");
            assert!(m.notes.is_empty(), "{text:?}: {:?}", m.notes);
        }
        assert!(!read(SERVICE_A, "a.yaml").unwrap().has_no_services());
    }
}
