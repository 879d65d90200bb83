//! Every iptables golden output reads back into a typed ruleset that renders to the same text:
//! the parser the tracer uses knows every rule kproxy writes, and reads it as written.

mod common;

use std::fs;

use kproxy::family::IpFamily;
use kproxy::iptables::Ruleset;

#[test]
fn every_golden_iptables_output_reads_back_unchanged() {
    let root = common::repo_dir().join("rules-golden");
    let mut checked = 0;
    for case in fs::read_dir(&root).expect("rules-golden") {
        let path = case.expect("entry").path().join("iptables.txt");
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        // Dual-stack output is one restore input per family, each after a `#` header.
        let mut sections: Vec<(IpFamily, String)> = Vec::new();
        for line in text.split_inclusive('\n') {
            match line {
                l if l.starts_with("# ip6tables-restore") => {
                    sections.push((IpFamily::V6, String::new()))
                }
                l if l.starts_with("# iptables-restore") => {
                    sections.push((IpFamily::V4, String::new()))
                }
                l => match sections.last_mut() {
                    Some((_, section)) => section.push_str(l),
                    None => sections.push((IpFamily::V4, l.to_string())),
                },
            }
        }
        for (family, section) in sections {
            let ruleset = Ruleset::from_restore_text(&section, family)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let rules: usize = ruleset
                .tables()
                .iter()
                .flat_map(|t| &t.chains)
                .map(|c| c.rules.len())
                .sum();
            assert!(rules > 0, "{}: no rules read", path.display());
            let again = ruleset.to_restore_text();
            if let Some(diff) = common::first_difference(&section, &again) {
                panic!("{}: {diff}", path.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 14, "only {checked} golden outputs read");
}
