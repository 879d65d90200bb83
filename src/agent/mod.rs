//! The node agent (`kproxy run`): keeps this node's rules in step with the cluster, as
//! kube-proxy does (spec kube-proxy-agent.md). Small pieces with one job each:
//!
//! ```text
//! source (API watches | directory) ──SourceEvent──► ClusterStore ──Wake──► SyncLoop ──► Backend
//!   src/source/kube.rs, dir.rs        store.rs        (keyed, validated,    sync_loop.rs   (translate,
//!                                                      changed Services)    runner.rs       diff, apply)
//!                                                                           node_model.rs
//! AgentStatus (health.rs, metrics.rs) ◄── the loop updates it; status.rs serves /healthz, /livez, /metrics
//! ServiceHealthServers (service_health.rs): healthCheckNodePorts, reconciled after each sync
//! ```
//!
//! Start-up: the first sync waits until Services and EndpointSlices have both been listed
//! completely, and is a full sync that reads the kernel and writes only differences, so a
//! restarted agent adopts its own rules without dropping traffic or affinity state. SIGTERM
//! and SIGINT end the agent after the current sync, leaving the rules in place.

pub mod config_file;
pub mod config_watch;
pub mod health;
pub mod http;
pub mod metrics;
pub mod node;
pub mod node_model;
pub mod runner;
pub mod service_health;
pub mod status;
pub mod store;
pub mod sync_loop;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::backend::{self, BackendOptions, Mode};
use crate::config::NodeConfig;
use crate::source::dir::{watch_dir, ManifestDir};
use crate::source::kube::{watch_cluster, watch_node, ApiServer};
use crate::source::{Kind, Object, SourceEvent};
use crate::sync::lock::NetnsLock;
use node::{adopt_node, follow_node, wait_for_node};
use runner::SyncSchedule;
use service_health::ServiceHealthServers;
use status::{serve_status, AgentStatus, Server};
use store::ClusterStore;
use sync_loop::{SyncLoop, Wake};

/// Where the cluster's objects come from.
#[derive(Debug, Clone)]
pub enum Source {
    ApiServer(ApiServer),
    /// A directory of manifests, re-read when it changes; no cluster needed.
    Dir(PathBuf),
}

/// How local traffic is told apart (kube-proxy's `--detect-local-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectLocal {
    /// The `--cluster-cidr` ranges.
    #[default]
    ClusterCidr,
    /// The Node's `spec.podCIDRs`.
    NodeCidr,
}

/// Everything `kproxy run` was configured with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub mode: Mode,
    /// The node settings from flags and the config file; the Node object fills in what they
    /// leave open (node IPs, zone, pod CIDRs).
    pub node: NodeConfig,
    pub source: Source,
    pub detect_local: DetectLocal,
    pub healthz_bind: Option<SocketAddr>,
    pub metrics_bind: Option<SocketAddr>,
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    pub backend: BackendOptions,
    /// How long start-up waits for the Node object to appear with addresses (§2.2: 30 s).
    pub node_wait: Duration,
    /// The `--config` file and its content at start: the agent exits when it changes (§1.1).
    pub config_file: Option<(PathBuf, String)>,
    /// How long start-up waits for another kproxy holding this network namespace's writer
    /// lock (an old instance ending during a rolling update).
    pub lock_timeout: Duration,
}

/// Runs the agent until SIGTERM/SIGINT (`Ok`) or a fatal error.
pub fn run(config: AgentConfig) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run_agent(config))
}

