//! The `Prefetch` custom resource (`cache.techsquad.rocks/v1`): the one place
//! its schema lives. Field names stay snake_case for compatibility with the
//! original operator, whose manifests must keep working unchanged.

use std::collections::BTreeMap;

use kube::CustomResource;
use kube::core::CustomResourceExt;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Default re-verification period, as in the original operator.
pub const DEFAULT_RETRY_AFTER_SECONDS: i64 = 300;
/// Default per-pull deadline.
pub const DEFAULT_PULL_TIMEOUT_SECONDS: i64 = 600;
/// At most this many failures are kept in `status.failures`.
pub const MAX_STATUS_FAILURES: usize = 20;

/// Which nodes should hold which images.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "cache.techsquad.rocks",
    version = "v1",
    kind = "Prefetch",
    plural = "prefetches",
    shortname = "pf",
    namespaced,
    status = "PrefetchStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Images","type":"string","jsonPath":".status.images"}"#,
    printcolumn = r#"{"name":"Nodes","type":"integer","jsonPath":".status.nodes"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.pulls.ready"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.pulls.failed"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct PrefetchSpec {
    /// Workloads whose labels match all these pairs have their images prefetched.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "label_map_schema")]
    pub filter_by_labels: BTreeMap<String, String>,

    /// A node is targeted only if its name contains this string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub node_filter: Option<String>,

    /// Re-verification period in seconds (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub retry_after: Option<i64>,

    /// Extra image references to prefetch, no workload needed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 4096)))]
    pub images: Vec<String>,

    /// Node label selector, ANDed with `node_filter`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "label_map_schema")]
    pub node_selector: BTreeMap<String, String>,

    /// Which workload kinds `filter_by_labels` applies to (default: Deployment).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workload_kinds: Vec<WorkloadKind>,

    /// Namespaces to look for workloads in (default: the Prefetch's own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 63)))]
    pub namespaces: Vec<String>,

    /// Only target nodes where the workload's pods could run (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub respect_workload_scheduling: Option<bool>,

    /// Cap on concurrent pull pods for this Prefetch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_parallel: Option<i32>,

    /// Deadline of one pull in seconds (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub pull_timeout_seconds: Option<i64>,

    /// Secrets (in this Prefetch's namespace) used to pull the `images` entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<String>,

    /// Stop dispatching pulls, keep the status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
}

impl PrefetchSpec {
    pub fn retry_after_seconds(&self) -> i64 {
        self.retry_after
            .filter(|seconds| *seconds > 0)
            .unwrap_or(DEFAULT_RETRY_AFTER_SECONDS)
    }

    pub fn pull_timeout_seconds(&self) -> i64 {
        self.pull_timeout_seconds
            .filter(|seconds| *seconds > 0)
            .unwrap_or(DEFAULT_PULL_TIMEOUT_SECONDS)
    }

    pub fn workload_kinds(&self) -> Vec<WorkloadKind> {
        if self.workload_kinds.is_empty() {
            vec![WorkloadKind::Deployment]
        } else {
            self.workload_kinds.clone()
        }
    }

    /// The workload kinds to watch. Like the original operator, an empty
    /// label filter selects no workloads (it would otherwise match all).
    pub fn selected_workload_kinds(&self) -> Vec<WorkloadKind> {
        if self.filter_by_labels.is_empty() {
            Vec::new()
        } else {
            self.workload_kinds()
        }
    }

    /// `filter_by_labels` as a Kubernetes label selector (`a=b,c=d`).
    pub fn label_selector(&self) -> String {
        self.filter_by_labels
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Where to look for workloads, split into (allowed, refused): other
    /// namespaces than `own` are refused unless `cross_namespace_allowed`.
    pub fn workload_namespaces(
        &self,
        own: &str,
        cross_namespace_allowed: bool,
    ) -> (Vec<String>, Vec<String>) {
        let mut requested = if self.namespaces.is_empty() {
            vec![own.to_string()]
        } else {
            self.namespaces.clone()
        };
        requested.sort();
        requested.dedup();
        requested
            .into_iter()
            .partition(|namespace| cross_namespace_allowed || namespace == own)
    }

    pub fn respects_workload_scheduling(&self) -> bool {
        self.respect_workload_scheduling.unwrap_or(true)
    }

    pub fn is_suspended(&self) -> bool {
        self.suspend.unwrap_or(false)
    }
}

#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
    CronJob,
    Job,
}

