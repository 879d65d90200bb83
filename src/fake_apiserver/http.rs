//! The HTTP side: routing, query parameters, lists and watch streams.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::CONTENT_TYPE;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

use super::selector::{FieldSelector, Filter, LabelSelector};
use super::store::{Change, Expired, Key};
use super::{RequestLog, ResourceKind, Shared, Signals};

type Body = UnsyncBoxBody<Bytes, io::Error>;

/// Accepts connections until the server is shut down.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut signals = shared.signals.subscribe();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| handle(shared.clone(), request));
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
            _ = signals.wait_for(|signals| signals.shutdown) => return,
        }
    }
}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path();
    let query = Query::parse(request.uri().query().unwrap_or(""));
    let route = route(path);
    shared.log(RequestLog {
        method: request.method().to_string(),
        path: path.to_string(),
        query: request.uri().query().unwrap_or("").to_string(),
        resource: route.as_ref().map(|route| route.kind),
        watch: query.as_ref().is_ok_and(|query| query.watch),
    });
    // A stalled server holds every request here, unanswered.
    let _ = shared
        .signals
        .subscribe()
        .wait_for(|signals| !signals.stalled)
        .await;

    let Some(route) = route else {
        return Ok(status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        ));
    };
    if request.method() != Method::GET {
        return Ok(status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "only GET (list and watch) is served",
        ));
    }
    let query = match query {
        Ok(query) => query,
        Err(message) => return Ok(status(StatusCode::BAD_REQUEST, "BadRequest", &message)),
    };
    let response = if query.watch {
        watch(&shared, route, query)
    } else {
        list(&shared, route, &query)
    };
    Ok(response.unwrap_or_else(|message| status(StatusCode::BAD_REQUEST, "BadRequest", &message)))
}

struct Route {
    kind: ResourceKind,
    namespace: Option<String>,
}

/// `/api/v1/services`, `/api/v1/namespaces/{ns}/services`, the same under
/// `/apis/discovery.k8s.io/v1` for endpointslices, and `/api/v1/nodes`.
fn route(path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_string(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, plural) = match rest {
        [plural] => (None, *plural),
        ["namespaces", namespace, plural] if !namespace.is_empty() => {
            (Some(namespace.to_string()), *plural)
        }
        _ => return None,
    };
    let kind = ResourceKind::ALL
        .into_iter()
        .find(|kind| kind.api_version() == api_version && kind.plural() == plural)?;
    if namespace.is_some() && !kind.namespaced() {
        return None;
    }
    Some(Route { kind, namespace })
}

/// The query parameters of a list or watch; the ones we do not know are ignored.
#[derive(Debug, Default)]
struct Query {
    watch: bool,
    label_selector: String,
    field_selector: String,
    resource_version: Option<String>,
    timeout_seconds: Option<u64>,
    allow_bookmarks: bool,
    send_initial_events: Option<bool>,
    limit: usize,
    continue_token: Option<String>,
}

impl Query {
    fn parse(query: &str) -> Result<Query, String> {
        let mut parsed = Query::default();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let (name, value) = (percent_decode(name)?, percent_decode(value)?);
            let number = |value: &str| {
                value
                    .parse()
                    .map_err(|_| format!("{name}: not a number: {value:?}"))
            };
            match name.as_str() {
                "watch" => parsed.watch = parse_bool(&name, &value)?,
                "labelSelector" => parsed.label_selector = value,
                "fieldSelector" => parsed.field_selector = value,
                "resourceVersion" => {
                    parsed.resource_version = Some(value).filter(|v| !v.is_empty())
                }
                "timeoutSeconds" => parsed.timeout_seconds = Some(number(&value)?),
                "allowWatchBookmarks" => parsed.allow_bookmarks = parse_bool(&name, &value)?,
                "sendInitialEvents" => {
                    parsed.send_initial_events = Some(parse_bool(&name, &value)?)
                }
                "limit" => parsed.limit = number(&value)? as usize,
                "continue" => parsed.continue_token = Some(value).filter(|v| !v.is_empty()),
                _ => {}
            }
        }
        Ok(parsed)
    }

    fn filter(&self, route: &Route) -> Result<Filter, String> {
        Ok(Filter {
            namespace: route.namespace.clone(),
            labels: LabelSelector::parse(&self.label_selector)?,
            fields: FieldSelector::parse(route.kind, &self.field_selector)?,
        })
    }
}

