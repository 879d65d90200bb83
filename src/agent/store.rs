//! The cluster as the agent holds it: every Service and EndpointSlice keyed by namespace/name,
//! validated once when it arrives, with the Services whose rules may have changed since the
//! last sync. Sources (API watches, a directory) write into it; the sync loop takes the
//! changes out. No I/O, no clock: trigger times are read from the objects.
//!
//! Conflicts between Services (a cluster IP, node port or frontend claimed twice) are settled
//! by the same [`Claims`] registry `validate` uses, incrementally: a change to one Service
//! marks every Service whose standing it changed, so that the sync rebuilds them too.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::model::claims::{Claims, Offer};
use crate::model::{
    object_ref, validate_service, validate_slice, ClusterSettings, ServiceSpec, SliceSpec, Verdict,
    SERVICE_NAME_LABEL,
};
use crate::small_set::SmallSet;
use crate::source::{Kind, Note};

pub use crate::model::ServiceKey;

/// The EndpointSlice annotation with the time its endpoints last changed (spec
/// kube-proxy-agent.md §7.2).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

#[derive(Debug)]
struct SliceEntry {
    /// The Service it belongs to, when the label says.
    service: Option<ServiceKey>,
    checked: Verdict<SliceSpec>,
}

/// What changed since the sync loop last asked.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Changes {
    /// Services whose Service object or slices changed.
    pub services: BTreeSet<ServiceKey>,
    /// Per Service, the trigger times of the slice changes (§7.2), for the
    /// network-programming latency.
    pub trigger_times: BTreeMap<ServiceKey, Vec<SystemTime>>,
    /// Service and EndpointSlice events that changed the store (a relist or a re-read
    /// directory counts only the objects that differ).
    pub service_events: u64,
    pub endpoint_events: u64,
    /// When the first of these changes reached the agent (set by the caller, which has the
    /// clock), for the change-to-kernel time.
    pub first_received: Option<std::time::Instant>,
}

/// The node names of the slices' endpoints, one allocation per node: at 100,000 Services of 10
/// endpoints each, a copy per endpoint would be a million strings.
#[derive(Debug, Default)]
struct NodeNames {
    names: HashSet<Arc<str>>,
    /// How many names were held after the last pruning: names no endpoint holds any more are
    /// dropped when the set has grown to twice that.
    held_after_pruning: usize,
}

impl NodeNames {
    /// Makes the slice's endpoints hold the shared copy of their node names.
    fn share(&mut self, slice: &mut SliceSpec) {
        for name in slice
            .endpoints
            .iter_mut()
            .filter_map(|e| e.node_name.as_mut())
        {
            match self.names.get(&**name) {
                Some(shared) => *name = shared.clone(),
                None => {
                    self.names.insert(name.clone());
                }
            }
        }
        if self.names.len() > 2 * self.held_after_pruning.max(64) {
            self.names.retain(|name| Arc::strong_count(name) > 1);
            self.held_after_pruning = self.names.len();
        }
    }
}

/// Services and EndpointSlices by key (module docs).
#[derive(Debug, Default)]
pub struct ClusterStore {
    services: BTreeMap<ServiceKey, Verdict<ServiceSpec>>,
    /// Who holds which cluster IP, node port and frontend, over the proxied Services.
    claims: Claims,
    /// What validation knows of the cluster (service CIDRs).
    settings: ClusterSettings,
    slices: HashMap<String, SliceEntry>,
    /// The slices of each Service, by slice key.
    slices_of: HashMap<ServiceKey, SmallSet<String>>,
    node_names: NodeNames,
    changes: Changes,
    services_listed: bool,
    slices_listed: bool,
    /// Objects skipped as invalid since the last time the loop asked; each is reported once
    /// per change, not once per sync.
    notes: Vec<Note>,
    /// Trigger times older than this are from before the agent started and are not measured.
    started: Option<SystemTime>,
}

impl ClusterStore {
    /// A store that measures network programming only for changes after `started`.
    pub fn new(started: SystemTime) -> ClusterStore {
        ClusterStore {
            started: Some(started),
            ..ClusterStore::default()
        }
    }

    /// Validates against the cluster's settings (service CIDRs) from now on.
    pub fn with_settings(mut self, settings: ClusterSettings) -> ClusterStore {
        self.settings = settings;
        self
    }

