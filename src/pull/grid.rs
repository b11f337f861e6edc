//! A Prefetch's drill-down: for every node of its cluster, the state of each
//! of its (node, image) pairs, or why the node gets none. Built on demand
//! from what the Prefetch's actor holds (its planner, desired set and
//! tracker) and the cluster's nodes; a skipped node's reason is `plan`'s
//! ([`Planner::plan_or_skip`], [`SkipReason`]), so the dashboard and
//! `kube-prefetch plan` never disagree on why.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::api::Phase;
use crate::pull::plan::{DesiredSet, Planner};
use crate::pull::targeting::NodeView;
use crate::pull::targeting::SkipReason;
use crate::pull::tracker::{PairView, Tracker};

/// Nodes listed when the request names no `limit`.
pub const DEFAULT_LIMIT: usize = 200;
/// The most nodes one answer lists, whatever `limit` says: a huge cluster's
/// grid is read through `q`, not in one document.
pub const MAX_LIMIT: usize = 2000;

/// What to list: nodes whose name or one of whose images contains
/// `search` (case-insensitive; empty: every node), at most `limit` of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GridQuery {
    search: String,
    limit: usize,
}

impl GridQuery {
    /// `limit` defaults to [`DEFAULT_LIMIT`] and is capped at [`MAX_LIMIT`];
    /// 0 lists no node, only the counts.
    pub fn new(search: Option<&str>, limit: Option<usize>) -> Self {
        GridQuery {
            search: search.unwrap_or_default().trim().to_lowercase(),
            limit: limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    fn matches(&self, text: &str) -> bool {
        self.search.is_empty() || text.to_lowercase().contains(&self.search)
    }
}

impl Default for GridQuery {
    fn default() -> Self {
        GridQuery::new(None, None)
    }
}

/// One image of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PairCell {
    pub image: String,
    #[serde(flatten)]
    pub view: PairView,
}

/// One node of the cluster, for one Prefetch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeRow {
    pub node: String,
    #[serde(flatten)]
    pub state: NodeState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum NodeState {
    /// Planned: one cell per image the node gets (by image).
    Targeted { pairs: Vec<PairCell> },
    /// Gets nothing, for the first rule it fails (as `plan` says).
    Skipped {
        reason: SkipReason,
        /// [`SkipReason::describe`].
        text: &'static str,
    },
    /// No rule skips it, yet nothing is planned on it: the Prefetch is over
    /// a pair limit or not planned yet (its `message` says which), or the
    /// node changed a moment ago.
    NotPlanned,
}

/// Counts over every node, and the rows asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NodeRows {
    /// Nodes in the cluster.
    pub total_nodes: usize,
    pub targeted_nodes: usize,
    pub not_planned_nodes: usize,
    /// Skipped nodes per reason.
    pub skipped_nodes: BTreeMap<SkipReason, usize>,
    /// Nodes matching `q`.
    pub matched: usize,
    /// Matching nodes left out by `limit`.
    pub omitted: usize,
    pub limit: usize,
    /// The first `limit` matching nodes, by name.
    pub nodes: Vec<NodeRow>,
}

/// What one Prefetch holds that the rows are made of.
pub struct GridSource<'a> {
    pub planner: &'a Planner,
    pub desired: &'a DesiredSet,
    pub tracker: &'a Tracker,
    pub retry_after: Duration,
    pub now: Instant,
}

/// Turns a Prefetch's plan and tracker into one row per node of `nodes`
/// (every node of the cluster): a node of the desired set shows its pairs'
/// states; any other node the reason the planner gives it nothing.
pub fn node_rows<'a>(
    source: &GridSource<'_>,
    nodes: impl IntoIterator<Item = &'a NodeView>,
    query: &GridQuery,
) -> NodeRows {
    let mut nodes: Vec<&NodeView> = nodes.into_iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let mut rows = NodeRows {
        total_nodes: nodes.len(),
        limit: query.limit,
        ..NodeRows::default()
    };
    for node in nodes {
        let state = node_state(source, node);
        match &state {
            NodeState::Targeted { .. } => rows.targeted_nodes += 1,
            NodeState::NotPlanned => rows.not_planned_nodes += 1,
            NodeState::Skipped { reason, .. } => {
                *rows.skipped_nodes.entry(*reason).or_default() += 1;
            }
        }
        let matches = query.matches(&node.name)
            || match &state {
                NodeState::Targeted { pairs } => {
                    pairs.iter().any(|cell| query.matches(&cell.image))
                }
                _ => false,
            };
        if !matches {
            continue;
        }
        rows.matched += 1;
        if rows.nodes.len() < query.limit {
            rows.nodes.push(NodeRow {
                node: node.name.clone(),
                state,
            });
        } else {
            rows.omitted += 1;
        }
    }
    rows
}