fn parse_bool(name: &str, value: &str) -> Result<bool, String> {
    match value {
        "true" | "1" => Ok(true),
        "false" | "0" | "" => Ok(false),
        _ => Err(format!("{name}: not a boolean: {value:?}")),
    }
}

fn percent_decode(text: &str) -> Result<String, String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let [first, tail @ ..] = rest {
        match (first, tail) {
            (b'+', _) => bytes.push(b' '),
            (b'%', [high, low, ..]) if high.is_ascii_hexdigit() && low.is_ascii_hexdigit() => {
                let hex = |digit: u8| (digit as char).to_digit(16).unwrap_or(0) as u8;
                bytes.push(hex(*high) << 4 | hex(*low));
                rest = &tail[2..];
                continue;
            }
            (b'%', _) => return Err(format!("bad percent-encoding in {text:?}")),
            (byte, _) => bytes.push(*byte),
        }
        rest = tail;
    }
    String::from_utf8(bytes).map_err(|_| format!("query parameter is not UTF-8: {text:?}"))
}

fn list(shared: &Shared, route: Route, query: &Query) -> Result<Response<Body>, String> {
    let filter = query.filter(&route)?;
    let (at, after) = match &query.continue_token {
        Some(token) => {
            let (rv, key) = decode_continue(token)?;
            (Some(rv), Some(key))
        }
        None => (None, None),
    };
    let page = shared
        .store()
        .page(route.kind, &filter, at, after.as_ref(), query.limit);
    let page = match page {
        Ok(page) => page,
        Err(Expired { .. }) => {
            let message =
                "The provided continue parameter is too old to display a consistent list result. \
                           You can start a new list without the continue parameter.";
            return Ok(status(StatusCode::GONE, "Expired", message));
        }
    };
    let mut metadata = json!({"resourceVersion": page.rv.to_string()});
    if let Some(key) = &page.more_after {
        metadata["continue"] = encode_continue(page.rv, key).into();
    }
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|item| {
            // Like the real server, list items carry no kind and apiVersion of their own.
            let mut item = Value::clone(item);
            if let Some(fields) = item.as_object_mut() {
                fields.remove("kind");
                fields.remove("apiVersion");
            }
            item
        })
        .collect();
    let body = json!({
        "kind": format!("{}List", route.kind.kind()),
        "apiVersion": route.kind.api_version(),
        "metadata": metadata,
        "items": items,
    });
    Ok(json_response(StatusCode::OK, &body))
}

/// Continue tokens are opaque to clients: base64url of `{"rv":N,"start":[namespace,name]}`.
fn encode_continue(rv: u64, after: &Key) -> String {
    let token = json!({"rv": rv, "start": [after.0, after.1]});
    data_encoding::BASE64URL_NOPAD.encode(token.to_string().as_bytes())
}

