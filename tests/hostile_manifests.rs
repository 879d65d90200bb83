//! Hostile manifests (issue 9): each is refused with a clear error, or only the bad object is
//! skipped, and nothing is built beyond the input bounds (`src/source/bounds.rs`). The small
//! inputs are under `tests/data/hostile/`; the big ones are generated here. Time is not
//! asserted: a refusal proves that the expansion stopped at its bound.

use std::path::PathBuf;
use std::process::{Command, Output};

use kproxy::source::bounds::{MAX_LIST_DEPTH, MIN_EXPANSION};
use kproxy::source::{Manifests, Note, SourceError};

fn hostile(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/hostile")
        .join(name)
}

fn read_file(name: &str) -> Result<Manifests, SourceError> {
    let data = std::fs::read(hostile(name)).expect("test data");
    let mut manifests = Manifests::default();
    manifests.add_bytes(&data, name).map(|()| manifests)
}

fn read_bytes(data: &[u8], origin: &str) -> Result<Manifests, SourceError> {
    let mut manifests = Manifests::default();
    manifests.add_bytes(data, origin).map(|()| manifests)
}

fn kproxy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .args(args)
        .output()
        .expect("kproxy runs")
}

fn expansion_refused(result: Result<Manifests, SourceError>, input_bytes: usize) {
    match result {
        Err(err @ SourceError::ExpansionLimit { .. }) => {
            let SourceError::ExpansionLimit {
                input_bytes: bytes,
                limit,
                ..
            } = &err
            else {
                unreachable!()
            };
            assert_eq!(*bytes, input_bytes);
            assert_eq!(*limit, MIN_EXPANSION.max(4 * input_bytes));
            let text = err.to_string();
            assert!(
                text.contains("refused: expanding its YAML aliases"),
                "{text}"
            );
        }
        Err(other) => panic!("expected the expansion limit, got: {other}"),
        Ok(m) => panic!(
            "expected the expansion limit, read {} Services",
            m.state.services.len()
        ),
    }
}

#[test]
fn nested_alias_bomb_is_refused() {
    let size = std::fs::metadata(hostile("alias_bomb.yaml")).unwrap().len() as usize;
    expansion_refused(read_file("alias_bomb.yaml"), size);
}

#[test]
fn wide_alias_bomb_is_refused() {
    // The tester's file: one anchor of 10,000 items referenced 10,000 times (50 kB, 10^8 nodes).
    let items = vec!["1"; 10_000].join(",");
    let refs = vec!["*a"; 10_000].join(",");
    let text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: a, namespace: ns, annotations: {{x: &a [{items}]}}}}\nspec:\n  clusterIP: 10.0.0.1\n  ports: [{{port: 80}}]\n  x: [{refs}]\n"
    );
    expansion_refused(read_bytes(text.as_bytes(), "wide.yaml"), text.len());
}

#[test]
fn aliases_of_a_long_string_are_refused() {
    // Few nodes, many bytes: 2,000 aliases of a 10 kB string.
    let text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: a, annotations: {{x: &s \"{}\"}}}}\nspec: {{x: [{}]}}\n",
        "x".repeat(10_000),
        vec!["*s"; 2_000].join(",")
    );
    expansion_refused(read_bytes(text.as_bytes(), "long.yaml"), text.len());
}

/// `levels` Lists around `services` Services, as YAML and as JSON.
fn nested_lists(levels: usize, services: usize) -> (String, String) {
    let items: Vec<String> = (0..services)
        .map(|i| {
            format!(
                r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"s{i}","namespace":"ns"}},"spec":{{"clusterIP":"10.1.{}.{}","ports":[{{"port":80}}]}}}}"#,
                i / 250,
                i % 250 + 1
            )
        })
        .collect();
    let mut json = items.join(",\n");
    for _ in 0..levels {
        json = format!("{{\"apiVersion\":\"v1\",\"kind\":\"List\",\"items\":[\n{json}\n]}}");
    }
    // JSON in flow style is YAML too; the Lists around it are in block style.
    let entries: String = items.iter().map(|item| format!("- {item}\n")).collect();
    let mut yaml = format!("apiVersion: v1\nkind: List\nitems:\n{entries}");
    for _ in 1..levels {
        let indented: String = yaml.lines().map(|l| format!("  {l}\n")).collect();
        yaml = format!("apiVersion: v1\nkind: List\nitems:\n-\n{indented}");
    }
    (yaml, json)
}

