//! kube-proxy's configuration file (`--config`): a `KubeProxyConfiguration` of
//! `kubeproxy.config.k8s.io/v1alpha1`, YAML or JSON (spec kube-proxy-agent.md §1). Only the
//! fields that apply to kproxy are read; the others are accepted and listed in a warning.
//! Durations are written as Go writes them (`1s`, `500ms`, `1m30s`).

use std::time::Duration;

use serde::Deserialize;

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

/// The fields kproxy reads.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeProxyConfiguration {
    pub bind_address: Option<String>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    pub hostname_override: Option<String>,
    pub mode: Option<String>,
    pub node_port_addresses: Option<Vec<String>>,
    pub detect_local_mode: Option<String>,
    pub client_connection: Option<ClientConnection>,
    pub iptables: Option<ModeSettings>,
    pub nftables: Option<ModeSettings>,
    pub conntrack: Option<Conntrack>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientConnection {
    pub kubeconfig: Option<String>,
}

/// `iptables:` or `nftables:`; the mode decides which one is read (§1.5).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModeSettings {
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<i32>,
    pub sync_period: Option<String>,
    pub min_sync_period: Option<String>,
    pub localhost_node_ports: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Conntrack {
    pub tcp_be_liberal: Option<bool>,
}

const KNOWN_FIELDS: [&str; 14] = [
    "apiVersion",
    "kind",
    "bindAddress",
    "healthzBindAddress",
    "metricsBindAddress",
    "clusterCIDR",
    "hostnameOverride",
    "mode",
    "nodePortAddresses",
    "detectLocalMode",
    "clientConnection",
    "iptables",
    "nftables",
    "conntrack",
];

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("{0}")]
    Invalid(String),
}

impl KubeProxyConfiguration {
    /// Parses a file's text. Returns the configuration and the top-level fields kproxy does not
    /// use (worth a warning, not an error).
    pub fn parse(text: &str) -> Result<(KubeProxyConfiguration, Vec<String>), ConfigFileError> {
        let value: serde_yaml::Value = serde_yaml::from_str(text)
            .map_err(|e| ConfigFileError::Invalid(format!("malformed YAML/JSON: {e}")))?;
        let field = |name: &str| value.get(name).and_then(serde_yaml::Value::as_str);
        if field("apiVersion") != Some(API_VERSION) || field("kind") != Some(KIND) {
            return Err(ConfigFileError::Invalid(format!(
                "not a {KIND}: apiVersion must be {API_VERSION:?} and kind {KIND:?}"
            )));
        }
        let ignored = value
            .as_mapping()
            .into_iter()
            .flat_map(|m| m.keys())
            .filter_map(serde_yaml::Value::as_str)
            .filter(|key| !KNOWN_FIELDS.contains(key))
            .map(str::to_string)
            .collect();
        let config =
            serde_yaml::from_value(value).map_err(|e| ConfigFileError::Invalid(e.to_string()))?;
        Ok((config, ignored))
    }

    /// The mode's own settings (`nftables:` in nftables mode, else `iptables:`).
    pub fn mode_settings(&self, mode: &str) -> ModeSettings {
        let section = if mode == "nftables" {
            &self.nftables
        } else {
            &self.iptables
        };
        section.clone().unwrap_or_default()
    }
}

/// Parses a Go duration: a sequence of decimal numbers with units `ns`, `us`/`µs`, `ms`, `s`,
/// `m`, `h` (`1m30s`, `1.5s`, `500ms`); `0` alone is zero. Negative durations are refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || format!("{text:?} is not a duration (like 1s, 500ms, 1m30s)");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err(invalid());
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        let number: f64 = rest[..number_len].parse().map_err(|_| invalid())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(invalid()),
        };
        total += number * seconds;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h0m0s"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "1", "s", "-1s", "1x", "1s2"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn reads_a_kubeadm_style_file() {
        let text = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
            bindAddress: 0.0.0.0\nclientConnection:\n  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf\n  qps: 5\n\
            clusterCIDR: 10.244.0.0/16\nmode: nftables\nnftables:\n  masqueradeBit: 14\n  syncPeriod: 30s\n  minSyncPeriod: 1s\n\
            iptables:\n  syncPeriod: 10s\nnodePortAddresses: null\noomScoreAdj: -999\n";
        let (config, ignored) = KubeProxyConfiguration::parse(text).unwrap();
        assert_eq!(config.cluster_cidr.as_deref(), Some("10.244.0.0/16"));
        assert_eq!(config.mode.as_deref(), Some("nftables"));
        assert_eq!(
            config.mode_settings("nftables").sync_period.as_deref(),
            Some("30s")
        );
        assert_eq!(
            config.client_connection.unwrap().kubeconfig.as_deref(),
            Some("/var/lib/kube-proxy/kubeconfig.conf")
        );
        assert_eq!(ignored, vec!["oomScoreAdj".to_string()]);
        let err = KubeProxyConfiguration::parse("kind: KubeProxyConfiguration\n").unwrap_err();
        assert!(err.to_string().contains("apiVersion must be"), "{err}");
    }
}
