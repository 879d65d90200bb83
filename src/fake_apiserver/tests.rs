//! The fake over the wire, with a raw HTTP/1.1 client: status codes, bodies, and how watch
//! streams end (cleanly with the last chunk, or cut off).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{json, Value};

use super::*;

fn service(namespace: &str, name: &str, labels: Value, cluster_ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": namespace, "name": name, "labels": labels},
        "spec": {"clusterIP": cluster_ip, "ports": [{"port": 80}]},
    })
}

fn connect(server: &FakeApiServer, path: &str) -> BufReader<TcpStream> {
    let address = server.url().trim_start_matches("http://").to_string();
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    BufReader::new(stream)
}

/// Reads the status line and headers; returns the status code and whether the body is chunked.
fn read_head(reader: &mut BufReader<TcpStream>) -> std::io::Result<(u16, bool)> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let code = line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let mut chunked = false;
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        if line.trim().is_empty() {
            return Ok((code, chunked));
        }
        chunked |= line
            .to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked");
    }
}

/// A list or any other plain request: status code and JSON body.
fn get(server: &FakeApiServer, path: &str) -> (u16, Value) {
    let mut reader = connect(server, path);
    let (code, chunked) = read_head(&mut reader).unwrap();
    assert!(!chunked, "{path}: a list body is not streamed");
    let mut body = String::new();
    reader.read_to_string(&mut body).unwrap();
    (
        code,
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}")),
    )
}

fn items(list: &Value) -> Vec<String> {
    let items = list["items"].as_array().unwrap();
    items
        .iter()
        .map(|item| {
            format!(
                "{}/{}",
                item["metadata"]["namespace"].as_str().unwrap_or(""),
                item["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

/// What a watch stream gave next.
#[derive(Debug, PartialEq)]
enum Next {
    Event(Value),
    /// The terminating chunk: the server ended the stream.
    End,
    /// The connection closed in the middle of the body.
    Cut,
    /// Nothing within the read timeout.
    Silent,
}

struct Watch {
    reader: BufReader<TcpStream>,
    pending: Vec<u8>,
    ended: bool,
}

impl Watch {
    fn open(server: &FakeApiServer, path: &str) -> Watch {
        let mut reader = connect(server, path);
        assert_eq!(read_head(&mut reader).unwrap(), (200, true), "{path}");
        Watch {
            reader,
            pending: Vec::new(),
            ended: false,
        }
    }

    fn next(&mut self) -> Next {
        loop {
            if let Some(at) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=at).collect();
                return Next::Event(serde_json::from_slice(&line).unwrap());
            }
            if self.ended {
                return Next::End;
            }
            let mut size = String::new();
            match self.reader.read_line(&mut size) {
                Ok(0) => return Next::Cut,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Next::Silent
                }
                Err(_) => return Next::Cut,
                Ok(_) => {}
            }
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut chunk = vec![0; size + 2];
            if self.reader.read_exact(&mut chunk).is_err() {
                return Next::Cut;
            }
            chunk.truncate(size);
            self.ended = size == 0;
            self.pending.extend(chunk);
        }
    }

    /// The next event, skipping bookmarks.
    fn event(&mut self) -> Value {
        loop {
            match self.next() {
                Next::Event(event) if event["type"] == "BOOKMARK" => continue,
                Next::Event(event) => return event,
                other => panic!("expected an event, got {other:?}"),
            }
        }
    }

    fn timeout(&mut self, timeout: Duration) {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .unwrap();
    }
}

fn summary(event: &Value) -> String {
    let meta = &event["object"]["metadata"];
    format!(
        "{} {} {}",
        event["type"].as_str().unwrap(),
        meta["name"].as_str().unwrap_or("?"),
        meta["resourceVersion"].as_str().unwrap_or("?")
    )
}

#[test]
fn lists_are_ordered_and_items_carry_no_type() {
    let server = FakeApiServer::start().unwrap();
    server.apply(service("b", "one", json!({}), "10.0.0.1"));
    server.apply(service("a", "two", json!({}), "10.0.0.2"));
    let rv = server.apply(service("a", "one", json!({}), "10.0.0.3"));
    server.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}));

    let (code, list) = get(&server, "/api/v1/services");
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "ServiceList");
    assert_eq!(list["apiVersion"], "v1");
    assert_eq!(list["metadata"]["resourceVersion"], (rv + 1).to_string());
    assert_eq!(items(&list), ["a/one", "a/two", "b/one"]);
    assert!(list["items"][0].get("kind").is_none() && list["items"][0].get("apiVersion").is_none());
    assert_eq!(
        list["items"][0]["metadata"]["resourceVersion"],
        rv.to_string()
    );
    assert!(list["items"][0]["metadata"]["uid"]
        .as_str()
        .is_some_and(|uid| !uid.is_empty()));

    let (_, namespaced) = get(&server, "/api/v1/namespaces/a/services");
    assert_eq!(items(&namespaced), ["a/one", "a/two"]);
    let (_, nodes) = get(&server, "/api/v1/nodes");
    assert_eq!(
        (nodes["kind"].as_str(), items(&nodes)),
        (Some("NodeList"), vec!["/node-a".to_string()])
    );
    let (_, slices) = get(&server, "/apis/discovery.k8s.io/v1/endpointslices");
    assert_eq!(slices["kind"], "EndpointSliceList");
    assert_eq!(slices["apiVersion"], "discovery.k8s.io/v1");
}