#[test]
fn lists_nested_beyond_the_limit_are_refused() {
    // The tester's shape (60 levels around 20,000 Services), smaller: the refusal is the
    // point, and it comes before any Service of the input is used.
    let (yaml, json) = nested_lists(60, 2_000);
    for (text, origin) in [(yaml, "nested.yaml"), (json, "nested.json")] {
        match read_bytes(text.as_bytes(), origin) {
            Err(err @ SourceError::ListTooDeep { .. }) => {
                let message = err.to_string();
                assert!(
                    message.starts_with(&format!(
                        "{origin}: refused: `kind: List` nested more than {MAX_LIST_DEPTH} levels deep"
                    )),
                    "{message}"
                );
            }
            other => panic!("{origin}: expected ListTooDeep, got {other:?}"),
        }
    }
    let (yaml, json) = nested_lists(MAX_LIST_DEPTH, 2_000);
    assert_eq!(
        read_bytes(yaml.as_bytes(), "n.yaml")
            .unwrap()
            .state
            .services
            .len(),
        2_000
    );
    assert_eq!(
        read_bytes(json.as_bytes(), "n.json")
            .unwrap()
            .state
            .services
            .len(),
        2_000
    );
}

#[test]
fn deep_nesting_does_not_overflow_the_stack() {
    // JSON: skipped over without recursion, an object of no kind.
    for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
        let text = format!("{}1{}", open.repeat(100_000), close.repeat(100_000));
        let m = read_bytes(text.as_bytes(), "deep.json").unwrap();
        let notes: Vec<String> = m.notes.iter().map(ToString::to_string).collect();
        assert_eq!(notes, ["note: deep.json: ignoring object of kind <none>"]);
    }
    let text = format!(
        "{{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"spec\":{}1{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let m = read_bytes(text.as_bytes(), "deep.json").unwrap();
    assert!(
        matches!(&m.notes[..], [Note::Invalid { .. }]),
        "{:?}",
        m.notes
    );
    // YAML: serde_yaml's recursion limit, for a document with few flow collections.
    let yaml = format!("a: {}1{}\n", "[".repeat(2_000), "]".repeat(2_000));
    let err = read_bytes(yaml.as_bytes(), "deep.yaml").unwrap_err();
    assert!(
        err.to_string().contains("recursion limit exceeded"),
        "{err}"
    );
}

/// libyaml's time grows with the square of the flow nesting depth: 1 MB of `[` would take an
/// hour. Deep documents are refused before the real parse, naming the line, and one deep
/// document in a stream does not hide behind ordinary ones.
#[test]
fn deep_flow_nesting_is_refused_before_parsing() {
    let service =
        "apiVersion: v1\nkind: Service\nmetadata: {name: ok}\nspec: {clusterIP: 10.0.0.1}\n";
    // The deep document starts on line 11, after two of 4 lines and their `---`.
    for (deep, line) in [
        (format!("a: {}", "[".repeat(1_000_000)), 11),
        (format!("a: {}", "[a, ".repeat(250_000)), 11),
        (format!("a:\n  b: {}", "{c: ".repeat(250_000)), 12),
    ] {
        let text = format!("{service}---\n{service}---\n{deep}\n");
        let err = read_bytes(text.as_bytes(), "deep.yaml").unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("nested more than 128 levels deep") && message.contains("deep.yaml"),
            "{message}"
        );
        assert!(
            message.contains(&format!("at line {line}:")),
            "the line in the whole stream: {message}"
        );
    }
}

/// The names of the Services skipped as not matching the schema; all other notes fail.
fn schema_skips(m: &Manifests) -> Vec<String> {
    m.notes
        .iter()
        .map(|note| match note {
            Note::Invalid { object, reason } => {
                assert!(
                    reason.starts_with("does not match the API schema: "),
                    "{reason}"
                );
                object.name.clone()
            }
            other => panic!("unexpected note: {other}"),
        })
        .collect()
}

#[test]
fn integers_too_large_for_their_field_skip_only_their_object() {
    for file in ["big_integers.yaml", "big_integers.json"] {
        let m = read_file(file).unwrap_or_else(|err| panic!("{file}: {err}"));
        assert_eq!(schema_skips(&m), ["port", "timeout"], "{file}");
        let names: Vec<_> = m
            .state
            .services
            .iter()
            .map(|s| s.metadata.name.clone())
            .collect();
        assert_eq!(names, [Some("good".to_string())], "{file}");
    }
}

#[test]
fn merge_keys_keep_the_service() {
    let m = read_file("merge_key.yaml").unwrap();
    assert!(m.notes.is_empty(), "{:?}", m.notes);
    let merged = &m.state.services[1];
    assert_eq!(merged.metadata.name.as_deref(), Some("merged"));
    let spec = merged.spec.as_ref().unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("10.0.0.2"));
    assert_eq!(spec.ports.as_ref().map(Vec::len), Some(1));
}

