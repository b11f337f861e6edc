//! The `Prefetch` custom resource (`cache.techsquad.rocks/v1`): the one place
//! its schema lives. Field names stay snake_case for compatibility with the
//! original operator, whose manifests must keep working unchanged.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use kube::CustomResource;
use kube::core::CustomResourceExt;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::names;

/// Default re-verification period, as in the original operator.
pub const DEFAULT_RETRY_AFTER_SECONDS: i64 = 300;
/// Default per-pull deadline.
pub const DEFAULT_PULL_TIMEOUT_SECONDS: i64 = 600;
/// At most this many failures are kept in `status.failures`.
pub const MAX_STATUS_FAILURES: usize = 20;

/// Limits of a Prefetch's spec. The schema makes the API server refuse
/// more; the code that reads a spec clamps to them as well, for objects
/// stored under an older schema.
pub const MAX_IMAGES: usize = 256;
/// The longest valid reference is about 520 characters (a 255-character
/// name, a 128-character tag and a sha512 digest). 256 of 1,024 fit in etcd
/// twice over, as a set-type list is repeated in `managedFields`; 256 of
/// 4,096 made an object etcd refused.
pub const MAX_IMAGE_LENGTH: usize = 1024;
pub const MAX_NAMESPACES: usize = 64;
pub const MAX_IMAGE_PULL_SECRETS: usize = 64;
pub const MAX_LABELS: usize = 64;
pub const MAX_TOLERATIONS: usize = 32;
/// 30 days: a longer period is never re-verified in practice, and keeps
/// deadline arithmetic far from overflowing.
pub const MAX_RETRY_AFTER_SECONDS: i64 = 30 * 24 * 3600;
pub const MAX_PULL_TIMEOUT_SECONDS: i64 = 86_400;
pub const MAX_PARALLEL: i32 = 10_000;

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

    /// Re-verification period in seconds (default 300, at most 30 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_RETRY_AFTER_SECONDS))]
    pub retry_after: Option<i64>,

    /// Extra image references to prefetch, no workload needed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "images_schema")]
    pub images: Vec<String>,

    /// Node label selector, ANDed with `node_filter`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "label_map_schema")]
    pub node_selector: BTreeMap<String, String>,

    /// Which workload kinds `filter_by_labels` applies to (default: Deployment).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "workload_kinds_schema")]
    pub workload_kinds: Vec<WorkloadKind>,

    /// Namespaces to look for workloads in (default: the Prefetch's own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "namespaces_schema")]
    pub namespaces: Vec<String>,

    /// Only target nodes where the workload's pods could run (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub respect_workload_scheduling: Option<bool>,

    /// Cap on concurrent pull pods for this Prefetch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_PARALLEL))]
    pub max_parallel: Option<i32>,

    /// Deadline of one pull in seconds (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_PULL_TIMEOUT_SECONDS))]
    pub pull_timeout_seconds: Option<i64>,

    /// Secrets (in this Prefetch's namespace) used to pull the `images` entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "image_pull_secrets_schema")]
    pub image_pull_secrets: Vec<String>,

    /// Stop dispatching pulls, keep the status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,

    /// Taints the pull pods of `images` may tolerate (core/v1 tolerations,
    /// as in a pod spec). Without them, `images` go only to nodes without
    /// NoSchedule/NoExecute taints; workload images follow the workload's
    /// own tolerations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "tolerations_schema")]
    pub tolerations: Vec<Toleration>,
}

impl PrefetchSpec {
    pub fn retry_after_seconds(&self) -> i64 {
        self.retry_after
            .filter(|seconds| *seconds > 0)
            .map_or(DEFAULT_RETRY_AFTER_SECONDS, |seconds| {
                seconds.min(MAX_RETRY_AFTER_SECONDS)
            })
    }

    pub fn pull_timeout_seconds(&self) -> i64 {
        self.pull_timeout_seconds
            .filter(|seconds| *seconds > 0)
            .map_or(DEFAULT_PULL_TIMEOUT_SECONDS, |seconds| {
                seconds.min(MAX_PULL_TIMEOUT_SECONDS)
            })
    }