impl std::fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
            WorkloadKind::CronJob => "CronJob",
            WorkloadKind::Job => "Job",
        };
        f.write_str(name)
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Phase {
    Pending,
    Running,
    Ready,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "PENDING",
            Phase::Running => "RUNNING",
            Phase::Ready => "READY",
            Phase::Failed => "FAILED",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct PrefetchStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The resolved, normalised image references.
    #[serde(default)]
    pub images: Vec<String>,
    /// How many nodes are targeted.
    #[serde(default)]
    #[schemars(with = "i64")]
    pub nodes: u32,
    #[serde(default)]
    pub pulls: PullCounts,
    /// The most recent failed (node, image) pairs, bounded.
    #[serde(default)]
    pub failures: Vec<PullFailure>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What was verified and since when, so a restarted process does not
    /// pull it again (see `pull::verified`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<VerifiedRecord>,
}

/// A compact, bounded record of the verified (node, image) pairs.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct VerifiedRecord {
    /// When the oldest of the recorded verifications happened (RFC 3339).
    pub at: String,
    /// Per-bucket digests of the verified pairs, 16 hex digits each.
    pub digests: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct PullCounts {
    #[schemars(with = "i64")]
    pub ready: u32,
    #[schemars(with = "i64")]
    pub in_flight: u32,
    #[schemars(with = "i64")]
    pub failed: u32,
    #[schemars(with = "i64")]
    pub total: u32,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct PullFailure {
    pub node: String,
    pub image: String,
    /// Short machine-readable reason, e.g. `ErrImagePull`.
    pub reason: String,
    #[schemars(with = "i64")]
    pub attempts: u32,
    pub last_error: String,
    /// Whether retrying cannot help (image not found, unauthorized, invalid name).
    #[serde(default)]
    pub permanent: bool,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: String,
}

/// A map whose values must be valid label values; the API server rejects
/// anything else with a message naming the field.
fn label_map_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "maxProperties": 64,
        "additionalProperties": {
            "type": "string",
            "maxLength": 63,
            "pattern": "^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
        }
    })
}

/// The CRD as YAML, exactly what `deploy/crd.yaml` holds.
pub fn crd_yaml() -> Result<String, serde_saphyr::ser::Error> {
    let crd = Prefetch::crd();
    let body = serde_saphyr::to_string(&crd)?;
    Ok(format!(
        "# Generated by `kube-prefetch crd`; a test keeps this file in sync.\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_label_filter_selects_no_workloads() {
        let spec = PrefetchSpec::default();
        assert!(spec.selected_workload_kinds().is_empty());
        let spec = PrefetchSpec {
            filter_by_labels: [("app".to_string(), "nginx".to_string())].into(),
            ..PrefetchSpec::default()
        };
        assert_eq!(
            spec.selected_workload_kinds(),
            vec![WorkloadKind::Deployment]
        );
        assert_eq!(spec.label_selector(), "app=nginx");
    }

    #[test]
    fn other_namespaces_need_the_policy() {
        let spec = PrefetchSpec {
            namespaces: vec!["b".into(), "a".into(), "b".into()],
            ..PrefetchSpec::default()
        };
        assert_eq!(
            spec.workload_namespaces("a", false),
            (vec!["a".to_string()], vec!["b".to_string()])
        );
        assert_eq!(
            spec.workload_namespaces("a", true),
            (vec!["a".to_string(), "b".to_string()], vec![])
        );
        let own_only = PrefetchSpec::default();
        assert_eq!(
            own_only.workload_namespaces("x", false),
            (vec!["x".to_string()], vec![])
        );
    }

    #[test]
    fn defaults_apply_when_fields_are_missing_or_zero() {
        let spec = PrefetchSpec {
            retry_after: Some(0),
            ..PrefetchSpec::default()
        };
        assert_eq!(spec.retry_after_seconds(), DEFAULT_RETRY_AFTER_SECONDS);
        assert_eq!(spec.pull_timeout_seconds(), DEFAULT_PULL_TIMEOUT_SECONDS);
        assert!(spec.respects_workload_scheduling());
        assert!(!spec.is_suspended());
    }
}
