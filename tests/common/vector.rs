//! A conformance vector's `config.yaml` (shared/conformance/kube-proxy) mapped onto kproxy's
//! node settings, for both modes. Unknown settings fail the test rather than being ignored.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use kproxy::config::{MasqueradeMark, NodeConfig, NodePortAddresses};
use kproxy::family::{parse_cidr_sloppy, parse_ip_sloppy, FamilyMode};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VectorConfig {
    pub mode: String,
    pub ip_family: String,
    pub hostname: String,
    #[serde(rename = "nodeIP")]
    pub node_ip: String,
    #[serde(rename = "nodeIPs", default)]
    pub node_ips: BTreeMap<String, Vec<String>>,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    pub local_detector: String,
    pub masquerade_all: bool,
    pub masquerade_bit: u8,
    #[serde(default)]
    pub node_port_addresses: Vec<String>,
    // nftables only.
    #[serde(rename = "serviceCIDRs", default)]
    pub service_cidrs: Vec<String>,
    /// The statement the revision writes to request masquerading; checked, not configured.
    pub masquerade_rule: Option<String>,
    // iptables only.
    #[serde(default = "yes")]
    pub localhost_node_ports: bool,
    #[serde(default)]
    pub nfacct_counters: Vec<String>,
    #[serde(rename = "conntrackTCPBeLiberal", default)]
    pub conntrack_tcp_be_liberal: bool,
    #[serde(default)]
    pub masquerade_random_fully: bool,
    pub large_cluster_endpoints_threshold: Option<usize>,
    /// Which kind of sync the expectation shows (`full` for all vectors used here).
    pub sync_kind: Option<String>,
}

fn yes() -> bool {
    true
}

impl VectorConfig {
    pub fn read(dir: &Path) -> VectorConfig {
        let text = fs::read_to_string(dir.join("config.yaml")).expect("config.yaml");
        serde_yaml::from_str(&text).expect("config.yaml matches VectorConfig")
    }

    pub fn node_config(&self) -> NodeConfig {
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
        let cidrs = |list: &[String], what: &str| -> Vec<ipnet::IpNet> {
            list.iter()
                .map(|c| parse_cidr_sloppy(c).unwrap_or_else(|| panic!("{what}: {c}")))
                .collect()
        };
        config.cluster_cidrs = cidrs(self.cluster_cidr.as_slice(), "clusterCIDR");
        config.service_cidrs = cidrs(&self.service_cidrs, "serviceCIDRs");
        config.masquerade_all = self.masquerade_all;
        // kube-proxy's unit tests inject the literal 0x4000 rather than Go's %#08x form.
        config.masquerade_mark = MasqueradeMark::short_from_bit(self.masquerade_bit);
        if let Some(rule) = &self.masquerade_rule {
            assert_eq!(
                rule,
                &format!("mark set mark or {}", config.masquerade_mark.text),
                "the vector's mark statement differs from the mark kproxy writes"
            );
        }
        config.nodeport_addresses = (!self.node_port_addresses.is_empty()).then(|| {
            NodePortAddresses::Cidrs(cidrs(&self.node_port_addresses, "nodePortAddresses"))
        });
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
