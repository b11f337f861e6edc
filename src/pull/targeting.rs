//! Which nodes a Prefetch targets, and where a workload's pods could run.
//!
//! Scheduling follows the Kubernetes scheduler's hard constraints only
//! (nodeSelector, required node affinity, NoSchedule/NoExecute taints):
//! prefetching onto a node the workload merely prefers to avoid is harmless,
//! skipping one where it can run is not.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Node, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PodSpec, Taint, Toleration,
};
use serde::Serialize;

use crate::api::PrefetchSpec;
use crate::pull::image::NodeImages;

/// Why a node gets no pull of a Prefetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// The name does not contain `node_filter`.
    NodeFilter,
    /// The labels do not match `node_selector`.
    NodeSelector,
    NotReady,
    /// `spec.unschedulable` (cordoned).
    Cordoned,
    /// No selected workload's `nodeSelector` admits the node.
    WorkloadNodeSelector,
    /// No selected workload's required node affinity admits it.
    WorkloadAffinity,
    /// A NoSchedule/NoExecute taint that neither the workloads nor the
    /// Prefetch's `tolerations` tolerate.
    TaintNotTolerated,
}

impl SkipReason {
    pub fn describe(self) -> &'static str {
        match self {
            SkipReason::NodeFilter => "name does not contain node_filter",
            SkipReason::NodeSelector => "labels do not match node_selector",
            SkipReason::NotReady => "node is NotReady",
            SkipReason::Cordoned => "node is cordoned",
            SkipReason::WorkloadNodeSelector => "no workload's nodeSelector admits it",
            SkipReason::WorkloadAffinity => "no workload's required node affinity admits it",
            SkipReason::TaintNotTolerated => "a taint is not tolerated",
        }
    }
}

/// The parts of a Node that planning needs, so tests and watches can use a
/// small, owned value instead of the full object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    pub ready: bool,
    pub unschedulable: bool,
    /// Every name of every image the kubelet reports
    /// (`status.images[].names`), parsed once for lookups; the names
    /// themselves are not kept (see [`NodeImages`] on memory).
    pub images: NodeImages,
}

impl NodeView {
    pub fn from_node(node: &Node) -> NodeView {
        let spec = node.spec.as_ref();
        let status = node.status.as_ref();
        let ready = status
            .and_then(|status| status.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|condition| condition.type_ == "Ready" && condition.status == "True");
        let image_names: Vec<String> = status
            .and_then(|status| status.images.as_ref())
            .into_iter()
            .flatten()
            .flat_map(|image| image.names.iter().flatten().cloned())
            .collect();
        NodeView {
            name: node.metadata.name.clone().unwrap_or_default(),
            labels: node.metadata.labels.clone().unwrap_or_default(),
            taints: spec
                .and_then(|spec| spec.taints.clone())
                .unwrap_or_default(),
            ready,
            unschedulable: spec.and_then(|spec| spec.unschedulable).unwrap_or(false),
            images: NodeImages::from_names(&image_names),
        }
    }
}

/// The Prefetch's own node targeting: `node_filter`, `node_selector`, and
/// the `tolerations` its own `images` may use.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeTargeting {
    /// Substring of the node name (the original operator's semantics).
    pub node_filter: Option<String>,
    pub node_selector: BTreeMap<String, String>,
    /// Taints the Prefetch's own `images` may be pulled past; workload
    /// images follow their workload's tolerations instead.
    pub tolerations: Vec<Toleration>,
}

impl NodeTargeting {
    pub fn from_spec(spec: &PrefetchSpec) -> Self {
        NodeTargeting {
            node_filter: spec.node_filter.clone(),
            node_selector: spec.node_selector.clone(),
            tolerations: spec.tolerations.clone(),
        }
    }

    /// Whether the Prefetch's own `images` may be pulled on `node`: it is
    /// targeted (so Ready and not cordoned), and the Prefetch tolerates its
    /// NoSchedule/NoExecute taints. Pull pods set `spec.nodeName`, which
    /// bypasses the scheduler, so this check is the only one.
    pub fn allows_own_images(&self, node: &NodeView) -> bool {
        self.targets(node) && taints_tolerated(&node.taints, &self.tolerations)
    }

    /// Name contains the filter (None or "" = any), labels include every
    /// selector pair, and the node is Ready and not cordoned: a pull pod on a
    /// NotReady or cordoned node would only hang until its deadline.
    pub fn targets(&self, node: &NodeView) -> bool {
        self.refusal(node).is_none()
    }

