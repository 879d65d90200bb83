//! Prometheus metrics under kube-proxy's names (spec kube-proxy-agent.md §7), so existing
//! dashboards and alerts keep working, plus a few of kproxy's own (`kproxy_*`).
//!
//! prometheus-client writes OpenMetrics text: a counter registered as `x` is exported as
//! `x_total`, which gives kube-proxy's exported names.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::backend::Mode;
use crate::family::IpFamily;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabel {
    pub ip_family: String,
}

impl FamilyLabel {
    pub fn of(family: IpFamily) -> FamilyLabel {
        FamilyLabel {
            ip_family: family.api_name().to_string(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    pub table: String,
    pub ip_family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabel {
    pub traffic_policy: String,
    pub ip_family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;
type Timestamps = Family<FamilyLabel, Gauge<f64, AtomicU64>>;

fn sync_histogram() -> Histogram {
    // ExponentialBuckets(0.001, 2, 15): 1 ms to 16.384 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

fn network_programming_histogram() -> Histogram {
    // 0, 0.25, 0.5, 1..59 by 1, 60..115 by 5, 120..300 by 30: 81 bounds (§7.2).
    let mut bounds = vec![0.0, 0.25, 0.5];
    bounds.extend((1..60).map(f64::from));
    bounds.extend((60..120).step_by(5).map(f64::from));
    bounds.extend((120..=300).step_by(30).map(f64::from));
    Histogram::new(bounds)
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histograms<FamilyLabel>,
    pub sync_full_duration: Histograms<FamilyLabel>,
    pub sync_partial_duration: Histograms<FamilyLabel>,
    pub last_sync: Timestamps,
    pub last_queued: Timestamps,
    pub network_programming: Histograms<FamilyLabel>,
    pub endpoint_changes_pending: Gauge,
    pub endpoint_changes: Counter,
    pub service_changes_pending: Gauge,
    pub service_changes: Counter,
    pub no_local_endpoints: Family<PolicyLabel, Gauge>,
    pub iptables_restore_failures: Family<FamilyLabel, Counter>,
    pub iptables_partial_restore_failures: Family<FamilyLabel, Counter>,
    pub iptables_rules: Family<TableLabel, Gauge>,
    pub iptables_rules_last: Family<TableLabel, Gauge>,
    pub nftables_sync_failures: Family<FamilyLabel, Counter>,
    pub nftables_cleanup_failures: Family<FamilyLabel, Counter>,
    pub healthz: Family<CodeLabel, Counter>,
    pub livez: Family<CodeLabel, Counter>,
    pub conntrack_duration: Histograms<FamilyLabel>,
    pub conntrack_deleted: Family<FamilyLabel, Counter>,
    /// kproxy's own: objects currently skipped as invalid, by kind.
    pub invalid_objects: Family<KindLabel, Gauge>,
    /// kproxy's own: nftables objects in kproxy's tables after the last sync.
    pub nftables_objects: Family<FamilyLabel, Gauge>,
    /// kproxy's own: objects (nft commands, restore lines) sent by the last sync.
    pub sync_objects_last: Family<FamilyLabel, Gauge>,
}

impl Metrics {
    /// The metrics of `mode`, registered as kube-proxy registers them (§7.1).
    pub fn new(mode: Mode) -> Metrics {
        let histograms = || Histograms::<FamilyLabel>::new_with_constructor(sync_histogram as _);
        let metrics = Metrics {
            registry: Registry::default(),
            sync_duration: histograms(),
            sync_full_duration: histograms(),
            sync_partial_duration: histograms(),
            last_sync: Timestamps::default(),
            last_queued: Timestamps::default(),
            network_programming: Histograms::new_with_constructor(
                network_programming_histogram as _,
            ),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes: Counter::default(),
            service_changes_pending: Gauge::default(),
            service_changes: Counter::default(),
            no_local_endpoints: Family::default(),
            iptables_restore_failures: Family::default(),
            iptables_partial_restore_failures: Family::default(),
            iptables_rules: Family::default(),
            iptables_rules_last: Family::default(),
            nftables_sync_failures: Family::default(),
            nftables_cleanup_failures: Family::default(),
            healthz: Family::default(),
            livez: Family::default(),
            conntrack_duration: histograms(),
            conntrack_deleted: Family::default(),
            invalid_objects: Family::default(),
            nftables_objects: Family::default(),
            sync_objects_last: Family::default(),
        };
        metrics.register(mode)
    }

    fn register(mut self, mode: Mode) -> Metrics {
        let r = &mut self.registry;
        r.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            self.sync_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            self.sync_full_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            self.sync_partial_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            self.last_sync.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            self.last_queued.clone(),
        );
        r.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            self.network_programming.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            self.endpoint_changes_pending.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            self.endpoint_changes.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            self.service_changes_pending.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            self.service_changes.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            self.no_local_endpoints.clone(),
        );
        r.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            self.healthz.clone(),
        );
        r.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            self.livez.clone(),
        );
        r.register(
            "kubeproxy_conntrack_reconciler_sync_duration_seconds",
            "ReconcileConntrackFlowsLatency latency in seconds",
            self.conntrack_duration.clone(),
        );
        r.register(
            "kubeproxy_conntrack_reconciler_deleted_entries",
            "Cumulative conntrack flows deleted by conntrack reconciler",
            self.conntrack_deleted.clone(),
        );
        r.register(
            "kproxy_invalid_objects",
            "Objects skipped because they are invalid, by kind",
            self.invalid_objects.clone(),
        );
        r.register(
            "kproxy_sync_proxy_rules_objects_sent_last",
            "Objects (nft commands or restore lines) sent to the kernel by the last sync",
            self.sync_objects_last.clone(),
        );
        match mode {
            Mode::Iptables => {
                r.register(
                    "kubeproxy_sync_proxy_rules_iptables_restore_failures",
                    "Cumulative proxy iptables restore failures",
                    self.iptables_restore_failures.clone(),
                );
                r.register(
                    "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures",
                    "Cumulative proxy iptables partial restore failures",
                    self.iptables_partial_restore_failures.clone(),
                );
                r.register(
                    "kubeproxy_sync_proxy_rules_iptables_total",
                    "Total number of iptables rules owned by kube-proxy",
                    self.iptables_rules.clone(),
                );
                r.register(
                    "kubeproxy_sync_proxy_rules_iptables_last",
                    "Number of iptables rules written by kube-proxy in last sync",
                    self.iptables_rules_last.clone(),
                );
            }
            Mode::Nftables => {
                r.register(
                    "kubeproxy_sync_proxy_rules_nftables_sync_failures",
                    "Cumulative proxy nftables sync failures",
                    self.nftables_sync_failures.clone(),
                );
                r.register(
                    "kubeproxy_sync_proxy_rules_nftables_cleanup_failures",
                    "Cumulative proxy nftables cleanup failures",
                    self.nftables_cleanup_failures.clone(),
                );
                r.register(
                    "kproxy_sync_proxy_rules_nftables_objects",
                    "Objects (chains, rules, sets, maps, elements) in kproxy's nftables tables",
                    self.nftables_objects.clone(),
                );
            }
        }
        self
    }

    /// Shows the failure counters of `families` at 0 from the start, so that a rate over them
    /// works before the first failure (kube-proxy's appear only once incremented).
    pub fn start_families(&self, families: &[IpFamily]) {
        for &family in families {
            let label = FamilyLabel::of(family);
            drop(self.iptables_restore_failures.get_or_create(&label));
            drop(self.iptables_partial_restore_failures.get_or_create(&label));
            drop(self.nftables_sync_failures.get_or_create(&label));
            drop(self.nftables_cleanup_failures.get_or_create(&label));
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exported_names_are_kube_proxys() {
        let metrics = Metrics::new(Mode::Iptables);
        metrics.endpoint_changes.inc();
        metrics
            .sync_duration
            .get_or_create(&FamilyLabel::of(IpFamily::V4))
            .observe(0.003);
        metrics
            .iptables_rules
            .get_or_create(&TableLabel {
                table: "nat".into(),
                ip_family: "IPv4".into(),
            })
            .set(42);
        let text = metrics.encode();
        for line in [
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 1",
            "kubeproxy_sync_proxy_rules_service_changes_total 0",
            "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\",ip_family=\"IPv4\"} 1",
            "kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\",ip_family=\"IPv4\"} 42",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains("nftables_sync_failures"));
        let nft = Metrics::new(Mode::Nftables);
        nft.start_families(&[IpFamily::V4]);
        let nft = nft.encode();
        assert!(nft.contains(
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv4\"} 0"
        ));
        assert!(!nft.contains("iptables_restore_failures"));
    }

    #[test]
    fn network_programming_has_81_bounds() {
        let h = network_programming_histogram();
        let metrics = Metrics::new(Mode::Nftables);
        drop(h);
        metrics
            .network_programming
            .get_or_create(&FamilyLabel::of(IpFamily::V4))
            .observe(0.1);
        let text = metrics.encode();
        let buckets = text
            .lines()
            .filter(|l| l.starts_with("kubeproxy_network_programming_duration_seconds_bucket"))
            .count();
        assert_eq!(buckets, 82, "81 bounds and +Inf");
    }
}