    /// The kinds, each once: a repeated kind must not open a second watch.
    pub fn workload_kinds(&self) -> Vec<WorkloadKind> {
        if self.workload_kinds.is_empty() {
            vec![WorkloadKind::Deployment]
        } else {
            let mut kinds = self.workload_kinds.clone();
            kinds.sort();
            kinds.dedup();
            kinds
        }
    }

    /// The workload kinds to watch. Like the original operator, an empty
    /// label filter selects no workloads (it would otherwise match all);
    /// neither does an invalid one (see [`PrefetchSpec::spec_problems`]).
    pub fn selected_workload_kinds(&self) -> Vec<WorkloadKind> {
        if self.filter_by_labels.is_empty() || self.label_selector().is_err() {
            Vec::new()
        } else {
            self.workload_kinds()
        }
    }

    /// `filter_by_labels` as a Kubernetes label selector (`a=b,c=d`), or
    /// why it cannot be one: never a selector built from an invalid key.
    pub fn label_selector(&self) -> Result<String, String> {
        names::equality_selector(&self.filter_by_labels)
            .map_err(|invalid| format!("filter_by_labels: {invalid}"))
    }

    /// What is wrong with the spec although the API server stored it (an
    /// object from before the schema had the rule, or an older CRD), for
    /// `status.message`. The fields at fault select nothing.
    pub fn spec_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(problem) = self.label_selector() {
            problems.push(format!("{problem}; no workload is selected"));
        }
        if let Err(invalid) = names::equality_selector(&self.node_selector) {
            problems.push(format!("node_selector: {invalid}; no node is selected"));
        }
        problems
    }

    /// Where to look for workloads, split into (allowed, refused): other
    /// namespaces than `own` are refused unless `allowed` says yes (see
    /// `crate::pull::namespaces`).
    pub fn workload_namespaces(
        &self,
        own: &str,
        allowed: impl Fn(&str) -> bool,
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
            .partition(|namespace| namespace == own || allowed(namespace))
    }

    pub fn respects_workload_scheduling(&self) -> bool {
        self.respect_workload_scheduling.unwrap_or(true)
    }

    /// `retry_after` in effect: the spec's (capped), or `default` when unset
    /// or zero.
    pub fn retry_after_or(&self, default: std::time::Duration) -> std::time::Duration {
        match self.retry_after {
            Some(seconds) if seconds > 0 => {
                std::time::Duration::from_secs(seconds.min(MAX_RETRY_AFTER_SECONDS).unsigned_abs())
            }
            _ => default,
        }
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
    /// Pairs whose image is on the node, including those being re-verified.
    #[schemars(with = "i64")]
    pub ready: u32,
    /// Of `ready`: pairs being checked again after `retry_after` (a pull
    /// pod in flight for an image that was there).
    #[serde(default)]
    #[schemars(with = "i64")]
    pub reverifying: u32,
    /// Pairs with a first pull (or a retry) in flight.
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

/// A label map (`filter_by_labels`, `node_selector`): keys must be label
/// keys and values label values; the API server rejects anything else with
/// a message naming the field. Keys need CEL (a structural schema has no
/// `propertyNames`); the total length bound keeps its cost estimate low.
fn label_map_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "maxProperties": MAX_LABELS,
        "additionalProperties": {
            "type": "string",
            "maxLength": names::LABEL_MAX,
            "pattern": "^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
        },
        "x-kubernetes-validations": [{
            "rule": LABEL_KEYS_RULE,
            "message": LABEL_KEYS_MESSAGE
        }]
    })
}

/// CEL: every key is `[prefix/]name`, prefix a DNS subdomain, name at most
/// 63 characters (253 + '/' + 63 in all).
pub const LABEL_KEYS_RULE: &str = "self.all(k, size(k) <= 317 && k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$'))";
pub const LABEL_KEYS_MESSAGE: &str = "keys must be label keys: an optional DNS subdomain prefix and '/', then at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit";

fn images_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": MAX_IMAGES,
        "x-kubernetes-list-type": "set",
        "items": { "type": "string", "minLength": 1, "maxLength": MAX_IMAGE_LENGTH }
    })
}

fn namespaces_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": MAX_NAMESPACES,
        "x-kubernetes-list-type": "set",
        "items": {
            "type": "string",
            "minLength": 1,
            "maxLength": names::DNS_LABEL_MAX,
            "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
        }
    })
}

