//! The pull pod: a node-pinned pod whose only job is to make the kubelet
//! pull one image, without running any of that image's code.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, LocalObjectReference, Pod, PodSecurityContext,
    PodSpec, ResourceRequirements, SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::pull::outcome::{HELPER_INIT_CONTAINER, PULL_CONTAINER};
use crate::pull::plan::{PairKey, PullTarget};

pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "kube-prefetch";
pub const PREFETCH_NAMESPACE_LABEL: &str = "cache.techsquad.rocks/prefetch-namespace";
pub const PREFETCH_NAME_LABEL: &str = "cache.techsquad.rocks/prefetch-name";
pub const PREFETCH_UID_LABEL: &str = "cache.techsquad.rocks/prefetch-uid";
/// Full node name (labels cannot hold every node name).
pub const NODE_ANNOTATION: &str = "cache.techsquad.rocks/node";
/// Full canonical image reference (labels cannot hold references).
pub const IMAGE_ANNOTATION: &str = "cache.techsquad.rocks/image";

const POD_NAME_PREFIX: &str = "kube-prefetch-";
/// 40 hex characters = 160 bits of the hash; prefix + hash = 54 characters.
const POD_NAME_HASH_LEN: usize = 40;
const MAX_LABEL_VALUE_LEN: usize = 63;

const NOOP_VOLUME: &str = "noop";
const NOOP_MOUNT_PATH: &str = "/kube-prefetch";
/// Where the helper image keeps the static no-op binary.
const HELPER_BINARY: &str = "/kube-prefetch-noop";
const NOOP_BINARY: &str = "/kube-prefetch/noop";
/// The conventional `nobody` user and group.
const NOBODY: i64 = 65534;
/// The command of a direct pull container: a path no image has, so starting
/// the container fails right after the kubelet pulled the image, and no code
/// of the image runs. The name says who asked, for whoever reads the event.
pub const DIRECT_PULL_COMMAND: &str = "/.kube-prefetch/pull-only-not-a-command";

/// How a pull pod makes the kubelet pull an image without running its code.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PullMethod {
    /// The image's container runs [`DIRECT_PULL_COMMAND`]: the kubelet pulls
    /// the image, then the runtime fails to start the container
    /// (`StartError`); the pull is judged from the container's `imageID`.
    /// No helper image to build, host, mirror or trust, and one container
    /// start instead of two: half the time per pull on a real node
    /// (BENCHMARKS.md, "pull methods"). The default.
    #[default]
    Direct,
    /// An init container from the helper image copies a static no-op binary
    /// into an emptyDir; the image's container runs it and exits 0, so the
    /// pod Succeeds.
    Helper,
}

impl PullMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            PullMethod::Direct => "direct",
            PullMethod::Helper => "helper",
        }
    }
}

/// Label selector matching every pull pod of kube-prefetch.
pub fn managed_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}")
}

/// Deterministic pod name for one pair of one Prefetch: creating it twice
/// fails with AlreadyExists instead of duplicating work, and a restarted
/// orchestrator finds the same name. `kube-prefetch-` + 40 hex characters of
/// SHA-256 over the three values, NUL-separated so that no two different
/// triples hash the same input; a valid DNS-1123 label of 54 characters.
pub fn pull_pod_name(prefetch_uid: &str, node: &str, image: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(prefetch_uid.as_bytes());
    hasher.update([0u8]);
    hasher.update(node.as_bytes());
    hasher.update([0u8]);
    hasher.update(image.as_bytes());
    let hex = to_hex(&hasher.finalize());
    format!("{POD_NAME_PREFIX}{}", &hex[..POD_NAME_HASH_LEN])
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    hex
}

/// `value` if it is a valid label value; otherwise a valid one derived from
/// it: invalid characters become `-`, and if too long it is cut and given a
/// hash suffix, so that distinct long names stay distinct. Use it to build
/// label selectors matching [`build_pull_pod`]'s labels.
pub fn label_value(value: &str) -> String {
    if is_valid_label_value(value) {
        return value.to_string();
    }
    let cleaned: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let suffix = &to_hex(&Sha256::digest(value.as_bytes()))[..10];
    // Room for "-" + suffix.
    let keep = MAX_LABEL_VALUE_LEN - 1 - suffix.len();
    let head: String = cleaned.chars().take(keep).collect();
    let head = head.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if head.is_empty() {
        suffix.to_string()
    } else {
        format!("{head}-{suffix}")
    }
}