fn decode_continue(token: &str) -> Result<(u64, Key), String> {
    let bad = || format!("invalid continue token {token:?}");
    let text = data_encoding::BASE64URL_NOPAD
        .decode(token.as_bytes())
        .map_err(|_| bad())?;
    let value: Value = serde_json::from_slice(&text).map_err(|_| bad())?;
    let rv = value.get("rv").and_then(Value::as_u64).ok_or_else(bad)?;
    let part = |at: usize| {
        value
            .pointer(&format!("/start/{at}"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    Ok((rv, (part(0).ok_or_else(bad)?, part(1).ok_or_else(bad)?)))
}

/// Where a watch begins.
enum Start {
    /// With ADDED events for the current objects (no resourceVersion, or "0", or
    /// sendInitialEvents=true); then, with `end_bookmark`, a bookmark that marks their end.
    Current { end_bookmark: bool },
    /// After the given resourceVersion, replaying the history.
    After(u64),
}

struct WatchRequest {
    kind: ResourceKind,
    filter: Filter,
    start: Start,
    bookmarks: bool,
    deadline: Instant,
}

fn watch(shared: &Arc<Shared>, route: Route, query: Query) -> Result<Response<Body>, String> {
    let filter = query.filter(&route)?;
    let rv = match query.resource_version.as_deref() {
        None | Some("0") => None,
        Some(rv) => Some(
            rv.parse::<u64>()
                .map_err(|_| format!("invalid resourceVersion {rv:?}"))?,
        ),
    };
    let start = match (query.send_initial_events, rv) {
        (Some(true), _) => Start::Current {
            end_bookmark: query.allow_bookmarks,
        },
        (_, Some(rv)) => Start::After(rv),
        (_, None) => Start::Current {
            end_bookmark: false,
        },
    };
    let max = shared.options.max_watch_timeout;
    let timeout = query
        .timeout_seconds
        .filter(|&seconds| seconds > 0)
        .map_or(max, |seconds| {
            max.min(std::time::Duration::from_secs(seconds))
        });
    let request = WatchRequest {
        kind: route.kind,
        filter,
        start,
        bookmarks: query.allow_bookmarks,
        deadline: Instant::now() + timeout,
    };

    let (frames, mut receiver) = mpsc::channel(64);
    let gate = shared.signals.subscribe();
    let generation = gate.borrow().drops;
    let emitter = Emitter {
        frames,
        gate,
        generation,
    };
    tokio::spawn(run_watch(shared.clone(), request, emitter));
    let body = StreamBody::new(futures::stream::poll_fn(move |cx| receiver.poll_recv(cx)));
    let response = Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed_unsync(body));
    Ok(response.unwrap_or_else(|_| {
        status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "response",
        )
    }))
}

/// Why a watch stream stopped before its end.
enum Stop {
    /// The client went away.
    Gone,
    /// `drop_watches()` or shutdown: close the connection without ending the body.
    Dropped,
}

/// Writes a watch's lines, holding them back while the server is stalled.
struct Emitter {
    frames: mpsc::Sender<Result<Frame<Bytes>, io::Error>>,
    gate: watch::Receiver<Signals>,
    /// `Signals::drops` when the watch started.
    generation: u64,
}

impl Emitter {
    /// Waits until the server is not stalled.
    async fn ready(&mut self) -> Result<(), Stop> {
        loop {
            let signals = *self.gate.borrow_and_update();
            if signals.drops != self.generation || signals.shutdown {
                return Err(Stop::Dropped);
            }
            if !signals.stalled {
                return Ok(());
            }
            tokio::select! {
                changed = self.gate.changed() => changed.map_err(|_| Stop::Dropped)?,
                _ = self.frames.closed() => return Err(Stop::Gone),
            }
        }
    }

    async fn send(&mut self, event: &Event<'_>) -> Result<(), Stop> {
        self.ready().await?;
        let mut line = serde_json::to_vec(event).map_err(|_| Stop::Gone)?;
        line.push(b'\n');
        self.frames
            .send(Ok(Frame::data(Bytes::from(line))))
            .await
            .map_err(|_| Stop::Gone)
    }
}

/// One line of a watch stream.
#[derive(Serialize)]
struct Event<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    object: &'a Value,
}