async fn run_agent(mut config: AgentConfig) -> Result<()> {
    let families = config.node.family_mode.families().to_vec();
    let status = Arc::new(AgentStatus::new(
        config.mode,
        families.clone(),
        config.sync_period,
    ));
    for (server, address) in [
        (Server::Health, config.healthz_bind),
        (Server::Metrics, config.metrics_bind),
    ] {
        if let Some(address) = address {
            tokio::spawn(serve_status(server, address, status.clone()));
        }
    }

    // Sources first: the Node decides the node's addresses before anything is programmed.
    let (events_tx, events_rx) = unbounded_channel();
    let (fatal_tx, mut fatal_rx) = unbounded_channel::<anyhow::Error>();
    let (wake_tx, wake_rx) = mpsc::channel();
    let mut node_rx = None;
    match config.source.clone() {
        Source::ApiServer(api) => {
            let client = api.client().await?;
            let (node_tx, mut rx) = unbounded_channel();
            tokio::spawn(watch_node(
                client.clone(),
                config.node.hostname.clone(),
                node_tx,
            ));
            let node = wait_for_node(&mut rx, &config.node.hostname, config.node_wait).await;
            adopt_node(&mut config, node.as_ref())?;
            status.set_node_eligible(Some(node.as_ref().is_some_and(|n| n.eligible)));
            node_rx = Some((rx, node));
            tokio::spawn(watch_cluster(client, events_tx));
        }
        Source::Dir(path) => {
            adopt_node(&mut config, None)?;
            let dir = ManifestDir::new(path);
            let fatal = fatal_tx.clone();
            tokio::spawn(async move {
                if let Err(err) = watch_dir(dir, events_tx).await {
                    let _ = fatal.send(err);
                }
            });
        }
    }
    if let Some((path, text)) = config.config_file.clone() {
        tokio::spawn(config_watch::watch_config_file(
            path,
            text,
            fatal_tx.clone(),
        ));
    }
    if let Some((rx, started)) = node_rx {
        tokio::spawn(follow_node(
            rx,
            started,
            config.clone(),
            status.clone(),
            wake_tx.clone(),
            fatal_tx.clone(),
        ));
    }
    tracing::info!(
        "kproxy {} starting in {} mode for node {:?} (node IPs {:?})",
        env!("CARGO_PKG_VERSION"),
        config.mode.name(),
        config.node.hostname,
        config.node.node_ips
    );

    let store = Arc::new(Mutex::new(
        ClusterStore::new(SystemTime::now())
            .with_settings(crate::model::ClusterSettings::of(&config.node)),
    ));
    let counted = store.clone();
    status.count_invalid_objects_with(Box::new(move || {
        counted
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .invalid_counts()
    }));
    tokio::spawn(feed_store(
        events_rx,
        store.clone(),
        status.clone(),
        wake_tx.clone(),
    ));

    // The sync loop: the kernel tools block, so it has a thread of its own.
    let mode = config.mode;
    let options = config.backend;
    let lock_timeout = config.lock_timeout;
    // The writer lock is held from before the first change to the kernel until the agent
    // ends (src/sync/lock.rs).
    let (backend, _lock) = tokio::task::spawn_blocking(move || {
        let lock = NetnsLock::acquire(lock_timeout, |holder| {
            tracing::warn!(
                "waiting up to {:.1}s for this network namespace's writer lock, held by {holder} (an instance still ending?)", lock_timeout.as_secs_f64()
            )
        })?;
        remove_other_modes_rules(mode);
        Ok::<_, anyhow::Error>((backend::system(mode, options), lock))
    })
    .await
    .context("cannot set up the backend")??;
    let schedule = SyncSchedule::new(
        Instant::now(),
        config.min_sync_period,
        config.sync_period,
        config.sync_period,
    );
    let mut sync_loop = SyncLoop::new(
        store,
        status.clone(),
        backend,
        config.node.clone(),
        schedule,
    );
    let healthy_status = status.clone();
    sync_loop.service_health = Some(ServiceHealthServers::new(
        tokio::runtime::Handle::current(),
        health_check_addresses(&config.node),
        Arc::new(move || healthy_status.is_healthy()),
    ));
    let sync_thread = std::thread::Builder::new()
        .name("sync".into())
        .spawn(move || sync_loop.run(wake_rx))
        .context("cannot start the sync thread")?;

    let outcome = wait_for_end(&mut fatal_rx).await;
    let _ = wake_tx.send(Wake::Stop);
    // The current sync finishes; an interrupted transaction would still be atomic.
    let _ = tokio::task::spawn_blocking(move || sync_thread.join()).await;
    if outcome.is_ok() {
        tracing::info!("stopped; the rules stay in place until the next start");
    }
    outcome
}

