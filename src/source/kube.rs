//! Watching the API server with kube-rs: one watcher per kind, with kube-proxy's selectors
//! (spec kube-proxy-agent.md §3). A watcher relists by itself after `410 Gone` or a dropped
//! connection, and backs off while the API server is unreachable; each complete list is sent
//! as one [`SourceEvent::Listed`], so that the agent never programs a partial view.

use std::fmt::Debug;
use std::path::PathBuf;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedSender;

use super::{Kind, Object, SourceEvent};

/// kube-proxy's Service selectors: not another proxy's, not headless.
pub const SERVICE_LABELS: &str = "!service.kubernetes.io/service-proxy-name";
pub const SERVICE_FIELDS: &str = "spec.clusterIP!=None";
/// kube-proxy's EndpointSlice selector.
pub const SLICE_LABELS: &str = "!service.kubernetes.io/headless";

/// How to reach the API server.
#[derive(Debug, Clone, Default)]
pub struct ApiServer {
    pub kubeconfig: Option<PathBuf>,
    /// Overrides the kubeconfig's server URL (kube-proxy's `--master`).
    pub master: Option<String>,
}

impl ApiServer {
    /// A client: from the kubeconfig and/or `--master`; with neither, in-cluster config
    /// (service account), else `$KUBECONFIG` or `~/.kube/config`.
    pub async fn client(&self) -> anyhow::Result<Client> {
        use anyhow::Context;
        let mut config = match (&self.kubeconfig, &self.master) {
            (Some(path), _) => {
                let file = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("cannot read the kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(file, &Default::default())
                    .await
                    .with_context(|| format!("cannot use the kubeconfig {}", path.display()))?
            }
            (None, Some(master)) => kube::Config::new(
                master
                    .parse()
                    .with_context(|| format!("--master {master:?} is not a URL"))?,
            ),
            (None, None) => kube::Config::infer().await.context(
                "no API server configured: not in a cluster and no kubeconfig found; \
                 pass --kubeconfig, --master or --from-dir",
            )?,
        };
        if let (Some(_), Some(master)) = (&self.kubeconfig, &self.master) {
            config.cluster_url = master
                .parse()
                .with_context(|| format!("--master {master:?} is not a URL"))?;
        }
        Client::try_from(config).context("cannot create the API client")
    }
}

/// Watches Services and EndpointSlices, sending every change to `events`, until the receiver
/// is gone.
pub async fn watch_cluster(client: Client, events: UnboundedSender<SourceEvent>) {
    let services = watch_kind(
        Api::<Service>::all(client.clone()),
        watcher::Config::default()
            .labels(SERVICE_LABELS)
            .fields(SERVICE_FIELDS),
        Kind::Service,
        |service| Object::Service(Box::new(service)),
        events.clone(),
    );
    let slices = watch_kind(
        Api::<EndpointSlice>::all(client),
        watcher::Config::default().labels(SLICE_LABELS),
        Kind::EndpointSlice,
        |slice| Object::EndpointSlice(Box::new(slice)),
        events,
    );
    futures::join!(services, slices);
}

/// Watches this node's Node object.
pub async fn watch_node(client: Client, name: String, events: UnboundedSender<SourceEvent>) {
    watch_kind(
        Api::<Node>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
        Kind::Node,
        |node| Object::Node(Box::new(node)),
        events,
    )
    .await
}

async fn watch_kind<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    wrap: fn(K) -> Object,
    events: UnboundedSender<SourceEvent>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut listing = Vec::new();
    let mut failing = false;
    while let Some(event) = stream.next().await {
        let sent = match event {
            Ok(Event::Init) => {
                listing.clear();
                Ok(())
            }
            Ok(Event::InitApply(object)) => {
                listing.push(wrap(object));
                Ok(())
            }
            Ok(Event::InitDone) => {
                if failing {
                    tracing::info!("watching {} works again", kind.plural());
                    failing = false;
                }
                events.send(SourceEvent::Listed {
                    kind,
                    objects: std::mem::take(&mut listing),
                })
            }
            Ok(Event::Apply(object)) => events.send(SourceEvent::Applied(wrap(object))),
            Ok(Event::Delete(object)) => events.send(SourceEvent::Deleted {
                kind,
                namespace: object.namespace().unwrap_or_else(|| "default".into()),
                name: object.name_any(),
            }),
            Err(err) => {
                // The watcher relists with back-off; the rules stay as they are meanwhile.
                tracing::warn!(
                    "watching {} failed: {err}; retrying with back-off, the rules in the kernel stay as they are",
                    kind.plural()
                );
                failing = true;
                Ok(())
            }
        };
        if sent.is_err() {
            return; // the agent is shutting down
        }
    }
}
