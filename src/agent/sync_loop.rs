//! The sync loop, on a thread of its own (the kernel tools block): it waits for changes,
//! lets the [`SyncSchedule`] decide when to sync, and then reads top to bottom like
//! kube-proxy's `syncProxyRules` — take the changes, rebuild the changed Services' ports,
//! translate and apply, then metrics, health, health-check ports and conntrack.

use std::collections::BTreeSet;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use super::metrics::{FamilyLabel, PolicyLabel, TableLabel};
use super::node::NodeInfo;
use super::node_model::NodeModel;
use super::runner::SyncSchedule;
use super::service_health::{self, ServiceHealthServers};
use super::status::AgentStatus;
use super::store::{ClusterStore, ServiceKey};
use crate::backend::{Backend, FamilySync, Mode};
use crate::config::NodeConfig;
use crate::model::{Protocol, ProxyModel};

/// What wakes the loop.
#[derive(Debug)]
pub enum Wake {
    /// The store has changes.
    Changed,
    /// The Node's topology changed: every Service is rebuilt, the next sync is full.
    Node(NodeInfo),
    /// Finish the current sync and stop; the rules stay in the kernel.
    Stop,
}

/// The loop's state (module docs).
pub struct SyncLoop {
    pub store: Arc<Mutex<ClusterStore>>,
    pub status: Arc<AgentStatus>,
    pub backend: Box<dyn Backend>,
    pub config: NodeConfig,
    pub schedule: SyncSchedule,
    pub service_health: Option<ServiceHealthServers>,
    /// Delete stale UDP conntrack entries after syncs that change UDP Services.
    pub conntrack: bool,
    pub model: NodeModel,
    /// Rebuild every Service at the next sync (start, node settings changed).
    rebuild_all: bool,
    /// Services with a UDP port in the last models, for the conntrack trigger.
    udp_services: BTreeSet<ServiceKey>,
}

impl SyncLoop {
    pub fn new(
        store: Arc<Mutex<ClusterStore>>,
        status: Arc<AgentStatus>,
        backend: Box<dyn Backend>,
        config: NodeConfig,
        schedule: SyncSchedule,
    ) -> SyncLoop {
        SyncLoop {
            store,
            status,
            backend,
            config,
            schedule,
            service_health: None,
            conntrack: true,
            model: NodeModel::default(),
            rebuild_all: true,
            udp_services: BTreeSet::new(),
        }
    }

