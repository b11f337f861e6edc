//! Per-cluster indexes fed by watch events, keeping only what planning uses.
//!
//! One watch per resource kind and cluster feeds one [`Index`]; every entry
//! is an `Arc`, so handing an entry to the Prefetches that care about it
//! costs a reference count, never a copy, and an event touches one entry.
//! A re-list (the watcher's `Init` .. `InitDone`) is buffered and then
//! compared with what was there, like kube-rs' reflector `Store`, so that a
//! reconnect reports only what really changed meanwhile.
//!
//! Nothing here talks to the API server: the actors turn watch events into
//! calls of these functions.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::api::{PrefetchSpec, WorkloadKind};
use crate::pull::namespaces::NamespacePolicy;
use crate::pull::targeting::{NodeTargeting, NodeView};
use crate::pull::workload::WorkloadImages;

/// One entry that was added, changed or removed. `old` and `new` are never
/// both `None`, and never equal.
#[derive(Debug, Clone, PartialEq)]
pub struct Change<K, V> {
    pub key: K,
    pub old: Option<Arc<V>>,
    pub new: Option<Arc<V>>,
}

/// Entries of one resource kind, by key.
#[derive(Debug, Clone)]
pub struct Index<K, V> {
    entries: BTreeMap<K, Arc<V>>,
    /// Entries of a re-list in progress; `Some` between `Init` and `InitDone`.
    relist: Option<BTreeMap<K, Arc<V>>>,
    synced: bool,
}

impl<K, V> Default for Index<K, V> {
    fn default() -> Self {
        Index {
            entries: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }
}

impl<K: Ord + Clone, V: PartialEq> Index<K, V> {
    /// Adds or replaces one entry; `None` when nothing planning uses changed
    /// (the common case for node heartbeats), so nobody is told.
    pub fn apply(&mut self, key: K, value: V) -> Option<Change<K, V>> {
        if let Some(old) = self.entries.get(&key)
            && **old == value
        {
            return None;
        }
        let new = Arc::new(value);
        let old = self.entries.insert(key.clone(), new.clone());
        Some(Change {
            key,
            old,
            new: Some(new),
        })
    }

    pub fn delete(&mut self, key: &K) -> Option<Change<K, V>> {
        self.entries.remove(key).map(|old| Change {
            key: key.clone(),
            old: Some(old),
            new: None,
        })
    }

    /// A re-list starts: entries stay usable until it is done.
    pub fn begin_relist(&mut self) {
        self.relist = Some(BTreeMap::new());
    }

    pub fn relist_apply(&mut self, key: K, value: V) {
        // An unchanged entry keeps its Arc, so holders share it still.
        let value = match self.entries.get(&key) {
            Some(old) if **old == value => old.clone(),
            _ => Arc::new(value),
        };
        self.relist
            .get_or_insert_with(BTreeMap::new)
            .insert(key, value);
    }

    /// Replaces the entries with the re-listed ones and reports the
    /// differences: what vanished while the watch was down counts as deleted.
    pub fn finish_relist(&mut self) -> Vec<Change<K, V>> {
        let fresh = self.relist.take().unwrap_or_default();
        let mut changes = Vec::new();
        for (key, old) in &self.entries {
            match fresh.get(key) {
                None => changes.push(Change {
                    key: key.clone(),
                    old: Some(old.clone()),
                    new: None,
                }),
                Some(new) if !Arc::ptr_eq(old, new) => changes.push(Change {
                    key: key.clone(),
                    old: Some(old.clone()),
                    new: Some(new.clone()),
                }),
                Some(_) => {}
            }
        }
        for (key, new) in &fresh {
            if !self.entries.contains_key(key) {
                changes.push(Change {
                    key: key.clone(),
                    old: None,
                    new: Some(new.clone()),
                });
            }
        }
        self.entries = fresh;
        self.synced = true;
        changes
    }

    /// Whether the first list completed.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    pub fn get(&self, key: &K) -> Option<&Arc<V>> {
        self.entries.get(key)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &Arc<V>)> {
        self.entries.iter()
    }

    pub fn values(&self) -> impl Iterator<Item = &Arc<V>> {
        self.entries.values()
    }

    pub fn range<R: std::ops::RangeBounds<K>>(
        &self,
        range: R,
    ) -> impl Iterator<Item = (&K, &Arc<V>)> {
        self.entries.range(range)
    }
}

/// Nodes by name.
pub type NodeIndex = Index<String, NodeView>;
pub type NodeChange = Change<String, NodeView>;

impl NodeChange {
    /// Whether a Prefetch with `targeting` must hear of this change: the
    /// node is targeted before or after it. A node that was not targeted and
    /// still is not changes nothing for it, whatever its images do.
    pub fn concerns(&self, targeting: &NodeTargeting) -> bool {
        self.old
            .iter()
            .chain(self.new.iter())
            .any(|node| targeting.targets(node))
    }
}

