//! Why a Prefetch pulls what it pulls: for every node, the pulls it gets or
//! the reason it gets none, and for every planned pair whether a pull is
//! needed at all. `kube-prefetch plan` prints this; the same rules as the
//! running planner ([`Planner::plan_node`], the tracker's node reports and
//! the verified record) decide, so the dry run lists the pulls a run makes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use serde::Serialize;

use crate::api::VerifiedRecord;
use crate::pull::plan::{DesiredSet, PairKey, Planner, PullTarget};
use crate::pull::targeting::{NodeView, SkipReason};
use crate::pull::verified;

/// Why a planned pair needs no pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoPullReason {
    /// The node reports the image in `status.images`.
    AlreadyOnNode,
    /// The Prefetch's `status.verified` record covers the pair and is
    /// younger than `retry_after`.
    AlreadyVerified,
}

impl NoPullReason {
    pub fn describe(self) -> &'static str {
        match self {
            NoPullReason::AlreadyOnNode => "already on the node",
            NoPullReason::AlreadyVerified => "verified within retry_after",
        }
    }
}

/// One Prefetch's plan, explained.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Explanation {
    /// The pulls a run would make now, sorted by node then image.
    pub pulls: Vec<PlannedPull>,
    /// Planned pairs that need no pull, and why.
    pub no_pull: Vec<(PairKey, NoPullReason)>,
    /// Nodes with nothing planned, and why.
    pub skipped: Vec<(String, SkipReason)>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlannedPull {
    pub node: String,
    pub image: String,
    /// Where the pull pod would run.
    pub namespace: String,
}

/// What the verified record says, and the clocks to judge it by.
pub struct VerifiedInput<'a> {
    pub record: &'a VerifiedRecord,
    pub retry_after: Duration,
    pub now_wall: Timestamp,
}

impl Explanation {
    /// Counts per skip reason, for a summary that stays short at any size.
    pub fn skipped_by_reason(&self) -> BTreeMap<SkipReason, Vec<&str>> {
        let mut grouped: BTreeMap<SkipReason, Vec<&str>> = BTreeMap::new();
        for (node, reason) in &self.skipped {
            grouped.entry(*reason).or_default().push(node);
        }
        grouped
    }

    pub fn no_pull_by_reason(&self) -> BTreeMap<NoPullReason, Vec<&PairKey>> {
        let mut grouped: BTreeMap<NoPullReason, Vec<&PairKey>> = BTreeMap::new();
        for (key, reason) in &self.no_pull {
            grouped.entry(*reason).or_default().push(key);
        }
        grouped
    }

    /// The pulls grouped by image: image -> (pod namespace, nodes).
    pub fn pulls_by_image(&self) -> BTreeMap<(&str, &str), Vec<&str>> {
        let mut grouped: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
        for pull in &self.pulls {
            grouped
                .entry((pull.image.as_str(), pull.namespace.as_str()))
                .or_default()
                .push(&pull.node);
        }
        grouped
    }
}

/// Explains `planner` over `nodes`. A node the planner does not target gets
/// the first reason that rules it out, in the order the planner checks.
pub fn explain<'a>(
    planner: &Planner,
    nodes: impl IntoIterator<Item = &'a NodeView>,
    verified: Option<VerifiedInput<'_>>,
) -> Explanation {
    let nodes: Vec<&NodeView> = nodes.into_iter().collect();
    let mut explanation = Explanation::default();
    let mut desired = DesiredSet::default();
    for node in &nodes {
        match planner.plan_or_skip(node) {
            Ok(pairs) => {
                desired.replace_node(&node.name, Some(pairs));
            }
            Err(reason) => explanation.skipped.push((node.name.clone(), reason)),
        }
    }
    // Same order as the tracker: a node report first, then the record.
    let verified_pairs: Vec<PairKey> = verified
        .and_then(|input| {
            verified::restorable(
                input.record,
                &desired,
                input.retry_after,
                Instant::now(),
                input.now_wall,
            )
        })
        .map(|(pairs, _)| pairs)
        .unwrap_or_default();
    let by_name: BTreeMap<&str, &NodeView> = nodes
        .iter()
        .map(|node| (node.name.as_str(), *node))
        .collect();
    for target in desired.targets() {
        let key = target.key();
        let on_node = by_name
            .get(&*key.node)
            .is_some_and(|node| node.images.contains(&key.image));
        if on_node {
            explanation.no_pull.push((key, NoPullReason::AlreadyOnNode));
        } else if verified_pairs.binary_search(&key).is_ok() {
            explanation
                .no_pull
                .push((key, NoPullReason::AlreadyVerified));
        } else {
            explanation.pulls.push(planned(&target));
        }
    }
    explanation.skipped.sort();
    explanation
}

