//! The objects, the global resourceVersion and the bounded history of changes.
//!
//! Every change is kept with the object before and after it, so that a watch can tell an object
//! that starts or stops matching its selectors, and a paginated list can be served from the
//! snapshot it started on by undoing the newer changes.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

use serde_json::Value;

use super::selector::{meta_str, Filter};
use super::ResourceKind;

/// namespace (empty for nodes), name: the order of list results.
pub(crate) type Key = (String, String);

/// One create, update or delete.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub rv: u64,
    pub kind: ResourceKind,
    pub old: Option<Arc<Value>>,
    pub new: Option<Arc<Value>>,
}

/// A resourceVersion that the history no longer reaches back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Expired {
    /// The oldest resourceVersion that can still be resumed from.
    pub oldest: u64,
}

/// One page of a list.
#[derive(Debug)]
pub(crate) struct Page {
    /// The snapshot the page comes from.
    pub rv: u64,
    pub items: Vec<Arc<Value>>,
    /// The last key on the page, when more matching objects follow it.
    pub more_after: Option<Key>,
}

#[derive(Debug)]
pub(crate) struct Store {
    rv: u64,
    objects: [BTreeMap<Key, Arc<Value>>; 3],
    history: VecDeque<Change>,
    history_limit: usize,
    /// Changes up to this resourceVersion may be missing from `history`.
    dropped_through: u64,
    /// The oldest resourceVersion a watch or a continue token may resume from; `compact()`
    /// raises it past the current one.
    resume_floor: u64,
    next_uid: u64,
}

