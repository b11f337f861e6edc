//! The desired set of one Prefetch: which (node, image) pairs should exist,
//! and with which namespace, credentials and tolerations each is pulled.
//!
//! Memory: a Prefetch over thousands of nodes holds hundreds of thousands of
//! pairs, so a pair owns no string. Node and image names are `Arc<str>`
//! shared by every pair of that node (or image), and the pull settings are
//! one `Arc` per source (workload or the Prefetch's own images).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Toleration;

use crate::pull::image::{ImageRefError, normalize};
use crate::pull::targeting::SkipReason;
use crate::pull::targeting::{NodeTargeting, NodeView, SchedulingConstraints};
use crate::pull::workload::WorkloadImages;

/// One (node, image) pair; `image` is canonical (see [`normalize`]).
/// Cloning costs two reference counts, not two strings.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PairKey {
    pub node: Arc<str>,
    pub image: Arc<str>,
}

impl PairKey {
    pub fn new(node: impl Into<Arc<str>>, image: impl Into<Arc<str>>) -> Self {
        PairKey {
            node: node.into(),
            image: image.into(),
        }
    }
}

/// How the pull pods of one source run: shared by all the source's pairs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PullSettings {
    /// Where the pull pod runs: the workload's namespace (its secrets and
    /// service account live there), or the Prefetch's for extra images.
    pub namespace: String,
    pub image_pull_secrets: Vec<String>,
    pub service_account: Option<String>,
    pub tolerations: Vec<Toleration>,
}

/// Everything needed to build the pull pod of one pair.
#[derive(Debug, Clone, PartialEq)]
pub struct PullTarget {
    pub node: Arc<str>,
    /// Canonical reference.
    pub image: Arc<str>,
    pub settings: Arc<PullSettings>,
}

impl PullTarget {
    pub fn new(
        node: impl Into<Arc<str>>,
        image: impl Into<Arc<str>>,
        settings: impl Into<Arc<PullSettings>>,
    ) -> Self {
        PullTarget {
            node: node.into(),
            image: image.into(),
            settings: settings.into(),
        }
    }

    pub fn key(&self) -> PairKey {
        PairKey {
            node: self.node.clone(),
            image: self.image.clone(),
        }
    }
}

/// The Prefetch's own `images` field, pulled in the Prefetch's namespace.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExtraImages {
    pub images: Vec<String>,
    pub namespace: String,
    pub image_pull_secrets: Vec<String>,
}

/// One pair as the desired set keeps it, under its node: 24 bytes.
#[derive(Debug, Clone, PartialEq)]
struct NodePair {
    image: Arc<str>,
    settings: Arc<PullSettings>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct DesiredSet {
    /// Targeted nodes (see [`desired_pulls`] for the exact rule), each with
    /// its pairs sorted by image (possibly none). One entry per node rather
    /// than one per pair: most of the memory of a big set was map overhead
    /// and keys repeated per pair.
    by_node: BTreeMap<Arc<str>, Box<[NodePair]>>,
    /// Pairs over all nodes.
    len: usize,
    /// Every valid canonical image of the workloads and extras, whether or
    /// not a node is targeted, so the status shows what was resolved.
    pub images: BTreeSet<String>,
    /// Unparseable references, each once; they do not stop the others.
    pub invalid_images: Vec<ImageRefError>,
}

/// A Prefetch over `defaults.max_pairs_per_prefetch`: its status message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "too many (node, image) pairs: more than {limit}, the limit per Prefetch (defaults.max_pairs_per_prefetch); select fewer images or nodes"
)]
pub struct TooManyPairs {
    pub limit: usize,
}

/// A toleration of every taint (empty key + Exists).
pub fn tolerate_everything() -> Toleration {
    Toleration {
        operator: Some("Exists".to_string()),
        ..Toleration::default()
    }
}