    /// Both kinds have been listed completely: the view is whole and may be programmed.
    pub fn is_initialized(&self) -> bool {
        self.services_listed && self.slices_listed
    }

    /// Records that a kind's complete list has been received.
    pub fn set_listed(&mut self, kind: Kind) {
        match kind {
            Kind::Service => self.services_listed = true,
            Kind::EndpointSlice => self.slices_listed = true,
            Kind::Node => {}
        }
    }

    /// Records when changes arrived: the earliest time since the changes were last taken.
    pub fn mark_received(&mut self, now: std::time::Instant) {
        if self.has_changes() && self.changes.first_received.is_none() {
            self.changes.first_received = Some(now);
        }
    }

    pub fn has_changes(&self) -> bool {
        !self.changes.services.is_empty()
    }

    /// Takes the changes and notes gathered since the last call.
    pub fn take_changes(&mut self) -> (Changes, Vec<Note>) {
        (
            std::mem::take(&mut self.changes),
            std::mem::take(&mut self.notes),
        )
    }

    /// Services that changed and have not been taken yet, and EndpointSlice events pending.
    pub fn pending(&self) -> (usize, u64) {
        (self.changes.services.len(), self.changes.endpoint_events)
    }

    /// Adds or updates a Service. Returns whether anything that matters for rules changed.
    pub fn apply_service(&mut self, service: &Service) -> bool {
        let key = key_of(&service.metadata);
        let verdict = validate_service(service, &self.settings);
        if self.services.get(&key) == Some(&verdict) {
            return false;
        }
        self.changes.service_events += 1;
        self.notes
            .extend(verdict.notes(&object_ref(Kind::Service.name(), &service.metadata)));
        let changed = match verdict.spec() {
            Some(spec) => self.claims.set(spec),
            None => self.claims.remove(&key),
        };
        self.services.insert(key.clone(), verdict);
        self.changes.services.insert(key);
        self.mark_standing_changed(changed);
        true
    }

    /// Marks the Services whose hold on a cluster IP, node port or frontend changed, and
    /// reports what each of them lost now.
    fn mark_standing_changed(&mut self, changed: BTreeSet<ServiceKey>) {
        for key in changed {
            if let Some(spec) = self.services.get(&key).and_then(Verdict::spec) {
                let object = spec.object_ref();
                match self.claims.lost(spec) {
                    Some(reason) => self.notes.push(Note::Invalid { object, reason }),
                    None => self
                        .notes
                        .extend(
                            self.claims
                                .withheld_reasons(spec)
                                .into_iter()
                                .map(|reason| Note::PartlyInvalid {
                                    object: object.clone(),
                                    reason,
                                }),
                        ),
                }
            }
            self.changes.services.insert(key);
        }
    }

    /// Removes a Service. Returns whether it was there.
    pub fn delete_service(&mut self, namespace: &str, name: &str) -> bool {
        let key = format!("{namespace}/{name}");
        if self.services.remove(&key).is_none() {
            return false;
        }
        self.changes.service_events += 1;
        let changed = self.claims.remove(&key);
        self.changes.services.insert(key);
        self.mark_standing_changed(changed);
        true
    }

    /// Adds or updates an EndpointSlice. Returns whether anything that matters changed.
    pub fn apply_slice(&mut self, slice: &EndpointSlice) -> bool {
        let key = key_of(&slice.metadata);
        let mut checked = validate_slice(slice);
        if let Verdict::Proxied { spec, .. } = &mut checked {
            self.node_names.share(spec);
        }
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
            .map(|name| format!("{}/{name}", namespace_of(&slice.metadata)));
        if let Some(old) = self.slices.get(&key) {
            if old.checked == checked && old.service == service {
                return false;
            }
        }
        self.changes.endpoint_events += 1;
        self.notes
            .extend(checked.notes(&object_ref(Kind::EndpointSlice.name(), &slice.metadata)));
        if let Some(service) = &service {
            if let Some(time) = trigger_time(&slice.metadata).filter(|t| Some(*t) > self.started) {
                self.changes
                    .trigger_times
                    .entry(service.clone())
                    .or_default()
                    .push(time);
            }
            self.slices_of
                .entry(service.clone())
                .or_default()
                .insert(key.clone());
            self.changes.services.insert(service.clone());
        }
        let old = self
            .slices
            .insert(key.clone(), SliceEntry { service, checked });
        if let Some(old_service) = old.and_then(|old| old.service) {
            self.unlink(&old_service, &key);
        }
        true
    }