fn planned(target: &PullTarget) -> PlannedPull {
    PlannedPull {
        node: target.node.to_string(),
        image: target.image.to_string(),
        namespace: target.settings.namespace.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::WorkloadKind;
    use crate::pull::plan::ExtraImages;
    use crate::pull::targeting::{NodeTargeting, SchedulingConstraints};
    use crate::pull::workload::WorkloadImages;
    use k8s_openapi::api::core::v1::{
        NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Taint,
    };

    fn node(name: &str) -> NodeView {
        let mut labels = BTreeMap::new();
        labels.insert("kubernetes.io/arch".to_string(), "amd64".to_string());
        NodeView {
            name: name.into(),
            labels,
            ready: true,
            ..NodeView::default()
        }
    }

    fn with_image(mut node: NodeView, image: &str) -> NodeView {
        node.images = crate::pull::image::NodeImages::from_names(&[image.to_string()]);
        node
    }

    fn arm64_only(name: &str, image: &str) -> WorkloadImages {
        let mut workload = WorkloadImages {
            kind: WorkloadKind::Deployment,
            namespace: "team".into(),
            name: name.into(),
            images: vec![image.into()],
            scheduling: SchedulingConstraints::default(),
            image_pull_secrets: Vec::new(),
            service_account: None,
        };
        workload.scheduling = SchedulingConstraints {
            required_node_affinity: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: "kubernetes.io/arch".into(),
                        operator: "In".into(),
                        values: Some(vec!["arm64".into()]),
                    }]),
                    match_fields: None,
                }],
            }),
            ..SchedulingConstraints::default()
        };
        workload
    }

    fn own_images(images: &[&str]) -> ExtraImages {
        ExtraImages {
            images: images.iter().map(|i| i.to_string()).collect(),
            namespace: "team".into(),
            image_pull_secrets: Vec::new(),
        }
    }

    #[test]
    fn every_node_gets_pulls_or_the_reason_it_gets_none() {
        let mut tainted = node("worker-tainted");
        tainted.taints = vec![Taint {
            key: "dedicated".into(),
            effect: "NoSchedule".into(),
            value: Some("gpu".into()),
            time_added: None,
        }];
        let mut cordoned = node("worker-cordoned");
        cordoned.unschedulable = true;
        let mut not_ready = node("worker-down");
        not_ready.ready = false;
        let has_it = with_image(node("worker-has"), "busybox:1.36");
        let nodes = vec![
            node("worker-a"),
            tainted,
            cordoned,
            not_ready,
            has_it,
            node("control-plane"),
        ];
        let planner = Planner::new(
            &[],
            &own_images(&["busybox:1.36"]),
            NodeTargeting {
                node_filter: Some("worker".into()),
                ..NodeTargeting::default()
            },
            true,
            false,
        );
        let explained = explain(&planner, &nodes, None);
        assert_eq!(
            explained.pulls,
            vec![PlannedPull {
                node: "worker-a".into(),
                image: "docker.io/library/busybox:1.36".into(),
                namespace: "team".into(),
            }]
        );
        assert_eq!(
            explained.no_pull,
            vec![(
                PairKey::new("worker-has", "docker.io/library/busybox:1.36"),
                NoPullReason::AlreadyOnNode
            )]
        );
        assert_eq!(
            explained.skipped,
            vec![
                ("control-plane".to_string(), SkipReason::NodeFilter),
                ("worker-cordoned".to_string(), SkipReason::Cordoned),
                ("worker-down".to_string(), SkipReason::NotReady),
                ("worker-tainted".to_string(), SkipReason::TaintNotTolerated),
            ]
        );
        let grouped = explained.skipped_by_reason();
        assert_eq!(grouped[&SkipReason::NotReady], vec!["worker-down"]);
    }

    #[test]
    fn an_arm64_only_workload_skips_amd64_nodes_by_affinity() {
        let mut arm = node("worker-arm");
        arm.labels
            .insert("kubernetes.io/arch".into(), "arm64".into());
        let nodes = vec![node("worker-amd"), arm];
        let workloads = [arm64_only("edge", "nginx:1.27")];
        let planner = Planner::new(
            &workloads,
            &ExtraImages::default(),
            NodeTargeting::default(),
            true,
            false,
        );
        let explained = explain(&planner, &nodes, None);
        assert_eq!(explained.pulls.len(), 1);
        assert_eq!(explained.pulls[0].node, "worker-arm");
        assert_eq!(
            explained.skipped,
            vec![("worker-amd".to_string(), SkipReason::WorkloadAffinity)]
        );
    }

    #[test]
    fn a_recent_verified_record_means_no_pull() {
        let nodes = vec![node("worker-a"), node("worker-b")];
        let planner = Planner::new(
            &[],
            &own_images(&["busybox:1.36"]),
            NodeTargeting::default(),
            true,
            false,
        );
        let desired = planner.plan(&nodes);
        let mut tracker = crate::pull::tracker::Tracker::new(Default::default());
        tracker.set_desired(&desired);
        let now = Instant::now();
        for key in desired.keys() {
            tracker.on_dispatched(&key, "pod", now);
            tracker.on_outcome(&key, crate::pull::tracker::Outcome::Succeeded, now);
        }
        let now_wall = Timestamp::now();
        let record =
            verified::record(&desired, &tracker, now, now_wall).expect("every pair verified");
        let fresh = explain(
            &planner,
            &nodes,
            Some(VerifiedInput {
                record: &record,
                retry_after: Duration::from_secs(300),
                now_wall,
            }),
        );
        assert!(fresh.pulls.is_empty(), "{fresh:?}");
        assert_eq!(
            fresh.no_pull_by_reason()[&NoPullReason::AlreadyVerified].len(),
            2
        );

        // Older than retry_after: pulled again.
        let stale = explain(
            &planner,
            &nodes,
            Some(VerifiedInput {
                record: &record,
                retry_after: Duration::from_secs(300),
                now_wall: now_wall.checked_add(jiff_secs(301)).expect("in range"),
            }),
        );
        assert_eq!(stale.pulls.len(), 2);
    }

    fn jiff_secs(seconds: i64) -> k8s_openapi::jiff::SignedDuration {
        k8s_openapi::jiff::SignedDuration::from_secs(seconds)
    }
}