    /// The first of [`NodeTargeting::targets`]' rules that `node` fails.
    pub fn refusal(&self, node: &NodeView) -> Option<SkipReason> {
        let name_ok = self
            .node_filter
            .as_deref()
            .is_none_or(|filter| node.name.contains(filter));
        if !name_ok {
            Some(SkipReason::NodeFilter)
        } else if !labels_match(&self.node_selector, &node.labels) {
            Some(SkipReason::NodeSelector)
        } else if !node.ready {
            Some(SkipReason::NotReady)
        } else if node.unschedulable {
            Some(SkipReason::Cordoned)
        } else {
            None
        }
    }
}

/// A workload's hard scheduling constraints, copied out of its pod template.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchedulingConstraints {
    pub node_selector: BTreeMap<String, String>,
    pub required_node_affinity: Option<NodeSelector>,
    pub tolerations: Vec<Toleration>,
}

impl SchedulingConstraints {
    pub fn from_pod_spec(spec: &PodSpec) -> Self {
        SchedulingConstraints {
            node_selector: spec.node_selector.clone().unwrap_or_default(),
            required_node_affinity: spec
                .affinity
                .as_ref()
                .and_then(|affinity| affinity.node_affinity.as_ref())
                .and_then(|node_affinity| {
                    node_affinity
                        .required_during_scheduling_ignored_during_execution
                        .clone()
                }),
            tolerations: spec.tolerations.clone().unwrap_or_default(),
        }
    }

    /// Whether the scheduler could place the workload's pods on `node`.
    pub fn allows(&self, node: &NodeView) -> bool {
        self.refusal(node).is_none()
    }

    /// The first hard constraint that keeps the workload's pods off `node`.
    pub fn refusal(&self, node: &NodeView) -> Option<SkipReason> {
        if !labels_match(&self.node_selector, &node.labels) {
            Some(SkipReason::WorkloadNodeSelector)
        } else if !self
            .required_node_affinity
            .as_ref()
            .is_none_or(|selector| node_selector_matches(selector, node))
        {
            Some(SkipReason::WorkloadAffinity)
        } else if !taints_tolerated(&node.taints, &self.tolerations) {
            Some(SkipReason::TaintNotTolerated)
        } else {
            None
        }
    }
}

fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

/// Terms are ORed; an empty term list matches nothing, as in Kubernetes.
pub fn node_selector_matches(selector: &NodeSelector, node: &NodeView) -> bool {
    selector
        .node_selector_terms
        .iter()
        .any(|term| term_matches(term, node))
}

/// Expressions and fields are ANDed; a term with neither matches nothing
/// (Kubernetes: "a null or empty node selector term matches no objects").
fn term_matches(term: &NodeSelectorTerm, node: &NodeView) -> bool {
    let expressions = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if expressions.is_empty() && fields.is_empty() {
        return false;
    }
    expressions
        .iter()
        .all(|requirement| label_requirement_matches(requirement, &node.labels))
        && fields
            .iter()
            .all(|requirement| field_requirement_matches(requirement, node))
}

fn label_requirement_matches(
    requirement: &NodeSelectorRequirement,
    labels: &BTreeMap<String, String>,
) -> bool {
    let values = requirement.values.as_deref().unwrap_or_default();
    let label = labels.get(&requirement.key);
    match requirement.operator.as_str() {
        "In" => label.is_some_and(|value| values.contains(value)),
        "NotIn" => label.is_none_or(|value| !values.contains(value)),
        "Exists" => label.is_some(),
        "DoesNotExist" => label.is_none(),
        // Gt/Lt need exactly one integer value and an integer label.
        "Gt" | "Lt" => {
            let [bound] = values else {
                return false;
            };
            let (Some(label), Ok(bound)) = (label, bound.parse::<i64>()) else {
                return false;
            };
            let Ok(label) = label.parse::<i64>() else {
                return false;
            };
            if requirement.operator == "Gt" {
                label > bound
            } else {
                label < bound
            }
        }
        // An operator we do not know cannot be proven satisfied.
        _ => false,
    }
}

