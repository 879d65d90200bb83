//! Validation: turns API objects into checked, family-independent specs, re-applying what the
//! API server would have checked (`shared/spec/api-validation.md`, in its §8 order). A
//! malformed object is reported (namespace/name and the reason) and left out whole; a bad part
//! of a well-formed object (one endpoint, one address kproxy refuses) is left out alone, with
//! a note. Every string that can end up in rule text (names, port names) is checked against
//! the API server's own syntax here, and every address is re-printed from its parsed form, so
//! no field can inject rule text. Conflicts between objects are settled by [`super::claims`].

mod address;
mod service;
mod slice;
mod syntax;

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::claims::{Claims, Offer};
use super::{Protocol, TopologyHints};
use crate::config::NodeConfig;
use crate::family::IpFamily;
use crate::source::{ClusterState, Note, ObjectRef};

pub use service::validate_service;
pub use slice::validate_slice;
use syntax::is_dns1123_label;

/// Label that links an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Objects with these labels are handled by someone else (kube-proxy's informer filter, §2.1).
const IGNORE_LABELS: [&str; 2] = [
    "service.kubernetes.io/service-proxy-name",
    "service.kubernetes.io/headless",
];
/// The API server's default for `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;
/// The API server's upper bound for it.
pub const MAX_AFFINITY_TIMEOUT: u32 = 86400;

/// `namespace/name` of a Service; its string order is kube-proxy's canonical service order.
pub type ServiceKey = String;

/// What validation knows of the cluster's own configuration (api-validation.md §8 step 5).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterSettings {
    /// The service CIDRs cluster IPs are allocated from (`--service-cidr`); a family without
    /// one is not checked.
    pub service_cidrs: Vec<IpNet>,
}

impl ClusterSettings {
    pub fn of(config: &NodeConfig) -> ClusterSettings {
        ClusterSettings {
            service_cidrs: config.service_cidrs.clone(),
        }
    }
}

/// The outcome of checking one object.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict<S> {
    /// Proxied; `left_out` names each part that was dropped (field path, value, reason).
    Proxied { spec: S, left_out: Vec<String> },
    /// Valid, but not proxied by kube-proxy (headless, ExternalName, FQDN, another proxy's).
    NotProxied,
    /// Skipped whole, and why.
    Skipped(String),
}

impl<S> Verdict<S> {
    /// The checked spec, when the object is proxied.
    pub fn spec(&self) -> Option<&S> {
        match self {
            Verdict::Proxied { spec, .. } => Some(spec),
            _ => None,
        }
    }

    pub fn is_skipped(&self) -> bool {
        matches!(self, Verdict::Skipped(_))
    }

    /// What to report about the object: why it was skipped, or each part left out.
    pub fn notes(&self, object: &ObjectRef) -> Vec<Note> {
        match self {
            Verdict::Proxied { left_out, .. } => left_out
                .iter()
                .map(|reason| Note::PartlyInvalid {
                    object: object.clone(),
                    reason: reason.clone(),
                })
                .collect(),
            Verdict::NotProxied => Vec::new(),
            Verdict::Skipped(reason) => vec![Note::Invalid {
                object: object.clone(),
                reason: reason.clone(),
            }],
        }
    }
}

/// The validated Services and EndpointSlices, conflicts settled.
#[derive(Debug, Clone, Default)]
pub struct ValidCluster {
    pub services: Vec<ServiceSpec>,
    pub slices: Vec<SliceSpec>,
    /// Per Service, the frontends it offers that another Service holds (§7.2): left out of
    /// its rules.
    pub withheld: HashMap<ServiceKey, BTreeSet<Offer>>,
}

/// A Service that kproxy proxies, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    /// `metadata.creationTimestamp`: the older Service wins a conflict (see `claims`).
    pub created: Option<k8s_openapi::jiff::Timestamp>,
    /// At most one per family, in `spec.clusterIPs` order.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<PortSpec>,
    /// Without repeats.
    pub external_ips: Vec<IpAddr>,
    /// Ingress IPs in VIP mode, without repeats.
    pub load_balancer_ips: Vec<IpAddr>,
    pub source_ranges: Vec<IpNet>,
    pub affinity_timeout: Option<u32>,
    /// `externalTrafficPolicy: Local` on a Service that is externally accessible by type.
    pub external_policy_local: bool,
    pub internal_policy_local: bool,
    pub health_check_node_port: Option<u16>,
}