/// `(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?`, at most 63 characters.
pub fn is_valid_label_value(value: &str) -> bool {
    if value.is_empty() {
        return true;
    }
    value.len() <= MAX_LABEL_VALUE_LEN
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Lowercase alphanumerics and '-', starting and ending alphanumeric, at
/// most 63 characters.
pub fn is_dns1123_label(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_LABEL_VALUE_LEN
        && value.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && value.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

pub struct PullPodParams<'a> {
    pub prefetch_namespace: &'a str,
    pub prefetch_name: &'a str,
    pub prefetch_uid: &'a str,
    pub target: &'a PullTarget,
    pub method: PullMethod,
    /// Our own multi-arch image holding the static no-op binary (used by
    /// [`PullMethod::Helper`] only).
    pub helper_image: &'a str,
    /// `activeDeadlineSeconds`: the pull timeout.
    pub timeout_seconds: i64,
    pub priority_class: Option<&'a str>,
}

/// The labels every pull pod of one Prefetch carries.
pub fn pull_pod_labels(
    prefetch_namespace: &str,
    prefetch_name: &str,
    prefetch_uid: &str,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
        (
            PREFETCH_NAMESPACE_LABEL.to_string(),
            label_value(prefetch_namespace),
        ),
        (PREFETCH_NAME_LABEL.to_string(), label_value(prefetch_name)),
        (PREFETCH_UID_LABEL.to_string(), label_value(prefetch_uid)),
    ])
}

pub fn build_pull_pod(params: &PullPodParams) -> Pod {
    let target = params.target;
    let annotations = BTreeMap::from([
        (NODE_ANNOTATION.to_string(), target.node.to_string()),
        (IMAGE_ANNOTATION.to_string(), target.image.to_string()),
    ]);
    let metadata = ObjectMeta {
        name: Some(pull_pod_name(
            params.prefetch_uid,
            &target.node,
            &target.image,
        )),
        namespace: Some(target.settings.namespace.clone()),
        labels: Some(pull_pod_labels(
            params.prefetch_namespace,
            params.prefetch_name,
            params.prefetch_uid,
        )),
        annotations: Some(annotations),
        ..ObjectMeta::default()
    };

    let mut pull = Container {
        name: PULL_CONTAINER.to_string(),
        image: Some(target.image.to_string()),
        image_pull_policy: Some("IfNotPresent".to_string()),
        command: Some(vec![DIRECT_PULL_COMMAND.to_string()]),
        resources: Some(tiny_resources()),
        security_context: Some(restricted_security_context()),
        ..Container::default()
    };
    let (init_containers, volumes) = match params.method {
        PullMethod::Direct => (None, None),
        PullMethod::Helper => {
            // The target image only provides the filesystem; the process is
            // our no-op from the shared volume, so images without a shell
            // work and none of their code runs.
            pull.command = Some(vec![NOOP_BINARY.to_string()]);
            pull.volume_mounts = Some(vec![noop_mount(true)]);
            (
                Some(vec![helper_init_container(params.helper_image)]),
                Some(vec![Volume {
                    name: NOOP_VOLUME.to_string(),
                    empty_dir: Some(EmptyDirVolumeSource {
                        medium: Some("Memory".to_string()),
                        size_limit: Some(Quantity("16Mi".to_string())),
                    }),
                    ..Volume::default()
                }]),
            )
        }
    };

    let spec = PodSpec {
        // Set directly: no scheduler round trip, and the pod lands exactly
        // on the node whose cache we want to fill.
        node_name: Some(target.node.to_string()),
        restart_policy: Some("Never".to_string()),
        active_deadline_seconds: Some(params.timeout_seconds),
        termination_grace_period_seconds: Some(0),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        image_pull_secrets: non_empty(
            target
                .settings
                .image_pull_secrets
                .iter()
                .map(|name| LocalObjectReference { name: name.clone() })
                .collect(),
        ),
        service_account_name: target.settings.service_account.clone(),
        tolerations: non_empty(target.settings.tolerations.clone()),
        priority_class_name: params.priority_class.map(str::to_string),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..PodSecurityContext::default()
        }),
        volumes,
        init_containers,
        containers: vec![pull],
        ..PodSpec::default()
    };

    Pod {
        metadata,
        spec: Some(spec),
        status: None,
    }
}