/// Plans the pairs of one Prefetch.
///
/// For every node passing `targeting`: each workload whose scheduling allows
/// the node (when `respect_scheduling`) contributes its images, pulled in its
/// namespace with its secrets, service account and tolerations; then every
/// extra image is added in `extra.namespace` with `extra`'s secrets on the
/// nodes whose taints the Prefetch's own `targeting.tolerations` tolerate. With `tolerate_all_taints` each pull pod gets one
/// toleration of everything instead. When two sources give the same pair the
/// first wins: workloads in the given order, then extras.
///
/// The targeted nodes ([`DesiredSet::nodes`]) are those passing targeting
/// that have or could have pairs: a workload allowed on it, or valid extra
/// images allowed there; with neither workloads nor extra images, every
/// targeted node.
pub fn desired_pulls(
    nodes: &[NodeView],
    workloads: &[WorkloadImages],
    extra: &ExtraImages,
    targeting: &NodeTargeting,
    respect_scheduling: bool,
    tolerate_all_taints: bool,
) -> DesiredSet {
    let planner = Planner::new(
        workloads.iter(),
        extra,
        targeting.clone(),
        respect_scheduling,
        tolerate_all_taints,
    );
    planner.plan(nodes.iter())
}

/// A workload as planning needs it, its references normalised once.
#[derive(Debug, Clone)]
struct PlannedSource {
    settings: Arc<PullSettings>,
    scheduling: Option<SchedulingConstraints>,
    /// Shared by every pair of the image (see the module's comment).
    images: Vec<Arc<str>>,
}

/// One Prefetch's planning inputs, prepared once per spec or workload change
/// so that a node event plans that node alone ([`Planner::plan_node`]).
#[derive(Debug, Clone)]
pub struct Planner {
    /// Workloads first, then the extras (whose scheduling is `None`).
    sources: Vec<PlannedSource>,
    has_workloads: bool,
    has_extras: bool,
    targeting: NodeTargeting,
    images: BTreeSet<String>,
    invalid_images: Vec<ImageRefError>,
}