/// Only `metadata.name` with In/NotIn is valid in matchFields.
fn field_requirement_matches(requirement: &NodeSelectorRequirement, node: &NodeView) -> bool {
    if requirement.key != "metadata.name" {
        return false;
    }
    let values = requirement.values.as_deref().unwrap_or_default();
    match requirement.operator.as_str() {
        "In" => values.contains(&node.name),
        "NotIn" => !values.contains(&node.name),
        _ => false,
    }
}

/// Every NoSchedule/NoExecute taint needs a matching toleration;
/// PreferNoSchedule is a preference and does not block scheduling.
pub fn taints_tolerated(taints: &[Taint], tolerations: &[Toleration]) -> bool {
    taints
        .iter()
        .filter(|taint| matches!(taint.effect.as_str(), "NoSchedule" | "NoExecute"))
        .all(|taint| {
            tolerations
                .iter()
                .any(|toleration| toleration_tolerates(toleration, taint))
        })
}

/// Kubernetes toleration semantics: an empty effect matches every effect, an
/// empty key matches every key (valid only with Exists), the operator
/// defaults to Equal, and a missing value equals the empty value.
pub fn toleration_tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect = toleration.effect.as_deref().unwrap_or_default();
    if !effect.is_empty() && effect != taint.effect {
        return false;
    }
    let key = toleration.key.as_deref().unwrap_or_default();
    if !key.is_empty() && key != taint.key {
        return false;
    }
    let toleration_value = toleration.value.as_deref().unwrap_or_default();
    let taint_value = taint.value.as_deref().unwrap_or_default();
    match toleration.operator.as_deref().unwrap_or_default() {
        "" | "Equal" => toleration_value == taint_value,
        "Exists" => true,
        // Alpha numeric operators (TaintTolerationComparisonOperators):
        // `Gt v` tolerates taint values above v, `Lt v` values below v.
        "Gt" | "Lt" => {
            let (Ok(taint_number), Ok(bound)) =
                (taint_value.parse::<i64>(), toleration_value.parse::<i64>())
            else {
                return false;
            };
            if toleration.operator.as_deref() == Some("Gt") {
                taint_number > bound
            } else {
                taint_number < bound
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Affinity, ContainerImage, NodeAffinity, NodeCondition, NodeSpec, NodeStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    fn node(name: &str) -> NodeView {
        NodeView {
            name: name.to_string(),
            ready: true,
            ..NodeView::default()
        }
    }

    fn taint(key: &str, value: Option<&str>, effect: &str) -> Taint {
        Taint {
            key: key.to_string(),
            value: value.map(str::to_string),
            effect: effect.to_string(),
            time_added: None,
        }
    }

    fn toleration(
        key: Option<&str>,
        operator: Option<&str>,
        value: Option<&str>,
        effect: Option<&str>,
    ) -> Toleration {
        Toleration {
            key: key.map(str::to_string),
            operator: operator.map(str::to_string),
            value: value.map(str::to_string),
            effect: effect.map(str::to_string),
            toleration_seconds: None,
        }
    }

    fn requirement(key: &str, operator: &str, values: &[&str]) -> NodeSelectorRequirement {
        NodeSelectorRequirement {
            key: key.to_string(),
            operator: operator.to_string(),
            values: if values.is_empty() {
                None
            } else {
                Some(values.iter().map(|value| value.to_string()).collect())
            },
        }
    }

    fn term(
        expressions: Vec<NodeSelectorRequirement>,
        fields: Vec<NodeSelectorRequirement>,
    ) -> NodeSelectorTerm {
        NodeSelectorTerm {
            match_expressions: Some(expressions),
            match_fields: Some(fields),
        }
    }

    fn affinity(terms: Vec<NodeSelectorTerm>) -> SchedulingConstraints {
        SchedulingConstraints {
            required_node_affinity: Some(NodeSelector {
                node_selector_terms: terms,
            }),
            ..SchedulingConstraints::default()
        }
    }

    #[test]
    fn node_view_from_node() {
        let node = Node {
            metadata: ObjectMeta {
                name: Some("worker-1".into()),
                labels: Some(labels(&[("zone", "a")])),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                taints: Some(vec![taint("gpu", Some("yes"), "NoSchedule")]),
                unschedulable: Some(true),
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                conditions: Some(vec![
                    NodeCondition {
                        type_: "MemoryPressure".into(),
                        status: "False".into(),
                        ..NodeCondition::default()
                    },
                    NodeCondition {
                        type_: "Ready".into(),
                        status: "True".into(),
                        ..NodeCondition::default()
                    },
                ]),
                images: Some(vec![
                    ContainerImage {
                        names: Some(vec!["nginx:1.7.9".into(), "nginx@sha256:abc".into()]),
                        size_bytes: Some(1),
                    },
                    ContainerImage {
                        names: None,
                        size_bytes: Some(2),
                    },
                    ContainerImage {
                        names: Some(vec!["registry.k8s.io/pause:3.10".into()]),
                        size_bytes: None,
                    },
                ]),
                ..NodeStatus::default()
            }),
        };
        let view = NodeView::from_node(&node);
        assert_eq!(view.name, "worker-1");
        assert_eq!(view.labels, labels(&[("zone", "a")]));
        assert_eq!(view.taints.len(), 1);
        assert!(view.ready);
        assert!(view.unschedulable);
        // `nginx@sha256:abc` is no valid digest: ignored.
        assert_eq!(view.images.len(), 2);
        for image in [
            "docker.io/library/nginx:1.7.9",
            "registry.k8s.io/pause:3.10",
        ] {
            assert!(view.images.contains(image), "{image}");
        }
        assert!(!view.images.contains("docker.io/library/nginx:1.8"));
    }

    #[test]
    fn node_view_defaults_for_bare_node() {
        let view = NodeView::from_node(&Node::default());
        assert_eq!(view, NodeView::default());
        let not_ready = Node {
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "Unknown".into(),
                    ..NodeCondition::default()
                }]),
                ..NodeStatus::default()
            }),
            ..Node::default()
        };
        assert!(!NodeView::from_node(&not_ready).ready);
    }

    #[test]
    fn targeting_by_name_filter() {
        let any = NodeTargeting::default();
        let empty = NodeTargeting {
            node_filter: Some(String::new()),
            ..NodeTargeting::default()
        };
        let workers = NodeTargeting {
            node_filter: Some("worker".into()),
            ..NodeTargeting::default()
        };
        assert!(any.targets(&node("control-plane")));
        assert!(empty.targets(&node("control-plane")));
        assert!(workers.targets(&node("kind-worker2")));
        assert!(workers.targets(&node("worker")));
        assert!(!workers.targets(&node("kind-control-plane")));
        assert!(
            !workers.targets(&node("kind-Worker")),
            "case-sensitive like the original"
        );
    }

    #[test]
    fn targeting_by_selector_ready_and_cordon() {
        let targeting = NodeTargeting {
            node_filter: None,
            node_selector: labels(&[("pool", "gpu"), ("zone", "a")]),
            ..NodeTargeting::default()
        };
        let mut gpu = node("n1");
        gpu.labels = labels(&[("pool", "gpu"), ("zone", "a"), ("extra", "x")]);
        assert!(targeting.targets(&gpu));

        let mut partial = gpu.clone();
        partial.labels.remove("zone");
        assert!(!targeting.targets(&partial));

        let mut wrong_value = gpu.clone();
        wrong_value.labels.insert("zone".into(), "b".into());
        assert!(!targeting.targets(&wrong_value));

        let mut not_ready = gpu.clone();
        not_ready.ready = false;
        assert!(!targeting.targets(&not_ready));

        let mut cordoned = gpu.clone();
        cordoned.unschedulable = true;
        assert!(!targeting.targets(&cordoned));
    }

    #[test]
    fn own_images_respect_taints_and_readiness() {
        let targeting = NodeTargeting::default();
        let control_plane = NodeView {
            taints: vec![taint(
                "node-role.kubernetes.io/control-plane",
                None,
                "NoSchedule",
            )],
            ..node("sim-1-control-plane")
        };
        let worker = node("sim-1-worker");
        let not_ready = NodeView {
            ready: false,
            ..node("sim-1-worker2")
        };
        let evicting = NodeView {
            taints: vec![taint("maintenance", Some("now"), "NoExecute")],
            ..node("sim-1-worker3")
        };
        let preferring = NodeView {
            taints: vec![taint("spot", Some("true"), "PreferNoSchedule")],
            ..node("sim-1-worker4")
        };
        assert!(targeting.allows_own_images(&worker));
        assert!(targeting.allows_own_images(&preferring));
        assert!(!targeting.allows_own_images(&control_plane));
        assert!(!targeting.allows_own_images(&not_ready));
        assert!(!targeting.allows_own_images(&evicting));

        // The opt-in: tolerations on the Prefetch.
        let opted_in = NodeTargeting {
            tolerations: vec![toleration(
                Some("node-role.kubernetes.io/control-plane"),
                Some("Exists"),
                None,
                Some("NoSchedule"),
            )],
            ..NodeTargeting::default()
        };
        assert!(opted_in.allows_own_images(&control_plane));
        assert!(!opted_in.allows_own_images(&evicting));
        assert!(
            !opted_in.allows_own_images(&NodeView {
                ready: false,
                ..control_plane.clone()
            }),
            "a toleration never makes a NotReady node a target"
        );
    }

    /// The plan of a Prefetch with only `images`: no pull pod on a tainted
    /// or NotReady node unless its tolerations opt in, and then the pull
    /// pods carry them.
    #[test]
    fn images_only_prefetch_plans_no_pull_on_tainted_or_not_ready_nodes() {
        use crate::pull::plan::{ExtraImages, desired_pulls};
        let control_plane = NodeView {
            taints: vec![taint(
                "node-role.kubernetes.io/control-plane",
                None,
                "NoSchedule",
            )],
            ..node("sim-1-control-plane")
        };
        let not_ready = NodeView {
            ready: false,
            ..node("sim-1-worker2")
        };
        let nodes = [control_plane, node("sim-1-worker"), not_ready];
        let images = ExtraImages {
            images: vec!["busybox:1.36".into()],
            namespace: "team".into(),
            image_pull_secrets: Vec::new(),
        };
        let planned = |targeting: &NodeTargeting, tolerate_all: bool| {
            let desired = desired_pulls(&nodes, &[], &images, targeting, true, tolerate_all);
            let pairs: Vec<(String, Vec<Toleration>)> = desired
                .targets()
                .map(|target| (target.node.to_string(), target.settings.tolerations.clone()))
                .collect();
            let targeted: Vec<String> = desired.nodes().map(str::to_string).collect();
            (pairs, targeted)
        };

        let (pairs, targeted) = planned(&NodeTargeting::default(), false);
        assert_eq!(pairs, vec![("sim-1-worker".to_string(), vec![])]);
        assert_eq!(targeted, vec!["sim-1-worker"]);
        // tolerate_all_taints shapes the pull pod, not where it goes.
        let (pairs, _) = planned(&NodeTargeting::default(), true);
        assert_eq!(pairs.len(), 1);

        let control_plane_toleration = toleration(
            Some("node-role.kubernetes.io/control-plane"),
            Some("Exists"),
            None,
            Some("NoSchedule"),
        );
        let opted_in = NodeTargeting {
            tolerations: vec![control_plane_toleration.clone()],
            ..NodeTargeting::default()
        };
        let (pairs, targeted) = planned(&opted_in, false);
        assert_eq!(
            pairs,
            vec![
                (
                    "sim-1-control-plane".to_string(),
                    vec![control_plane_toleration.clone()]
                ),
                ("sim-1-worker".to_string(), vec![control_plane_toleration]),
            ]
        );
        assert_eq!(targeted, vec!["sim-1-control-plane", "sim-1-worker"]);
    }

    #[test]
    fn targeting_from_spec() {
        let spec = PrefetchSpec {
            node_filter: Some("worker".into()),
            node_selector: labels(&[("zone", "a")]),
            tolerations: vec![toleration(None, Some("Exists"), None, None)],
            ..PrefetchSpec::default()
        };
        assert_eq!(
            NodeTargeting::from_spec(&spec),
            NodeTargeting {
                node_filter: Some("worker".into()),
                node_selector: labels(&[("zone", "a")]),
                tolerations: vec![toleration(None, Some("Exists"), None, None)],
            }
        );
    }

    #[test]
    fn scheduling_node_selector() {
        let constraints = SchedulingConstraints {
            node_selector: labels(&[("disk", "ssd")]),
            ..SchedulingConstraints::default()
        };
        let mut ssd = node("n1");
        ssd.labels = labels(&[("disk", "ssd")]);
        assert!(constraints.allows(&ssd));
        assert!(!constraints.allows(&node("n2")));
        assert!(SchedulingConstraints::default().allows(&node("n2")));
    }

    #[test]
    fn toleration_matrix() {
        let no_schedule = taint("dedicated", Some("gpu"), "NoSchedule");
        let cases = [
            // (toleration, tolerates?)
            (toleration(None, Some("Exists"), None, None), true),
            (
                toleration(Some("dedicated"), Some("Exists"), None, None),
                true,
            ),
            (
                toleration(Some("dedicated"), Some("Equal"), Some("gpu"), None),
                true,
            ),
            (toleration(Some("dedicated"), None, Some("gpu"), None), true),
            (
                toleration(Some("dedicated"), None, Some("gpu"), Some("NoSchedule")),
                true,
            ),
            (
                toleration(Some("dedicated"), None, Some("gpu"), Some("NoExecute")),
                false,
            ),
            (
                toleration(Some("dedicated"), None, Some("cpu"), None),
                false,
            ),
            (toleration(Some("dedicated"), None, None, None), false),
            (toleration(Some("other"), Some("Exists"), None, None), false),
            (
                toleration(None, Some("Exists"), None, Some("NoExecute")),
                false,
            ),
            (
                toleration(Some("dedicated"), Some("Bogus"), Some("gpu"), None),
                false,
            ),
        ];
        for (index, (toleration, expected)) in cases.iter().enumerate() {
            assert_eq!(
                toleration_tolerates(toleration, &no_schedule),
                *expected,
                "case {index}: {toleration:?}"
            );
        }
        // A valueless taint is tolerated by Equal with no/empty value.
        let bare = taint("maintenance", None, "NoExecute");
        assert!(toleration_tolerates(
            &toleration(Some("maintenance"), None, None, None),
            &bare
        ));
        assert!(toleration_tolerates(
            &toleration(Some("maintenance"), Some("Equal"), Some(""), None),
            &bare
        ));
    }

    #[test]
    fn numeric_toleration_operators() {
        let score = taint("gpu-score", Some("1000"), "NoSchedule");
        let low = taint("gpu-score", Some("500"), "NoSchedule");
        let gt = toleration(Some("gpu-score"), Some("Gt"), Some("800"), None);
        let lt = toleration(Some("gpu-score"), Some("Lt"), Some("800"), None);
        assert!(toleration_tolerates(&gt, &score));
        assert!(!toleration_tolerates(&gt, &low));
        assert!(toleration_tolerates(&lt, &low));
        assert!(!toleration_tolerates(&lt, &score));
        let text = taint("gpu-score", Some("high"), "NoSchedule");
        assert!(!toleration_tolerates(&gt, &text));
    }

    #[test]
    fn taint_effects() {
        let mut tainted = node("n1");
        tainted.taints = vec![taint("soft", Some("x"), "PreferNoSchedule")];
        let none = SchedulingConstraints::default();
        assert!(none.allows(&tainted), "PreferNoSchedule is ignored");

        tainted.taints.push(taint("hard", Some("x"), "NoSchedule"));
        assert!(!none.allows(&tainted));

        let tolerates_hard = SchedulingConstraints {
            tolerations: vec![toleration(Some("hard"), None, Some("x"), None)],
            ..SchedulingConstraints::default()
        };
        assert!(tolerates_hard.allows(&tainted));

        tainted.taints.push(taint("evict", None, "NoExecute"));
        assert!(
            !tolerates_hard.allows(&tainted),
            "every hard taint must be tolerated"
        );

        let tolerates_all = SchedulingConstraints {
            tolerations: vec![toleration(None, Some("Exists"), None, None)],
            ..SchedulingConstraints::default()
        };
        assert!(tolerates_all.allows(&tainted));
    }

    #[test]
    fn affinity_operators() {
        let mut n = node("worker-1");
        n.labels = labels(&[("zone", "a"), ("cores", "8")]);
        let cases = [
            (requirement("zone", "In", &["a", "b"]), true),
            (requirement("zone", "In", &["b"]), false),
            (requirement("missing", "In", &["a"]), false),
            (requirement("zone", "NotIn", &["b"]), true),
            (requirement("zone", "NotIn", &["a"]), false),
            (requirement("missing", "NotIn", &["a"]), true),
            (requirement("zone", "Exists", &[]), true),
            (requirement("missing", "Exists", &[]), false),
            (requirement("zone", "DoesNotExist", &[]), false),
            (requirement("missing", "DoesNotExist", &[]), true),
            (requirement("cores", "Gt", &["4"]), true),
            (requirement("cores", "Gt", &["8"]), false),
            (requirement("cores", "Lt", &["16"]), true),
            (requirement("cores", "Lt", &["8"]), false),
            (requirement("zone", "Gt", &["1"]), false),
            (requirement("cores", "Gt", &["x"]), false),
            (requirement("cores", "Gt", &["1", "2"]), false),
            (requirement("missing", "Lt", &["10"]), false),
            (requirement("zone", "Like", &["a"]), false),
        ];
        for (requirement, expected) in cases {
            let constraints = affinity(vec![term(vec![requirement.clone()], vec![])]);
            assert_eq!(constraints.allows(&n), expected, "{requirement:?}");
        }
    }

    #[test]
    fn affinity_match_fields() {
        let n = node("worker-1");
        let cases = [
            (requirement("metadata.name", "In", &["worker-1"]), true),
            (requirement("metadata.name", "In", &["worker-2"]), false),
            (requirement("metadata.name", "NotIn", &["worker-2"]), true),
            (requirement("metadata.name", "NotIn", &["worker-1"]), false),
            (requirement("metadata.name", "Exists", &[]), false),
            (requirement("metadata.uid", "In", &["worker-1"]), false),
        ];
        for (requirement, expected) in cases {
            let constraints = affinity(vec![term(vec![], vec![requirement.clone()])]);
            assert_eq!(constraints.allows(&n), expected, "{requirement:?}");
        }
    }

    #[test]
    fn affinity_terms_or_and_requirements_and() {
        let mut n = node("worker-1");
        n.labels = labels(&[("zone", "a"), ("disk", "ssd")]);
        let zone_a = requirement("zone", "In", &["a"]);
        let zone_b = requirement("zone", "In", &["b"]);
        let hdd = requirement("disk", "In", &["hdd"]);
        let named = requirement("metadata.name", "In", &["worker-1"]);

        // ANDed within a term.
        assert!(affinity(vec![term(vec![zone_a.clone()], vec![named.clone()])]).allows(&n));
        assert!(!affinity(vec![term(vec![zone_a.clone(), hdd.clone()], vec![])]).allows(&n));
        assert!(!affinity(vec![term(vec![zone_b.clone()], vec![named.clone()])]).allows(&n));
        // ORed across terms.
        assert!(
            affinity(vec![
                term(vec![zone_b.clone()], vec![]),
                term(vec![zone_a.clone()], vec![])
            ])
            .allows(&n)
        );
        assert!(!affinity(vec![term(vec![zone_b], vec![]), term(vec![hdd], vec![])]).allows(&n));
        // Empty list of terms, and empty terms, match nothing.
        assert!(!affinity(vec![]).allows(&n));
        assert!(!affinity(vec![term(vec![], vec![])]).allows(&n));
        assert!(
            !affinity(vec![NodeSelectorTerm {
                match_expressions: None,
                match_fields: None
            }])
            .allows(&n)
        );
        // An empty term does not poison a matching one.
        assert!(affinity(vec![term(vec![], vec![]), term(vec![zone_a], vec![])]).allows(&n));
    }

    #[test]
    fn constraints_from_pod_spec() {
        let selector = NodeSelector {
            node_selector_terms: vec![term(vec![requirement("zone", "In", &["a"])], vec![])],
        };
        let spec = PodSpec {
            node_selector: Some(labels(&[("disk", "ssd")])),
            affinity: Some(Affinity {
                node_affinity: Some(NodeAffinity {
                    required_during_scheduling_ignored_during_execution: Some(selector.clone()),
                    ..NodeAffinity::default()
                }),
                ..Affinity::default()
            }),
            tolerations: Some(vec![toleration(Some("k"), Some("Exists"), None, None)]),
            ..PodSpec::default()
        };
        let constraints = SchedulingConstraints::from_pod_spec(&spec);
        assert_eq!(constraints.node_selector, labels(&[("disk", "ssd")]));
        assert_eq!(constraints.required_node_affinity, Some(selector));
        assert_eq!(constraints.tolerations.len(), 1);
        assert_eq!(
            SchedulingConstraints::from_pod_spec(&PodSpec::default()),
            SchedulingConstraints::default()
        );

        let mut n = node("n1");
        n.labels = labels(&[("disk", "ssd"), ("zone", "a")]);
        n.taints = vec![taint("k", Some("v"), "NoSchedule")];
        assert!(constraints.allows(&n));
        n.labels.insert("zone".into(), "b".into());
        assert!(!constraints.allows(&n));
    }
}
