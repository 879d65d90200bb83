//! The HTTP side: routing, query parameters, lists, and the start of watches ([`super::stream`]).

use std::convert::Infallible;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::time::Instant;

use super::selector::{FieldSelector, Filter, LabelSelector};
use super::store::{Expired, Key};
use super::stream::{self, Start, WatchRequest};
use super::{RequestLog, ResourceKind, Shared};

pub(super) type Body = UnsyncBoxBody<Bytes, io::Error>;

/// Accepts connections until the server is shut down.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut signals = shared.signals.subscribe();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of file descriptors, say: let connections close before retrying.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
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
    let list = List {
        kind: format!("{}List", route.kind.kind()),
        api_version: route.kind.api_version(),
        metadata,
        items: page.items.iter().map(|item| ListItem(item)).collect(),
    };
    let body = serde_json::to_vec(&list).map_err(|e| format!("cannot encode the list: {e}"))?;
    Ok(json_bytes(StatusCode::OK, body))
}

#[derive(Serialize)]
struct List<'a> {
    kind: String,
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    metadata: Value,
    items: Vec<ListItem<'a>>,
}

/// Like the real server's, list items carry no kind and apiVersion of their own.
struct ListItem<'a>(&'a Value);

impl Serialize for ListItem<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0.as_object() {
            Some(fields) => serializer.collect_map(
                fields
                    .iter()
                    .filter(|(name, _)| *name != "kind" && *name != "apiVersion"),
            ),
            None => self.0.serialize(serializer),
        }
    }
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

    let response = Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/json")
        .body(stream::open(shared, request));
    Ok(response.unwrap_or_else(|_| {
        status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "response",
        )
    }))
}

pub(super) fn status_body(code: u16, reason: &str, message: &str) -> Value {
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
    let body = status_body(code.as_u16(), reason, message);
    json_bytes(code, body.to_string().into_bytes())
}

fn json_bytes(code: StatusCode, body: Vec<u8>) -> Response<Body> {
    let body = Full::new(Bytes::from(body)).map_err(|never| match never {});
    let mut response = Response::new(BodyExt::boxed_unsync(body));
    *response.status_mut() = code;
    let json = hyper::header::HeaderValue::from_static("application/json");
    response.headers_mut().insert(CONTENT_TYPE, json);
    response
}