#[test]
fn updates_keep_the_uid_and_bump_the_resource_version() {
    let server = FakeApiServer::start().unwrap();
    let first = server.apply(service("default", "web", json!({}), "10.0.0.1"));
    let uid =
        server.get(ResourceKind::Service, "default", "web").unwrap()["metadata"]["uid"].clone();
    let second = server.apply(service("default", "web", json!({"v": "2"}), "10.0.0.1"));
    assert_eq!(second, first + 1);
    let stored = server.get(ResourceKind::Service, "default", "web").unwrap();
    assert_eq!(stored["metadata"]["uid"], uid);
    assert_eq!(stored["metadata"]["resourceVersion"], second.to_string());
    assert_eq!(server.delete("Service", "default", "web"), Some(second + 1));
    assert_eq!(server.delete("Service", "default", "web"), None);
    assert_eq!(server.resource_version(), second + 1);
}

#[test]
fn selectors_filter_lists_and_bad_ones_are_refused() {
    let server = FakeApiServer::start().unwrap();
    server.apply(service("default", "plain", json!({}), "10.0.0.1"));
    server.apply(service("default", "headless", json!({}), "None"));
    server.apply(service(
        "default",
        "delegated",
        json!({"service.kubernetes.io/service-proxy-name": "x"}),
        "10.0.0.2",
    ));

    let kproxy = "/api/v1/services?labelSelector=%21service.kubernetes.io%2Fservice-proxy-name&fieldSelector=spec.clusterIP%21%3DNone";
    assert_eq!(items(&get(&server, kproxy).1), ["default/plain"]);
    let by_name = "/api/v1/services?fieldSelector=metadata.name%3Dheadless";
    assert_eq!(items(&get(&server, by_name).1), ["default/headless"]);

    let (code, status) = get(&server, "/api/v1/services?fieldSelector=spec.ports%3D80");
    assert_eq!(
        (code, status["kind"].as_str(), status["reason"].as_str()),
        (400, Some("Status"), Some("BadRequest"))
    );
    assert_eq!(status["message"], "field label not supported: spec.ports");
    assert_eq!(
        get(&server, "/api/v1/services?labelSelector=a%3D%3D%3Db").0,
        400
    );
    assert_eq!(get(&server, "/api/v1/services?limit=many").0, 400);
    assert_eq!(get(&server, "/api/v1/services?labelSelector=%ZZ").0, 400);
    assert_eq!(get(&server, "/api/v1/services?watch=maybe").0, 400);
    assert_eq!(
        get(&server, "/api/v1/services?watch=1&resourceVersion=abc").0,
        400
    );

    for unknown in [
        "/api/v1/pods",
        "/api/v1/namespaces/a/nodes",
        "/apis/discovery.k8s.io/v1beta1/endpointslices",
        "/healthz",
    ] {
        let (code, status) = get(&server, unknown);
        assert_eq!(
            (code, status["reason"].as_str(), status["code"].as_u64()),
            (404, Some("NotFound"), Some(404)),
            "{unknown}"
        );
    }
}