impl Store {
    pub fn new(history_limit: usize) -> Store {
        Store {
            rv: 0,
            objects: Default::default(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            dropped_through: 0,
            resume_floor: 0,
            next_uid: 1,
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Creates or replaces the object, stamping kind, apiVersion, resourceVersion and (on
    /// create, unless given) uid.
    pub fn apply(&mut self, kind: ResourceKind, mut object: Value) -> Result<Change, String> {
        let key = key_of(kind, &object)?;
        let old = self.objects[kind.index()].get(&key).cloned();
        let fields = object
            .as_object_mut()
            .ok_or("the object is not a JSON object")?;
        fields.insert("kind".into(), kind.kind().into());
        fields.insert("apiVersion".into(), kind.api_version().into());
        let metadata = fields
            .entry("metadata")
            .or_insert_with(|| Value::Object(Default::default()))
            .as_object_mut()
            .ok_or("metadata is not a JSON object")?;
        if metadata.get("uid").and_then(Value::as_str).is_none() {
            let uid = match old.as_deref().map(|old| meta_str(old, "uid")) {
                Some(uid) if !uid.is_empty() => uid.to_string(),
                _ => {
                    self.next_uid += 1;
                    format!("00000000-0000-4000-8000-{:012x}", self.next_uid - 1)
                }
            };
            metadata.insert("uid".into(), uid.into());
        }
        self.rv += 1;
        metadata.insert("resourceVersion".into(), self.rv.to_string().into());
        let new = Arc::new(object);
        self.objects[kind.index()].insert(key, new.clone());
        Ok(self.record(kind, old, Some(new)))
    }

    pub fn delete(&mut self, kind: ResourceKind, namespace: &str, name: &str) -> Option<Change> {
        let key = (namespace.to_string(), name.to_string());
        let old = self.objects[kind.index()].remove(&key)?;
        self.rv += 1;
        Some(self.record(kind, Some(old), None))
    }

    fn record(
        &mut self,
        kind: ResourceKind,
        old: Option<Arc<Value>>,
        new: Option<Arc<Value>>,
    ) -> Change {
        let change = Change {
            rv: self.rv,
            kind,
            old,
            new,
        };
        if self.history.len() == self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.dropped_through = dropped.rv;
                self.resume_floor = self.resume_floor.max(dropped.rv);
            }
        }
        self.history.push_back(change.clone());
        change
    }

    /// Forgets the history: nothing handed out so far can be resumed from, not even the current
    /// resourceVersion (stricter than etcd, which keeps the compacted revision itself), so a
    /// test can force a relist without making a change first.
    pub fn compact(&mut self) {
        self.history.clear();
        self.dropped_through = self.rv;
        self.resume_floor = self.rv + 1;
    }

    /// May a new watch or a continue token resume from `rv`?
    pub fn check_resumable(&self, rv: u64) -> Result<(), Expired> {
        if rv < self.resume_floor {
            Err(Expired {
                oldest: self.resume_floor,
            })
        } else {
            Ok(())
        }
    }

    /// The changes after `rv`, for a watch that has seen everything up to it. Fails when some
    /// of them have been dropped from the history.
    pub fn changes_after(&self, rv: u64) -> Result<Vec<Change>, Expired> {
        if rv < self.dropped_through {
            return Err(Expired {
                oldest: self.resume_floor,
            });
        }
        let first = self.history.partition_point(|change| change.rv <= rv);
        Ok(self.history.range(first..).cloned().collect())
    }

    pub fn get(&self, kind: ResourceKind, namespace: &str, name: &str) -> Option<Arc<Value>> {
        self.objects[kind.index()]
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// The current objects of a kind that match, in key order.
    pub fn current(&self, kind: ResourceKind, filter: &Filter) -> Vec<Arc<Value>> {
        let objects = self.objects[kind.index()].values();
        objects
            .filter(|object| filter.matches(object))
            .cloned()
            .collect()
    }

    /// Up to `limit` (0: all) matching objects after `after`, from the snapshot at `at` (the
    /// current state when `None`).
    pub fn page(
        &self,
        kind: ResourceKind,
        filter: &Filter,
        at: Option<u64>,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Page, Expired> {
        let rv = at.unwrap_or(self.rv);
        if at.is_some() {
            self.check_resumable(rv)?;
        }
        let rolled_back;
        let objects = if rv >= self.rv {
            &self.objects[kind.index()]
        } else {
            rolled_back = self.snapshot(kind, rv);
            &rolled_back
        };
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let matching = objects
            .range((start, Bound::Unbounded))
            .filter(|(_, object)| filter.matches(object));
        let (mut items, mut last, mut more_after): (_, Option<&Key>, _) = (Vec::new(), None, None);
        for (key, object) in matching {
            if limit > 0 && items.len() == limit {
                more_after = last.cloned();
                break;
            }
            items.push(object.clone());
            last = Some(key);
        }
        Ok(Page {
            rv,
            items,
            more_after,
        })
    }

    /// The objects of a kind as they were at `rv`: the current ones with newer changes undone.
    /// Only for a resumable `rv`, whose newer changes are all in the history.
    fn snapshot(&self, kind: ResourceKind, rv: u64) -> BTreeMap<Key, Arc<Value>> {
        let mut objects = self.objects[kind.index()].clone();
        for change in self
            .history
            .iter()
            .rev()
            .take_while(|change| change.rv > rv)
        {
            if change.kind != kind {
                continue;
            }
            let Some(object) = change.old.as_ref().or(change.new.as_ref()) else {
                continue;
            };
            let key = (
                meta_str(object, "namespace").to_string(),
                meta_str(object, "name").to_string(),
            );
            match &change.old {
                Some(old) => objects.insert(key, old.clone()),
                None => objects.remove(&key),
            };
        }
        objects
    }
}

fn key_of(kind: ResourceKind, object: &Value) -> Result<Key, String> {
    let name = meta_str(object, "name");
    if name.is_empty() {
        return Err(format!("{} without metadata.name", kind.kind()));
    }
    let namespace = meta_str(object, "namespace");
    match (kind.namespaced(), namespace.is_empty()) {
        (true, true) => Err(format!("{} {name} without metadata.namespace", kind.kind())),
        (false, false) => Err(format!(
            "{} {name} is cluster-scoped but has a namespace",
            kind.kind()
        )),
        _ => Ok((namespace.to_string(), name.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn service(name: &str, port: u16) -> Value {
        json!({"metadata": {"namespace": "ns", "name": name}, "spec": {"ports": [{"port": port}]}})
    }

    fn names_and_ports(page: &Page) -> Vec<String> {
        let entry =
            |o: &Arc<Value>| format!("{}:{}", meta_str(o, "name"), o["spec"]["ports"][0]["port"]);
        page.items.iter().map(entry).collect()
    }

    #[test]
    fn a_snapshot_undoes_later_changes_of_its_own_kind_only() {
        let mut store = Store::new(100);
        store.apply(ResourceKind::Service, service("a", 1)).unwrap();
        store.apply(ResourceKind::Service, service("b", 1)).unwrap();
        let at = store.resource_version();
        store
            .apply(ResourceKind::Node, json!({"metadata": {"name": "n"}}))
            .unwrap();
        store.apply(ResourceKind::Service, service("a", 2)).unwrap();
        store.delete(ResourceKind::Service, "ns", "b").unwrap();
        store.apply(ResourceKind::Service, service("c", 1)).unwrap();

        let all = Filter::default();
        let then = store
            .page(ResourceKind::Service, &all, Some(at), None, 0)
            .unwrap();
        assert_eq!(
            (then.rv, names_and_ports(&then)),
            (at, vec!["a:1".into(), "b:1".into()])
        );
        let now = store
            .page(ResourceKind::Service, &all, None, None, 0)
            .unwrap();
        assert_eq!(names_and_ports(&now), ["a:2", "c:1"]);
        let nodes = store
            .page(ResourceKind::Node, &all, Some(at), None, 0)
            .unwrap();
        assert!(nodes.items.is_empty());
    }

    #[test]
    fn pages_continue_after_their_last_key() {
        let mut store = Store::new(100);
        for name in ["a", "b", "c"] {
            store
                .apply(ResourceKind::Service, service(name, 1))
                .unwrap();
        }
        let all = Filter::default();
        let first = store
            .page(ResourceKind::Service, &all, None, None, 2)
            .unwrap();
        let after = first.more_after.clone().unwrap();
        assert_eq!(after, ("ns".to_string(), "b".to_string()));
        let second = store
            .page(ResourceKind::Service, &all, Some(first.rv), Some(&after), 2)
            .unwrap();
        assert_eq!(
            (names_and_ports(&second), second.more_after),
            (vec!["c:1".into()], None)
        );
    }

    #[test]
    fn history_replay_and_expiry() {
        let mut store = Store::new(2);
        for name in ["a", "b", "c"] {
            store
                .apply(ResourceKind::Service, service(name, 1))
                .unwrap();
        }
        // Change 1 fell out of the two-change history.
        assert_eq!(store.changes_after(0).unwrap_err(), Expired { oldest: 1 });
        assert_eq!(store.check_resumable(0), Err(Expired { oldest: 1 }));
        let replay = store.changes_after(1).unwrap();
        assert_eq!(
            replay.iter().map(|change| change.rv).collect::<Vec<_>>(),
            [2, 3]
        );
        assert!(store.changes_after(3).unwrap().is_empty());

        store.compact();
        assert_eq!(store.check_resumable(3), Err(Expired { oldest: 4 }));
        assert!(
            store.changes_after(3).unwrap().is_empty(),
            "a live watch at the head lost nothing"
        );
        assert!(store.changes_after(2).is_err());
    }

    #[test]
    fn objects_need_a_name_and_the_right_scope() {
        let mut store = Store::new(10);
        assert!(store
            .apply(
                ResourceKind::Service,
                json!({"metadata": {"namespace": "ns"}})
            )
            .is_err());
        assert!(store
            .apply(ResourceKind::Service, json!({"metadata": {"name": "x"}}))
            .is_err());
        let namespaced_node = json!({"metadata": {"name": "n", "namespace": "ns"}});
        assert!(store.apply(ResourceKind::Node, namespaced_node).is_err());
        assert!(store.apply(ResourceKind::Node, json!([])).is_err());
        assert_eq!(store.resource_version(), 0);
    }
}
