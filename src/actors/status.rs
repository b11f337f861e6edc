//! The one aggregated view across clusters: per cluster health, per Prefetch
//! phase and counts. Everyone reports here; HTTP and the CLI read from here.

use std::collections::BTreeMap;

use actix::prelude::*;
use serde::{Deserialize, Serialize};

use crate::api::{Phase, PullCounts, PullFailure};

/// The health of one target cluster, as last seen by its ClusterActor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state")]
pub enum ClusterHealth {
    Connecting,
    Connected { version: String },
    Unreachable { reason: String },
    Forbidden { what: String },
    CrdMissing { reason: String },
}

impl ClusterHealth {
    pub fn label(&self) -> &'static str {
        match self {
            ClusterHealth::Connecting => "Connecting",
            ClusterHealth::Connected { .. } => "Connected",
            ClusterHealth::Unreachable { .. } => "Unreachable",
            ClusterHealth::Forbidden { .. } => "Forbidden",
            ClusterHealth::CrdMissing { .. } => "CrdMissing",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefetchSummary {
    pub namespace: String,
    pub name: String,
    pub phase: Phase,
    pub images: Vec<String>,
    pub nodes: u32,
    pub pulls: PullCounts,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<PullFailure>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    pub name: String,
    #[serde(flatten)]
    pub health: ClusterHealth,
    pub prefetches: Vec<PrefetchSummary>,
}

/// What `GET /api/v1/status` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    pub clusters: Vec<ClusterView>,
}

impl StatusView {
    /// Ready when every configured cluster has been heard from at least once.
    pub fn all_clusters_reported(&self) -> bool {
        self.clusters
            .iter()
            .all(|cluster| cluster.health != ClusterHealth::Connecting)
    }
}

#[derive(Default)]
pub struct StatusActor {
    clusters: BTreeMap<String, ClusterView>,
}

impl Actor for StatusActor {
    type Context = Context<Self>;
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct ClusterAdded {
    pub cluster: String,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct ClusterRemoved {
    pub cluster: String,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct ClusterHealthChanged {
    pub cluster: String,
    pub health: ClusterHealth,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct PrefetchReported {
    pub cluster: String,
    pub summary: PrefetchSummary,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct PrefetchGone {
    pub cluster: String,
    pub namespace: String,
    pub name: String,
}

#[derive(Message)]
#[rtype(result = "StatusView")]
pub struct GetStatus;

impl StatusActor {
    fn cluster_mut(&mut self, cluster: &str) -> &mut ClusterView {
        self.clusters
            .entry(cluster.to_string())
            .or_insert_with(|| ClusterView {
                name: cluster.to_string(),
                health: ClusterHealth::Connecting,
                prefetches: Vec::new(),
            })
    }
}

impl Handler<ClusterAdded> for StatusActor {
    type Result = ();
    fn handle(&mut self, msg: ClusterAdded, _: &mut Self::Context) {
        self.cluster_mut(&msg.cluster);
    }
}

impl Handler<ClusterRemoved> for StatusActor {
    type Result = ();
    fn handle(&mut self, msg: ClusterRemoved, _: &mut Self::Context) {
        self.clusters.remove(&msg.cluster);
    }
}

impl Handler<ClusterHealthChanged> for StatusActor {
    type Result = ();
    fn handle(&mut self, msg: ClusterHealthChanged, _: &mut Self::Context) {
        // The Prefetches stay listed while a cluster is away: their last known
        // state is more useful than nothing, and the cluster's state says
        // it may be stale.
        self.cluster_mut(&msg.cluster).health = msg.health;
    }
}

impl Handler<PrefetchReported> for StatusActor {
    type Result = ();
    fn handle(&mut self, msg: PrefetchReported, _: &mut Self::Context) {
        let view = self.cluster_mut(&msg.cluster);
        let summary = msg.summary;
        match view
            .prefetches
            .iter_mut()
            .find(|p| p.namespace == summary.namespace && p.name == summary.name)
        {
            Some(existing) => *existing = summary,
            None => {
                view.prefetches.push(summary);
                view.prefetches
                    .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
            }
        }
    }
}

impl Handler<PrefetchGone> for StatusActor {
    type Result = ();
    fn handle(&mut self, msg: PrefetchGone, _: &mut Self::Context) {
        let view = self.cluster_mut(&msg.cluster);
        view.prefetches
            .retain(|p| !(p.namespace == msg.namespace && p.name == msg.name));
    }
}

impl Handler<GetStatus> for StatusActor {
    type Result = MessageResult<GetStatus>;
    fn handle(&mut self, _: GetStatus, _: &mut Self::Context) -> Self::Result {
        MessageResult(StatusView {
            clusters: self.clusters.values().cloned().collect(),
        })
    }
}