impl ServiceSpec {
    /// `namespace/name`.
    pub fn key(&self) -> ServiceKey {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef {
            kind: "Service".into(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// An EndpointSlice of an IP address type, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceSpec {
    pub namespace: String,
    pub name: String,
    /// The Service it belongs to (its `kubernetes.io/service-name` label).
    pub service_name: String,
    pub family: IpFamily,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub ip: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Shared by every endpoint on the node (interned by the agent's store).
    pub node_name: Option<Arc<str>>,
    pub hints: Option<Arc<TopologyHints>>,
}

/// [`validate_with`] without knowledge of the cluster's service CIDRs.
pub fn validate(state: &ClusterState) -> (ValidCluster, Vec<Note>) {
    validate_with(state, &ClusterSettings::default())
}

/// Validates every object and settles conflicts between them; what was skipped or left out
/// comes back as notes. Never panics, whatever the objects hold.
pub fn validate_with(
    state: &ClusterState,
    settings: &ClusterSettings,
) -> (ValidCluster, Vec<Note>) {
    // Services and slices are independent until they are joined in the model.
    let ((services, mut notes), (slices, slice_notes)) = crate::parallel::join(
        || {
            check_all(
                &state.services,
                "Service",
                |s| &s.metadata,
                |s| validate_service(s, settings),
            )
        },
        || {
            check_all(
                &state.endpoint_slices,
                "EndpointSlice",
                |s| &s.metadata,
                validate_slice,
            )
        },
    );
    notes.extend(slice_notes);
    let mut cluster = ValidCluster {
        services,
        slices,
        withheld: HashMap::new(),
    };
    reject_duplicates(&mut cluster, &mut notes);
    settle_claims(&mut cluster, &mut notes);
    (cluster, notes)
}

/// Checks every object of one kind.
fn check_all<T, S>(
    objects: &[T],
    kind: &str,
    metadata: impl Fn(&T) -> &ObjectMeta,
    check: impl Fn(&T) -> Verdict<S>,
) -> (Vec<S>, Vec<Note>) {
    let mut valid = Vec::with_capacity(objects.len());
    let mut notes = Vec::new();
    for object in objects {
        let verdict = check(object);
        if !matches!(&verdict, Verdict::Proxied { left_out, .. } if left_out.is_empty()) {
            notes.extend(verdict.notes(&object_ref(kind, metadata(object))));
        }
        if let Verdict::Proxied { spec, .. } = verdict {
            valid.push(spec);
        }
    }
    (valid, notes)
}

/// `Kind namespace/name` for messages, whatever the metadata holds.
pub fn object_ref(kind: &str, meta: &ObjectMeta) -> ObjectRef {
    ObjectRef {
        kind: kind.to_string(),
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name: meta.name.clone().unwrap_or_else(|| "<unnamed>".into()),
    }
}

/// Two objects with the same namespace/name cannot both be right: keep the first, report the rest.
fn reject_duplicates(cluster: &mut ValidCluster, notes: &mut Vec<Note>) {
    let duplicate = |kind: &str, namespace: &str, name: &str| Note::Invalid {
        object: ObjectRef {
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
        },
        reason: "defined more than once; the first definition is used".into(),
    };
    let mut seen = BTreeSet::new();
    cluster.services.retain(|s| {
        let fresh = seen.insert((s.namespace.clone(), s.name.clone()));
        if !fresh {
            notes.push(duplicate("Service", &s.namespace, &s.name));
        }
        fresh
    });
    let mut seen = BTreeSet::new();
    cluster.slices.retain(|s| {
        let fresh = seen.insert((s.namespace.clone(), s.name.clone()));
        if !fresh {
            notes.push(duplicate("EndpointSlice", &s.namespace, &s.name));
        }
        fresh
    });
}

/// Cross-object invariants (§7.1, §7.2): the losers of a cluster IP or node port are skipped,
/// frontends another Service holds are withheld.
fn settle_claims(cluster: &mut ValidCluster, notes: &mut Vec<Note>) {
    let mut claims = Claims::default();
    for service in &cluster.services {
        claims.set(service);
    }
    cluster
        .services
        .retain(|service| match claims.lost(service) {
            Some(reason) => {
                notes.push(Note::Invalid {
                    object: service.object_ref(),
                    reason,
                });
                false
            }
            None => true,
        });
    for service in &cluster.services {
        let key = service.key();
        let withheld = claims.withheld(&key);
        if withheld.is_empty() {
            continue;
        }
        for reason in claims.withheld_reasons(service) {
            notes.push(Note::PartlyInvalid {
                object: service.object_ref(),
                reason,
            });
        }
        cluster.withheld.insert(key, withheld);
    }
}

fn metadata_names(
    meta: &ObjectMeta,
    name_rule: fn(&str) -> bool,
    name_syntax: &str,
) -> syntax::Check<(String, String)> {
    let name = meta.name.clone().ok_or("metadata.name is missing")?;
    if !name_rule(&name) {
        return Err(format!(
            "metadata.name {:?} is not a valid {name_syntax}",
            syntax::shorten(&name)
        ));
    }
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    if !is_dns1123_label(&namespace) {
        return Err(format!(
            "metadata.namespace {:?} is not a valid DNS-1123 label",
            syntax::shorten(&namespace)
        ));
    }
    Ok((namespace, name))
}

fn has_ignore_label(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .is_some_and(|labels| IGNORE_LABELS.iter().any(|l| labels.contains_key(*l)))
}
