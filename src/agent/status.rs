//! What the agent shows about itself: the proxy health behind `/healthz` and `/livez`, the
//! metrics behind `/metrics`, shared by the sync loop (which updates them) and the HTTP
//! servers (which read them).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use super::health::ProxyHealth;
use super::http::{serve, Handler, Reply};
use super::metrics::{CodeLabel, FamilyLabel, KindLabel, Metrics};
use crate::backend::Mode;
use crate::family::IpFamily;

pub struct AgentStatus {
    pub mode: Mode,
    pub families: Vec<IpFamily>,
    pub metrics: Metrics,
    health: Mutex<ProxyHealth>,
    /// From the Node object; `None` without one (`--from-dir`), which counts as eligible.
    node_eligible: Mutex<Option<bool>>,
    /// Counts the objects skipped as invalid (Services, EndpointSlices), for
    /// `kproxy_invalid_objects`: a pass over every object, so done when the metrics are read,
    /// not after each sync (50 ms at 100,000 Services, which a change arriving then would wait).
    invalid_objects: OnceLock<InvalidCount>,
}

/// Counts the objects skipped as invalid: (Services, EndpointSlices).
pub type InvalidCount = Box<dyn Fn() -> (usize, usize) + Send + Sync>;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves plain data behind; keep serving it.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl AgentStatus {
    pub fn new(mode: Mode, families: Vec<IpFamily>, sync_period: Duration) -> AgentStatus {
        let metrics = Metrics::new(mode);
        metrics.start_families(&families);
        AgentStatus {
            mode,
            families,
            metrics,
            // kube-proxy's health timeout: twice the sync period (§6.1).
            health: Mutex::new(ProxyHealth::new(2 * sync_period)),
            node_eligible: Mutex::new(None),
            invalid_objects: OnceLock::new(),
        }
    }

    /// How to count the objects skipped as invalid (set once, when the store exists).
    pub fn count_invalid_objects_with(&self, count: InvalidCount) {
        // Set once; a second call keeps the first.
        let _ = self.invalid_objects.set(count);
    }

    /// Brings `kproxy_invalid_objects` up to date.
    fn count_invalid_objects(&self) {
        let Some(count) = self.invalid_objects.get() else {
            return;
        };
        let (services, slices) = count();
        for (kind, count) in [("Service", services), ("EndpointSlice", slices)] {
            self.metrics
                .invalid_objects
                .get_or_create(&KindLabel { kind: kind.into() })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// The sync loop starts: healthy during start-up, as kube-proxy's SyncLoop does (§4.1).
    pub fn started(&self) {
        let now = SystemTime::now();
        for &family in &self.families {
            lock(&self.health).updated(family, now);
            self.metrics
                .last_queued
                .get_or_create(&FamilyLabel::of(family))
                .set(unix_seconds(now));
        }
    }

    /// A change is waiting for a sync.
    pub fn queued(&self) {
        let now = SystemTime::now();
        let mut health = lock(&self.health);
        for &family in &self.families {
            health.queued(family, now);
            self.metrics
                .last_queued
                .get_or_create(&FamilyLabel::of(family))
                .set(unix_seconds(now));
        }
    }

    /// `family` was synced successfully at `now`.
    pub fn synced(&self, family: IpFamily, now: SystemTime) {
        lock(&self.health).updated(family, now);
        self.metrics
            .last_sync
            .get_or_create(&FamilyLabel::of(family))
            .set(unix_seconds(now));
    }

    pub fn set_node_eligible(&self, eligible: Option<bool>) {
        *lock(&self.node_eligible) = eligible;
    }

    pub fn is_healthy(&self) -> bool {
        lock(&self.health).is_healthy(SystemTime::now())
    }

    /// `/healthz` (node eligibility counts) and `/livez` (it does not).
    fn health_reply(&self, path: &str) -> Reply {
        let now = SystemTime::now();
        let (report, counter) = match path {
            "/healthz" => {
                let eligible = Some(lock(&self.node_eligible).unwrap_or(true));
                (
                    lock(&self.health).report(now, eligible),
                    &self.metrics.healthz,
                )
            }
            "/livez" => (lock(&self.health).report(now, None), &self.metrics.livez),
            _ => return Reply::not_found(),
        };
        let status = if report.healthy { 200 } else { 503 };
        counter
            .get_or_create(&CodeLabel {
                code: status.to_string(),
            })
            .inc();
        Reply::new(status, "application/json", report.body)
            .with_header("X-Content-Type-Options", "nosniff")
    }

    /// The metrics server's paths (§6.3).
    fn metrics_reply(&self, path: &str) -> Reply {
        match path {
            "/metrics" => {
                self.count_invalid_objects();
                Reply::new(
                    200,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    self.metrics.encode(),
                )
            }
            "/healthz" => Reply::new(200, "text/plain; charset=utf-8", "ok"),
            "/proxyMode" => Reply::new(200, "text/plain; charset=utf-8", self.mode.name()),
            _ => Reply::not_found(),
        }
    }
}

/// Which of the agent's servers.
#[derive(Debug, Clone, Copy)]
pub enum Server {
    Health,
    Metrics,
}

/// Serves `server` on `address`. A failed bind is retried every 5 s, as kube-proxy does
/// (§6.4), and the agent runs on meanwhile.
pub async fn serve_status(server: Server, address: SocketAddr, status: Arc<AgentStatus>) {
    let handler: Handler = match server {
        Server::Health => Arc::new(move |path: &str| status.health_reply(path)),
        Server::Metrics => Arc::new(move |path: &str| status.metrics_reply(path)),
    };
    loop {
        match tokio::net::TcpListener::bind(address).await {
            Ok(listener) => {
                tracing::info!("serving {server:?} on {address}");
                return serve(listener, handler).await;
            }
            Err(err) => {
                tracing::error!("cannot serve {server:?} on {address}: {err}; retrying in 5 s");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}
