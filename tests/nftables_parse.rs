//! Every nftables golden output reads back into a typed ruleset that renders to the same
//! script: the reader the tracer uses knows every object kproxy writes, and reads it as
//! written.

mod common;

use std::fs;

use kproxy::nftables::Ruleset;

#[test]
fn every_golden_nftables_output_reads_back_unchanged() {
    let root = common::repo_dir().join("rules-golden");
    let mut checked = 0;
    for case in fs::read_dir(&root).expect("rules-golden") {
        let path = case.expect("entry").path().join("nftables.txt");
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        // Dual-stack output is one script per family, each starting with its `add table`.
        let mut scripts: Vec<String> = Vec::new();
        for line in text.split_inclusive('\n') {
            if line.starts_with("add table") || scripts.is_empty() {
                scripts.push(String::new());
            }
            if let Some(script) = scripts.last_mut() {
                script.push_str(line);
            }
        }
        for script in scripts {
            let ruleset = Ruleset::from_nft_script(&script)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let rules: usize = ruleset.chains.iter().map(|c| c.rules.len()).sum();
            assert!(rules > 0, "{}: no rules read", path.display());
            let again = ruleset.to_nft_script();
            if let Some(diff) = common::first_difference(&script, &again) {
                panic!("{}: {diff}", path.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 14, "only {checked} golden outputs read");
}
