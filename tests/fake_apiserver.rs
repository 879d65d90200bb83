//! The fake API server driven by a real kube-rs client and `kube::runtime::watcher`, set up the
//! way the node agent watches: what arrives, and how the watcher recovers from dropped,
//! expired and stalled watches.

use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy::fake_apiserver::{FakeApiServer, FakeOptions, ResourceKind};
use kube::api::ListParams;
use kube::runtime::watcher::{self, watcher, Event};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};

/// No single wait in these tests lasts longer.
const PATIENCE: Duration = Duration::from_secs(10);

fn client(server: &FakeApiServer) -> Client {
    let config = kube::Config::new(server.url().parse().expect("the server's URL parses"));
    Client::try_from(config).expect("a client for the fake")
}

fn service(name: &str, labels: Value, cluster_ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": "default", "name": name, "labels": labels},
        "spec": {"clusterIP": cluster_ip, "ports": [{"port": 80, "protocol": "TCP"}]},
    })
}

/// The watch kproxy's agent runs on Services.
fn proxied_services() -> watcher::Config {
    watcher::Config::default()
        .labels("!service.kubernetes.io/service-proxy-name")
        .fields("spec.clusterIP!=None")
}

/// An event as a short line: `InitApply default/a`, `Error 410`, ...
fn describe<K: kube::Resource>(event: Result<Event<K>, watcher::Error>) -> String {
    let name = |object: &K| match object.namespace() {
        Some(namespace) => format!("{namespace}/{}", object.name_any()),
        None => object.name_any(),
    };
    match event {
        Ok(Event::Init) => "Init".into(),
        Ok(Event::InitApply(object)) => format!("InitApply {}", name(&object)),
        Ok(Event::InitDone) => "InitDone".into(),
        Ok(Event::Apply(object)) => format!("Apply {}", name(&object)),
        Ok(Event::Delete(object)) => format!("Delete {}", name(&object)),
        Err(watcher::Error::WatchError(status)) => format!("Error {}", status.code),
        Err(other) => format!("Error {other}"),
    }
}

/// The next event, failing the test if none comes in time.
async fn next<K: kube::Resource>(
    events: &mut (impl Stream<Item = Result<Event<K>, watcher::Error>> + Unpin),
) -> String {
    match tokio::time::timeout(PATIENCE, events.next()).await {
        Ok(Some(event)) => describe(event),
        Ok(None) => panic!("the watcher ended"),
        Err(_) => panic!("no watcher event within {PATIENCE:?}"),
    }
}

async fn next_n<K: kube::Resource>(
    events: &mut (impl Stream<Item = Result<Event<K>, watcher::Error>> + Unpin),
    count: usize,
) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..count {
        seen.push(next(events).await);
    }
    seen
}

/// Nothing arrives for `quiet`.
async fn assert_quiet<K: kube::Resource>(
    events: &mut (impl Stream<Item = Result<Event<K>, watcher::Error>> + Unpin),
    quiet: Duration,
) {
    if let Ok(event) = tokio::time::timeout(quiet, events.next()).await {
        panic!("unexpected: {:?}", event.map(describe));
    }
}

/// Waits until the server has `count` watch streams open.
async fn open_watches(server: &FakeApiServer, count: usize) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while server.open_watches() != count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} watches open, not {count}",
            server.open_watches()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_service_watcher_lists_then_follows_changes() {
    let server = FakeApiServer::start().unwrap();
    server.apply(service("b", json!({}), "10.0.0.2"));
    server.apply(service("a", json!({}), "10.0.0.1"));
    server.apply(service("headless", json!({}), "None"));
    server.apply(service(
        "delegated",
        json!({"service.kubernetes.io/service-proxy-name": "other"}),
        "10.0.0.3",
    ));

    let api = Api::<Service>::all(client(&server));
    let mut events = watcher(api, proxied_services()).boxed();
    assert_eq!(
        next_n(&mut events, 4).await,
        [
            "Init",
            "InitApply default/a",
            "InitApply default/b",
            "InitDone"
        ]
    );

    server.apply(service("c", json!({}), "10.0.0.4"));
    assert_eq!(next(&mut events).await, "Apply default/c");
    server.delete("Service", "default", "a");
    assert_eq!(next(&mut events).await, "Delete default/a");

    // Changes to services the agent must not see are not delivered; a service that becomes
    // headless or delegated is deleted for the watcher, and added back when it returns.
    server.apply(service("headless", json!({"touched": "yes"}), "None"));
    server.apply(service("delegated", json!({"touched": "yes"}), "10.0.0.3"));
    assert_eq!(next(&mut events).await, "Apply default/delegated");
    server.apply(service(
        "b",
        json!({"service.kubernetes.io/service-proxy-name": "other"}),
        "10.0.0.2",
    ));
    assert_eq!(next(&mut events).await, "Delete default/b");
    server.apply(service("b", json!({}), "10.0.0.2"));
    assert_eq!(next(&mut events).await, "Apply default/b");
    assert_quiet(&mut events, Duration::from_millis(500)).await;

    assert_eq!(server.list_requests(ResourceKind::Service), 1);
    assert_eq!(server.watch_requests(ResourceKind::Service), 1);
    let watch = server
        .requests()
        .into_iter()
        .find(|request| request.watch)
        .unwrap();
    assert!(
        watch.query.contains("allowWatchBookmarks=true"),
        "{}",
        watch.query
    );
}

