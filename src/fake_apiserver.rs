//! A fake Kubernetes API server on loopback, for driving the node agent's watches in tests and
//! benchmarks without a cluster.
//!
//! It serves what kproxy watches — Services, EndpointSlices and Nodes, cluster-wide and (for the
//! namespaced kinds) per namespace — with the real list+watch protocol as kube-rs speaks it:
//!
//! - one global resourceVersion across all kinds, bumped by every change;
//! - lists in namespace/name order, with `limit`/`continue` pagination served from the list's
//!   snapshot (a token older than the kept history gets 410 `Expired`);
//! - `labelSelector` and `fieldSelector` on lists and watches;
//! - watches as newline-delimited JSON events over a chunked body: history replay from the
//!   requested resourceVersion, then live events; an object that starts or stops matching a
//!   watch's selectors is ADDED or DELETED for it; periodic BOOKMARKs; `timeoutSeconds`; a
//!   resourceVersion older than the history gets the single 410 `ERROR` event kube-apiserver
//!   sends, and the stream ends;
//! - `sendInitialEvents=true` (streaming lists), closed by the `k8s.io/initial-events-end`
//!   bookmark.
//!
//! Unlike a real API server it is in memory and read-only over HTTP (objects change only
//! through [`FakeApiServer::apply`] and [`FakeApiServer::delete`]); it has no authentication,
//! no TLS, no protobuf, no discovery, no single-object GET, no admission or validation beyond
//! name and namespace, and no creationTimestamp or generation. A no-op apply still bumps the
//! resourceVersion. [`FakeApiServer::compact`] is stricter than etcd compaction: afterwards
//! no resourceVersion handed out so far can be resumed from. A watch from a resourceVersion
//! newer than the current one waits for it instead of failing. Field values take no
//! backslash escapes.
//!
//! The control handle also lets a test misbehave like a real server does: end every watch
//! abruptly ([`FakeApiServer::drop_watches`]) or stop answering for a while
//! ([`FakeApiServer::set_stalled`]).

mod http;
mod selector;
mod store;
mod stream;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

use store::Store;

/// The kinds the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    Service,
    EndpointSlice,
    Node,
}

impl ResourceKind {
    pub const ALL: [ResourceKind; 3] = [
        ResourceKind::Service,
        ResourceKind::EndpointSlice,
        ResourceKind::Node,
    ];

    pub fn kind(self) -> &'static str {
        match self {
            ResourceKind::Service => "Service",
            ResourceKind::EndpointSlice => "EndpointSlice",
            ResourceKind::Node => "Node",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            ResourceKind::EndpointSlice => "discovery.k8s.io/v1",
            ResourceKind::Service | ResourceKind::Node => "v1",
        }
    }

    /// The resource's name in URL paths.
    pub fn plural(self) -> &'static str {
        match self {
            ResourceKind::Service => "services",
            ResourceKind::EndpointSlice => "endpointslices",
            ResourceKind::Node => "nodes",
        }
    }

    pub fn namespaced(self) -> bool {
        self != ResourceKind::Node
    }

    /// By kind name alone (`"Service"`).
    pub fn from_kind(kind: &str) -> Option<ResourceKind> {
        ResourceKind::ALL
            .into_iter()
            .find(|candidate| candidate.kind() == kind)
    }

    /// By apiVersion and kind, as an object states them.
    pub fn from_type(api_version: &str, kind: &str) -> Option<ResourceKind> {
        ResourceKind::from_kind(kind).filter(|candidate| candidate.api_version() == api_version)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Tunables; [`FakeOptions::default`] suits tests.
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK. Default 1 s.
    pub bookmark_interval: Duration,
    /// The longest a watch stays open, whatever `timeoutSeconds` asks. Default 300 s.
    pub max_watch_timeout: Duration,
    /// How many changes are kept for resuming watches and continuing lists. Default 10 000.
    pub history_limit: usize,
}

impl Default for FakeOptions {
    fn default() -> FakeOptions {
        FakeOptions {
            bookmark_interval: Duration::from_secs(1),
            max_watch_timeout: Duration::from_secs(300),
            history_limit: 10_000,
        }
    }
}

/// One HTTP request the server received, logged when it arrived (before any stall).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLog {
    pub method: String,
    pub path: String,
    /// The raw (still percent-encoded) query string.
    pub query: String,
    /// `None` for a path the server does not serve.
    pub resource: Option<ResourceKind>,
    /// A watch (`watch=true`) rather than a list.
    pub watch: bool,
}

/// What the HTTP side and the control handle share.
struct Shared {
    store: Mutex<Store>,
    signals: watch::Sender<Signals>,
    options: FakeOptions,
    requests: Mutex<Vec<RequestLog>>,
    open_watches: AtomicUsize,
}

/// Broadcast to every request and watch: they wake on any change.
#[derive(Debug, Clone, Copy, Default)]
struct Signals {
    /// The latest resourceVersion.
    rv: u64,
    stalled: bool,
    /// Bumped by `drop_watches()`: watches opened before it end.
    drops: u64,
    shutdown: bool,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn requests(&self) -> MutexGuard<'_, Vec<RequestLog>> {
        self.requests.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn log(&self, request: RequestLog) {
        self.requests().push(request);
    }
}