#[test]
fn pagination_serves_the_snapshot_of_the_first_page() {
    let server = FakeApiServer::start().unwrap();
    for name in ["a", "b", "c", "d", "e"] {
        server.apply(service("default", name, json!({}), "10.0.0.1"));
    }
    let snapshot = server.resource_version().to_string();
    let (_, first) = get(&server, "/api/v1/services?limit=2");
    assert_eq!(items(&first), ["default/a", "default/b"]);
    assert_eq!(first["metadata"]["resourceVersion"], snapshot);

    // Changes after the first page do not show in the later ones.
    server.delete("Service", "default", "c");
    server.apply(service(
        "default",
        "d",
        json!({"changed": "yes"}),
        "10.0.0.1",
    ));
    server.apply(service("default", "bb", json!({}), "10.0.0.1"));

    let token = first["metadata"]["continue"].as_str().unwrap();
    let (_, second) = get(
        &server,
        &format!("/api/v1/services?limit=2&continue={token}"),
    );
    assert_eq!(items(&second), ["default/c", "default/d"]);
    assert_eq!(second["metadata"]["resourceVersion"], snapshot);
    assert!(second["items"][1]["metadata"]["labels"]
        .get("changed")
        .is_none());
    let token = second["metadata"]["continue"].as_str().unwrap();
    let (_, third) = get(
        &server,
        &format!("/api/v1/services?limit=2&continue={token}"),
    );
    assert_eq!(items(&third), ["default/e"]);
    assert!(third["metadata"].get("continue").is_none());

    // A fresh list sees the changes; a page that ends exactly at the last object has no token.
    let (_, fresh) = get(&server, "/api/v1/services?limit=5");
    assert_eq!(
        items(&fresh),
        [
            "default/a",
            "default/b",
            "default/bb",
            "default/d",
            "default/e"
        ]
    );
    assert!(fresh["metadata"].get("continue").is_none());

    // With a selector, a page holds `limit` matching objects.
    let (_, selected) = get(&server, "/api/v1/services?limit=1&labelSelector=changed");
    assert_eq!(items(&selected), ["default/d"]);
    assert!(selected["metadata"].get("continue").is_none());

    let (code, status) = get(&server, "/api/v1/services?continue=bm9wZQ");
    assert_eq!((code, status["reason"].as_str()), (400, Some("BadRequest")));
}

#[test]
fn a_continue_token_from_before_compaction_is_gone() {
    let server = FakeApiServer::start().unwrap();
    for name in ["a", "b", "c"] {
        server.apply(service("default", name, json!({}), "10.0.0.1"));
    }
    let (_, first) = get(&server, "/api/v1/services?limit=2");
    let token = first["metadata"]["continue"].as_str().unwrap().to_string();
    server.compact();
    let (code, status) = get(
        &server,
        &format!("/api/v1/services?limit=2&continue={token}"),
    );
    assert_eq!(
        (code, status["reason"].as_str(), status["code"].as_u64()),
        (410, Some("Expired"), Some(410))
    );
}

#[test]
fn a_watch_replays_the_history_then_streams_live_changes() {
    let server = FakeApiServer::start().unwrap();
    let start = server.apply(service("default", "a", json!({}), "10.0.0.1"));
    server.apply(service("default", "b", json!({}), "10.0.0.2"));
    server.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}));
    server.apply(service("default", "a", json!({"v": "2"}), "10.0.0.1"));

    let mut watch = Watch::open(
        &server,
        &format!("/api/v1/services?watch=true&resourceVersion={start}"),
    );
    let added = watch.event();
    assert_eq!(summary(&added), "ADDED b 2");
    assert_eq!(
        (
            added["object"]["kind"].as_str(),
            added["object"]["apiVersion"].as_str()
        ),
        (Some("Service"), Some("v1"))
    );
    assert_eq!(summary(&watch.event()), "MODIFIED a 4");

    server.delete("Service", "default", "b");
    let deleted = watch.event();
    assert_eq!(summary(&deleted), "DELETED b 5");
    assert_eq!(deleted["object"]["spec"]["clusterIP"], "10.0.0.2");
    server.apply(service("other", "c", json!({}), "10.0.0.3"));
    assert_eq!(summary(&watch.event()), "ADDED c 6");
    assert_eq!(server.open_watches(), 1);
    assert_eq!(
        (
            server.watch_requests(ResourceKind::Service),
            server.list_requests(ResourceKind::Service)
        ),
        (1, 0)
    );
}