fn helper_init_container(helper_image: &str) -> Container {
    Container {
        name: HELPER_INIT_CONTAINER.to_string(),
        image: Some(helper_image.to_string()),
        image_pull_policy: Some("IfNotPresent".to_string()),
        command: Some(vec![
            HELPER_BINARY.to_string(),
            "install".to_string(),
            NOOP_BINARY.to_string(),
        ]),
        volume_mounts: Some(vec![noop_mount(false)]),
        resources: Some(tiny_resources()),
        security_context: Some(restricted_security_context()),
        ..Container::default()
    }
}

fn non_empty<T>(items: Vec<T>) -> Option<Vec<T>> {
    if items.is_empty() { None } else { Some(items) }
}

fn noop_mount(read_only: bool) -> VolumeMount {
    VolumeMount {
        name: NOOP_VOLUME.to_string(),
        mount_path: NOOP_MOUNT_PATH.to_string(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

fn tiny_resources() -> ResourceRequirements {
    let quantities = |cpu: &str, memory: &str| {
        BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu.to_string())),
            ("memory".to_string(), Quantity(memory.to_string())),
        ])
    };
    ResourceRequirements {
        requests: Some(quantities("1m", "4Mi")),
        limits: Some(quantities("10m", "16Mi")),
        ..ResourceRequirements::default()
    }
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_string(),
        localhost_profile: None,
    }
}

/// Passes the Pod Security "restricted" profile, so pull pods run in
/// namespaces that enforce it.
fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(NOBODY),
        run_as_group: Some(NOBODY),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_string()]),
            add: None,
        }),
        read_only_root_filesystem: Some(true),
        seccomp_profile: Some(runtime_default_seccomp()),
        ..SecurityContext::default()
    }
}

/// The Prefetch uid and pair of a pull pod, for adopting pods after a
/// restart. `None` unless the pod is ours and carries all three values.
pub fn pair_of_pod(pod: &Pod) -> Option<(String, PairKey)> {
    let labels = pod.metadata.labels.as_ref()?;
    if labels.get(MANAGED_BY_LABEL).map(String::as_str) != Some(MANAGED_BY_VALUE) {
        return None;
    }
    let uid = labels
        .get(PREFETCH_UID_LABEL)
        .filter(|uid| !uid.is_empty())?;
    let annotations = pod.metadata.annotations.as_ref()?;
    let node = annotations
        .get(NODE_ANNOTATION)
        .filter(|node| !node.is_empty())?;
    let image = annotations
        .get(IMAGE_ANNOTATION)
        .filter(|image| !image.is_empty())?;
    Some((uid.clone(), PairKey::new(node.clone(), image.clone())))
}