/// A running fake API server on 127.0.0.1, with its own thread and tokio runtime, so that plain
/// `#[test]` functions and async tests alike can use it. Dropping it stops the server.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    url: String,
    thread: Option<JoinHandle<()>>,
}

impl FakeApiServer {
    pub fn start() -> std::io::Result<FakeApiServer> {
        FakeApiServer::start_with(FakeOptions::default())
    }

    pub fn start_with(options: FakeOptions) -> std::io::Result<FakeApiServer> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
        listener.set_nonblocking(true)?;
        let url = format!("http://{}", listener.local_addr()?);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = {
            let _context = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(options.history_limit)),
            signals: watch::Sender::new(Signals::default()),
            options,
            requests: Mutex::default(),
            open_watches: AtomicUsize::new(0),
        });
        let server = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || runtime.block_on(http::serve(listener, server)))?;
        Ok(FakeApiServer {
            shared,
            url,
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Creates or replaces an object, chosen by its `apiVersion` and `kind` (v1 Service,
    /// discovery.k8s.io/v1 EndpointSlice, v1 Node) and its namespace and name; returns its new
    /// resourceVersion.
    ///
    /// # Panics
    /// On any other kind, or without a name (or, for a namespaced kind, a namespace): that is a
    /// mistake in the test, not a condition to handle.
    pub fn apply(&self, object: Value) -> u64 {
        let text = |field: &str| object.get(field).and_then(Value::as_str).unwrap_or("");
        let (api_version, kind) = (text("apiVersion"), text("kind"));
        let Some(kind) = ResourceKind::from_type(api_version, kind) else {
            panic!("FakeApiServer::apply: not served: apiVersion {api_version:?}, kind {kind:?}");
        };
        let change = self.shared.store().apply(kind, object);
        match change {
            Ok(change) => self.announce(change.rv),
            Err(message) => panic!("FakeApiServer::apply: {message}"),
        }
    }

    /// [`apply`](Self::apply) for a typed object (`Service`, `EndpointSlice`, `Node`).
    pub fn apply_typed<K: serde::Serialize + k8s_openapi::Resource>(&self, object: &K) -> u64 {
        let mut value = serde_json::to_value(object).expect("a k8s-openapi object serializes");
        // k8s-openapi writes both, but say so rather than rely on it.
        value["apiVersion"] = K::API_VERSION.into();
        value["kind"] = K::KIND.into();
        self.apply(value)
    }

    /// Deletes an object by kind name (`"Service"`, `"EndpointSlice"`, `"Node"`), namespace
    /// (`""` for a Node) and name; returns the deletion's resourceVersion, or `None` if there
    /// was no such object.
    ///
    /// # Panics
    /// On a kind the server does not serve.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Option<u64> {
        let Some(resource) = ResourceKind::from_kind(kind) else {
            panic!("FakeApiServer::delete: kind {kind:?} is not served");
        };
        let change = self.shared.store().delete(resource, namespace, name)?;
        Some(self.announce(change.rv))
    }

    /// The stored object (with kind, apiVersion, uid and resourceVersion), if any.
    pub fn get(&self, kind: ResourceKind, namespace: &str, name: &str) -> Option<Value> {
        let store = self.shared.store();
        store
            .get(kind, namespace, name)
            .map(|object| Value::clone(&object))
    }

    fn announce(&self, rv: u64) -> u64 {
        self.shared
            .signals
            .send_modify(|signals| signals.rv = signals.rv.max(rv));
        rv
    }

    /// The latest resourceVersion (0 before the first change).
    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version()
    }

    /// Forgets the history: a watch resuming from any resourceVersion handed out so far gets
    /// the 410 `Expired` event, and a continue token gets a 410 response. Open watches go on.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Ends every open watch abruptly: the connection is closed in the middle of the chunked
    /// body, as when an API server dies or a load balancer cuts the stream.
    pub fn drop_watches(&self) {
        self.shared
            .signals
            .send_modify(|signals| signals.drops += 1);
    }

    /// While stalled, requests are accepted but not answered and open watches send nothing
    /// (no events, no bookmarks, no end); afterwards everything proceeds and nothing is lost.
    pub fn set_stalled(&self, stalled: bool) {
        self.shared
            .signals
            .send_modify(|signals| signals.stalled = stalled);
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RequestLog> {
        self.shared.requests().clone()
    }

    /// How many lists (pages count one each) of the kind were requested so far.
    pub fn list_requests(&self, kind: ResourceKind) -> usize {
        self.count_requests(kind, false)
    }

    /// How many watches of the kind were requested so far.
    pub fn watch_requests(&self, kind: ResourceKind) -> usize {
        self.count_requests(kind, true)
    }

    fn count_requests(&self, kind: ResourceKind, watch: bool) -> usize {
        let requests = self.shared.requests();
        requests
            .iter()
            .filter(|request| request.resource == Some(kind) && request.watch == watch)
            .count()
    }

    /// Watch streams currently open.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shared
            .signals
            .send_modify(|signals| signals.shutdown = true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
