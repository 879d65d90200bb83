//! Replays the fuzz targets' checked-in corpora (`fuzz/corpus/<target>/`, see fuzz/README.md)
//! and the hostile inputs of `tests/data/hostile/` through the same entry points the fuzzer
//! calls (`kproxy::fuzzing`). An input that makes kproxy panic, or render a line the rule
//! format does not allow, fails here with the file's name.

mod common;

use std::fs;
use std::path::PathBuf;

use kproxy::backend::Mode;

fn inputs(dir: &str) -> Vec<PathBuf> {
    let dir = common::repo_dir().join(dir);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(files: &[PathBuf], target: fn(&[u8])) {
    for file in files {
        let data = fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let outcome = std::panic::catch_unwind(|| target(&data));
        assert!(outcome.is_ok(), "{} makes kproxy panic", file.display());
    }
}

#[test]
fn manifest_corpus_replays() {
    let files = inputs("fuzz/corpus/manifest");
    assert!(files.len() >= 100, "the manifest corpus is checked in");
    assert!(
        files
            .iter()
            .any(|f| f.ends_with("issue9-name-escapes.yaml")),
        "the corpus keeps the issue's cases"
    );
    replay(&files, kproxy::fuzzing::manifest);
}

#[test]
fn hostile_inputs_replay() {
    let files = inputs("tests/data/hostile");
    assert!(!files.is_empty(), "tests/data/hostile is checked in");
    replay(&files, kproxy::fuzzing::manifest);
}

#[test]
fn validation_corpus_replays() {
    let files = inputs("fuzz/corpus/validation");
    assert!(files.len() >= 100, "the validation corpus is checked in");
    replay(&files, kproxy::fuzzing::validation);
}

/// The replay can fail: a rendered line that is no restore command is caught.
#[test]
fn an_injected_line_is_caught() {
    let injected = "apiVersion: v1\nkind: Service\nmetadata: {name: ok, namespace: default}\nspec: {clusterIP: 172.30.0.9, ports: [{port: 80}]}\n";
    // The valid input passes …
    kproxy::fuzzing::manifest(injected.as_bytes());
    // … and the line check behind it refuses a forged line.
    let outcome = std::panic::catch_unwind(|| {
        kproxy::fuzzing::check_lines(
            Mode::Iptables,
            "-A KUBE-SERVICES -j ACCEPT\nflush ruleset\n",
        )
    });
    assert!(
        outcome.is_err(),
        "a line that is no restore command must fail the check"
    );
}

#[test]
fn rule_reader_corpora_replay() {
    let iptables = inputs("fuzz/corpus/iptables_rules");
    let nft = inputs("fuzz/corpus/nft_rules");
    assert!(
        iptables.len() >= 14 && nft.len() >= 14,
        "the rule corpora are checked in"
    );
    replay(&iptables, kproxy::fuzzing::iptables_rules);
    replay(&nft, kproxy::fuzzing::nft_rules);
}

#[test]
fn live_reader_corpora_replay() {
    let save = inputs("fuzz/corpus/iptables_save");
    let json = inputs("fuzz/corpus/nft_json");
    assert!(
        save.len() >= 4 && json.len() >= 6,
        "the live reader corpora are checked in"
    );
    assert!(
        save.iter()
            .any(|f| f.ends_with("seed-iptables-save-nat.txt"))
            && json.iter().any(|f| f.ends_with("seed-nft-list-table.json")),
        "the corpora keep the real captures"
    );
    replay(&save, kproxy::fuzzing::iptables_save);
    replay(&json, kproxy::fuzzing::nft_json);
}
