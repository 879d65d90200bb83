//! kube-proxy's own expected nftables tables (shared/conformance/kube-proxy, the folders ending
//! in `-edca5633`) against kproxy's output, compared after kube-proxy's nftables normalisation.
//! Prints one line per vector: `match` or the first differing line.

mod common;

use std::fs;
use std::path::PathBuf;

use kproxy::config::NodeConfig;
use kproxy::pipeline;
use kproxy::source::Manifests;
use serde::Deserialize;

use common::vector::VectorConfig;
use common::{canonical_nftables, diff, first_difference, nftables_consistency, shared_dir};

/// The layout revision these vectors (and kproxy's nftables translator) follow.
const REVISION_SUFFIX: &str = "-edca5633";

/// One comparison: the input manifests and the expected table dump.
struct Case {
    name: String,
    dir: PathBuf,
    input: PathBuf,
    expected: PathBuf,
}

/// Every `-edca5633` vector; a stepwise one contributes its first step (later steps need a
/// syncer's memory of flushed chains).
fn cases() -> Vec<Case> {
    let root = shared_dir().join("conformance/kube-proxy");
    let mut dirs: Vec<PathBuf> = fs::read_dir(&root)
        .expect("conformance directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("nftables-") && n.ends_with(REVISION_SUFFIX))
        })
        .collect();
    dirs.sort();
    dirs.into_iter()
        .map(|dir| {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let (input, expected) = if dir.join("input.yaml").is_file() {
                (dir.join("input.yaml"), dir.join("expected.txt"))
            } else {
                (
                    dir.join("input-step01.yaml"),
                    dir.join("expected-step01.txt"),
                )
            };
            Case {
                name,
                dir,
                input,
                expected,
            }
        })
        .collect()
}

fn render(case: &Case) -> String {
    let vector = VectorConfig::read(&case.dir);
    assert_eq!(vector.mode, "nftables", "{}", case.name);
    let node = vector.node_config();
    let manifests = Manifests::read_paths(std::slice::from_ref(&case.input)).expect("input reads");
    let plan = pipeline::plan(&manifests.state, &node);
    assert!(
        plan.notes.is_empty() && manifests.notes.is_empty(),
        "kube-proxy accepts every object of {}: {:?} {:?}",
        case.name,
        manifests.notes,
        plan.notes
    );
    let rulesets = pipeline::nftables_rulesets(&plan, &node);
    assert_eq!(rulesets.len(), 1);
    rulesets[0].to_nft_script()
}