#[tokio::test]
async fn the_watcher_relists_after_an_expired_resume() {
    let options = FakeOptions {
        bookmark_interval: Duration::from_millis(200),
        ..FakeOptions::default()
    };
    let server = FakeApiServer::start_with(options).unwrap();
    server.apply(service("a", json!({}), "10.0.0.1"));
    let api = Api::<Service>::all(client(&server));
    let mut events = watcher(api, proxied_services()).boxed();
    assert_eq!(
        next_n(&mut events, 3).await,
        ["Init", "InitApply default/a", "InitDone"]
    );
    // The watcher only sends its watch request when polled.
    assert_quiet(&mut events, Duration::from_millis(300)).await;
    open_watches(&server, 1).await;

    // The watch breaks; while it is down the history is compacted and a service is added.
    server.set_stalled(true);
    server.drop_watches();
    server.compact();
    server.apply(service("b", json!({}), "10.0.0.2"));
    server.set_stalled(false);

    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("InitDone") {
        seen.push(next(&mut events).await);
    }
    assert_eq!(
        seen,
        [
            "Error 410",
            "Init",
            "InitApply default/a",
            "InitApply default/b",
            "InitDone"
        ]
    );
    assert_eq!(server.list_requests(ResourceKind::Service), 2);

    // And it follows changes again.
    server.delete("Service", "default", "a");
    assert_eq!(next(&mut events).await, "Delete default/a");
}

#[tokio::test]
async fn a_dropped_watch_is_resumed_without_a_relist() {
    let server = FakeApiServer::start().unwrap();
    server.apply(service("a", json!({}), "10.0.0.1"));
    let api = Api::<Service>::all(client(&server));
    let mut events = watcher(api, proxied_services()).boxed();
    assert_eq!(
        next_n(&mut events, 3).await,
        ["Init", "InitApply default/a", "InitDone"]
    );
    assert_quiet(&mut events, Duration::from_millis(300)).await;
    open_watches(&server, 1).await;

    server.set_stalled(true);
    server.drop_watches();
    server.apply(service("b", json!({}), "10.0.0.2"));
    server.set_stalled(false);
    // The cut stream ends like a watch timeout: the watcher resumes from its resourceVersion,
    // and the history replays what it missed.
    assert_eq!(next(&mut events).await, "Apply default/b");
    assert_eq!(server.list_requests(ResourceKind::Service), 1);
    assert_eq!(server.watch_requests(ResourceKind::Service), 2);
}

#[tokio::test]
async fn changes_made_while_stalled_arrive_afterwards() {
    let server = FakeApiServer::start().unwrap();
    server.apply(service("a", json!({}), "10.0.0.1"));
    let api = Api::<Service>::all(client(&server));
    let mut events = watcher(api, proxied_services()).boxed();
    assert_eq!(
        next_n(&mut events, 3).await,
        ["Init", "InitApply default/a", "InitDone"]
    );
    assert_quiet(&mut events, Duration::from_millis(300)).await;
    open_watches(&server, 1).await;

    server.set_stalled(true);
    server.apply(service("b", json!({}), "10.0.0.2"));
    server.apply(service("a", json!({"v": "2"}), "10.0.0.1"));
    assert_quiet(&mut events, Duration::from_secs(2)).await;
    server.set_stalled(false);
    assert_eq!(
        next_n(&mut events, 2).await,
        ["Apply default/b", "Apply default/a"]
    );
    assert_eq!(server.watch_requests(ResourceKind::Service), 1);
}