/// The node targeting of `spec`.
pub fn targeting_of(spec: &PrefetchSpec) -> NodeTargeting {
    NodeTargeting::from_spec(spec)
}

/// A workload's place: (namespace, name) within one kind.
pub type WorkloadKey = (String, String);

/// What planning keeps of a workload: its labels (for selection) and its
/// pod template's images and scheduling fields.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadEntry {
    pub labels: BTreeMap<String, String>,
    pub workload: WorkloadImages,
}

pub type WorkloadChange = Change<WorkloadKey, WorkloadEntry>;

/// Which workloads one Prefetch selects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadSelector {
    pub kinds: BTreeSet<WorkloadKind>,
    /// Allowed namespaces only (the policy's refusals are left out).
    pub namespaces: BTreeSet<String>,
    /// Every pair must be among the workload's labels; an empty selector
    /// selects nothing (the original operator's `filter_by_labels`).
    pub labels: BTreeMap<String, String>,
    /// Why namespaces the Prefetch lists are refused (its status says so).
    pub refusal: Option<String>,
}

impl WorkloadSelector {
    /// What `spec` of a Prefetch in `own_namespace` selects; namespaces the
    /// policy refuses are left out (the Prefetch reports them).
    pub fn for_spec(spec: &PrefetchSpec, own_namespace: &str, policy: &NamespacePolicy) -> Self {
        let (namespaces, refused) =
            spec.workload_namespaces(own_namespace, |target| policy.allows(own_namespace, target));
        let refusal = policy.refusal(own_namespace, &refused);
        // An invalid label key selects nothing (the status says why).
        if spec.label_selector().is_err() {
            return WorkloadSelector {
                refusal,
                ..WorkloadSelector::default()
            };
        }
        WorkloadSelector {
            kinds: spec.selected_workload_kinds().into_iter().collect(),
            namespaces: namespaces.into_iter().collect(),
            labels: spec.filter_by_labels.clone(),
            refusal,
        }
    }

    pub fn selects(&self, kind: WorkloadKind, key: &WorkloadKey, entry: &WorkloadEntry) -> bool {
        !self.labels.is_empty()
            && self.kinds.contains(&kind)
            && self.namespaces.contains(&key.0)
            && self
                .labels
                .iter()
                .all(|(label, value)| entry.labels.get(label) == Some(value))
    }

    /// Whether a change of a `kind` workload concerns this selector: the
    /// workload is selected before or after it.
    pub fn concerns(&self, kind: WorkloadKind, change: &WorkloadChange) -> bool {
        change
            .old
            .iter()
            .chain(change.new.iter())
            .any(|entry| self.selects(kind, &change.key, entry))
    }
}

/// Workloads of every watched kind.
#[derive(Debug, Clone, Default)]
pub struct WorkloadIndex {
    kinds: BTreeMap<WorkloadKind, Index<WorkloadKey, WorkloadEntry>>,
}

impl WorkloadIndex {
    /// The index of `kind`, created empty (not synced) on first use.
    pub fn kind_mut(&mut self, kind: WorkloadKind) -> &mut Index<WorkloadKey, WorkloadEntry> {
        self.kinds.entry(kind).or_default()
    }

    /// Forgets a kind nobody selects any more (its watch was stopped).
    pub fn drop_kind(&mut self, kind: WorkloadKind) {
        self.kinds.remove(&kind);
    }