    /// Runs until [`Wake::Stop`] or until every sender is gone.
    pub fn run(mut self, wake: Receiver<Wake>) {
        self.status.started();
        loop {
            let initialized = self.lock_store().is_initialized();
            let received = if initialized {
                let next = self.schedule.next_run(self.backend.next_deadline());
                match wake.recv_timeout(next.saturating_duration_since(Instant::now())) {
                    Ok(message) => Some(message),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                // Never program a partial view: wait until both kinds were listed.
                match wake.recv() {
                    Ok(message) => Some(message),
                    Err(_) => return,
                }
            };
            for message in received
                .into_iter()
                .chain(std::iter::from_fn(|| wake.try_recv().ok()))
            {
                match message {
                    Wake::Changed => self.schedule.request(),
                    Wake::Node(node) => {
                        if node.zone != self.config.zone {
                            tracing::info!(
                                "the node's zone is now {:?}; rebuilding every Service",
                                node.zone
                            );
                            self.config.zone = node.zone;
                            self.rebuild_all = true;
                            self.backend.request_full_sync();
                            self.schedule.request();
                        }
                    }
                    Wake::Stop => return,
                }
            }
            if !self.lock_store().is_initialized() {
                continue;
            }
            let deadline = self.backend.next_deadline();
            if self.schedule.is_due(Instant::now(), deadline) {
                // A sync that rebuilds every Service (the first one, a node change) leaves
                // the most garbage behind: hand it back now, not whenever the next sync runs.
                let rebuilds_all = self.rebuild_all;
                let ok = self.sync_guarded();
                self.schedule.finished(Instant::now(), ok);
                if rebuilds_all {
                    crate::allocator::release_freed_memory();
                }
            }
        }
    }

    fn lock_store(&self) -> std::sync::MutexGuard<'_, ClusterStore> {
        self.store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// [`SyncLoop::sync`], surviving a panic inside it as kube-proxy's runner does: the panic
    /// counts as a failed sync, and the next one is full (and rebuilds every Service).
    fn sync_guarded(&mut self) -> bool {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.sync()));
        outcome.unwrap_or_else(|_| {
            tracing::error!("a sync panicked; the next sync is a full one");
            self.rebuild_all = true;
            self.backend.request_full_sync();
            false
        })
    }

    /// One sync; whether every family succeeded.
    pub fn sync(&mut self) -> bool {
        let started = Instant::now();
        // 1. Changes: take them, rebuild the ports of the Services they touch.
        let (changes, notes, modelled) = {
            let mut store = self
                .store
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let (changes, notes) = store.take_changes();
            let changed = (!self.rebuild_all).then_some(&changes.services);
            self.model.update(&store, changed, &self.config);
            (changes, notes, started.elapsed())
        };
        self.rebuild_all = false;
        for note in &notes {
            tracing::warn!("{note}");
        }
        let metrics = &self.status.metrics;
        metrics.service_changes.inc_by(changes.service_events);
        metrics.endpoint_changes.inc_by(changes.endpoint_events);
        metrics.service_changes_pending.set(0);
        metrics.endpoint_changes_pending.set(0);

        // 2. Translate and apply, one transaction per family.
        let models = self.model.models();
        let results = self.backend.sync(models, &self.config);

        // 3. Account for each family.
        let now = SystemTime::now();
        let mut all_ok = true;
        for family_sync in &results {
            let label = FamilyLabel::of(family_sync.family);
            let duration = started.elapsed().as_secs_f64();
            metrics
                .sync_duration
                .get_or_create(&label)
                .observe(duration);
            match &family_sync.result {
                Ok(report) => {
                    let kind = if report.full { "full" } else { "partial" };
                    let histogram = if report.full {
                        &metrics.sync_full_duration
                    } else {
                        &metrics.sync_partial_duration
                    };
                    histogram.get_or_create(&label).observe(duration);
                    self.status.synced(family_sync.family, now);
                    if report.cleanup_failed {
                        metrics
                            .nftables_cleanup_failures
                            .get_or_create(&label)
                            .inc();
                    }
                    metrics
                        .sync_objects_last
                        .get_or_create(&label)
                        .set(report.objects as i64);
                    for &(table, count) in &family_sync.programmed {
                        match self.backend.mode() {
                            Mode::Iptables => {
                                let table_label = TableLabel {
                                    table: table.into(),
                                    ip_family: label.ip_family.clone(),
                                };
                                metrics
                                    .iptables_rules
                                    .get_or_create(&table_label)
                                    .set(count as i64);
                            }
                            Mode::Nftables => {
                                metrics
                                    .nftables_objects
                                    .get_or_create(&label)
                                    .set(count as i64);
                            }
                        }
                    }
                    if self.backend.mode() == Mode::Iptables {
                        metrics
                            .iptables_rules_last
                            .get_or_create(&TableLabel {
                                table: "nat".into(),
                                ip_family: label.ip_family.clone(),
                            })
                            .set(report.objects as i64);
                    }
                    for times in changes.trigger_times.values() {
                        for time in times {
                            let latency = now.duration_since(*time).unwrap_or_default();
                            metrics
                                .network_programming
                                .get_or_create(&label)
                                .observe(latency.as_secs_f64());
                        }
                    }
                    let total = started.elapsed();
                    let waited = changes
                        .first_received
                        .map(|first| format!(", change to kernel {:.1} ms", ms(first.elapsed())))
                        .unwrap_or_default();
                    tracing::info!(
                        "synced {}: {kind} sync in {:.1} ms (kproxy {:.1} ms: model {:.1}, translate {:.1}, diff and rest {:.1}; kernel tools {:.1} ms){waited}, {} objects sent, {} Services changed, {} EndpointSlice events",
                        family_sync.family,
                        ms(total),
                        ms(total.saturating_sub(report.kernel)),
                        ms(modelled),
                        ms(family_sync.translate),
                        ms(report.duration.saturating_sub(report.kernel)),
                        ms(report.kernel),
                        report.objects,
                        changes.services.len(),
                        changes.endpoint_events,
                    );
                }
                Err(err) => {
                    all_ok = false;
                    self.count_failure(family_sync);
                    tracing::error!(
                        "sync of {} failed: {err}; the kernel keeps its previous rules, retrying with a full sync",
                        family_sync.family
                    );
                }
            }
        }
        for model in models {
            set_no_local_endpoints(metrics, model);
        }

        // 4. After success: health-check ports, then stale UDP flows.
        if all_ok {
            if let Some(servers) = &mut self.service_health {
                servers.reconcile(&service_health::wanted(models));
            }
        }
        let udp_now = udp_services(models);
        let udp_changed = changes
            .services
            .iter()
            .any(|key| udp_now.contains(key) || self.udp_services.contains(key));
        self.udp_services = udp_now;
        if all_ok && self.conntrack && udp_changed {
            self.cleanup_conntrack(models);
        }
        all_ok
    }

    fn count_failure(&self, family_sync: &FamilySync) {
        let label = FamilyLabel::of(family_sync.family);
        let metrics = &self.status.metrics;
        match self.backend.mode() {
            Mode::Iptables => {
                metrics
                    .iptables_restore_failures
                    .get_or_create(&label)
                    .inc();
                if family_sync.attempted_partial {
                    metrics
                        .iptables_partial_restore_failures
                        .get_or_create(&label)
                        .inc();
                }
            }
            Mode::Nftables => {
                metrics.nftables_sync_failures.get_or_create(&label).inc();
            }
        }
    }

    fn cleanup_conntrack(&self, models: &[ProxyModel]) {
        let started = Instant::now();
        match crate::sync::conntrack::cleanup_stale_udp(models) {
            Ok(deleted) => {
                for model in models {
                    let label = FamilyLabel::of(model.family);
                    let metrics = &self.status.metrics;
                    metrics
                        .conntrack_duration
                        .get_or_create(&label)
                        .observe(started.elapsed().as_secs_f64());
                    if model.family == models[0].family {
                        metrics
                            .conntrack_deleted
                            .get_or_create(&label)
                            .inc_by(deleted as u64);
                    }
                }
                if deleted > 0 {
                    tracing::info!("deleted {deleted} stale UDP conntrack entries");
                }
            }
            Err(err) => tracing::warn!("removing stale UDP conntrack entries failed: {err}"),
        }
    }
}