#[tokio::test]
async fn endpoint_slices_and_the_node() {
    let server = FakeApiServer::start().unwrap();
    let slice = |name: &str, labels: Value| {
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"namespace": "default", "name": name, "labels": labels},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.1.0.1"]}],
        })
    };
    let node = |name: &str, unschedulable: bool| json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": {"unschedulable": unschedulable}});
    server.apply(slice("web-1", json!({"kubernetes.io/service-name": "web"})));
    server.apply(slice(
        "headless-1",
        json!({"kubernetes.io/service-name": "h", "service.kubernetes.io/headless": ""}),
    ));
    server.apply(node("node-b", false));
    server.apply(node("node-a", false));

    let client = client(&server);
    let slices = Api::<EndpointSlice>::all(client.clone());
    let config = watcher::Config::default().labels("!service.kubernetes.io/headless");
    let mut slice_events = watcher(slices, config).boxed();
    assert_eq!(
        next_n(&mut slice_events, 3).await,
        ["Init", "InitApply default/web-1", "InitDone"]
    );
    let nodes = Api::<Node>::all(client);
    let mut node_events = watcher(
        nodes,
        watcher::Config::default().fields("metadata.name=node-a"),
    )
    .boxed();
    assert_eq!(
        next_n(&mut node_events, 3).await,
        ["Init", "InitApply node-a", "InitDone"]
    );

    server.apply(slice(
        "headless-1",
        json!({"service.kubernetes.io/headless": "", "touched": "yes"}),
    ));
    server.apply(slice("web-2", json!({"kubernetes.io/service-name": "web"})));
    assert_eq!(next(&mut slice_events).await, "Apply default/web-2");
    server.apply(node("node-b", true));
    server.apply(node("node-a", true));
    assert_eq!(next(&mut node_events).await, "Apply node-a");

    // Typed objects go in as they are.
    let mut typed: EndpointSlice = serde_json::from_value(slice("web-3", json!({}))).unwrap();
    typed.metadata.labels = None;
    server.apply_typed(&typed);
    assert_eq!(next(&mut slice_events).await, "Apply default/web-3");
}

#[tokio::test]
async fn paginated_lists_return_every_object() {
    let server = FakeApiServer::start().unwrap();
    for name in ["a", "b", "c", "d", "e"] {
        server.apply(service(name, json!({}), "10.0.0.1"));
    }
    let api = Api::<Service>::all(client(&server));
    let mut events = watcher(api.clone(), proxied_services().page_size(2)).boxed();
    let all = [
        "Init",
        "InitApply default/a",
        "InitApply default/b",
        "InitApply default/c",
    ];
    assert_eq!(next_n(&mut events, 4).await, all);
    assert_eq!(
        next_n(&mut events, 3).await,
        ["InitApply default/d", "InitApply default/e", "InitDone"]
    );
    assert_eq!(server.list_requests(ResourceKind::Service), 3);

    let mut names = Vec::new();
    let mut params = ListParams::default().limit(2);
    loop {
        let page = api.list(&params).await.unwrap();
        assert!(page.items.len() <= 2);
        names.extend(page.items.iter().map(|service| service.name_any()));
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    assert_eq!(names, ["a", "b", "c", "d", "e"]);
}

#[tokio::test]
async fn streaming_lists_end_with_the_initial_events_bookmark() {
    let server = FakeApiServer::start().unwrap();
    server.apply(service("a", json!({}), "10.0.0.1"));
    server.apply(service("headless", json!({}), "None"));
    let api = Api::<Service>::all(client(&server));
    let mut events = watcher(api, proxied_services().streaming_lists()).boxed();
    assert_eq!(
        next_n(&mut events, 3).await,
        ["Init", "InitApply default/a", "InitDone"]
    );
    server.apply(service("b", json!({}), "10.0.0.2"));
    assert_eq!(next(&mut events).await, "Apply default/b");
    assert_eq!(server.list_requests(ResourceKind::Service), 0);
}