/// Whether a pod that [`pair_of_pod`] found to be the pull pod of `key` for
/// the Prefetch `prefetch_uid` is one we would have created: the name
/// derived from those three, bound to the pair's node and, when `namespace`
/// is given (the pair is wanted: where the plan puts its pod), in that
/// namespace. Labels and annotations are anyone's to set, and a pod taken
/// for ours holds a pull slot and can mark the pair satisfied, so anything
/// else is left alone. A pair no longer wanted passes `None`: its leftover
/// may sit in a namespace the Prefetch no longer targets, and deleting a
/// pod of exactly our name gives nobody anything. The error says why, for
/// the log.
pub fn check_own_pull_pod(
    pod: &Pod,
    prefetch_uid: &str,
    key: &PairKey,
    namespace: Option<&str>,
) -> Result<(), String> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let expected = pull_pod_name(prefetch_uid, &key.node, &key.image);
    if name != expected {
        return Err(format!(
            "its name is not {expected}, the one we give the pod of node {} and image {}",
            key.node, key.image
        ));
    }
    let node = pod
        .spec
        .as_ref()
        .and_then(|spec| spec.node_name.as_deref())
        .unwrap_or_default();
    if node != &*key.node {
        return Err(format!(
            "it is bound to node {node:?}, not to {:?} as its annotation says",
            key.node
        ));
    }
    let pod_namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    match namespace {
        Some(wanted) if wanted != pod_namespace => Err(format!(
            "it is in namespace {pod_namespace}, not in {wanted} where we create it"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pull::plan::{PullSettings, tolerate_everything};

    const UID: &str = "0b7e4f3c-2a51-4d0e-9c1b-6f8a2d3e4b5c";

    fn target() -> PullTarget {
        PullTarget::new(
            "kind-worker",
            "docker.io/library/nginx:1.7.9",
            PullSettings {
                namespace: "apps".into(),
                image_pull_secrets: vec!["regcred".into()],
                service_account: Some("web".into()),
                tolerations: vec![tolerate_everything()],
            },
        )
    }

    fn build(target: &PullTarget, name: &str, priority: Option<&str>) -> Pod {
        build_pull_pod(&PullPodParams {
            prefetch_namespace: "default",
            prefetch_name: name,
            prefetch_uid: UID,
            target,
            method: PullMethod::Helper,
            helper_image: "ghcr.io/kube-prefetch/helper:0.1.0",
            timeout_seconds: 600,
            priority_class: priority,
        })
    }

    #[test]
    fn selector() {
        assert_eq!(
            managed_selector(),
            "app.kubernetes.io/managed-by=kube-prefetch"
        );
    }

    #[test]
    fn pod_name_is_deterministic_short_and_valid() {
        let a = pull_pod_name(UID, "kind-worker", "docker.io/library/nginx:1.7.9");
        assert_eq!(
            a,
            pull_pod_name(UID, "kind-worker", "docker.io/library/nginx:1.7.9")
        );
        assert!(a.starts_with("kube-prefetch-"));
        assert_eq!(a.len(), 54);
        assert!(is_dns1123_label(&a));

        let others = [
            pull_pod_name(UID, "kind-worker2", "docker.io/library/nginx:1.7.9"),
            pull_pod_name(UID, "kind-worker", "docker.io/library/nginx:1.7.90"),
            pull_pod_name("other-uid", "kind-worker", "docker.io/library/nginx:1.7.9"),
            // Separators keep shifted boundaries apart.
            pull_pod_name(UID, "kind-worke", "rdocker.io/library/nginx:1.7.9"),
        ];
        for other in others {
            assert_ne!(a, other);
            assert!(is_dns1123_label(&other));
        }
        let long = pull_pod_name(&"u".repeat(500), &"n".repeat(500), &"i".repeat(5000));
        assert!(long.len() <= 63 && is_dns1123_label(&long));
        assert!(is_dns1123_label(&pull_pod_name("", "", "")));
    }

    #[test]
    fn label_values_are_made_valid() {
        assert_eq!(label_value("my-prefetch"), "my-prefetch");
        assert_eq!(label_value(""), "");
        let exactly_63 = "a".repeat(63);
        assert_eq!(label_value(&exactly_63), exactly_63);

        let long = format!("{}.{}", "a".repeat(60), "b".repeat(100));
        let value = label_value(&long);
        assert!(is_valid_label_value(&value), "{value}");
        assert!(value.len() <= 63);
        assert!(value.starts_with("aaaa"));
        assert_eq!(value, label_value(&long), "deterministic");
        let other = format!("{}.{}", "a".repeat(60), "c".repeat(100));
        assert_ne!(
            value,
            label_value(&other),
            "distinct long names stay distinct"
        );

        // A cut that would end on a separator is trimmed.
        let dotted = format!("{}.{}", "a".repeat(51), "b".repeat(20));
        let value = label_value(&dotted);
        assert!(is_valid_label_value(&value), "{value}");

        assert!(is_valid_label_value(&label_value("-weird/value-")));
        assert!(is_valid_label_value(&label_value("...")));
        assert!(!is_valid_label_value("-a"));
        assert!(!is_valid_label_value("a b"));
        assert!(!is_valid_label_value(&"a".repeat(64)));
    }

    #[test]
    fn metadata() {
        let target = target();
        let pod = build(&target, "nginx-prefetch", None);
        let meta = &pod.metadata;
        assert_eq!(
            meta.name.as_deref(),
            Some(pull_pod_name(UID, &target.node, &target.image).as_str())
        );
        assert_eq!(meta.namespace.as_deref(), Some("apps"));
        let labels = meta.labels.clone().unwrap_or_default();
        assert_eq!(labels[MANAGED_BY_LABEL], "kube-prefetch");
        assert_eq!(labels[PREFETCH_NAMESPACE_LABEL], "default");
        assert_eq!(labels[PREFETCH_NAME_LABEL], "nginx-prefetch");
        assert_eq!(labels[PREFETCH_UID_LABEL], UID);
        assert_eq!(labels.len(), 4);
        assert_eq!(labels, pull_pod_labels("default", "nginx-prefetch", UID));
        let annotations = meta.annotations.clone().unwrap_or_default();
        assert_eq!(annotations[NODE_ANNOTATION], "kind-worker");
        assert_eq!(
            annotations[IMAGE_ANNOTATION],
            "docker.io/library/nginx:1.7.9"
        );

        let long_name = "p".repeat(200);
        let pod = build(&target, &long_name, None);
        let labels = pod.metadata.labels.unwrap_or_default();
        assert!(is_valid_label_value(&labels[PREFETCH_NAME_LABEL]));
    }

    #[test]
    fn pod_spec_fields() {
        let target = target();
        let pod = build(&target, "p", Some("kube-prefetch-low"));
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.node_name.as_deref(), Some("kind-worker"));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.active_deadline_seconds, Some(600));
        assert_eq!(spec.termination_grace_period_seconds, Some(0));
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.enable_service_links, Some(false));
        assert_eq!(
            spec.image_pull_secrets,
            Some(vec![LocalObjectReference {
                name: "regcred".into()
            }])
        );
        assert_eq!(spec.service_account_name.as_deref(), Some("web"));
        assert_eq!(spec.tolerations, Some(vec![tolerate_everything()]));
        assert_eq!(
            spec.priority_class_name.as_deref(),
            Some("kube-prefetch-low")
        );
        let pod_security = spec.security_context.expect("pod security context");
        assert_eq!(pod_security.run_as_non_root, Some(true));
        assert_eq!(
            pod_security.seccomp_profile.map(|profile| profile.type_),
            Some("RuntimeDefault".to_string())
        );

        let volumes = spec.volumes.expect("volumes");
        assert_eq!(volumes.len(), 1);
        assert_eq!(volumes[0].name, "noop");
        let empty_dir = volumes[0].empty_dir.clone().expect("emptyDir");
        assert_eq!(empty_dir.medium.as_deref(), Some("Memory"));
        assert_eq!(empty_dir.size_limit, Some(Quantity("16Mi".into())));

        let init = spec.init_containers.expect("init containers");
        assert_eq!(init.len(), 1);
        let install = &init[0];
        assert_eq!(install.name, "install-noop");
        assert_eq!(
            install.image.as_deref(),
            Some("ghcr.io/kube-prefetch/helper:0.1.0")
        );
        assert_eq!(
            install.command,
            Some(vec![
                "/kube-prefetch-noop".to_string(),
                "install".to_string(),
                "/kube-prefetch/noop".to_string()
            ])
        );
        let mounts = install.volume_mounts.clone().expect("mounts");
        assert_eq!(mounts[0].name, "noop");
        assert_eq!(mounts[0].mount_path, "/kube-prefetch");
        assert_ne!(mounts[0].read_only, Some(true), "the installer writes");

        assert_eq!(spec.containers.len(), 1);
        let pull = &spec.containers[0];
        assert_eq!(pull.name, "pull");
        assert_eq!(pull.image.as_deref(), Some("docker.io/library/nginx:1.7.9"));
        assert_eq!(pull.image_pull_policy.as_deref(), Some("IfNotPresent"));
        assert_eq!(pull.command, Some(vec!["/kube-prefetch/noop".to_string()]));
        let mounts = pull.volume_mounts.clone().expect("mounts");
        assert_eq!(mounts[0].mount_path, "/kube-prefetch");
        assert_eq!(mounts[0].read_only, Some(true));

        for container in [install, pull] {
            let resources = container.resources.clone().expect("resources");
            let requests = resources.requests.expect("requests");
            let limits = resources.limits.expect("limits");
            assert_eq!(requests["cpu"], Quantity("1m".into()));
            assert_eq!(requests["memory"], Quantity("4Mi".into()));
            assert_eq!(limits["cpu"], Quantity("10m".into()));
            assert_eq!(limits["memory"], Quantity("16Mi".into()));

            let security = container.security_context.clone().expect("security");
            assert_eq!(security.run_as_non_root, Some(true));
            assert_eq!(security.run_as_user, Some(65534));
            assert_eq!(security.run_as_group, Some(65534));
            assert_eq!(security.allow_privilege_escalation, Some(false));
            assert_eq!(security.read_only_root_filesystem, Some(true));
            assert_eq!(
                security.capabilities.and_then(|caps| caps.drop),
                Some(vec!["ALL".to_string()])
            );
            assert_eq!(
                security.seccomp_profile.map(|profile| profile.type_),
                Some("RuntimeDefault".to_string())
            );
        }
    }

    #[test]
    fn direct_pull_pods_need_no_helper() {
        let target = target();
        let pod = build_pull_pod(&PullPodParams {
            prefetch_namespace: "default",
            prefetch_name: "p",
            prefetch_uid: UID,
            target: &target,
            method: PullMethod::Direct,
            helper_image: "ghcr.io/kube-prefetch/helper:0.1.0",
            timeout_seconds: 600,
            priority_class: None,
        });
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.init_containers, None);
        assert_eq!(spec.volumes, None);
        let [pull] = spec.containers.as_slice() else {
            panic!("one container expected: {:?}", spec.containers);
        };
        assert_eq!(pull.name, PULL_CONTAINER);
        assert_eq!(pull.image.as_deref(), Some(&*target.image));
        assert_eq!(
            pull.command.as_deref(),
            Some([DIRECT_PULL_COMMAND.to_string()].as_slice())
        );
        assert_eq!(pull.volume_mounts, None);
        // The same restricted context as the helper method.
        assert_eq!(pull.security_context, Some(restricted_security_context()));
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.node_name.as_deref(), Some("kind-worker"));
    }

    #[test]
    fn pull_method_names() {
        for method in [PullMethod::Direct, PullMethod::Helper] {
            let json = serde_json::to_string(&method).expect("serialize");
            assert_eq!(json, format!("\"{}\"", method.as_str()));
        }
    }

    #[test]
    fn optional_fields_are_omitted() {
        let bare = PullTarget {
            settings: std::sync::Arc::new(PullSettings {
                namespace: "apps".into(),
                ..PullSettings::default()
            }),
            ..target()
        };
        let spec = build(&bare, "p", None).spec.expect("spec");
        assert_eq!(spec.image_pull_secrets, None);
        assert_eq!(spec.service_account_name, None);
        assert_eq!(spec.tolerations, None);
        assert_eq!(spec.priority_class_name, None);
    }

    #[test]
    fn pair_of_pod_round_trip() {
        let target = target();
        let pod = build(&target, "p", None);
        assert_eq!(pair_of_pod(&pod), Some((UID.to_string(), target.key())));
    }

    #[test]
    fn only_the_pod_we_would_create_is_ours() {
        let target = target();
        let key = target.key();
        let pod = build(&target, "p", None);
        assert_eq!(check_own_pull_pod(&pod, UID, &key, Some("apps")), Ok(()));
        assert_eq!(check_own_pull_pod(&pod, UID, &key, None), Ok(()));

        // Same name, labels and annotations, another tenant's namespace.
        let mut elsewhere = pod.clone();
        elsewhere.metadata.namespace = Some("tenant-b".into());
        assert_eq!(
            check_own_pull_pod(&elsewhere, UID, &key, Some("apps")),
            Err("it is in namespace tenant-b, not in apps where we create it".to_string())
        );
        // A leftover of a pair no longer wanted may be anywhere.
        assert_eq!(check_own_pull_pod(&elsewhere, UID, &key, None), Ok(()));

        let mut renamed = pod.clone();
        renamed.metadata.name = Some("looks-like-ours".into());
        assert_eq!(
            check_own_pull_pod(&renamed, UID, &key, Some("apps")),
            Err(format!(
                "its name is not {}, the one we give the pod of node kind-worker and image docker.io/library/nginx:1.7.9",
                pod.metadata.name.clone().unwrap_or_default()
            ))
        );
        assert!(check_own_pull_pod(&renamed, UID, &key, None).is_err());

        let mut moved = pod.clone();
        if let Some(spec) = moved.spec.as_mut() {
            spec.node_name = Some("kind-worker2".into());
        }
        assert_eq!(
            check_own_pull_pod(&moved, UID, &key, Some("apps")),
            Err("it is bound to node \"kind-worker2\", not to \"kind-worker\" as its annotation says".to_string())
        );
    }

    #[test]
    fn pair_of_foreign_or_incomplete_pods() {
        let pod = build(&target(), "p", None);
        assert_eq!(pair_of_pod(&Pod::default()), None);

        let mut foreign = pod.clone();
        if let Some(labels) = foreign.metadata.labels.as_mut() {
            labels.insert(MANAGED_BY_LABEL.into(), "helm".into());
        }
        assert_eq!(pair_of_pod(&foreign), None);

        let mut no_uid = pod.clone();
        if let Some(labels) = no_uid.metadata.labels.as_mut() {
            labels.remove(PREFETCH_UID_LABEL);
        }
        assert_eq!(pair_of_pod(&no_uid), None);

        for annotation in [NODE_ANNOTATION, IMAGE_ANNOTATION] {
            let mut missing = pod.clone();
            if let Some(annotations) = missing.metadata.annotations.as_mut() {
                annotations.remove(annotation);
            }
            assert_eq!(pair_of_pod(&missing), None);
        }
    }
}