#[test]
fn invalid_utf8_and_nul_name_where_they_are() {
    let err = read_file("not_utf8.yaml").unwrap_err().to_string();
    assert_eq!(
        err,
        "not_utf8.yaml: not UTF-8: invalid byte 0xe9 at byte offset 50 (line 4); save the \
         file as UTF-8"
    );
    let err = read_file("nul_line13.yaml").unwrap_err().to_string();
    assert!(
        err.starts_with("nul_line13.yaml: malformed YAML/JSON at line 13: the character \\u{0}"),
        "{err}"
    );
}

#[test]
fn many_ignored_objects_make_one_note() {
    let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\n".repeat(100_000);
    let m = read_bytes(text.as_bytes(), "big.yaml").unwrap();
    let notes: Vec<String> = m.notes.iter().map(ToString::to_string).collect();
    assert_eq!(
        notes,
        ["note: big.yaml: ignoring 100000 objects of kind v1/ConfigMap"]
    );
    let json = format!(
        "{{\"apiVersion\":\"v1\",\"kind\":\"List\",\"items\":[{}]}}",
        vec![r#"{"apiVersion":"v1","kind":"ConfigMap"}"#; 100_000].join(",")
    );
    let m = read_bytes(json.as_bytes(), "big.json").unwrap();
    let notes: Vec<String> = m.notes.iter().map(ToString::to_string).collect();
    assert_eq!(
        notes,
        ["note: big.json: ignoring 100000 objects of kind v1/ConfigMap"]
    );
}

#[test]
fn a_name_cannot_forge_a_line_of_output() {
    let path = hostile("forged_name.yaml");
    let out = kproxy(&["render", "--hostname", "n1", path.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one note, on one line: {stderr:?}");
    assert!(
        lines[0].starts_with(
            r"kproxy: skipped Service ns/x\nkproxy: synced ipv4: full sync, 1 objects, 1 bytes\u{1b}[2K\0: "
        ),
        "{stderr:?}"
    );
}

#[test]
fn a_read_error_names_the_path_and_its_cause_once() {
    let out = kproxy(&["render", "--hostname", "n1", "/nonexistent"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        stderr,
        "kproxy: cannot read /nonexistent: No such file or directory (os error 2)\n"
    );
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A few shapes a fuzzer finds early; cargo fuzz covers the rest through add_bytes.
    let inputs: [&[u8]; 9] = [
        b"",
        b"\xef\xbb\xbf{",
        b"[",
        b"{\"kind\":\"List\",\"apiVersion\":\"v1\",\"items\":{}}",
        b"apiVersion: v1\nkind: List\nitems: 5\n",
        b"!!binary x",
        b"*a",
        b"<<: [1]\n",
        b"apiVersion: v1\nkind: Service\nmetadata: !tag {name: a}\n",
    ];
    for input in inputs {
        let _ = read_bytes(input, "fuzz");
    }
}

/// A block-style YAML List (`kubectl get -o yaml`) is read item by item; the objects are the
/// ones the same List gives as JSON (read by another parser), in the same order — also when an
/// alias crosses items, which makes the reader fall back to the whole document.
#[test]
fn a_yaml_list_read_item_by_item_matches_the_json_list() {
    let state = kproxy::synthetic::cluster(300, 3).expect("a small cluster");
    let items: Vec<serde_json::Value> = state
        .services
        .iter()
        .map(serde_json::to_value)
        .chain(state.endpoint_slices.iter().map(serde_json::to_value))
        .collect::<Result<_, _>>()
        .expect("objects serialise");
    let list = serde_json::json!({"apiVersion": "v1", "items": items, "kind": "List"});
    let json = serde_json::to_string(&list).expect("json");
    let yaml = serde_yaml::to_string(&list).expect("yaml");
    assert!(
        yaml.contains("\nitems:\n- "),
        "block style: {}",
        &yaml[..200]
    );
    let from_json = read_bytes(json.as_bytes(), "list.json").expect("json reads");
    let from_yaml = read_bytes(yaml.as_bytes(), "list.yaml").expect("yaml reads");
    assert_eq!(from_json.state.services.len(), 300);
    assert_eq!(from_yaml.state.services, from_json.state.services);
    assert_eq!(
        from_yaml.state.endpoint_slices,
        from_json.state.endpoint_slices
    );

    let aliased = "apiVersion: v1\nitems:\n- &svc\n  apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n  spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n- <<: *svc\n  metadata: {name: b}\nkind: List\n";
    let m = read_bytes(aliased.as_bytes(), "aliased.yaml").expect("reads whole");
    let names: Vec<_> = m
        .state
        .services
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    assert_eq!(names, ["a", "b"]);
}
