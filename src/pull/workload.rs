//! What a workload contributes to the plan: its images and everything a
//! pull pod needs to pull them exactly as the real pods would.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::PodSpec;

use crate::api::WorkloadKind;
use crate::pull::targeting::SchedulingConstraints;

#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadImages {
    pub kind: WorkloadKind,
    pub namespace: String,
    pub name: String,
    /// Raw references as written in the pod template: init containers first,
    /// then containers, deduplicated keeping the first occurrence.
    pub images: Vec<String>,
    pub scheduling: SchedulingConstraints,
    /// Names from `imagePullSecrets`, so private registries work as for the
    /// real pods.
    pub image_pull_secrets: Vec<String>,
    /// `serviceAccountName`, for kubelet credential providers keyed on it.
    pub service_account: Option<String>,
}

impl WorkloadImages {
    /// Ephemeral containers are ignored: they are debugging aids added to
    /// running pods, never part of a template.
    pub fn from_pod_spec(kind: WorkloadKind, namespace: &str, name: &str, spec: &PodSpec) -> Self {
        let mut images: Vec<String> = Vec::new();
        let containers = spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter());
        for container in containers {
            let Some(image) = container.image.as_deref() else {
                continue;
            };
            let image = image.trim();
            if !image.is_empty() && !images.iter().any(|seen| seen == image) {
                images.push(image.to_string());
            }
        }
        let image_pull_secrets = spec
            .image_pull_secrets
            .iter()
            .flatten()
            .map(|secret| secret.name.clone())
            .filter(|secret| !secret.is_empty())
            .collect();
        // `serviceAccount` is the deprecated alias, still honoured by the API.
        let service_account = [&spec.service_account_name, &spec.service_account]
            .into_iter()
            .flatten()
            .find(|account| !account.is_empty())
            .cloned();
        WorkloadImages {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
            images,
            scheduling: SchedulingConstraints::from_pod_spec(spec),
            image_pull_secrets,
            service_account,
        }
    }
}

/// A workload kind whose pods come from a pod template.
pub trait PodTemplated {
    const KIND: WorkloadKind;
    fn pod_spec(&self) -> Option<&PodSpec>;
}

impl PodTemplated for Deployment {
    const KIND: WorkloadKind = WorkloadKind::Deployment;
    fn pod_spec(&self) -> Option<&PodSpec> {
        self.spec.as_ref().and_then(|s| s.template.spec.as_ref())
    }
}

impl PodTemplated for StatefulSet {
    const KIND: WorkloadKind = WorkloadKind::StatefulSet;
    fn pod_spec(&self) -> Option<&PodSpec> {
        self.spec.as_ref().and_then(|s| s.template.spec.as_ref())
    }
}

impl PodTemplated for DaemonSet {
    const KIND: WorkloadKind = WorkloadKind::DaemonSet;
    fn pod_spec(&self) -> Option<&PodSpec> {
        self.spec.as_ref().and_then(|s| s.template.spec.as_ref())
    }
}

impl PodTemplated for Job {
    const KIND: WorkloadKind = WorkloadKind::Job;
    fn pod_spec(&self) -> Option<&PodSpec> {
        self.spec.as_ref().and_then(|s| s.template.spec.as_ref())
    }
}

impl PodTemplated for CronJob {
    const KIND: WorkloadKind = WorkloadKind::CronJob;
    fn pod_spec(&self) -> Option<&PodSpec> {
        // A CronJob's pods come from its job template's pod template.
        self.spec
            .job_template
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Container, EphemeralContainer, LocalObjectReference, Toleration,
    };

    fn container(name: &str, image: Option<&str>) -> Container {
        Container {
            name: name.to_string(),
            image: image.map(str::to_string),
            ..Container::default()
        }
    }

    #[test]
    fn images_init_first_deduplicated_in_order() {
        let spec = PodSpec {
            init_containers: Some(vec![
                container("migrate", Some("app:v1")),
                container("wait", Some("busybox:1.36")),
            ]),
            containers: vec![
                container("app", Some("app:v1")),
                container("sidecar", Some("envoy:1.30")),
                container("no-image", None),
                container("blank", Some("  ")),
                container("again", Some("busybox:1.36")),
                container("proxy", Some("nginx:1.7.9")),
            ],
            ephemeral_containers: Some(vec![EphemeralContainer {
                name: "debug".into(),
                image: Some("debugger:1".into()),
                ..EphemeralContainer::default()
            }]),
            ..PodSpec::default()
        };
        let workload = WorkloadImages::from_pod_spec(WorkloadKind::Deployment, "ns", "web", &spec);
        assert_eq!(
            workload.images,
            vec!["app:v1", "busybox:1.36", "envoy:1.30", "nginx:1.7.9"]
        );
        assert_eq!(workload.kind, WorkloadKind::Deployment);
        assert_eq!(workload.namespace, "ns");
        assert_eq!(workload.name, "web");
    }

    #[test]
    fn raw_references_are_kept() {
        // Normalisation happens in planning; `nginx` and its canonical form
        // are both kept here as written.
        let spec = PodSpec {
            containers: vec![
                container("a", Some("nginx")),
                container("b", Some("docker.io/library/nginx:latest")),
            ],
            ..PodSpec::default()
        };
        let workload = WorkloadImages::from_pod_spec(WorkloadKind::Job, "ns", "j", &spec);
        assert_eq!(
            workload.images,
            vec!["nginx", "docker.io/library/nginx:latest"]
        );
    }

    #[test]
    fn secrets_service_account_and_scheduling() {
        let spec = PodSpec {
            containers: vec![container("a", Some("private.io/app:1"))],
            image_pull_secrets: Some(vec![
                LocalObjectReference {
                    name: "regcred".into(),
                },
                LocalObjectReference {
                    name: String::new(),
                },
                LocalObjectReference {
                    name: "other".into(),
                },
            ]),
            service_account_name: Some("puller".into()),
            tolerations: Some(vec![Toleration {
                operator: Some("Exists".into()),
                ..Toleration::default()
            }]),
            ..PodSpec::default()
        };
        let workload = WorkloadImages::from_pod_spec(WorkloadKind::StatefulSet, "ns", "db", &spec);
        assert_eq!(workload.image_pull_secrets, vec!["regcred", "other"]);
        assert_eq!(workload.service_account.as_deref(), Some("puller"));
        assert_eq!(workload.scheduling.tolerations.len(), 1);
    }

    #[test]
    fn service_account_empty_or_deprecated_field() {
        let mut spec = PodSpec {
            service_account_name: Some(String::new()),
            ..PodSpec::default()
        };
        let kind = WorkloadKind::DaemonSet;
        assert_eq!(
            WorkloadImages::from_pod_spec(kind, "n", "d", &spec).service_account,
            None
        );
        spec.service_account = Some("legacy".into());
        assert_eq!(
            WorkloadImages::from_pod_spec(kind, "n", "d", &spec)
                .service_account
                .as_deref(),
            Some("legacy")
        );
        spec.service_account_name = Some("current".into());
        assert_eq!(
            WorkloadImages::from_pod_spec(kind, "n", "d", &spec)
                .service_account
                .as_deref(),
            Some("current")
        );
        let bare = WorkloadImages::from_pod_spec(kind, "n", "d", &PodSpec::default());
        assert!(bare.images.is_empty());
        assert!(bare.image_pull_secrets.is_empty());
        assert_eq!(bare.service_account, None);
    }
}