/// Ends on SIGTERM or SIGINT (`Ok`), or on a fatal error from a source.
async fn wait_for_end(fatal: &mut UnboundedReceiver<anyhow::Error>) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM received"); Ok(()) }
        _ = int.recv() => { tracing::info!("SIGINT received"); Ok(()) }
        Some(err) = fatal.recv() => Err(err),
    }
}

/// Applies source events to the store in batches and wakes the sync loop when something
/// changed.
async fn feed_store(
    mut events: UnboundedReceiver<SourceEvent>,
    store: Arc<Mutex<ClusterStore>>,
    status: Arc<AgentStatus>,
    wake: mpsc::Sender<Wake>,
) {
    while let Some(first) = events.recv().await {
        let (changed, initialized, pending) = {
            let mut store = store.lock().unwrap_or_else(|p| p.into_inner());
            let was_initialized = store.is_initialized();
            let mut changed = apply(&mut store, first);
            while let Ok(event) = events.try_recv() {
                changed |= apply(&mut store, event);
            }
            store.mark_received(Instant::now());
            let initialized = store.is_initialized();
            (
                changed || (initialized && !was_initialized),
                initialized,
                store.pending(),
            )
        };
        status.metrics.service_changes_pending.set(pending.0 as i64);
        status
            .metrics
            .endpoint_changes_pending
            .set(pending.1 as i64);
        if changed {
            if initialized {
                status.queued();
            }
            if wake.send(Wake::Changed).is_err() {
                return;
            }
        }
    }
}

fn apply(store: &mut ClusterStore, event: SourceEvent) -> bool {
    match event {
        SourceEvent::Applied(Object::Service(service)) => store.apply_service(&service),
        SourceEvent::Applied(Object::EndpointSlice(slice)) => store.apply_slice(&slice),
        SourceEvent::Deleted {
            kind: Kind::Service,
            namespace,
            name,
        } => store.delete_service(&namespace, &name),
        SourceEvent::Deleted {
            kind: Kind::EndpointSlice,
            namespace,
            name,
        } => store.delete_slice(&namespace, &name),
        SourceEvent::Listed { kind, objects } => {
            match kind {
                Kind::Service => {
                    store.replace_services(objects.into_iter().filter_map(|o| match o {
                        Object::Service(s) => Some(s),
                        _ => None,
                    }))
                }
                Kind::EndpointSlice => {
                    store.replace_slices(objects.into_iter().filter_map(|o| match o {
                        Object::EndpointSlice(s) => Some(s),
                        _ => None,
                    }))
                }
                Kind::Node => {}
            }
            store.set_listed(kind);
            store.has_changes()
        }
        SourceEvent::Applied(Object::Node(_))
        | SourceEvent::Deleted {
            kind: Kind::Node, ..
        } => false,
    }
}

/// Where health-check node ports listen: the node's addresses inside `--nodeport-addresses`,
/// or every address.
fn health_check_addresses(config: &NodeConfig) -> Vec<IpAddr> {
    use crate::config::NodePortAddresses;
    match &config.nodeport_addresses {
        Some(NodePortAddresses::Cidrs(cidrs)) if !cidrs.iter().any(|c| c.prefix_len() == 0) => {
            config
                .node_ips
                .iter()
                .copied()
                .filter(|ip| cidrs.iter().any(|c| c.contains(ip)))
                .collect()
        }
        _ => Vec::new(),
    }
}

/// Best effort, as kube-proxy does at start-up (§4.1): a node switched from one mode to the
/// other loses the old mode's rules. This mode's own rules are adopted, not touched.
fn remove_other_modes_rules(mode: Mode) {
    let other = match mode {
        Mode::Iptables => Mode::Nftables,
        Mode::Nftables => Mode::Iptables,
    };
    let mut backend = backend::system(other, BackendOptions::default());
    match backend.cleanup() {
        Ok(cleaned) if !cleaned.removed.is_empty() => {
            tracing::info!("leftover {} rules: {cleaned}", other.name())
        }
        Ok(_) => {}
        Err(err) => tracing::debug!("removing leftover {} rules: {err}", other.name()),
    }
}