impl Planner {
    /// See [`desired_pulls`] for the rules.
    pub fn new<'a>(
        workloads: impl IntoIterator<Item = &'a WorkloadImages>,
        extra: &ExtraImages,
        targeting: NodeTargeting,
        respect_scheduling: bool,
        tolerate_all_taints: bool,
    ) -> Self {
        let mut images = BTreeSet::new();
        let mut invalid_images = Vec::new();
        let mut seen_invalid = BTreeSet::new();
        // One allocation per distinct image, whichever sources name it.
        let mut interned: BTreeMap<String, Arc<str>> = BTreeMap::new();
        let mut canonical = |raws: &[String]| {
            let mut out: Vec<Arc<str>> = Vec::new();
            for raw in raws {
                match normalize(raw) {
                    Ok(image) => {
                        images.insert(image.clone());
                        let shared = interned
                            .entry(image)
                            .or_insert_with_key(|image| Arc::from(image.as_str()))
                            .clone();
                        if !out.contains(&shared) {
                            out.push(shared);
                        }
                    }
                    Err(error) => {
                        if seen_invalid.insert(error.reference.clone()) {
                            invalid_images.push(error);
                        }
                    }
                }
            }
            out
        };
        let tolerations_for = |own: &[Toleration]| {
            if tolerate_all_taints {
                vec![tolerate_everything()]
            } else {
                own.to_vec()
            }
        };
        let mut sources = Vec::new();
        for workload in workloads {
            sources.push(PlannedSource {
                settings: Arc::new(PullSettings {
                    namespace: workload.namespace.clone(),
                    image_pull_secrets: workload.image_pull_secrets.clone(),
                    service_account: workload.service_account.clone(),
                    tolerations: tolerations_for(&workload.scheduling.tolerations),
                }),
                scheduling: respect_scheduling.then(|| workload.scheduling.clone()),
                images: canonical(&workload.images),
            });
        }
        let has_workloads = !sources.is_empty();
        let extra_images = canonical(&extra.images);
        let has_extras = !extra_images.is_empty();
        if has_extras {
            sources.push(PlannedSource {
                settings: Arc::new(PullSettings {
                    namespace: extra.namespace.clone(),
                    image_pull_secrets: extra.image_pull_secrets.clone(),
                    service_account: None,
                    // The Prefetch's own images have no workload to follow:
                    // its own tolerations decide which tainted nodes they go
                    // to.
                    tolerations: tolerations_for(&targeting.tolerations),
                }),
                scheduling: None,
                images: extra_images,
            });
        }
        Planner {
            sources,
            has_workloads,
            has_extras,
            targeting,
            images,
            invalid_images,
        }
    }

    /// The pairs of one node, or `None` when the node is not counted as
    /// targeted (see [`desired_pulls`]).
    pub fn plan_node(&self, node: &NodeView) -> Option<Vec<PullTarget>> {
        if !self.targeting.targets(node) {
            return None;
        }
        let mut any_allowed = false;
        let own_images_allowed = self.has_extras && self.targeting.allows_own_images(node);
        let workload_count = self.sources.len() - usize::from(self.has_extras);
        let node_name: Arc<str> = Arc::from(node.name.as_str());
        let mut pairs: Vec<PullTarget> = Vec::new();
        for (index, source) in self.sources.iter().enumerate() {
            let allowed = if index >= workload_count {
                own_images_allowed
            } else {
                source
                    .scheduling
                    .as_ref()
                    .is_none_or(|scheduling| scheduling.allows(node))
            };
            if !allowed {
                continue;
            }
            any_allowed = true;
            for image in &source.images {
                // First source wins; a node has at most a few dozen pairs.
                if pairs.iter().any(|pair| pair.image == *image) {
                    continue;
                }
                pairs.push(PullTarget {
                    node: node_name.clone(),
                    image: image.clone(),
                    settings: source.settings.clone(),
                });
            }
        }
        let nothing_to_pull = !self.has_workloads && !self.has_extras;
        (any_allowed || nothing_to_pull).then_some(pairs)
    }

    /// [`Planner::plan_node`], with the reason when it gives `node` nothing:
    /// the Prefetch's own targeting first, then the sources' constraints
    /// (the first source's reason when none allows the node).
    pub fn plan_or_skip(&self, node: &NodeView) -> Result<Vec<PullTarget>, SkipReason> {
        if let Some(reason) = self.targeting.refusal(node) {
            return Err(reason);
        }
        if let Some(pairs) = self.plan_node(node) {
            return Ok(pairs);
        }
        let workload_count = self.sources.len() - usize::from(self.has_extras);
        let reason = self.sources.iter().enumerate().find_map(|(index, source)| {
            if index >= workload_count {
                // Own images: targeted already, so a taint refused them.
                Some(SkipReason::TaintNotTolerated)
            } else {
                source
                    .scheduling
                    .as_ref()
                    .and_then(|scheduling| scheduling.refusal(node))
            }
        });
        // Every source refused the node, so one of them gave a reason.
        Err(reason.unwrap_or(SkipReason::TaintNotTolerated))
    }

    /// The whole desired set over `nodes`.
    pub fn plan<'a>(&self, nodes: impl IntoIterator<Item = &'a NodeView>) -> DesiredSet {
        self.plan_within(nodes, usize::MAX).0
    }

    /// Like [`Planner::plan`], but gives up as soon as the set holds more
    /// than `limit` pairs: then no pair and no node is planned (the images
    /// are still resolved, for the status). Building a million pairs only
    /// to refuse them would cost the memory the limit protects.
    pub fn plan_within<'a>(
        &self,
        nodes: impl IntoIterator<Item = &'a NodeView>,
        limit: usize,
    ) -> (DesiredSet, Option<TooManyPairs>) {
        let mut desired = DesiredSet {
            images: self.images.clone(),
            invalid_images: self.invalid_images.clone(),
            ..DesiredSet::default()
        };
        for node in nodes {
            let plan = self.plan_node(node);
            desired.replace_node(&node.name, plan);
            if desired.len() > limit {
                desired.clear_pairs();
                return (desired, Some(TooManyPairs { limit }));
            }
        }
        (desired, None)
    }

    /// Every valid canonical image of the sources.
    pub fn images(&self) -> &BTreeSet<String> {
        &self.images
    }

    pub fn invalid_images(&self) -> &[ImageRefError] {
        &self.invalid_images
    }
}

impl DesiredSet {
    /// Replaces the pairs of `node` with `plan` (`None`: not targeted).
    /// Costs the node's own pairs, not the whole set. Returns whether
    /// anything changed (most node events, image list updates of a node
    /// already served, change nothing here).
    pub fn replace_node(&mut self, node: &str, plan: Option<Vec<PullTarget>>) -> bool {
        let old = self.by_node.remove_entry(node);
        let old_len = old.as_ref().map_or(0, |(_, pairs)| pairs.len());
        self.len -= old_len;
        let Some(mut targets) = plan else {
            return old.is_some();
        };
        // Keep the node's name allocation: the tracker's keys share it.
        let name = match (&old, targets.first()) {
            (Some((name, _)), _) => name.clone(),
            (None, Some(first)) => first.node.clone(),
            (None, None) => Arc::from(node),
        };
        targets.sort_by(|a, b| a.image.cmp(&b.image));
        let pairs: Box<[NodePair]> = targets
            .into_iter()
            .map(|target| NodePair {
                image: target.image,
                settings: target.settings,
            })
            .collect();
        let changed = old.is_none_or(|(_, old)| old != pairs);
        self.len += pairs.len();
        self.by_node.insert(name, pairs);
        changed
    }