fn ms(duration: std::time::Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn udp_services(models: &[ProxyModel]) -> BTreeSet<ServiceKey> {
    models
        .iter()
        .flat_map(|m| &m.ports)
        .filter(|p| p.name.protocol == Protocol::Udp)
        .map(|p| p.name.service())
        .collect()
}

/// kube-proxy's no-local-endpoints gauges: service ports with a Local policy that have
/// endpoints in the cluster but none on this node.
fn set_no_local_endpoints(metrics: &super::metrics::Metrics, model: &ProxyModel) {
    let (mut internal, mut external) = (0, 0);
    for port in &model.ports {
        if port.has_any_endpoints() && port.selection.local.is_empty() {
            if port.internal_policy_local {
                internal += 1;
            }
            if port.external_policy_local && port.externally_accessible() {
                external += 1;
            }
        }
    }
    for (policy, count) in [("internal", internal), ("external", external)] {
        metrics
            .no_local_endpoints
            .get_or_create(&PolicyLabel {
                traffic_policy: policy.into(),
                ip_family: model.family.api_name().into(),
            })
            .set(count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::NftablesBackend;
    use crate::family::IpFamily;
    use crate::nftables::Command;
    use crate::sync::nftables::{Applier, FakeKernel, KernelTable, SyncOptions};
    use crate::sync::SyncError;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// The fake kernel, refusing every transaction while `refuse` is set.
    struct Refusing {
        kernel: FakeKernel,
        refuse: Arc<AtomicBool>,
    }

    impl Applier for Refusing {
        fn apply(
            &mut self,
            family: IpFamily,
            commands: &[Command<'_>],
        ) -> Result<usize, SyncError> {
            if self.refuse.load(Ordering::Relaxed) {
                return Err(SyncError::Refused {
                    tool: "nft".into(),
                    family,
                    object: None,
                    message: "refused by the test".into(),
                });
            }
            self.kernel.apply(family, commands)
        }
        fn read(&mut self, family: IpFamily) -> Result<Option<KernelTable>, SyncError> {
            self.kernel.read(family)
        }
        fn rule_count(
            &mut self,
            family: IpFamily,
            chain: &str,
        ) -> Result<Option<usize>, SyncError> {
            self.kernel.rule_count(family, chain)
        }
        fn table_exists(&mut self, family: IpFamily) -> Result<bool, SyncError> {
            self.kernel.table_exists(family)
        }
    }

    fn metric(status: &AgentStatus, series: &str) -> Option<f64> {
        status
            .metrics
            .encode()
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn a_refused_sync_is_counted_and_leaves_the_changes_for_the_next() {
        let cluster = crate::synthetic::cluster(3, 2).expect("fits");
        let store = Arc::new(Mutex::new(ClusterStore::new(SystemTime::UNIX_EPOCH)));
        {
            let mut store = store.lock().unwrap();
            store.replace_services(&cluster.services);
            store.replace_slices(&cluster.endpoint_slices);
            store.set_listed(crate::source::Kind::Service);
            store.set_listed(crate::source::Kind::EndpointSlice);
        }
        let status = Arc::new(AgentStatus::new(
            Mode::Nftables,
            vec![IpFamily::V4],
            Duration::from_secs(30),
        ));
        let refuse = Arc::new(AtomicBool::new(true));
        let backend = NftablesBackend::new(
            Refusing {
                kernel: FakeKernel::new(),
                refuse: refuse.clone(),
            },
            SyncOptions::default(),
        );
        let schedule = SyncSchedule::new(
            Instant::now(),
            Duration::from_secs(1),
            Duration::from_secs(30),
            Duration::from_secs(30),
        );
        let config = NodeConfig::new("node-1");
        let mut sync_loop =
            SyncLoop::new(store, status.clone(), Box::new(backend), config, schedule);
        sync_loop.conntrack = false;

        let failures =
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv4\"}";
        let last = "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}";
        assert!(!sync_loop.sync(), "the refused sync reports failure");
        assert_eq!(metric(&status, failures), Some(1.0));
        assert_eq!(metric(&status, last), None, "no successful sync yet");
        assert_eq!(
            metric(&status, "kubeproxy_sync_proxy_rules_service_changes_total"),
            Some(3.0)
        );

        // Nothing changed since, but the next sync still programs everything.
        refuse.store(false, Ordering::Relaxed);
        assert!(sync_loop.sync());
        assert_eq!(metric(&status, failures), Some(1.0));
        assert!(metric(&status, last).is_some_and(|t| t > 1.0e9));
        assert!(metric(
            &status,
            "kproxy_sync_proxy_rules_nftables_objects{ip_family=\"IPv4\"}"
        )
        .is_some_and(|n| n > 20.0));
        assert_eq!(
            metric(
                &status,
                "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}"
            ),
            Some(1.0),
            "the repairing sync is a full one"
        );
    }
}