    pub fn kinds(&self) -> impl Iterator<Item = WorkloadKind> + '_ {
        self.kinds.keys().copied()
    }

    /// Whether `kind` has been listed.
    pub fn is_kind_synced(&self, kind: WorkloadKind) -> bool {
        self.kinds.get(&kind).is_some_and(Index::is_synced)
    }

    /// Whether every kind `selector` needs has been listed.
    pub fn is_synced_for(&self, selector: &WorkloadSelector) -> bool {
        selector.kinds.iter().all(|kind| self.is_kind_synced(*kind))
    }

    /// The selected workloads, in (kind, namespace, name) order. Looks only
    /// at the selected namespaces of the selected kinds.
    pub fn select(&self, selector: &WorkloadSelector) -> Vec<Arc<WorkloadEntry>> {
        if selector.labels.is_empty() {
            return Vec::new();
        }
        let mut selected = Vec::new();
        for kind in &selector.kinds {
            let Some(index) = self.kinds.get(kind) else {
                continue;
            };
            for namespace in &selector.namespaces {
                let start = (namespace.clone(), String::new());
                for (key, entry) in index.range(start..) {
                    if key.0 != *namespace {
                        break;
                    }
                    if selector.selects(*kind, key, entry) {
                        selected.push(entry.clone());
                    }
                }
            }
        }
        selected
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pull::targeting::SchedulingConstraints;

    fn node(name: &str, images: &[&str]) -> NodeView {
        let image_names: Vec<String> = images.iter().map(|image| image.to_string()).collect();
        NodeView {
            name: name.to_string(),
            ready: true,
            images: crate::pull::image::NodeImages::from_names(&image_names),
            ..NodeView::default()
        }
    }

    fn entry(namespace: &str, name: &str, app: &str, image: &str) -> WorkloadEntry {
        WorkloadEntry {
            labels: [("app".to_string(), app.to_string())].into(),
            workload: WorkloadImages {
                kind: WorkloadKind::Deployment,
                namespace: namespace.to_string(),
                name: name.to_string(),
                images: vec![image.to_string()],
                scheduling: SchedulingConstraints::default(),
                image_pull_secrets: Vec::new(),
                service_account: None,
            },
        }
    }

    fn key(namespace: &str, name: &str) -> WorkloadKey {
        (namespace.to_string(), name.to_string())
    }

    #[test]
    fn node_add_update_delete() {
        let mut nodes = NodeIndex::default();
        let added = nodes.apply("n1".into(), node("n1", &[])).expect("added");
        assert!(added.old.is_none());
        assert_eq!(added.new.as_deref(), Some(&node("n1", &[])));

        // A heartbeat changes nothing planning uses: nobody hears of it.
        assert_eq!(nodes.apply("n1".into(), node("n1", &[])), None);

        let updated = nodes
            .apply("n1".into(), node("n1", &["busybox:1.36"]))
            .expect("updated");
        assert_eq!(updated.old.as_deref(), Some(&node("n1", &[])));
        assert!(
            updated
                .new
                .as_ref()
                .is_some_and(|n| n.images.contains("docker.io/library/busybox:1.36"))
        );
        assert_eq!(nodes.len(), 1);

        let deleted = nodes.delete(&"n1".to_string()).expect("deleted");
        assert!(deleted.new.is_none());
        assert!(nodes.is_empty());
        assert_eq!(nodes.delete(&"n1".to_string()), None, "deleted once");
    }

    #[test]
    fn an_update_shares_the_entry_instead_of_copying_the_map() {
        let mut nodes = NodeIndex::default();
        nodes.apply("n1".into(), node("n1", &[]));
        nodes.apply("n2".into(), node("n2", &[]));
        let n2_before = nodes.get(&"n2".to_string()).cloned().expect("n2");
        let change = nodes
            .apply("n1".into(), node("n1", &["nginx:1"]))
            .expect("changed");
        let n2_after = nodes.get(&"n2".to_string()).expect("n2");
        assert!(Arc::ptr_eq(&n2_before, n2_after), "n2 untouched");
        let n1 = nodes.get(&"n1".to_string()).expect("n1");
        assert!(Arc::ptr_eq(change.new.as_ref().expect("new"), n1));
    }

    #[test]
    fn relist_reports_only_what_changed_while_down() {
        let mut nodes = NodeIndex::default();
        assert!(!nodes.is_synced());
        nodes.begin_relist();
        nodes.relist_apply("kept".into(), node("kept", &[]));
        nodes.relist_apply("changed".into(), node("changed", &[]));
        nodes.relist_apply("gone".into(), node("gone", &[]));
        let first = nodes.finish_relist();
        assert_eq!(first.len(), 3, "all new on the first list");
        assert!(nodes.is_synced());
        let kept = nodes.get(&"kept".to_string()).cloned().expect("kept");

        nodes.begin_relist();
        // Still usable while the re-list runs.
        assert_eq!(nodes.len(), 3);
        nodes.relist_apply("kept".into(), node("kept", &[]));
        nodes.relist_apply("changed".into(), node("changed", &["nginx:1"]));
        nodes.relist_apply("new".into(), node("new", &[]));
        let mut changes: Vec<(String, bool, bool)> = nodes
            .finish_relist()
            .into_iter()
            .map(|c| (c.key, c.old.is_some(), c.new.is_some()))
            .collect();
        changes.sort();
        assert_eq!(
            changes,
            vec![
                ("changed".to_string(), true, true),
                ("gone".to_string(), true, false),
                ("new".to_string(), false, true),
            ]
        );
        assert!(Arc::ptr_eq(
            &kept,
            nodes.get(&"kept".to_string()).expect("kept")
        ));
    }

    #[test]
    fn node_change_concerns_prefetches_targeting_it_before_or_after() {
        let workers = NodeTargeting {
            node_filter: Some("worker".into()),
            ..NodeTargeting::default()
        };
        let mut nodes = NodeIndex::default();
        let change = nodes
            .apply("worker1".into(), node("worker1", &[]))
            .expect("added");
        assert!(change.concerns(&workers));
        let control = nodes
            .apply("control".into(), node("control", &[]))
            .expect("added");
        assert!(!control.concerns(&workers));

        // Becoming NotReady: targeted before, not after; still concerns it.
        let mut not_ready = node("worker1", &[]);
        not_ready.ready = false;
        let change = nodes.apply("worker1".into(), not_ready).expect("changed");
        assert!(change.concerns(&workers));
        let change = nodes.delete(&"worker1".to_string()).expect("deleted");
        assert!(!change.concerns(&workers), "neither before nor after");
    }

    fn selector(apps: &str, namespaces: &[&str]) -> WorkloadSelector {
        WorkloadSelector {
            kinds: [WorkloadKind::Deployment].into(),
            namespaces: namespaces.iter().map(|ns| ns.to_string()).collect(),
            labels: [("app".to_string(), apps.to_string())].into(),
            refusal: None,
        }
    }

    #[test]
    fn workload_add_change_delete_and_selection() {
        let mut workloads = WorkloadIndex::default();
        let web = selector("web", &["a"]);
        assert!(!workloads.is_synced_for(&web));
        let deployments = workloads.kind_mut(WorkloadKind::Deployment);
        deployments.begin_relist();
        deployments.relist_apply(key("a", "web"), entry("a", "web", "web", "nginx:1"));
        deployments.relist_apply(key("a", "db"), entry("a", "db", "db", "postgres:16"));
        deployments.relist_apply(key("b", "web"), entry("b", "web", "web", "nginx:1"));
        deployments.finish_relist();
        assert!(workloads.is_synced_for(&web));

        let names = |selected: Vec<Arc<WorkloadEntry>>| -> Vec<String> {
            selected
                .iter()
                .map(|e| format!("{}/{}", e.workload.namespace, e.workload.name))
                .collect()
        };
        assert_eq!(names(workloads.select(&web)), vec!["a/web"]);
        assert_eq!(
            names(workloads.select(&selector("web", &["a", "b"]))),
            vec!["a/web", "b/web"]
        );

        // Add: concerns the selector it matches only.
        let deployments = workloads.kind_mut(WorkloadKind::Deployment);
        let added = deployments
            .apply(key("a", "web2"), entry("a", "web2", "web", "nginx:2"))
            .expect("added");
        assert!(web.concerns(WorkloadKind::Deployment, &added));
        assert!(!selector("db", &["a"]).concerns(WorkloadKind::Deployment, &added));

        // Change of labels away from the selector still concerns it (its
        // images must leave the plan).
        let relabelled = deployments
            .apply(key("a", "web2"), entry("a", "web2", "other", "nginx:2"))
            .expect("changed");
        assert!(web.concerns(WorkloadKind::Deployment, &relabelled));
        assert_eq!(names(workloads.select(&web)), vec!["a/web"]);

        // Unchanged object (a status update): nobody is told.
        let deployments = workloads.kind_mut(WorkloadKind::Deployment);
        assert_eq!(
            deployments.apply(key("a", "web"), entry("a", "web", "web", "nginx:1")),
            None
        );

        // Delete.
        let deleted = deployments.delete(&key("a", "web")).expect("deleted");
        assert!(web.concerns(WorkloadKind::Deployment, &deleted));
        assert!(workloads.select(&web).is_empty());

        // Another kind or namespace is not this selector's business.
        assert!(!web.concerns(WorkloadKind::StatefulSet, &deleted));
        assert!(!selector("web", &["b"]).concerns(WorkloadKind::Deployment, &deleted));
    }

    #[test]
    fn empty_label_selector_selects_nothing() {
        let mut workloads = WorkloadIndex::default();
        let deployments = workloads.kind_mut(WorkloadKind::Deployment);
        deployments.begin_relist();
        deployments.relist_apply(key("a", "web"), entry("a", "web", "web", "nginx:1"));
        deployments.finish_relist();
        let none = WorkloadSelector {
            labels: BTreeMap::new(),
            ..selector("web", &["a"])
        };
        assert!(workloads.select(&none).is_empty());
    }

    #[test]
    fn dropped_kind_is_no_longer_synced() {
        let mut workloads = WorkloadIndex::default();
        let web = selector("web", &["a"]);
        workloads.kind_mut(WorkloadKind::Deployment).finish_relist();
        assert!(workloads.is_synced_for(&web));
        workloads.drop_kind(WorkloadKind::Deployment);
        assert!(!workloads.is_synced_for(&web));
        assert_eq!(workloads.kinds().count(), 0);
    }
}