#[test]
fn a_watch_without_resource_version_starts_with_the_current_objects() {
    let server = FakeApiServer::start().unwrap();
    server.apply(service("default", "b", json!({}), "10.0.0.1"));
    server.apply(service("default", "a", json!({}), "10.0.0.2"));
    server.apply(service("default", "a", json!({}), "10.0.0.3"));
    for path in [
        "/api/v1/services?watch=1",
        "/api/v1/services?watch=1&resourceVersion=0",
    ] {
        let mut watch = Watch::open(&server, path);
        assert_eq!(summary(&watch.event()), "ADDED a 3");
        assert_eq!(summary(&watch.event()), "ADDED b 1");
        watch.timeout(Duration::from_millis(300));
        assert_eq!(watch.next(), Next::Silent);
    }
    // Streaming lists: the initial objects, then the bookmark that closes them.
    let mut watch = Watch::open(&server, "/api/v1/services?watch=1&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan");
    assert_eq!(summary(&watch.event()), "ADDED a 3");
    assert_eq!(summary(&watch.event()), "ADDED b 1");
    let Next::Event(end) = watch.next() else {
        panic!("no bookmark")
    };
    assert_eq!(end["type"], "BOOKMARK");
    assert_eq!(
        end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    assert_eq!(end["object"]["metadata"]["resourceVersion"], "3");
}

#[test]
fn objects_moving_across_a_selector_are_added_and_deleted() {
    let server = FakeApiServer::start().unwrap();
    let rv = server.apply(service("default", "web", json!({}), "10.0.0.1"));
    let mut watch = Watch::open(&server, &format!("/api/v1/services?watch=true&resourceVersion={rv}&labelSelector=%21service.kubernetes.io%2Fservice-proxy-name"));
    server.apply(service(
        "default",
        "web",
        json!({"service.kubernetes.io/service-proxy-name": "x"}),
        "10.0.0.1",
    ));
    server.apply(service(
        "default",
        "other",
        json!({"service.kubernetes.io/service-proxy-name": "x"}),
        "10.0.0.2",
    ));
    server.apply(service("default", "web", json!({}), "10.0.0.9"));
    let deleted = watch.event();
    assert_eq!(summary(&deleted), "DELETED web 2");
    // The last state that matched, at the change's resourceVersion.
    assert!(deleted["object"]["metadata"]["labels"]
        .as_object()
        .unwrap()
        .is_empty());
    let added = watch.event();
    assert_eq!(summary(&added), "ADDED web 4");
    assert_eq!(added["object"]["spec"]["clusterIP"], "10.0.0.9");
}

#[test]
fn a_watch_from_a_compacted_resource_version_gets_one_410_event() {
    let server = FakeApiServer::start().unwrap();
    let old = server.apply(service("default", "a", json!({}), "10.0.0.1"));
    let current = server.apply(service("default", "b", json!({}), "10.0.0.1"));
    server.compact();
    for rv in [old, current] {
        let mut watch = Watch::open(
            &server,
            &format!("/api/v1/services?watch=true&resourceVersion={rv}"),
        );
        let Next::Event(error) = watch.next() else {
            panic!("no error event")
        };
        assert_eq!(error["type"], "ERROR");
        let status = &error["object"];
        assert_eq!(
            (status["kind"].as_str(), status["status"].as_str()),
            (Some("Status"), Some("Failure"))
        );
        assert_eq!(
            (status["reason"].as_str(), status["code"].as_u64()),
            (Some("Expired"), Some(410))
        );
        assert_eq!(
            status["message"],
            format!("too old resource version: {rv} ({})", current + 1)
        );
        assert_eq!(watch.next(), Next::End);
    }
    // Changes after the compaction can be resumed from again.
    let after = server.apply(service("default", "c", json!({}), "10.0.0.1"));
    server.apply(service("default", "d", json!({}), "10.0.0.1"));
    let mut watch = Watch::open(
        &server,
        &format!("/api/v1/services?watch=true&resourceVersion={after}"),
    );
    assert_eq!(summary(&watch.event()), "ADDED d 4");
}

#[test]
fn a_short_history_expires_old_resource_versions() {
    let options = FakeOptions {
        history_limit: 2,
        ..FakeOptions::default()
    };
    let server = FakeApiServer::start_with(options).unwrap();
    for name in ["a", "b", "c", "d"] {
        server.apply(service("default", name, json!({}), "10.0.0.1"));
    }
    let mut watch = Watch::open(&server, "/api/v1/services?watch=true&resourceVersion=1");
    assert_eq!(watch.event()["object"]["code"], 410);
    let mut watch = Watch::open(&server, "/api/v1/services?watch=true&resourceVersion=2");
    assert_eq!(summary(&watch.event()), "ADDED c 3");
    assert_eq!(summary(&watch.event()), "ADDED d 4");
}

#[test]
fn bookmarks_carry_the_current_resource_version() {
    let options = FakeOptions {
        bookmark_interval: Duration::from_millis(100),
        ..FakeOptions::default()
    };
    let server = FakeApiServer::start_with(options).unwrap();
    let rv = server.apply(service("default", "a", json!({}), "10.0.0.1"));
    // A change to another kind moves the watch's resourceVersion on.
    let node =
        server.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}));
    let path = format!("/apis/discovery.k8s.io/v1/endpointslices?watch=true&resourceVersion={rv}&allowWatchBookmarks=true");
    let mut watch = Watch::open(&server, &path);
    let Next::Event(bookmark) = watch.next() else {
        panic!("no bookmark")
    };
    assert_eq!(bookmark["type"], "BOOKMARK");
    assert_eq!(bookmark["object"]["kind"], "EndpointSlice");
    assert_eq!(bookmark["object"]["apiVersion"], "discovery.k8s.io/v1");
    assert_eq!(
        bookmark["object"]["metadata"]["resourceVersion"],
        node.to_string()
    );

    // Without allowWatchBookmarks, none.
    let mut quiet = Watch::open(
        &server,
        &format!("/api/v1/services?watch=true&resourceVersion={node}"),
    );
    quiet.timeout(Duration::from_millis(400));
    assert_eq!(quiet.next(), Next::Silent);
}