/// Counts the watch as open while it runs.
struct OpenWatch(Arc<Shared>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0
            .open_watches
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn run_watch(shared: Arc<Shared>, request: WatchRequest, mut out: Emitter) {
    shared
        .open_watches
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let _open = OpenWatch(shared.clone());
    if let Err(Stop::Dropped) = stream_events(&shared, &request, &mut out).await {
        // An error from the body makes hyper close the connection without the last chunk.
        let _ = out
            .frames
            .send(Err(io::Error::other("watch dropped")))
            .await;
    }
}

async fn stream_events(
    shared: &Shared,
    request: &WatchRequest,
    out: &mut Emitter,
) -> Result<(), Stop> {
    let kind = request.kind;
    let mut wake = shared.signals.subscribe();
    let mut cursor = match request.start {
        Start::Current { end_bookmark } => {
            let (rv, objects) = {
                let store = shared.store();
                (
                    store.resource_version(),
                    store.current(kind, &request.filter),
                )
            };
            for object in &objects {
                out.send(&Event {
                    kind: "ADDED",
                    object,
                })
                .await?;
            }
            if end_bookmark {
                let mark = bookmark(kind, rv, true);
                out.send(&Event {
                    kind: "BOOKMARK",
                    object: &mark,
                })
                .await?;
            }
            rv
        }
        Start::After(rv) => {
            let resumable = shared.store().check_resumable(rv);
            if let Err(expired) = resumable {
                return send_too_old(out, rv, expired).await;
            }
            rv
        }
    };
    let period = shared.options.bookmark_interval;
    let mut bookmarks = tokio::time::interval_at(Instant::now() + period, period);
    bookmarks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let signals = *wake.borrow_and_update();
        if signals.drops != out.generation || signals.shutdown {
            return Err(Stop::Dropped);
        }
        let changes = shared.store().changes_after(cursor);
        match changes {
            Ok(changes) => {
                for change in changes {
                    if change.kind == kind {
                        if let Some((event, object)) = event_for(&change, &request.filter) {
                            out.send(&Event {
                                kind: event,
                                object: &object,
                            })
                            .await?;
                        }
                    }
                    cursor = change.rv;
                }
            }
            Err(expired) => return send_too_old(out, cursor, expired).await,
        }
        tokio::select! {
            changed = wake.changed() => changed.map_err(|_| Stop::Dropped)?,
            _ = bookmarks.tick(), if request.bookmarks => {
                out.send(&Event { kind: "BOOKMARK", object: &bookmark(kind, cursor, false) }).await?;
            }
            _ = tokio::time::sleep_until(request.deadline) => return out.ready().await,
            _ = out.frames.closed() => return Err(Stop::Gone),
        }
    }
}

/// What a watch with `filter` sees of a change: an object that starts matching is ADDED, one
/// that stops matching is DELETED (its last matching state, at the change's resourceVersion).
fn event_for(change: &Change, filter: &Filter) -> Option<(&'static str, Value)> {
    let old = change.old.as_deref().filter(|old| filter.matches(old));
    let new = change.new.as_deref().filter(|new| filter.matches(new));
    match (old, new) {
        (None, Some(new)) => Some(("ADDED", new.clone())),
        (Some(_), Some(new)) => Some(("MODIFIED", new.clone())),
        (Some(old), None) => {
            let mut old = old.clone();
            if let Some(metadata) = old.get_mut("metadata").and_then(Value::as_object_mut) {
                metadata.insert("resourceVersion".into(), change.rv.to_string().into());
            }
            Some(("DELETED", old))
        }
        (None, None) => None,
    }
}

fn bookmark(kind: ResourceKind, rv: u64, initial_events_end: bool) -> Value {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"kind": kind.kind(), "apiVersion": kind.api_version(), "metadata": metadata})
}

/// The one line kube-apiserver sends on a watch from a compacted resourceVersion.
async fn send_too_old(out: &mut Emitter, rv: u64, expired: Expired) -> Result<(), Stop> {
    let message = format!("too old resource version: {rv} ({})", expired.oldest);
    let object = status_body(410, "Expired", &message);
    out.send(&Event {
        kind: "ERROR",
        object: &object,
    })
    .await
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status_body(code.as_u16(), reason, message))
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    let body = Full::new(Bytes::from(body.to_string())).map_err(|never| match never {});
    let mut response = Response::new(BodyExt::boxed_unsync(body));
    *response.status_mut() = code;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