    /// Adds one pair (its node becomes targeted), replacing the same pair.
    /// Planning goes node by node ([`DesiredSet::replace_node`]); this is
    /// for sets built by hand (tests, benchmarks).
    pub fn insert(&mut self, target: PullTarget) {
        let mut targets: Vec<PullTarget> = self
            .node_targets(&target.node)
            .filter(|old| old.image != target.image)
            .collect();
        let node = target.node.clone();
        targets.push(target);
        self.replace_node(&node, Some(targets));
    }

    /// Drops every pair and targeted node; the images stay resolved.
    pub fn clear_pairs(&mut self) {
        self.by_node.clear();
        self.len = 0;
    }

    /// How many pairs.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, key: &PairKey) -> bool {
        self.node_pair(key).is_some()
    }

    /// The pull of one pair, when desired.
    pub fn target(&self, key: &PairKey) -> Option<PullTarget> {
        let (node, pair) = self.node_pair(key)?;
        Some(PullTarget {
            node: node.clone(),
            image: pair.image.clone(),
            settings: pair.settings.clone(),
        })
    }

    fn node_pair(&self, key: &PairKey) -> Option<(&Arc<str>, &NodePair)> {
        let (node, pairs) = self.by_node.get_key_value(&*key.node)?;
        let at = pairs
            .binary_search_by(|pair| pair.image.cmp(&key.image))
            .ok()?;
        Some((node, pairs.get(at)?))
    }

    /// Every pair, by node then image.
    pub fn keys(&self) -> impl Iterator<Item = PairKey> + '_ {
        self.by_node.iter().flat_map(|(node, pairs)| {
            pairs.iter().map(move |pair| PairKey {
                node: node.clone(),
                image: pair.image.clone(),
            })
        })
    }

    /// Every pair with its pull, by node then image.
    pub fn targets(&self) -> impl Iterator<Item = PullTarget> + '_ {
        self.by_node.iter().flat_map(|(node, pairs)| {
            pairs.iter().map(move |pair| PullTarget {
                node: node.clone(),
                image: pair.image.clone(),
                settings: pair.settings.clone(),
            })
        })
    }

    /// The keys of one node's pairs, by image.
    pub fn node_keys<'a>(&'a self, node: &str) -> impl Iterator<Item = PairKey> + 'a {
        self.node_targets(node).map(|target| target.key())
    }

    fn node_targets<'a>(&'a self, node: &str) -> impl Iterator<Item = PullTarget> + 'a {
        self.by_node
            .get_key_value(node)
            .into_iter()
            .flat_map(|(node, pairs)| {
                pairs.iter().map(move |pair| PullTarget {
                    node: node.clone(),
                    image: pair.image.clone(),
                    settings: pair.settings.clone(),
                })
            })
    }

    /// The images of one node's pairs, sorted.
    pub fn node_images<'a>(
        &'a self,
        node: &str,
    ) -> impl ExactSizeIterator<Item = &'a Arc<str>> + Clone + 'a {
        self.by_node
            .get(node)
            .map_or(&[][..], |pairs| &pairs[..])
            .iter()
            .map(|pair| &pair.image)
    }

    /// The shared name of a targeted node.
    pub fn node_name(&self, node: &str) -> Option<&Arc<str>> {
        self.by_node.get_key_value(node).map(|(name, _)| name)
    }

    /// The targeted nodes (see [`desired_pulls`]), by name.
    pub fn nodes(&self) -> impl Iterator<Item = &str> + '_ {
        self.by_node.keys().map(|node| &**node)
    }

    pub fn node_count(&self) -> usize {
        self.by_node.len()
    }

    pub fn targets_node(&self, node: &str) -> bool {
        self.by_node.contains_key(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::WorkloadKind;
    use k8s_openapi::api::core::v1::Taint;

    fn node(name: &str, labels: &[(&str, &str)]) -> NodeView {
        NodeView {
            name: name.to_string(),
            labels: labels
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
            ready: true,
            ..NodeView::default()
        }
    }

    fn workload(namespace: &str, name: &str, images: &[&str]) -> WorkloadImages {
        WorkloadImages {
            kind: WorkloadKind::Deployment,
            namespace: namespace.to_string(),
            name: name.to_string(),
            images: images.iter().map(|image| image.to_string()).collect(),
            scheduling: SchedulingConstraints::default(),
            image_pull_secrets: vec![format!("{name}-secret")],
            service_account: Some(format!("{name}-sa")),
        }
    }

    fn no_extra() -> ExtraImages {
        extra(&[])
    }

    fn extra(images: &[&str]) -> ExtraImages {
        ExtraImages {
            images: images.iter().map(|image| image.to_string()).collect(),
            namespace: "pf-ns".into(),
            image_pull_secrets: vec!["pf-secret".into()],
        }
    }

    fn workers() -> NodeTargeting {
        NodeTargeting {
            node_filter: Some("worker".into()),
            ..NodeTargeting::default()
        }
    }

    fn keys(desired: &DesiredSet) -> Vec<(String, String)> {
        desired
            .keys()
            .map(|key| (key.node.to_string(), key.image.to_string()))
            .collect()
    }

    fn pair(node: &str, image: &str) -> (String, String) {
        (node.to_string(), image.to_string())
    }

    #[test]
    fn article_sample_nginx_on_workers() {
        let nodes = [
            node("kind-control-plane", &[]),
            node("kind-worker", &[]),
            node("kind-worker2", &[]),
        ];
        let desired = desired_pulls(
            &nodes,
            &[workload("default", "nginx", &["nginx:1.7.9"])],
            &no_extra(),
            &workers(),
            true,
            false,
        );
        let nginx = "docker.io/library/nginx:1.7.9";
        assert_eq!(
            keys(&desired),
            vec![pair("kind-worker", nginx), pair("kind-worker2", nginx)]
        );
        assert_eq!(
            desired.nodes().collect::<Vec<_>>(),
            vec!["kind-worker", "kind-worker2"]
        );
        assert_eq!(desired.images, BTreeSet::from([nginx.to_string()]));
        assert!(desired.invalid_images.is_empty());

        let target = desired
            .target(&PairKey::new("kind-worker", nginx))
            .expect("desired");
        assert_eq!(target.settings.namespace, "default");
        assert_eq!(target.settings.image_pull_secrets, vec!["nginx-secret"]);
        assert_eq!(target.settings.service_account.as_deref(), Some("nginx-sa"));
        assert!(target.settings.tolerations.is_empty());
        assert_eq!(target.key(), PairKey::new("kind-worker", nginx));
    }

    #[test]
    fn scheduling_limits_nodes_per_workload() {
        let nodes = [
            node("worker-ssd", &[("disk", "ssd")]),
            node("worker-hdd", &[]),
        ];
        let mut ssd_only = workload("apps", "db", &["postgres:16"]);
        ssd_only.scheduling.node_selector =
            BTreeMap::from([("disk".to_string(), "ssd".to_string())]);
        let anywhere = workload("apps", "web", &["nginx"]);
        let workloads = [ssd_only.clone(), anywhere];

        let respected = desired_pulls(&nodes, &workloads, &no_extra(), &workers(), true, false);
        assert_eq!(
            keys(&respected),
            vec![
                pair("worker-hdd", "docker.io/library/nginx:latest"),
                pair("worker-ssd", "docker.io/library/nginx:latest"),
                pair("worker-ssd", "docker.io/library/postgres:16"),
            ]
        );
        assert_eq!(respected.node_count(), 2);

        let ignored = desired_pulls(&nodes, &workloads, &no_extra(), &workers(), false, false);
        assert_eq!(ignored.len(), 4);

        // A node no workload can use is not counted as targeted.
        let only_ssd = desired_pulls(&nodes, &[ssd_only], &no_extra(), &workers(), true, false);
        assert_eq!(only_ssd.nodes().collect::<Vec<_>>(), vec!["worker-ssd"]);
    }

    #[test]
    fn taints_and_tolerations() {
        let mut tainted = node("worker-gpu", &[]);
        tainted.taints = vec![Taint {
            key: "gpu".into(),
            value: Some("true".into()),
            effect: "NoSchedule".into(),
            time_added: None,
        }];
        let nodes = [tainted, node("worker-1", &[])];
        let workloads = [workload("apps", "web", &["nginx"])];

        let respected = desired_pulls(&nodes, &workloads, &no_extra(), &workers(), true, false);
        assert_eq!(respected.len(), 1);
        assert_eq!(respected.nodes().collect::<Vec<_>>(), vec!["worker-1"]);

        // Tolerating all taints is about the pull pod, not about planning.
        let all = desired_pulls(&nodes, &workloads, &no_extra(), &workers(), true, true);
        assert_eq!(all.len(), 1);
        let target = all.targets().next().expect("one pair");
        assert_eq!(target.settings.tolerations, vec![tolerate_everything()]);

        let unrestricted = desired_pulls(&nodes, &workloads, &no_extra(), &workers(), false, true);
        assert_eq!(unrestricted.len(), 2);
    }

    #[test]
    fn workload_tolerations_are_copied() {
        let mut gpu_workload = workload("apps", "train", &["trainer:1"]);
        gpu_workload.scheduling.tolerations = vec![Toleration {
            key: Some("gpu".into()),
            operator: Some("Exists".into()),
            ..Toleration::default()
        }];
        let desired = desired_pulls(
            &[node("worker-1", &[])],
            std::slice::from_ref(&gpu_workload),
            &no_extra(),
            &workers(),
            true,
            false,
        );
        let target = desired.targets().next().expect("one pair");
        assert_eq!(
            target.settings.tolerations,
            gpu_workload.scheduling.tolerations
        );
    }

    #[test]
    fn extras_go_to_every_targeted_node() {
        let mut ssd_only = workload("apps", "db", &["postgres:16"]);
        ssd_only.scheduling.node_selector =
            BTreeMap::from([("disk".to_string(), "ssd".to_string())]);
        let nodes = [
            node("worker-ssd", &[("disk", "ssd")]),
            node("worker-hdd", &[]),
            node("master", &[]),
        ];
        let desired = desired_pulls(
            &nodes,
            &[ssd_only],
            &extra(&["busybox:1.36"]),
            &workers(),
            true,
            true,
        );
        let busybox = "docker.io/library/busybox:1.36";
        assert_eq!(
            keys(&desired),
            vec![
                pair("worker-hdd", busybox),
                pair("worker-ssd", busybox),
                pair("worker-ssd", "docker.io/library/postgres:16"),
            ]
        );
        let target = desired
            .target(&PairKey::new("worker-hdd", busybox))
            .expect("desired");
        assert_eq!(target.settings.namespace, "pf-ns");
        assert_eq!(target.settings.image_pull_secrets, vec!["pf-secret"]);
        assert_eq!(target.settings.service_account, None);
        assert_eq!(target.settings.tolerations, vec![tolerate_everything()]);
        assert_eq!(desired.node_count(), 2, "both workers have extras to pull");
    }

    #[test]
    fn first_source_wins_for_duplicate_pairs() {
        let first = workload("team-a", "one", &["nginx:1.7.9"]);
        let second = workload("team-b", "two", &["docker.io/library/nginx:1.7.9"]);
        let desired = desired_pulls(
            &[node("worker-1", &[])],
            &[first, second],
            &extra(&["index.docker.io/library/nginx:1.7.9"]),
            &workers(),
            true,
            false,
        );
        assert_eq!(desired.len(), 1);
        let target = desired.targets().next().expect("one pair");
        assert_eq!(target.settings.namespace, "team-a");
        assert_eq!(target.settings.service_account.as_deref(), Some("one-sa"));

        // Extras lose to workloads, whatever the order of declaration.
        let desired = desired_pulls(
            &[node("worker-1", &[])],
            &[workload("team-b", "two", &["nginx:1.7.9"])],
            &extra(&["nginx:1.7.9"]),
            &workers(),
            true,
            false,
        );
        let target = desired.targets().next().expect("one pair");
        assert_eq!(target.settings.namespace, "team-b");
    }

    #[test]
    fn invalid_references_are_collected_once() {
        let desired = desired_pulls(
            &[node("worker-1", &[])],
            &[
                workload("a", "one", &["Bad Image", "nginx"]),
                workload("a", "two", &["Bad Image"]),
            ],
            &extra(&["UPPER:1", "redis:7"]),
            &workers(),
            true,
            false,
        );
        let invalid: Vec<&str> = desired
            .invalid_images
            .iter()
            .map(|error| error.reference.as_str())
            .collect();
        assert_eq!(invalid, vec!["Bad Image", "UPPER:1"]);
        assert_eq!(
            keys(&desired),
            vec![
                pair("worker-1", "docker.io/library/nginx:latest"),
                pair("worker-1", "docker.io/library/redis:7"),
            ]
        );
    }

    #[test]
    fn untargeted_nodes_and_empty_inputs() {
        let mut cordoned = node("worker-c", &[]);
        cordoned.unschedulable = true;
        let mut not_ready = node("worker-n", &[]);
        not_ready.ready = false;
        let nodes = [cordoned, not_ready, node("worker-1", &[])];

        // No workloads and no extras: the node still counts as targeted.
        let nothing = desired_pulls(&nodes, &[], &no_extra(), &workers(), true, false);
        assert!(nothing.is_empty());
        assert_eq!(nothing.nodes().collect::<Vec<_>>(), vec!["worker-1"]);
        assert!(nothing.images.is_empty());

        // Images are resolved even when no node is targeted.
        let no_nodes = desired_pulls(
            &[],
            &[workload("a", "w", &["nginx"])],
            &no_extra(),
            &workers(),
            true,
            false,
        );
        assert!(no_nodes.is_empty());
        assert!(no_nodes.nodes().next().is_none());
        assert_eq!(
            no_nodes.images,
            BTreeSet::from(["docker.io/library/nginx:latest".to_string()])
        );
    }

    #[test]
    fn node_selector_targeting() {
        let targeting = NodeTargeting {
            node_filter: None,
            node_selector: BTreeMap::from([("pool".to_string(), "edge".to_string())]),
            ..NodeTargeting::default()
        };
        let nodes = [
            node("a", &[("pool", "edge")]),
            node("b", &[("pool", "core")]),
        ];
        let desired = desired_pulls(&nodes, &[], &extra(&["nginx"]), &targeting, true, false);
        assert_eq!(
            keys(&desired),
            vec![pair("a", "docker.io/library/nginx:latest")]
        );
    }

    fn labelled(name: &str, pool: &str) -> NodeView {
        node(name, &[("pool", pool)])
    }

    fn pool_workload(pool: &str, images: &[&str]) -> WorkloadImages {
        let mut w = workload("ns", pool, images);
        w.scheduling.node_selector = [("pool".to_string(), pool.to_string())].into();
        w
    }

    /// A node event re-plans that node alone and ends exactly where a whole
    /// re-plan would: node added, updated (labels move it to another
    /// workload), made unready, deleted.
    #[test]
    fn node_by_node_planning_matches_a_whole_replan() {
        let workloads = vec![
            pool_workload("a", &["nginx:1", "redis:7"]),
            pool_workload("b", &["postgres:16"]),
        ];
        let planner = Planner::new(
            workloads.iter(),
            &extra(&["busybox:1.36"]),
            workers(),
            true,
            false,
        );
        let mut nodes = vec![labelled("worker1", "a"), labelled("worker2", "b")];
        let mut desired = planner.plan(nodes.iter());
        let whole = |nodes: &[NodeView]| {
            desired_pulls(
                nodes,
                &workloads,
                &extra(&["busybox:1.36"]),
                &workers(),
                true,
                false,
            )
        };
        assert_eq!(desired, whole(&nodes));

        // Unchanged: nothing to do for anyone.
        assert!(!desired.replace_node("worker1", planner.plan_node(&nodes[0])));

        // Added.
        let added = labelled("worker3", "a");
        assert!(desired.replace_node(&added.name, planner.plan_node(&added)));
        nodes.push(added);
        assert_eq!(desired, whole(&nodes));
        assert_eq!(desired.node_keys("worker3").count(), 3);

        // Updated: worker1 moves from pool a to pool b.
        nodes[0] = labelled("worker1", "b");
        desired.replace_node("worker1", planner.plan_node(&nodes[0]));
        assert_eq!(desired, whole(&nodes));
        assert_eq!(
            desired
                .node_keys("worker1")
                .map(|key| key.image.to_string())
                .collect::<Vec<_>>(),
            vec![
                "docker.io/library/busybox:1.36",
                "docker.io/library/postgres:16"
            ]
        );

        // Not ready any more: no longer targeted.
        nodes[1].ready = false;
        desired.replace_node("worker2", planner.plan_node(&nodes[1]));
        assert_eq!(desired, whole(&nodes));
        assert!(!desired.targets_node("worker2"));

        // Deleted.
        nodes.remove(2);
        desired.replace_node("worker3", None);
        assert_eq!(desired, whole(&nodes));
        assert_eq!(desired.node_keys("worker3").count(), 0);
    }

    /// A pair owns no string: a node's pairs share its name, an image's
    /// pairs its name, a source's pairs its pull settings.
    #[test]
    fn pairs_share_names_and_settings() {
        let desired = desired_pulls(
            &[node("worker-1", &[]), node("worker-2", &[])],
            &[workload("apps", "web", &["nginx:1", "redis:7"])],
            &no_extra(),
            &workers(),
            true,
            false,
        );
        let targets: Vec<PullTarget> = desired.targets().collect();
        assert_eq!(targets.len(), 4);
        let [a1, a2, b1, _] = &targets[..] else {
            panic!("four pairs: {targets:?}");
        };
        assert!(Arc::ptr_eq(&a1.node, &a2.node), "one name per node");
        assert!(Arc::ptr_eq(&a1.image, &b1.image), "one name per image");
        assert!(
            targets
                .iter()
                .all(|target| Arc::ptr_eq(&target.settings, &a1.settings)),
            "one settings per source"
        );
        assert_eq!(desired.node_name("worker-1"), Some(&a1.node));
    }

    /// A desired pair under its node is two pointers and a length.
    #[test]
    fn a_desired_pair_stays_small() {
        assert_eq!(std::mem::size_of::<NodePair>(), 24);
    }

    #[test]
    fn hand_built_sets_count_pairs_and_nodes() {
        let settings = Arc::new(PullSettings::default());
        let mut desired = DesiredSet::default();
        desired.insert(PullTarget::new("n2", "b", settings.clone()));
        desired.insert(PullTarget::new("n1", "b", settings.clone()));
        desired.insert(PullTarget::new("n1", "a", settings.clone()));
        desired.insert(PullTarget::new("n1", "a", settings.clone()));
        assert_eq!((desired.len(), desired.node_count()), (3, 2));
        assert_eq!(
            keys(&desired),
            vec![pair("n1", "a"), pair("n1", "b"), pair("n2", "b")]
        );
        assert!(desired.contains(&PairKey::new("n1", "b")));
        assert!(!desired.contains(&PairKey::new("n2", "a")));
        assert_eq!(desired.target(&PairKey::new("n3", "a")), None);
        // A targeted node without pairs still counts as targeted.
        assert!(
            desired.replace_node("n1", Some(vec![])),
            "its pairs dropped"
        );
        assert!(desired.targets_node("n1"));
        assert_eq!((desired.len(), desired.node_count()), (1, 2));
        desired.clear_pairs();
        assert!(desired.is_empty() && desired.node_count() == 0);
    }

    #[test]
    fn planning_stops_at_the_pair_limit() {
        let planner = Planner::new(
            [workload("apps", "web", &["nginx:1", "redis:7"])].iter(),
            &no_extra(),
            workers(),
            true,
            false,
        );
        let nodes = [
            node("worker1", &[]),
            node("worker2", &[]),
            node("worker3", &[]),
        ];
        let (within, none) = planner.plan_within(nodes.iter(), 6);
        assert_eq!((within.len(), none), (6, None));
        assert_eq!(within, planner.plan(nodes.iter()));

        let (over, too_many) = planner.plan_within(nodes.iter(), 5);
        assert!(over.is_empty() && over.nodes().next().is_none());
        assert_eq!(over.images.len(), 2, "images still resolved for the status");
        assert_eq!(
            too_many.map(|too_many| too_many.to_string()).as_deref(),
            Some(
                "too many (node, image) pairs: more than 5, the limit per Prefetch (defaults.max_pairs_per_prefetch); select fewer images or nodes"
            )
        );
    }

    #[test]
    fn untargeted_node_plans_nothing() {
        let planner = Planner::new(
            [workload("ns", "w", &["nginx:1"])].iter(),
            &no_extra(),
            workers(),
            true,
            false,
        );
        assert_eq!(planner.plan_node(&node("control", &[])), None);
        assert_eq!(
            planner
                .plan_node(&node("worker1", &[]))
                .map(|pairs| pairs.len()),
            Some(1)
        );
        assert_eq!(
            planner.images().iter().cloned().collect::<Vec<_>>(),
            vec!["docker.io/library/nginx:1"]
        );
        assert!(planner.invalid_images().is_empty());
    }
}