fn node_state(source: &GridSource<'_>, node: &NodeView) -> NodeState {
    if source.desired.targets_node(&node.name) {
        let pairs = source
            .desired
            .node_keys(&node.name)
            .filter_map(|key| {
                let view = source.tracker.view(&key, source.now, source.retry_after)?;
                Some(PairCell {
                    image: key.image.to_string(),
                    view,
                })
            })
            .collect();
        return NodeState::Targeted { pairs };
    }
    match source.planner.plan_or_skip(node) {
        Err(reason) => NodeState::Skipped {
            reason,
            text: reason.describe(),
        },
        Ok(_) => NodeState::NotPlanned,
    }
}

/// `GET /api/v1/clusters/{cluster}/prefetches/{namespace}/{name}/nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeGrid {
    pub cluster: String,
    pub namespace: String,
    pub name: String,
    pub phase: Phase,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Every image of the Prefetch, canonical: the grid's columns.
    pub images: Vec<String>,
    #[serde(flatten)]
    pub rows: NodeRows,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pull::plan::{ExtraImages, PairKey};
    use crate::pull::targeting::NodeTargeting;
    use crate::pull::tracker::{BackoffPolicy, Outcome};
    use k8s_openapi::api::core::v1::Taint;

    const RETRY: Duration = Duration::from_secs(300);
    const BUSYBOX: &str = "docker.io/library/busybox:1.36";
    const NGINX: &str = "docker.io/library/nginx:1.27";

    fn node(name: &str) -> NodeView {
        NodeView {
            name: name.into(),
            ready: true,
            ..NodeView::default()
        }
    }

    fn planner(node_filter: &str) -> Planner {
        Planner::new(
            &[],
            &ExtraImages {
                images: vec!["busybox:1.36".into(), "nginx:1.27".into()],
                namespace: "team".into(),
                image_pull_secrets: Vec::new(),
            },
            NodeTargeting {
                node_filter: Some(node_filter.into()),
                ..NodeTargeting::default()
            },
            true,
            false,
        )
    }

    /// What the Prefetch actor hands the grid, judged at the current time.
    fn source_now<'a>(
        planner: &'a Planner,
        desired: &'a DesiredSet,
        tracker: &'a Tracker,
    ) -> GridSource<'a> {
        GridSource {
            planner,
            desired,
            tracker,
            retry_after: RETRY,
            now: Instant::now(),
        }
    }

    fn policy() -> BackoffPolicy {
        BackoffPolicy {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            max_attempts: 3,
            jitter: false,
        }
    }

    fn failed(reason: &str, message: &str, permanent: bool) -> Outcome {
        Outcome::Failed {
            reason: reason.into(),
            message: message.into(),
            permanent,
        }
    }

    /// Three workers in every state a pair can be in, and three nodes the
    /// planner skips, each for its own reason.
    fn cluster() -> Vec<NodeView> {
        let mut tainted = node("worker-tainted");
        tainted.taints = vec![Taint {
            key: "dedicated".into(),
            effect: "NoSchedule".into(),
            value: Some("gpu".into()),
            time_added: None,
        }];
        let mut cordoned = node("worker-cordoned");
        cordoned.unschedulable = true;
        vec![
            node("worker-c"),
            node("control-plane"),
            node("worker-a"),
            tainted,
            cordoned,
            node("worker-b"),
        ]
    }

    #[test]
    fn every_node_shows_its_pairs_or_the_reason_it_is_skipped() {
        let nodes = cluster();
        let planner = planner("worker");
        let desired = planner.plan(&nodes);
        let mut tracker = Tracker::new(policy());
        tracker.set_desired(&desired);
        let start = Instant::now();
        let pair = |node: &str, image: &str| PairKey::new(node, image);
        // worker-a: busybox ready, nginx in flight.
        tracker.on_dispatched(&pair("worker-a", BUSYBOX), "pull-a-busybox", start);
        tracker.on_outcome(&pair("worker-a", BUSYBOX), Outcome::Succeeded, start);
        tracker.on_dispatched(&pair("worker-a", NGINX), "pull-a-nginx", start);
        // worker-b: busybox backing off after one failure, nginx failed for good.
        tracker.on_dispatched(&pair("worker-b", BUSYBOX), "pull-b-busybox", start);
        tracker.on_outcome(
            &pair("worker-b", BUSYBOX),
            failed("ErrImagePull", "registry timeout", false),
            start,
        );
        tracker.on_dispatched(&pair("worker-b", NGINX), "pull-b-nginx", start);
        tracker.on_outcome(
            &pair("worker-b", NGINX),
            failed("ErrImagePull", "not found", true),
            start,
        );
        // worker-c: busybox verified long ago and being checked again.
        let long_ago = start;
        tracker.on_dispatched(&pair("worker-c", BUSYBOX), "pull-c-busybox", long_ago);
        tracker.on_outcome(&pair("worker-c", BUSYBOX), Outcome::Succeeded, long_ago);
        let now = start + Duration::from_secs(4);
        tracker.on_dispatched(&pair("worker-c", BUSYBOX), "pull-c-again", now);

        let source = GridSource {
            planner: &planner,
            desired: &desired,
            tracker: &tracker,
            retry_after: RETRY,
            now,
        };
        let rows = node_rows(&source, &nodes, &GridQuery::default());
        let names: Vec<&str> = rows.nodes.iter().map(|row| row.node.as_str()).collect();
        assert_eq!(
            names,
            [
                "control-plane",
                "worker-a",
                "worker-b",
                "worker-c",
                "worker-cordoned",
                "worker-tainted"
            ],
            "every node of the cluster, by name"
        );
        let state = |name: &str| {
            rows.nodes
                .iter()
                .find(|row| row.node == name)
                .map(|row| row.state.clone())
                .expect("listed")
        };
        assert_eq!(
            state("control-plane"),
            NodeState::Skipped {
                reason: SkipReason::NodeFilter,
                text: "name does not contain node_filter",
            }
        );
        assert_eq!(
            state("worker-cordoned"),
            NodeState::Skipped {
                reason: SkipReason::Cordoned,
                text: "node is cordoned",
            }
        );
        assert_eq!(
            state("worker-tainted"),
            NodeState::Skipped {
                reason: SkipReason::TaintNotTolerated,
                text: "a taint is not tolerated",
            }
        );
        assert_eq!(
            state("worker-a"),
            NodeState::Targeted {
                pairs: vec![
                    PairCell {
                        image: BUSYBOX.into(),
                        view: PairView::Ready {
                            recheck_in_seconds: 296
                        },
                    },
                    PairCell {
                        image: NGINX.into(),
                        view: PairView::InFlight {
                            pod: "pull-a-nginx".into(),
                            for_seconds: 4
                        },
                    },
                ]
            }
        );
        assert_eq!(
            state("worker-b"),
            NodeState::Targeted {
                pairs: vec![
                    PairCell {
                        image: BUSYBOX.into(),
                        view: PairView::BackingOff {
                            retry_in_seconds: 6,
                            attempts: 1,
                            reason: Some("ErrImagePull".into()),
                            last_error: Some("registry timeout".into()),
                        },
                    },
                    PairCell {
                        image: NGINX.into(),
                        view: PairView::Failed {
                            reason: "ErrImagePull".into(),
                            attempts: 1,
                            permanent: true,
                            last_error: "not found".into(),
                            retry_in_seconds: 296,
                        },
                    },
                ]
            }
        );
        assert_eq!(
            state("worker-c"),
            NodeState::Targeted {
                pairs: vec![
                    PairCell {
                        image: BUSYBOX.into(),
                        view: PairView::Reverifying {
                            pod: Some("pull-c-again".into())
                        },
                    },
                    PairCell {
                        image: NGINX.into(),
                        view: PairView::Pending,
                    },
                ]
            }
        );
        assert_eq!(rows.total_nodes, 6);
        assert_eq!(rows.targeted_nodes, 3);
        assert_eq!(
            rows.skipped_nodes,
            BTreeMap::from([
                (SkipReason::NodeFilter, 1),
                (SkipReason::Cordoned, 1),
                (SkipReason::TaintNotTolerated, 1),
            ])
        );
        assert_eq!((rows.matched, rows.omitted), (6, 0));

        // The JSON the endpoint serves: the state names the legend uses.
        let json = serde_json::to_value(&rows).expect("serializes");
        assert_eq!(json["skipped_nodes"]["node_filter"], 1);
        assert_eq!(json["nodes"][0]["state"], "skipped");
        assert_eq!(json["nodes"][0]["reason"], "node_filter");
        assert_eq!(json["nodes"][2]["pairs"][0]["state"], "backing_off");
        assert_eq!(json["nodes"][2]["pairs"][1]["permanent"], true);
        assert_eq!(json["nodes"][3]["pairs"][0]["state"], "reverifying");
    }

    #[test]
    fn the_skip_reason_is_the_one_plan_gives() {
        let nodes = cluster();
        let planner = planner("worker");
        let desired = planner.plan(&nodes);
        let mut tracker = Tracker::new(policy());
        tracker.set_desired(&desired);
        let source = source_now(&planner, &desired, &tracker);
        let rows = node_rows(&source, &nodes, &GridQuery::default());
        let from_grid: Vec<(String, SkipReason)> = rows
            .nodes
            .iter()
            .filter_map(|row| match row.state {
                NodeState::Skipped { reason, .. } => Some((row.node.clone(), reason)),
                _ => None,
            })
            .collect();
        let explained = crate::pull::explain::explain(&planner, &nodes, None);
        assert_eq!(from_grid, explained.skipped);
    }

    #[test]
    fn search_and_limit_bound_the_rows_but_not_the_counts() {
        let nodes: Vec<NodeView> = (0..50)
            .map(|i| node(&format!("worker-{i:02}")))
            .chain([node("control-plane")])
            .collect();
        let planner = planner("worker");
        let desired = planner.plan(&nodes);
        let mut tracker = Tracker::new(policy());
        tracker.set_desired(&desired);
        let source = source_now(&planner, &desired, &tracker);
        let limited = node_rows(&source, &nodes, &GridQuery::new(None, Some(10)));
        assert_eq!(limited.nodes.len(), 10);
        assert_eq!((limited.matched, limited.omitted), (51, 41));
        assert_eq!(limited.total_nodes, 51);
        assert_eq!(limited.targeted_nodes, 50);
        assert_eq!(limited.skipped_nodes[&SkipReason::NodeFilter], 1);

        // By node name, case-insensitive.
        let control = node_rows(&source, &nodes, &GridQuery::new(Some(" Control "), None));
        assert_eq!(control.matched, 1);
        assert_eq!(control.nodes[0].node, "control-plane");

        // By image: the nodes that get it (a skipped node gets none).
        let nginx = node_rows(&source, &nodes, &GridQuery::new(Some("nginx"), Some(5)));
        assert_eq!(
            (nginx.matched, nginx.omitted, nginx.nodes.len()),
            (50, 45, 5)
        );

        // The cap holds whatever is asked; 0 gives the counts alone.
        assert_eq!(GridQuery::new(None, Some(1_000_000)).limit(), MAX_LIMIT);
        let counts = node_rows(&source, &nodes, &GridQuery::new(None, Some(0)));
        assert!(counts.nodes.is_empty());
        assert_eq!(counts.omitted, 51);
    }

    #[test]
    fn a_targeted_node_without_a_plan_is_not_called_skipped() {
        let nodes = vec![node("worker-a")];
        let planner = planner("worker");
        // Nothing planned yet (or refused by a pair limit).
        let desired = DesiredSet::default();
        let tracker = Tracker::new(policy());
        let source = source_now(&planner, &desired, &tracker);
        let rows = node_rows(&source, &nodes, &GridQuery::default());
        assert_eq!(rows.nodes[0].state, NodeState::NotPlanned);
        assert_eq!(rows.not_planned_nodes, 1);
    }
}
