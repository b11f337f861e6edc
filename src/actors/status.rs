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
    Connected {
        version: String,
    },
    Unreachable {
        reason: String,
    },
    Forbidden {
        what: String,
    },
    CrdMissing {
        reason: String,
    },
    /// Its code panicked: the cluster is stopped until the supervisor
    /// restarts it (the reason says when).
    Crashed {
        reason: String,
    },
}

impl ClusterHealth {
    pub fn label(&self) -> &'static str {
        match self {
            ClusterHealth::Connecting => "Connecting",
            ClusterHealth::Connected { .. } => "Connected",
            ClusterHealth::Unreachable { .. } => "Unreachable",
            ClusterHealth::Forbidden { .. } => "Forbidden",
            ClusterHealth::CrdMissing { .. } => "CrdMissing",
            ClusterHealth::Crashed { .. } => "Crashed",
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
    /// How often the supervisor restarted this cluster after a panic, and
    /// the last panic: kept after it recovers, so that a cluster that keeps
    /// crashing and coming back is visible.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_panic: Option<String>,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

/// What `GET /api/v1/status` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    /// A standby waiting for the leader Lease: it watches no cluster, so
    /// its empty list says nothing about the fleet.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub standby: bool,
    pub clusters: Vec<ClusterView>,
}

/// What a standby's `/readyz` and `kube-prefetch status` say.
pub const STANDBY: &str = "standby: waiting for the leader lease; the leader serves the status";

impl StatusView {
    /// Ready when every configured cluster has been heard from at least once.
    /// A cluster reconnecting after a restart has been: one cluster's panic
    /// must not make the whole process unready. A standby is never ready.
    pub fn all_clusters_reported(&self) -> bool {
        !self.standby
            && self
                .clusters
                .iter()
                .all(|cluster| cluster.health != ClusterHealth::Connecting || cluster.restarts > 0)
    }

    /// What `/healthz` says below its "ok": one line per cluster that
    /// crashed, now or before (the process itself stays healthy: the
    /// supervisor restarts the cluster, and restarting the process would
    /// stop every other cluster too).
    pub fn health_details(&self) -> Vec<String> {
        self.clusters
            .iter()
            .filter_map(|cluster| match &cluster.health {
                ClusterHealth::Crashed { reason } => {
                    Some(format!("cluster {}: crashed: {reason}", cluster.name))
                }
                _ if cluster.restarts > 0 => Some(format!(
                    "cluster {}: {}, restarted {} after a panic; last: {}",
                    cluster.name,
                    cluster.health.label(),
                    times(cluster.restarts),
                    cluster.last_panic.as_deref().unwrap_or("unknown"),
                )),
                _ => None,
            })
            .collect()
    }
}

/// "once", "2 times".
pub fn times(count: u32) -> String {
    match count {
        1 => "once".to_string(),
        n => format!("{n} times"),
    }
}

#[derive(Default)]
pub struct StatusActor {
    standby: bool,
    clusters: BTreeMap<String, ClusterView>,
}

/// Whether this instance is a standby (leader election).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetStandby(pub bool);

impl Handler<SetStandby> for StatusActor {
    type Result = ();
    fn handle(&mut self, SetStandby(standby): SetStandby, _: &mut Self::Context) {
        self.standby = standby;
    }
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

/// A cluster's code panicked; the supervisor stopped it and restarts it
/// after `reason`'s delay.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ClusterCrashed {
    pub cluster: String,
    /// The panic's location and message.
    pub panic: String,
    /// Shown as the Crashed state's reason.
    pub reason: String,
}

/// The supervisor started a crashed cluster again.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ClusterRestarted {
    pub cluster: String,
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
                restarts: 0,
                last_panic: None,
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

impl Handler<ClusterCrashed> for StatusActor {
    type Result = ();
    fn handle(&mut self, msg: ClusterCrashed, _: &mut Self::Context) {
        let view = self.cluster_mut(&msg.cluster);
        view.health = ClusterHealth::Crashed { reason: msg.reason };
        view.last_panic = Some(msg.panic);
    }
}

impl Handler<ClusterRestarted> for StatusActor {
    type Result = ();
    fn handle(&mut self, msg: ClusterRestarted, _: &mut Self::Context) {
        let view = self.cluster_mut(&msg.cluster);
        view.health = ClusterHealth::Connecting;
        view.restarts = view.restarts.saturating_add(1);
        // The new actor reports every Prefetch again once it has listed
        // them; an entry of the dead one (a Prefetch deleted meanwhile)
        // would never be corrected.
        view.prefetches.clear();
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
            standby: self.standby,
            clusters: self.clusters.values().cloned().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str, health: ClusterHealth, restarts: u32) -> ClusterView {
        ClusterView {
            name: name.into(),
            health,
            prefetches: Vec::new(),
            restarts,
            last_panic: (restarts > 0).then(|| "panicked at src/x.rs:1:2: boom".to_string()),
        }
    }

    #[test]
    fn health_details_name_crashed_and_restarted_clusters() {
        let view = StatusView {
            standby: false,
            clusters: vec![
                cluster(
                    "a",
                    ClusterHealth::Connected {
                        version: "v1".into(),
                    },
                    0,
                ),
                cluster(
                    "b",
                    ClusterHealth::Crashed {
                        reason: "panicked at src/x.rs:1:2: boom; restarting in 2s".into(),
                    },
                    1,
                ),
                cluster(
                    "c",
                    ClusterHealth::Connected {
                        version: "v1".into(),
                    },
                    2,
                ),
            ],
        };
        assert_eq!(
            view.health_details(),
            [
                "cluster b: crashed: panicked at src/x.rs:1:2: boom; restarting in 2s",
                "cluster c: Connected, restarted 2 times after a panic; last: panicked at src/x.rs:1:2: boom",
            ]
        );
    }

    #[test]
    fn a_restarted_cluster_reconnecting_keeps_the_process_ready() {
        let mut view = StatusView {
            standby: false,
            clusters: vec![cluster("a", ClusterHealth::Connecting, 1)],
        };
        assert!(view.all_clusters_reported());
        view.clusters[0].restarts = 0;
        assert!(!view.all_clusters_reported());
        // A standby is not ready, whatever its (empty) list says.
        let standby = StatusView {
            standby: true,
            clusters: Vec::new(),
        };
        assert!(!standby.all_clusters_reported());
    }
}