#[test]
fn watches_end_after_their_timeout_or_the_maximum() {
    let options = FakeOptions {
        max_watch_timeout: Duration::from_secs(1),
        ..FakeOptions::default()
    };
    let server = FakeApiServer::start_with(options).unwrap();
    let started = std::time::Instant::now();
    let mut watch = Watch::open(&server, "/api/v1/nodes?watch=true&timeoutSeconds=290");
    assert_eq!(watch.next(), Next::End);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(server.open_watches(), 0);
}

#[test]
fn dropped_watches_are_cut_off_mid_stream() {
    let server = FakeApiServer::start().unwrap();
    let rv = server.apply(service("default", "a", json!({}), "10.0.0.1"));
    let mut watch = Watch::open(
        &server,
        &format!("/api/v1/services?watch=true&resourceVersion={rv}"),
    );
    server.apply(service("default", "b", json!({}), "10.0.0.1"));
    assert_eq!(summary(&watch.event()), "ADDED b 2");
    server.drop_watches();
    assert_eq!(watch.next(), Next::Cut);
    // Watches opened afterwards are not affected.
    let mut later = Watch::open(
        &server,
        &format!("/api/v1/services?watch=true&resourceVersion={rv}"),
    );
    assert_eq!(summary(&later.event()), "ADDED b 2");
}

#[test]
fn a_stalled_server_answers_nothing_until_it_resumes() {
    let server = FakeApiServer::start().unwrap();
    let rv = server.apply(service("default", "a", json!({}), "10.0.0.1"));
    let mut watch = Watch::open(
        &server,
        &format!("/api/v1/services?watch=true&resourceVersion={rv}"),
    );
    server.set_stalled(true);
    server.apply(service("default", "b", json!({}), "10.0.0.1"));
    watch.timeout(Duration::from_millis(300));
    assert_eq!(watch.next(), Next::Silent);

    let mut list = connect(&server, "/api/v1/services");
    list.get_ref()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        read_head(&mut list).is_err(),
        "a stalled server answered a list"
    );
    assert_eq!(server.list_requests(ResourceKind::Service), 1);

    server.set_stalled(false);
    watch.timeout(Duration::from_secs(5));
    assert_eq!(summary(&watch.event()), "ADDED b 2");
    list.get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(read_head(&mut list).unwrap(), (200, false));
}