    /// Removes an EndpointSlice. Returns whether it was there.
    pub fn delete_slice(&mut self, namespace: &str, name: &str) -> bool {
        let key = format!("{namespace}/{name}");
        let Some(old) = self.slices.remove(&key) else {
            return false;
        };
        self.changes.endpoint_events += 1;
        if let Some(service) = old.service {
            // A deleted slice discards the Service's pending trigger times (§7.2).
            self.changes.trigger_times.remove(&service);
            self.unlink(&service, &key);
            self.changes.services.insert(service);
        }
        true
    }

    /// Replaces every object of a kind with a complete list (after a relist, or a re-read
    /// directory): objects not in it are deleted, the others applied. Only real differences
    /// count as changes. Each object given by value is dropped once applied: at 100,000
    /// Services, a complete list of API objects is several hundred MiB.
    pub fn replace_services<S: Borrow<Service>>(&mut self, services: impl IntoIterator<Item = S>) {
        let services: Vec<S> = services.into_iter().collect();
        let keep: BTreeSet<ServiceKey> = services
            .iter()
            .map(|s| key_of(&s.borrow().metadata))
            .collect();
        let gone: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|key| !keep.contains(*key))
            .cloned()
            .collect();
        for key in gone {
            if let Some((namespace, name)) = key.split_once('/') {
                self.delete_service(namespace, name);
            }
        }
        for service in services {
            self.apply_service(service.borrow());
        }
    }

    /// [`ClusterStore::replace_services`] for EndpointSlices.
    pub fn replace_slices<S: Borrow<EndpointSlice>>(
        &mut self,
        slices: impl IntoIterator<Item = S>,
    ) {
        let slices: Vec<S> = slices.into_iter().collect();
        let keep: BTreeSet<String> = slices
            .iter()
            .map(|s| key_of(&s.borrow().metadata))
            .collect();
        let gone: Vec<String> = self
            .slices
            .keys()
            .filter(|key| !keep.contains(*key))
            .cloned()
            .collect();
        for key in gone {
            if let Some((namespace, name)) = key.split_once('/') {
                self.delete_slice(namespace, name);
            }
        }
        for slice in slices {
            self.apply_slice(slice.borrow());
        }
    }

    fn unlink(&mut self, service: &str, slice: &str) {
        // The slice may have been re-linked to the same Service just before.
        if self.slices.get(slice).and_then(|e| e.service.as_deref()) == Some(service) {
            return;
        }
        if let Some(set) = self.slices_of.get_mut(service) {
            set.remove(slice);
            if set.is_empty() {
                self.slices_of.remove(service);
            }
        }
    }

    /// The proxied Service with this key, if it is valid and holds its cluster IPs and node
    /// ports.
    pub fn service(&self, key: &str) -> Option<&ServiceSpec> {
        self.services
            .get(key)?
            .spec()
            .filter(|_| self.claims.is_live(key))
    }

    /// Every proxied, valid Service in key order (as [`ClusterStore::service`]).
    pub fn services(&self) -> impl Iterator<Item = (&ServiceKey, &ServiceSpec)> {
        self.services.iter().filter_map(|(key, verdict)| {
            Some((key, verdict.spec().filter(|_| self.claims.is_live(key))?))
        })
    }

    /// The frontends of a proxied Service that another Service holds: left out of its rules.
    pub fn withheld(&self, key: &str) -> BTreeSet<Offer> {
        self.claims.withheld(key)
    }

    /// The valid slices of a Service.
    pub fn slices_of(&self, key: &str) -> Vec<&SliceSpec> {
        self.slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|slice| self.slices.get(slice)?.checked.spec())
            .filter(|slice| service_key(slice) == key)
            .collect()
    }

    /// Objects currently skipped as invalid (or in conflict with an older Service), by kind.
    pub fn invalid_counts(&self) -> (usize, usize) {
        (
            self.services
                .iter()
                .filter(|(key, v)| {
                    v.is_skipped() || (v.spec().is_some() && !self.claims.is_live(key))
                })
                .count(),
            self.slices
                .values()
                .filter(|e| e.checked.is_skipped())
                .count(),
        )
    }
}

