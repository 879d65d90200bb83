//! kube-proxy's own expected nftables tables (shared/conformance/kube-proxy, the folders ending
//! in `-edca5633`) against kproxy's output, compared after kube-proxy's nftables normalisation.
//! Prints one line per vector: `match` or the first differing line.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use kproxy::config::{MasqueradeMark, NodeConfig, NodePortAddresses};
use kproxy::family::{parse_cidr_sloppy, parse_ip_sloppy, FamilyMode};
use kproxy::pipeline;
use kproxy::source::Manifests;
use serde::Deserialize;

use common::{canonical_nftables, diff, first_difference, nftables_consistency, shared_dir};

/// The layout revision these vectors (and kproxy's nftables translator) follow.
const REVISION_SUFFIX: &str = "-edca5633";

/// A nftables vector's `config.yaml`. Unknown settings fail the test rather than being ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VectorConfig {
    mode: String,
    ip_family: String,
    hostname: String,
    #[serde(rename = "nodeIP")]
    node_ip: String,
    #[serde(rename = "nodeIPs", default)]
    node_ips: std::collections::BTreeMap<String, Vec<String>>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<String>,
    local_detector: String,
    #[serde(rename = "serviceCIDRs", default)]
    service_cidrs: Vec<String>,
    masquerade_all: bool,
    masquerade_bit: u8,
    /// The statement the revision writes to request masquerading; checked, not configured.
    masquerade_rule: String,
    #[serde(default)]
    node_port_addresses: Vec<String>,
}

impl VectorConfig {
    fn read(dir: &Path) -> VectorConfig {
        let text = fs::read_to_string(dir.join("config.yaml")).expect("config.yaml");
        serde_yaml::from_str(&text).expect("config.yaml matches VectorConfig")
    }

    fn node_config(&self) -> NodeConfig {
        assert_eq!(self.mode, "nftables");
        assert_eq!(self.ip_family, "IPv4", "only IPv4 vectors exist");
        assert_eq!(self.local_detector, "ClusterCIDR");
        let mut config = NodeConfig::new(&self.hostname);
        config.family_mode = FamilyMode::V4;
        // The primary node IP first, then every interface address (without prefix length).
        config
            .node_ips
            .push(parse_ip_sloppy(&self.node_ip).expect("nodeIP"));
        for addr in self.node_ips.values().flatten() {
            let ip = parse_ip_sloppy(addr.split('/').next().unwrap_or_default()).expect("nodeIPs");
            if !config.node_ips.contains(&ip) {
                config.node_ips.push(ip);
            }
        }
        config.cluster_cidrs = self
            .cluster_cidr
            .iter()
            .map(|c| parse_cidr_sloppy(c).expect("clusterCIDR"))
            .collect();
        config.service_cidrs = self
            .service_cidrs
            .iter()
            .map(|c| parse_cidr_sloppy(c).expect("serviceCIDRs"))
            .collect();
        config.masquerade_all = self.masquerade_all;
        // kube-proxy's unit tests inject the literal 0x4000 rather than Go's %#08x form.
        config.masquerade_mark = MasqueradeMark::short_from_bit(self.masquerade_bit);
        assert_eq!(
            self.masquerade_rule,
            format!("mark set mark or {}", config.masquerade_mark.text),
            "the vector's mark statement differs from the mark kproxy writes"
        );
        config.nodeport_addresses = if self.node_port_addresses.is_empty() {
            None
        } else {
            Some(NodePortAddresses::Cidrs(
                self.node_port_addresses
                    .iter()
                    .map(|c| parse_cidr_sloppy(c).expect("nodePortAddresses"))
                    .collect(),
            ))
        };
        config
    }
}

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
    let node = VectorConfig::read(&case.dir).node_config();
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
