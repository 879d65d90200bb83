//! kube-proxy's own expected rules (shared/conformance/kube-proxy) against kproxy's output.
//! Prints one line per vector: `match` or the first differing line.

mod common;

use std::fs;
use std::path::Path;

use kproxy::config::{MasqueradeMark, NodeConfig, NodePortAddresses};
use kproxy::family::{parse_cidr_sloppy, parse_ip_sloppy, FamilyMode};
use kproxy::pipeline;
use kproxy::source::Manifests;
use serde::Deserialize;

use common::{canonical_iptables, first_difference, iptables_consistency, shared_dir};

/// The parts of a vector's `config.yaml` that map onto kproxy's node settings.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
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
    masquerade_all: bool,
    masquerade_bit: u8,
    #[serde(default)]
    node_port_addresses: Vec<String>,
    #[serde(default = "yes")]
    localhost_node_ports: bool,
    #[serde(default)]
    nfacct_counters: Vec<String>,
    #[serde(rename = "conntrackTCPBeLiberal", default)]
    conntrack_tcp_be_liberal: bool,
    #[serde(default)]
    masquerade_random_fully: bool,
    large_cluster_endpoints_threshold: Option<usize>,
}

fn yes() -> bool {
    true
}

impl VectorConfig {
    fn read(dir: &Path) -> VectorConfig {
        let text = fs::read_to_string(dir.join("config.yaml")).expect("config.yaml");
        serde_yaml::from_str(&text).expect("config.yaml matches VectorConfig")
    }

    fn node_config(&self) -> NodeConfig {
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
        config.masquerade_all = self.masquerade_all;
        // kube-proxy's unit tests inject the literal 0x4000 rather than Go's %#08x form.
        config.masquerade_mark = MasqueradeMark::short_from_bit(self.masquerade_bit);
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
        config.iptables.localhost_nodeports = self.localhost_node_ports;
        config.iptables.nfacct_counters = !self.nfacct_counters.is_empty();
        config.iptables.conntrack_tcp_be_liberal = self.conntrack_tcp_be_liberal;
        config.iptables.random_fully = self.masquerade_random_fully;
        if let Some(threshold) = self.large_cluster_endpoints_threshold {
            config.iptables.large_cluster_endpoints_threshold = threshold;
        }
        config
    }
}

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