fn service_key(slice: &SliceSpec) -> String {
    format!("{}/{}", slice.namespace, slice.service_name)
}

fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

fn key_of(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        namespace_of(meta),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// The slice's trigger-time annotation, when it parses as RFC 3339 (§7.2).
fn trigger_time(meta: &ObjectMeta) -> Option<SystemTime> {
    let text = meta.annotations.as_ref()?.get(TRIGGER_TIME_ANNOTATION)?;
    let time: k8s_openapi::jiff::Timestamp = text.parse().ok()?;
    let nanos = time.as_nanosecond();
    let nanos = u64::try_from(nanos).ok().filter(|n| *n > 0)?;
    Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, ip: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]}
        }))
        .expect("a valid Service")
    }

    fn slice(name: &str, service: &str, ip: &str, trigger: Option<&str>) -> EndpointSlice {
        let mut annotations = serde_json::Map::new();
        if let Some(t) = trigger {
            annotations.insert(TRIGGER_TIME_ANNOTATION.into(), t.into());
        }
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns",
                         "labels": {"kubernetes.io/service-name": service},
                         "annotations": annotations},
            "addressType": "IPv4",
            "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}]
        }))
        .expect("a valid EndpointSlice")
    }

    /// A Service with a creation timestamp (seconds after 2020-01-01) and external IPs.
    fn aged(name: &str, ip: &str, created: u32, external: &[&str]) -> Service {
        let created = k8s_openapi::jiff::Timestamp::from_second(1_577_836_800 + i64::from(created))
            .expect("a valid time");
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "creationTimestamp": created.to_string()},
            "spec": {"clusterIP": ip, "externalIPs": external,
                     "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]}
        }))
        .expect("a valid Service")
    }

    fn keys(names: &[&str]) -> BTreeSet<ServiceKey> {
        names.iter().map(|n| format!("ns/{n}")).collect()
    }

    /// §7.1: the agent settles a shared cluster IP as `validate` does, and when the holder goes
    /// the other Service becomes live and is among the changed Services.
    #[test]
    fn a_shared_cluster_ip_passes_to_the_next_service_when_its_holder_goes() {
        let mut store = ClusterStore::new(SystemTime::UNIX_EPOCH);
        store.apply_service(&aged("a", "10.0.0.5", 1, &[]));
        store.take_changes();
        assert!(store.apply_service(&aged("b", "10.0.0.5", 2, &[])));
        let (changes, notes) = store.take_changes();
        assert_eq!(
            changes.services,
            keys(&["b"]),
            "a's standing did not change"
        );
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].to_string().starts_with(
                "skipped Service ns/b: spec.clusterIP 10.0.0.5 is already used by Service ns/a (older)"
            ),
            "{notes:?}"
        );
        assert!(store.service("ns/a").is_some());
        assert!(store.service("ns/b").is_none());
        assert_eq!(store.services().count(), 1);
        assert_eq!(store.invalid_counts(), (1, 0));

        assert!(store.delete_service("ns", "a"));
        let (changes, _) = store.take_changes();
        assert_eq!(changes.services, keys(&["a", "b"]));
        assert!(store.service("ns/b").is_some(), "b holds the IP now");
        assert_eq!(store.invalid_counts(), (0, 0));
    }

    #[test]
    fn an_older_service_arriving_takes_the_ip_and_a_changed_ip_frees_it() {
        let mut store = ClusterStore::new(SystemTime::UNIX_EPOCH);
        store.apply_service(&aged("b", "10.0.0.5", 2, &[]));
        store.take_changes();
        store.apply_service(&aged("a", "10.0.0.5", 1, &[]));
        let (changes, notes) = store.take_changes();
        assert_eq!(
            changes.services,
            keys(&["a", "b"]),
            "the previous holder changes"
        );
        assert!(store.service("ns/b").is_none());
        assert!(notes
            .iter()
            .any(|n| n.to_string().starts_with("skipped Service ns/b: ")));
        // The holder moves to another IP: b is live again.
        store.apply_service(&aged("a", "10.0.0.6", 1, &[]));
        let (changes, _) = store.take_changes();
        assert_eq!(changes.services, keys(&["a", "b"]));
        assert!(store.service("ns/a").is_some() && store.service("ns/b").is_some());
    }

    /// §7.2: a frontend offered twice stays with the older Service; the other keeps the rest.
    #[test]
    fn a_shared_external_ip_is_withheld_from_the_newer_service_until_the_older_one_drops_it() {
        let mut store = ClusterStore::new(SystemTime::UNIX_EPOCH);
        store.apply_service(&aged("a", "10.0.0.5", 1, &["192.0.2.1"]));
        store.apply_service(&aged("b", "10.0.0.6", 2, &["192.0.2.1"]));
        let (_, notes) = store.take_changes();
        assert!(store.service("ns/b").is_some(), "b keeps its cluster IP");
        assert!(store.withheld("ns/a").is_empty());
        assert_eq!(store.withheld("ns/b").len(), 1);
        assert!(notes.iter().any(|n| n.to_string().starts_with(
            "skipped part of Service ns/b: spec.externalIPs 192.0.2.1 port 80/tcp is already offered by Service ns/a (older)"
        )), "{notes:?}");
        store.apply_service(&aged("a", "10.0.0.5", 1, &[]));
        let (changes, _) = store.take_changes();
        assert_eq!(changes.services, keys(&["a", "b"]));
        assert!(store.withheld("ns/b").is_empty());
    }

    #[test]
    fn only_real_changes_mark_a_service() {
        let mut store = ClusterStore::new(SystemTime::UNIX_EPOCH);
        assert!(store.apply_service(&service("a", "10.0.0.1")));
        assert!(store.apply_slice(&slice("a-1", "a", "10.1.0.1", None)));
        let (changes, notes) = store.take_changes();
        assert_eq!(changes.services, BTreeSet::from(["ns/a".to_string()]));
        assert!(notes.is_empty());
        // The same objects again change nothing (a resync, a relist).
        assert!(!store.apply_service(&service("a", "10.0.0.1")));
        assert!(!store.apply_slice(&slice("a-1", "a", "10.1.0.1", None)));
        assert!(!store.has_changes());
        assert_eq!(store.slices_of("ns/a").len(), 1);
    }

    #[test]
    fn moving_a_slice_marks_both_services_and_relinks_it() {
        let mut store = ClusterStore::new(SystemTime::UNIX_EPOCH);
        store.apply_slice(&slice("s", "a", "10.1.0.1", None));
        store.take_changes();
        store.apply_slice(&slice("s", "b", "10.1.0.1", None));
        let (changes, _) = store.take_changes();
        assert_eq!(
            changes.services,
            BTreeSet::from(["ns/b".to_string()]),
            "the new owner is marked"
        );
        assert!(store.slices_of("ns/a").is_empty());
        assert_eq!(store.slices_of("ns/b").len(), 1);
    }

    #[test]
    fn an_invalid_object_is_noted_once_and_replace_deletes_the_missing() {
        let mut store = ClusterStore::new(SystemTime::UNIX_EPOCH);
        store.replace_services(&[service("a", "10.0.0.1"), service("b", "not-an-ip")]);
        let (_, notes) = store.take_changes();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].to_string().starts_with("skipped Service ns/b: "));
        store.replace_services(&[service("b", "not-an-ip")]);
        let (changes, notes) = store.take_changes();
        assert!(
            notes.is_empty(),
            "the same bad object is not reported again"
        );
        assert_eq!(changes.services, BTreeSet::from(["ns/a".to_string()]));
        assert!(store.service("ns/a").is_none());
        assert_eq!(store.invalid_counts(), (1, 0));
    }

    #[test]
    fn trigger_times_after_start_are_kept_and_dropped_with_the_slice() {
        let started = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let mut store = ClusterStore::new(started);
        store.apply_slice(&slice("s", "a", "10.1.0.1", Some("2020-01-01T00:00:00Z")));
        store.apply_slice(&slice("s", "a", "10.1.0.2", Some("2030-01-01T00:00:00.5Z")));
        let (changes, _) = store.take_changes();
        let times = &changes.trigger_times["ns/a"];
        assert_eq!(times.len(), 1, "the one before the start is not measured");
        assert_eq!(
            times[0],
            SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_893_456_000_500)
        );
        store.apply_slice(&slice("s", "a", "10.1.0.3", Some("2030-01-01T00:00:01Z")));
        store.delete_slice("ns", "s");
        let (changes, _) = store.take_changes();
        assert!(changes.trigger_times.is_empty());
        assert_eq!(changes.services, BTreeSet::from(["ns/a".to_string()]));
    }
}