fn image_pull_secrets_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": MAX_IMAGE_PULL_SECRETS,
        "x-kubernetes-list-type": "set",
        "items": {
            "type": "string",
            "minLength": 1,
            "maxLength": names::DNS_SUBDOMAIN_MAX,
            "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
        }
    })
}

/// core/v1 Toleration, with the operators and effects Kubernetes accepts
/// ("" meaning Equal, and every effect).
fn tolerations_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": MAX_TOLERATIONS,
        "items": {
            "type": "object",
            "properties": {
                "key": { "type": "string", "maxLength": 317 },
                "operator": { "type": "string", "enum": ["", "Exists", "Equal"] },
                "value": { "type": "string", "maxLength": names::LABEL_MAX },
                "effect": {
                    "type": "string",
                    "enum": ["", "NoSchedule", "PreferNoSchedule", "NoExecute"]
                },
                "tolerationSeconds": { "type": "integer", "format": "int64" }
            }
        }
    })
}

/// Each kind once: a repeated kind used to open one more watch per repeat.
fn workload_kinds_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": 5,
        "x-kubernetes-list-type": "set",
        "items": {
            "type": "string",
            "enum": ["Deployment", "StatefulSet", "DaemonSet", "CronJob", "Job"]
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
        assert_eq!(spec.label_selector(), Ok("app=nginx".to_string()));
    }

    #[test]
    fn invalid_label_keys_build_no_selector() {
        let spec = PrefetchSpec {
            filter_by_labels: [("app!".to_string(), "web".to_string())].into(),
            node_selector: [("zone".to_string(), "a b".to_string())].into(),
            ..PrefetchSpec::default()
        };
        assert_eq!(
            spec.label_selector(),
            Err("filter_by_labels: key \"app!\" is not a label key: an optional DNS subdomain prefix and '/', then at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit".to_string())
        );
        assert!(spec.selected_workload_kinds().is_empty());
        assert_eq!(
            spec.spec_problems(),
            vec![
                "filter_by_labels: key \"app!\" is not a label key: an optional DNS subdomain prefix and '/', then at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit; no workload is selected".to_string(),
                "node_selector: value \"a b\" is not a label value: empty, or at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit; no node is selected".to_string(),
            ]
        );
        let fine = PrefetchSpec {
            filter_by_labels: [("example.com/app".to_string(), "web".to_string())].into(),
            ..PrefetchSpec::default()
        };
        assert!(fine.spec_problems().is_empty());
    }

    #[test]
    fn repeated_workload_kinds_count_once() {
        let spec = PrefetchSpec {
            filter_by_labels: [("app".to_string(), "web".to_string())].into(),
            workload_kinds: vec![WorkloadKind::Job; 10_000]
                .into_iter()
                .chain([WorkloadKind::Deployment, WorkloadKind::Job])
                .collect(),
            ..PrefetchSpec::default()
        };
        assert_eq!(
            spec.selected_workload_kinds(),
            vec![WorkloadKind::Deployment, WorkloadKind::Job]
        );
    }

    #[test]
    fn huge_periods_are_clamped() {
        let spec = PrefetchSpec {
            retry_after: Some(i64::MAX),
            pull_timeout_seconds: Some(i64::MAX),
            ..PrefetchSpec::default()
        };
        assert_eq!(spec.retry_after_seconds(), MAX_RETRY_AFTER_SECONDS);
        assert_eq!(spec.pull_timeout_seconds(), MAX_PULL_TIMEOUT_SECONDS);
    }

    #[test]
    fn other_namespaces_need_the_policy() {
        let spec = PrefetchSpec {
            namespaces: vec!["b".into(), "a".into(), "b".into()],
            ..PrefetchSpec::default()
        };
        assert_eq!(
            spec.workload_namespaces("a", |_| false),
            (vec!["a".to_string()], vec!["b".to_string()])
        );
        assert_eq!(
            spec.workload_namespaces("a", |_| true),
            (vec!["a".to_string(), "b".to_string()], vec![])
        );
        let own_only = PrefetchSpec::default();
        assert_eq!(
            own_only.workload_namespaces("x", |_| false),
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
