//! kube-proxy's own expected rules (shared/conformance/kube-proxy) against kproxy's output.
//! Prints one line per vector: `match` or the first differing line.

mod common;

use std::fs;
use std::path::Path;

use kproxy::config::NodeConfig;
use kproxy::pipeline;
use kproxy::source::Manifests;

use common::vector::VectorConfig;
use common::{canonical_iptables, first_difference, iptables_consistency, shared_dir};

fn vectors(prefix: &str) -> Vec<std::path::PathBuf> {
    let root = shared_dir().join("conformance/kube-proxy");
    let mut dirs: Vec<_> = fs::read_dir(&root)
        .expect("conformance directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    dirs.sort();
    dirs
}

fn render_iptables(dir: &Path) -> String {
    let config = VectorConfig::read(dir);
    assert_eq!(config.mode, "iptables");
    let node = config.node_config();
    let manifests = Manifests::read_paths(&[dir.join("input.yaml")]).expect("input.yaml reads");
    let plan = pipeline::plan(&manifests.state, &node);
    assert!(
        plan.notes.is_empty() && manifests.notes.is_empty(),
        "kube-proxy accepts every object of {}: {:?} {:?}",
        dir.display(),
        manifests.notes,
        plan.notes
    );
    let rulesets = pipeline::iptables_rulesets(&plan, &node);
    assert_eq!(rulesets.len(), 1);
    rulesets[0].to_restore_text()
}

#[test]
fn iptables_vectors_match_kube_proxy() {
    let dirs = vectors("iptables-");
    assert!(
        dirs.len() >= 3,
        "expected the iptables vectors, found {dirs:?}"
    );
    let mut failures = Vec::new();
    for dir in &dirs {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let expected = fs::read_to_string(dir.join("expected.txt")).expect("expected.txt");
        let actual = render_iptables(dir);
        let verdict =
            match first_difference(&canonical_iptables(&expected), &canonical_iptables(&actual)) {
                None => "match".to_string(),
                Some(diff) => {
                    failures.push(format!(
                        "{name}:\n{}",
                        common::diff(&canonical_iptables(&expected), &canonical_iptables(&actual))
                    ));
                    diff
                }
            };
        println!("conformance {name}: {verdict}");
        // kproxy renders in canonical order already, so the raw text must equal the sorted one.
        assert_eq!(
            actual,
            canonical_iptables(&actual),
            "{name}: render is not canonical"
        );
        let problems = iptables_consistency(&actual);
        assert!(problems.is_empty(), "{name}: {problems:#?}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn consistency_check_can_fail() {
    let broken = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-X - [0:0]\n-A KUBE-SERVICES -j KUBE-SEP-Y\nCOMMIT\n";
    let problems = iptables_consistency(broken);
    assert_eq!(problems.len(), 2, "{problems:?}");
}

/// The spec's worked example (§12.1) is assembled independently of the unit tests; kproxy's
/// render of `examples/my-service.yaml` with the example's node settings must equal it.
#[test]
fn worked_example_matches_spec() {
    let spec = fs::read_to_string(shared_dir().join("spec/kube-proxy-rules.md")).expect("spec");
    let section = spec.split("### 12.1").nth(1).expect("spec has §12.1");
    let expected = section
        .split("```")
        .nth(1)
        .expect("§12.1 has a code block")
        .trim_start_matches('\n')
        .to_string();
    let mut config = NodeConfig::new("node-1");
    config.cluster_cidrs = vec!["10.244.0.0/16".parse().unwrap()];
    config.iptables.nfacct_counters = true;
    let manifests =
        Manifests::read_paths(&[common::repo_dir().join("examples/my-service.yaml")]).unwrap();
    let plan = pipeline::plan(&manifests.state, &config);
    let actual = pipeline::iptables_rulesets(&plan, &config)[0].to_restore_text();
    assert!(actual.contains("--rcheck --seconds 10000 --reap"));
    let (expected, actual) = (canonical_iptables(&expected), canonical_iptables(&actual));
    assert!(
        expected == actual,
        "render differs from spec §12.1:\n{}",
        common::diff(&expected, &actual)
    );
}
