//! Watch streams: the history replayed from the requested resourceVersion, then live changes,
//! filtered by the watch's selectors, with bookmarks, a deadline, and the server's stalls and
//! dropped connections.

use std::borrow::Cow;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

use super::http::{status_body, Body};
use super::selector::Filter;
use super::store::{Change, Expired};
use super::{ResourceKind, Shared, Signals};

/// Where a watch begins.
pub(crate) enum Start {
    /// With ADDED events for the current objects (no resourceVersion, or "0", or
    /// sendInitialEvents=true); then, with `end_bookmark`, a bookmark that marks their end.
    Current { end_bookmark: bool },
    /// After the given resourceVersion, replaying the history.
    After(u64),
}

/// A parsed watch request.
pub(crate) struct WatchRequest {
    pub kind: ResourceKind,
    pub filter: Filter,
    pub start: Start,
    pub bookmarks: bool,
    /// When to end the stream: `timeoutSeconds`, capped by the server's maximum.
    pub deadline: Instant,
}

/// Starts the watch; its lines come out of the returned body.
pub(crate) fn open(shared: &Arc<Shared>, request: WatchRequest) -> Body {
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
    BodyExt::boxed_unsync(body)
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
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn run_watch(shared: Arc<Shared>, request: WatchRequest, mut out: Emitter) {
    shared.open_watches.fetch_add(1, Ordering::SeqCst);
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
fn event_for<'a>(change: &'a Change, filter: &Filter) -> Option<(&'static str, Cow<'a, Value>)> {
    let old = change.old.as_deref().filter(|old| filter.matches(old));
    let new = change.new.as_deref().filter(|new| filter.matches(new));
    match (old, new) {
        (None, Some(new)) => Some(("ADDED", Cow::Borrowed(new))),
        (Some(_), Some(new)) => Some(("MODIFIED", Cow::Borrowed(new))),
        (Some(old), None) => {
            let mut old = old.clone();
            if let Some(metadata) = old.get_mut("metadata").and_then(Value::as_object_mut) {
                metadata.insert("resourceVersion".into(), change.rv.to_string().into());
            }
            Some(("DELETED", Cow::Owned(old)))
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