#[test]
fn nftables_vectors_match_kube_proxy() {
    let cases = cases();
    assert_eq!(
        cases.len(),
        4,
        "expected the four {REVISION_SUFFIX} nftables vectors, found {:?}",
        cases.iter().map(|c| &c.name).collect::<Vec<_>>()
    );
    let mut failures = Vec::new();
    for case in &cases {
        let expected = canonical_nftables(
            &fs::read_to_string(&case.expected)
                .unwrap_or_else(|e| panic!("{}: {e}", case.expected.display())),
        );
        let rendered = render(case);
        let actual = canonical_nftables(&rendered);
        let verdict = match first_difference(&expected, &actual) {
            None => "match".to_string(),
            Some(first) => {
                failures.push(format!("{}:\n{}", case.name, diff(&expected, &actual)));
                first
            }
        };
        println!("conformance {}: {verdict}", case.name);
        let problems = nftables_consistency(&rendered);
        assert!(problems.is_empty(), "{}: {problems:#?}", case.name);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The normaliser must ignore what kube-proxy's comparison ignores and nothing else.
#[test]
fn normalisation_can_fail() {
    let table = "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }";
    let chain = "add chain ip kube-proxy services";
    let rule_a =
        "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips";
    let rule_b = "add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports";
    let set =
        "add set ip kube-proxy cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }";
    let element_1 = "add element ip kube-proxy cluster-ips { 172.30.0.41 }";
    let element_2 = "add element ip kube-proxy cluster-ips { 172.30.0.42 }";
    let join = |lines: &[&str]| lines.join("\n") + "\n";
    let reference = canonical_nftables(&join(&[
        table, chain, rule_a, rule_b, set, element_1, element_2,
    ]));

    // Ignored: object order across kinds, element order, blank and `#` lines.
    let shuffled = join(&[
        "# services",
        element_2,
        "",
        set,
        rule_a,
        element_1,
        chain,
        rule_b,
        table,
    ]);
    assert_eq!(canonical_nftables(&shuffled), reference);

    // Significant: rule order inside a chain, a missing line, changed text.
    let swapped = join(&[table, chain, rule_b, rule_a, set, element_1, element_2]);
    let missing = join(&[table, chain, rule_a, rule_b, set, element_1]);
    let changed = join(&[
        table,
        chain,
        rule_a,
        &rule_b.replace("@nodeport-ips", "@cluster-ips"),
        set,
        element_1,
        element_2,
    ]);
    for broken in [swapped, missing, changed] {
        let normalised = canonical_nftables(&broken);
        assert!(
            first_difference(&reference, &normalised).is_some(),
            "not detected:\n{broken}"
        );
        assert!(diff(&reference, &normalised).contains("@@"));
    }
}

#[test]
fn consistency_check_can_fail() {
    let broken = "add chain ip kube-proxy services\n\
                  add rule ip kube-proxy services goto service-X\n\
                  add rule ip kube-proxy nowhere ip daddr @cluster-ips drop\n\
                  add element ip kube-proxy service-ips { 1.2.3.4 . tcp . 80 : goto services }\n";
    let problems = nftables_consistency(broken);
    assert_eq!(problems.len(), 4, "{problems:#?}");
}

/// Replays an `nft` transaction (the command forms kproxy and kube-proxy write) against an empty
/// table and returns the resulting table as a dump of `add` lines, so that a transaction can be
/// compared with a dump. Only what the worked example uses is modelled.
fn replay_transaction(script: &str) -> String {
    #[derive(Default)]
    struct Chain {
        declaration: String,
        rules: Vec<String>,
    }
    let mut table = None;
    let mut chains: Vec<(String, Chain)> = Vec::new();
    let mut containers: Vec<(String, String)> = Vec::new();
    let mut elements: Vec<(String, String)> = Vec::new();
    for line in script.lines().filter(|l| !l.trim().is_empty()) {
        let words: Vec<&str> = line.split(' ').collect();
        let (verb, kind, name) = (words[0], words[1], words.get(4).copied().unwrap_or(""));
        let chain_index = chains.iter().position(|(n, _)| n == name);
        match (verb, kind) {
            ("add", "table") => table = Some(line.to_string()),
            ("add", "chain") => match chain_index {
                // Re-adding an existing chain changes nothing.
                Some(_) => {}
                None => chains.push((
                    name.to_string(),
                    Chain {
                        declaration: line.to_string(),
                        rules: vec![],
                    },
                )),
            },
            ("delete", "chain") => {
                chains.remove(chain_index.expect("deleted chain exists"));
            }
            ("flush", "chain") => chains[chain_index.expect("flushed chain exists")]
                .1
                .rules
                .clear(),
            ("add", "rule") => chains[chain_index.expect("rule's chain exists")]
                .1
                .rules
                .push(line.to_string()),
            ("add", "set" | "map") => {
                if !containers.iter().any(|(n, _)| n == name) {
                    containers.push((name.to_string(), line.to_string()));
                }
            }
            ("flush", "set" | "map") => elements.retain(|(c, _)| c != name),
            ("add", "element") => {
                if !elements.iter().any(|(_, l)| l == line) {
                    elements.push((name.to_string(), line.to_string()));
                }
            }
            _ => panic!("replay does not model {line:?}"),
        }
    }
    let mut dump: Vec<String> = table.into_iter().collect();
    for (_, chain) in &chains {
        dump.push(chain.declaration.clone());
        dump.extend(chain.rules.iter().cloned());
    }
    dump.extend(containers.into_iter().map(|(_, l)| l));
    dump.extend(elements.into_iter().map(|(_, l)| l));
    dump.join("\n") + "\n"
}

/// The code blocks of the spec's "12.2, second version" (the `edca5633` layout) and the prose
/// after it.
fn worked_example_section() -> String {
    let spec = fs::read_to_string(shared_dir().join("spec/kube-proxy-rules.md")).expect("spec");
    let section = spec
        .split("#### 12.2, second version")
        .nth(1)
        .expect("spec has §12.2, second version");
    section
        .split("\n## ")
        .next()
        .unwrap_or_default()
        .to_string()
}

/// kproxy's table for `examples/my-service.yaml` with the worked example's node settings:
/// IPv4, cluster CIDR 10.244.0.0/16, node IP 192.168.0.2 (NodePorts default to it), ServiceCIDR
/// 172.30.0.0/16, default mark, no endpoint on this node.
fn render_worked_example(hostname: &str, edit: impl Fn(String) -> String) -> String {
    let mut config = NodeConfig::new(hostname);
    config.node_ips = vec!["192.168.0.2".parse().unwrap()];
    config.cluster_cidrs = vec!["10.244.0.0/16".parse().unwrap()];
    config.service_cidrs = vec!["172.30.0.0/16".parse().unwrap()];
    let input = fs::read_to_string(common::repo_dir().join("examples/my-service.yaml")).unwrap();
    let mut manifests = Manifests::default();
    manifests.add_text(&edit(input), "my-service.yaml").unwrap();
    let plan = pipeline::plan(&manifests.state, &config);
    assert!(plan.notes.is_empty(), "{:?}", plan.notes);
    pipeline::nftables_rulesets(&plan, &config)[0].to_nft_script()
}

/// The spec's worked example is assembled independently of the unit tests: its first-sync
/// transaction, replayed, must give kproxy's table, and its per-Service dump must be part of it.
#[test]
fn worked_example_matches_spec() {
    let section = worked_example_section();
    let blocks: Vec<&str> = section.split("```").collect();
    let (service_objects, transaction) = (blocks[1], blocks[3]);
    assert!(transaction.contains("add table ip kube-proxy"));

    let actual = render_worked_example("this-node", |text| text);
    assert!(actual.contains("mark set mark or 0x00004000"));
    let expected = canonical_nftables(&replay_transaction(transaction));
    let actual = canonical_nftables(&actual);
    assert!(
        expected == actual,
        "render differs from spec §12.2 (second version):\n{}",
        diff(&expected, &actual)
    );
    for line in service_objects.lines().filter(|l| l.starts_with("add ")) {
        assert!(actual.lines().any(|l| l == line), "missing {line:?}");
    }
}

/// The example's stated variants: without affinity one DNAT-map rule and no endpoint objects;
/// with 10.244.1.5 on this node, a hairpin element.
#[test]
fn worked_example_variants_match_spec() {
    let section = worked_example_section();
    let quoted = |start: &str| -> String {
        section
            .split('`')
            .find(|s| s.starts_with(start))
            .unwrap_or_else(|| panic!("spec quotes a line starting {start:?}"))
            .to_string()
    };
    let dnat_rule =
        quoted("add rule ip kube-proxy service-6NGMIUMF-default/my-service/tcp/http meta l4proto");
    let hairpin = quoted("add element ip kube-proxy hairpin-connections");

    let no_affinity = render_worked_example("this-node", |text| {
        text.replace("sessionAffinity: ClientIP", "sessionAffinity: None")
    });
    let service_rules: Vec<&str> = no_affinity
        .lines()
        .filter(|l| l.starts_with("add rule ip kube-proxy service-6NGMIUMF"))
        .collect();
    assert_eq!(service_rules, vec![dnat_rule.as_str()]);
    assert!(!no_affinity.contains(" endpoint-"));
    assert!(!no_affinity.contains(" affinity-"));
    assert!(!no_affinity.contains("add element ip kube-proxy hairpin-connections"));

    let local = render_worked_example("node-1", |text| text);
    let hairpins: Vec<&str> = local
        .lines()
        .filter(|l| l.starts_with("add element ip kube-proxy hairpin-connections"))
        .collect();
    assert_eq!(hairpins, vec![hairpin.as_str()]);
}

/// One sync of a stepwise vector (`steps.yaml`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Step {
    step: u32,
    #[allow(dead_code)]
    change: String,
    #[serde(default)]
    age_stale_chains: bool,
    expected: Option<String>,
}

#[derive(Deserialize)]
struct Steps {
    steps: Vec<Step>,
}

/// Operations kube-proxy's `TestSyncProxyRulesRepeated` asserts for each partial sync of this
/// vector (spec §5A.11, test-verified at `edca5633`): the main transaction only, not the
/// separate deletion of stale chains. Step 1 is a full sync, whose count upstream spreads over
/// several transactions; steps 11 and 12 repeat steps 9 and 10.
const REPEATED_OPERATION_COUNTS: [(u32, usize); 12] = [
    (2, 6),
    (3, 4),
    (4, 0),
    (5, 2),
    (6, 6),
    (7, 5),
    (8, 4),
    (9, 5),
    (10, 7),
    (11, 5),
    (12, 7),
    (13, 0),
];

/// `nftables-sync-proxy-rules-repeated-edca5633` replayed step by step through the nftables
/// syncer with the in-memory kernel: after every step that has an expectation, the table
/// must equal it (chains a step stops using are flushed, and deleted once `ageStaleChains`
/// lets the grace period pass), and every partial transaction has kube-proxy's operation count.
#[test]
fn stepwise_vector_replays_through_the_syncer() {
    use kproxy::sync::nftables::{FakeKernel, SyncOptions, Syncer};

    let dir = shared_dir().join("conformance/kube-proxy").join(format!(
        "nftables-sync-proxy-rules-repeated{REVISION_SUFFIX}"
    ));
    let node = VectorConfig::read(&dir).node_config();
    let steps: Steps =
        serde_yaml::from_str(&fs::read_to_string(dir.join("steps.yaml")).expect("steps.yaml"))
            .expect("steps.yaml parses");
    assert_eq!(steps.steps.len(), 13);

    let mut syncer = Syncer::new(FakeKernel::new(), SyncOptions::default());
    let mut failures = Vec::new();
    let mut checked = Vec::new();
    for step in &steps.steps {
        if step.age_stale_chains {
            syncer.age_stale_chains(std::time::Duration::from_secs(2));
        }
        let input = dir.join(format!("input-step{:02}.yaml", step.step));
        let manifests = Manifests::read_paths(&[input]).expect("input reads");
        let plan = pipeline::plan(&manifests.state, &node);
        let rulesets = pipeline::nftables_rulesets(&plan, &node);
        let before = syncer.applier().transactions.len();
        let reports = syncer
            .sync(&rulesets)
            .expect("the fake kernel accepts every step");
        assert_eq!(reports[0].full, step.step == 1, "step {}", step.step);

        // Main transaction: every new one except a pure deletion of stale chains.
        let main: usize = syncer.applier().transactions[before..]
            .iter()
            .filter(|t| {
                !t.commands
                    .iter()
                    .all(|c| c.starts_with("delete chain ip kube-proxy "))
            })
            .map(|t| t.commands.len())
            .sum();
        if let Some((_, want)) = REPEATED_OPERATION_COUNTS
            .iter()
            .find(|(s, _)| *s == step.step)
        {
            if main != *want {
                let sent: Vec<&String> = syncer.applier().transactions[before..]
                    .iter()
                    .flat_map(|t| &t.commands)
                    .collect();
                failures.push(format!(
                    "step {}: {main} operations, kube-proxy has {want}: {sent:#?}",
                    step.step
                ));
            }
        }

        let dump = syncer.applier().dump(kproxy::family::IpFamily::V4);
        let problems = nftables_consistency(&dump);
        assert!(problems.is_empty(), "step {}: {problems:#?}", step.step);
        let Some(expected) = &step.expected else {
            continue;
        };
        let expected = canonical_nftables(&fs::read_to_string(dir.join(expected)).expect("read"));
        let actual = canonical_nftables(&dump);
        match first_difference(&expected, &actual) {
            None => checked.push(step.step),
            Some(first) => failures.push(format!(
                "step {}: {first}\n{}",
                step.step,
                diff(&expected, &actual)
            )),
        }
    }
    println!("stepwise replay: steps {checked:?} match");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(checked, vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13]);
}
