//! Judging a pull pod from its status.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

use crate::pull::tracker::Outcome;

/// The container running the target image (its code never runs: it execs
/// the no-op binary).
pub const PULL_CONTAINER: &str = "pull";
/// The init container copying the no-op binary from the helper image.
pub const HELPER_INIT_CONTAINER: &str = "install-noop";

/// Waiting reasons the kubelet uses for image pull problems.
const PULL_FAILURE_REASONS: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "RegistryUnavailable",
    "SignatureValidationFailed",
];

/// Reasons that no retry can fix.
const PERMANENT_REASONS: &[&str] = &["InvalidImageName", "ErrImageNeverPull"];

/// Message fragments (lower case) meaning the image cannot be pulled as
/// configured: it does not exist, or the credentials do not allow it.
const PERMANENT_MESSAGES: &[&str] = &[
    "not found",
    "manifest unknown",
    "unauthorized",
    "authentication required",
    "denied",
    "invalid reference format",
];

/// Waiting reasons that come after the image was pulled: the kubelet pulls
/// first, then builds the container config, creates and starts it.
const AFTER_PULL_REASONS: &[&str] = &[
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// Prefix of failure reasons caused by the helper image, not the target.
pub const HELPER_REASON_PREFIX: &str = "helper image: ";

/// `None` while the pull is still pending.
///
/// Success: the pull container is running or terminated, reports an
/// `imageID`, waits with a reason that only happens after the pull, or the
/// pod Succeeded. Failure: the pull (or helper init) container waits with an
/// image pull reason, the helper init container exited non-zero, or the pod
/// Failed (e.g. `DeadlineExceeded`). See [`is_permanent`] for the split.
pub fn classify(pod: &Pod) -> Option<Outcome> {
    let status = pod.status.as_ref()?;
    let pull = find(status.container_statuses.as_deref(), PULL_CONTAINER);
    let helper = find(
        status.init_container_statuses.as_deref(),
        HELPER_INIT_CONTAINER,
    );
    let phase = status.phase.as_deref().unwrap_or_default();

    if let Some(pull) = pull
        && pulled(pull)
    {
        return Some(Outcome::Succeeded);
    }
    if phase == "Succeeded" {
        return Some(Outcome::Succeeded);
    }
    if let Some(failure) = pull.and_then(|pull| waiting_failure(pull, "")) {
        return Some(failure);
    }
    if let Some(helper) = helper {
        if let Some(failure) = waiting_failure(helper, HELPER_REASON_PREFIX) {
            return Some(failure);
        }
        if let Some(failure) = helper_exit_failure(helper) {
            return Some(failure);
        }
    }
    if phase == "Failed" {
        return Some(pod_failure(
            status.reason.as_deref().unwrap_or_default(),
            status.message.as_deref().unwrap_or_default(),
        ));
    }
    None
}

/// Whether a failure cannot be fixed by retrying: reason InvalidImageName or
/// ErrImageNeverPull, or a message (case-insensitive) saying not found,
/// manifest unknown, unauthorized, authentication required, denied or
/// invalid reference format. Anything else (DNS, timeouts) is transient.
pub fn is_permanent(reason: &str, message: &str) -> bool {
    if PERMANENT_REASONS.contains(&reason) {
        return true;
    }
    let message = message.to_lowercase();
    PERMANENT_MESSAGES
        .iter()
        .any(|fragment| message.contains(fragment))
}

fn find<'a>(statuses: Option<&'a [ContainerStatus]>, name: &str) -> Option<&'a ContainerStatus> {
    statuses?.iter().find(|status| status.name == name)
}

fn pulled(container: &ContainerStatus) -> bool {
    if !container.image_id.is_empty() {
        return true;
    }
    let Some(state) = container.state.as_ref() else {
        return false;
    };
    state.running.is_some()
        || state.terminated.is_some()
        || state
            .waiting
            .as_ref()
            .and_then(|waiting| waiting.reason.as_deref())
            .is_some_and(|reason| AFTER_PULL_REASONS.contains(&reason))
}

fn waiting_failure(container: &ContainerStatus, prefix: &str) -> Option<Outcome> {
    let waiting = container.state.as_ref()?.waiting.as_ref()?;
    let reason = waiting.reason.as_deref().unwrap_or_default();
    if !PULL_FAILURE_REASONS.contains(&reason) {
        return None;
    }
    let message = match waiting.message.as_deref().map(str::trim) {
        Some(message) if !message.is_empty() => message.to_string(),
        _ => format!("pulling image {:?} failed ({reason})", container.image),
    };
    Some(Outcome::Failed {
        permanent: is_permanent(reason, &message),
        reason: format!("{prefix}{reason}"),
        message,
    })
}

/// The helper's no-op installer failed after its image was pulled: the
/// helper image is broken, not the target image; retrying may help after a
/// fix, so it is transient.
fn helper_exit_failure(helper: &ContainerStatus) -> Option<Outcome> {
    let terminated = helper.state.as_ref()?.terminated.as_ref()?;
    if terminated.exit_code == 0 {
        return None;
    }
    let reason = terminated.reason.as_deref().unwrap_or("Error");
    let detail = terminated
        .message
        .as_deref()
        .map(str::trim)
        .filter(|message| !message.is_empty())
        .map(|message| format!(": {message}"))
        .unwrap_or_default();
    Some(Outcome::Failed {
        reason: format!("{HELPER_REASON_PREFIX}{reason}"),
        message: format!(
            "installing the no-op binary exited with code {}{detail}",
            terminated.exit_code
        ),
        permanent: false,
    })
}

fn pod_failure(reason: &str, message: &str) -> Outcome {
    if reason == "DeadlineExceeded" {
        return Outcome::Failed {
            reason: reason.to_string(),
            message: "pull did not finish within the deadline".to_string(),
            permanent: false,
        };
    }
    let reason = if reason.is_empty() {
        "PodFailed"
    } else {
        reason
    };
    let message = if message.trim().is_empty() {
        "pull pod failed without a message".to_string()
    } else {
        message.to_string()
    };
    Outcome::Failed {
        permanent: is_permanent(reason, &message),
        reason: reason.to_string(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
        PodStatus,
    };

    fn waiting(reason: &str, message: Option<&str>) -> ContainerState {
        ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.to_string()),
                message: message.map(str::to_string),
            }),
            ..ContainerState::default()
        }
    }

    fn terminated(exit_code: i32) -> ContainerState {
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code,
                ..ContainerStateTerminated::default()
            }),
            ..ContainerState::default()
        }
    }

    fn container(name: &str, state: Option<ContainerState>, image_id: &str) -> ContainerStatus {
        ContainerStatus {
            name: name.to_string(),
            image: "ghcr.io/org/app:v1".to_string(),
            image_id: image_id.to_string(),
            state,
            ..ContainerStatus::default()
        }
    }

    fn pod(phase: &str, helper: Option<ContainerStatus>, pull: Option<ContainerStatus>) -> Pod {
        Pod {
            status: Some(PodStatus {
                phase: Some(phase.to_string()),
                init_container_statuses: helper.map(|status| vec![status]),
                container_statuses: pull.map(|status| vec![status]),
                ..PodStatus::default()
            }),
            ..Pod::default()
        }
    }

    fn pull(state: ContainerState) -> Option<ContainerStatus> {
        Some(container(PULL_CONTAINER, Some(state), ""))
    }

    fn helper(state: ContainerState) -> Option<ContainerStatus> {
        Some(container(HELPER_INIT_CONTAINER, Some(state), ""))
    }

    fn failed(outcome: Option<Outcome>) -> (String, String, bool) {
        match outcome {
            Some(Outcome::Failed {
                reason,
                message,
                permanent,
            }) => (reason, message, permanent),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn pending_pods() {
        assert_eq!(classify(&Pod::default()), None);
        assert_eq!(classify(&pod("Pending", None, None)), None);
        assert_eq!(
            classify(&pod(
                "Pending",
                helper(waiting("PodInitializing", None)),
                pull(waiting("PodInitializing", None))
            )),
            None
        );
        assert_eq!(
            classify(&pod(
                "Pending",
                None,
                pull(waiting("ContainerCreating", None))
            )),
            None
        );
        assert_eq!(
            classify(&pod(
                "Pending",
                None,
                Some(container(PULL_CONTAINER, None, ""))
            )),
            None
        );
    }

    #[test]
    fn success_cases() {
        let running = ContainerState {
            running: Some(ContainerStateRunning::default()),
            ..ContainerState::default()
        };
        let cases = [
            pod("Running", None, pull(running)),
            pod("Running", None, pull(terminated(0))),
            pod("Failed", None, pull(terminated(1))),
            pod(
                "Pending",
                None,
                Some(container(
                    PULL_CONTAINER,
                    Some(waiting("ContainerCreating", None)),
                    "sha256:abc",
                )),
            ),
            pod(
                "Pending",
                None,
                pull(waiting("CreateContainerConfigError", Some("x"))),
            ),
            pod("Pending", None, pull(waiting("CreateContainerError", None))),
            pod("Succeeded", None, None),
        ];
        for (index, pod) in cases.iter().enumerate() {
            assert_eq!(classify(pod), Some(Outcome::Succeeded), "case {index}");
        }
    }

    #[test]
    fn transient_pull_failures() {
        let (reason, message, permanent) = failed(classify(&pod(
            "Pending",
            None,
            pull(waiting(
                "ErrImagePull",
                Some(
                    "failed to resolve reference \"fail.invalid/x:1\": dial tcp: lookup fail.invalid: no such host",
                ),
            )),
        )));
        assert_eq!(reason, "ErrImagePull");
        assert!(message.contains("no such host"));
        assert!(!permanent);

        let (reason, message, permanent) = failed(classify(&pod(
            "Pending",
            None,
            pull(waiting(
                "ImagePullBackOff",
                Some("Back-off pulling image \"x\""),
            )),
        )));
        assert_eq!(reason, "ImagePullBackOff");
        assert_eq!(message, "Back-off pulling image \"x\"");
        assert!(!permanent);

        let (_, _, permanent) = failed(classify(&pod(
            "Pending",
            None,
            pull(waiting("ErrImagePull", Some("i/o timeout"))),
        )));
        assert!(!permanent);
    }

    #[test]
    fn permanent_pull_failures() {
        let permanent_messages = [
            "rpc error: ghcr.io/org/app:v1: not found",
            "manifest unknown: manifest unknown",
            "401 Unauthorized",
            "authentication required",
            "pull access denied for app, repository does not exist",
            "invalid reference format",
            "NOT FOUND",
        ];
        for text in permanent_messages {
            let (reason, message, permanent) = failed(classify(&pod(
                "Pending",
                None,
                pull(waiting("ErrImagePull", Some(text))),
            )));
            assert_eq!(reason, "ErrImagePull");
            assert_eq!(message, text);
            assert!(permanent, "{text:?} should be permanent");
        }
        for reason in ["InvalidImageName", "ErrImageNeverPull"] {
            let (got, message, permanent) =
                failed(classify(&pod("Pending", None, pull(waiting(reason, None)))));
            assert_eq!(got, reason);
            assert!(permanent);
            assert!(!message.is_empty(), "an empty message gets a clear text");
            assert!(message.contains(reason));
        }
    }

    #[test]
    fn helper_failures_are_prefixed() {
        let (reason, message, permanent) = failed(classify(&pod(
            "Pending",
            helper(waiting(
                "ErrImagePull",
                Some("ghcr.io/me/helper:1: not found"),
            )),
            pull(waiting("PodInitializing", None)),
        )));
        assert_eq!(reason, "helper image: ErrImagePull");
        assert!(message.contains("helper"));
        assert!(permanent);

        let (reason, _, permanent) = failed(classify(&pod(
            "Pending",
            helper(waiting("ImagePullBackOff", Some("Back-off"))),
            None,
        )));
        assert_eq!(reason, "helper image: ImagePullBackOff");
        assert!(!permanent);

        let (reason, message, permanent) = failed(classify(&pod(
            "Failed",
            helper(terminated(127)),
            pull(waiting("PodInitializing", None)),
        )));
        assert_eq!(reason, "helper image: Error");
        assert!(message.contains("127"));
        assert!(!permanent);

        // A helper that finished fine is not a failure.
        assert_eq!(
            classify(&pod(
                "Pending",
                helper(terminated(0)),
                pull(waiting("ContainerCreating", None))
            )),
            None
        );
    }

    #[test]
    fn pod_failed_phase() {
        let mut deadline = pod("Failed", None, pull(waiting("ContainerCreating", None)));
        if let Some(status) = deadline.status.as_mut() {
            status.reason = Some("DeadlineExceeded".into());
            status.message =
                Some("Pod was active on the node longer than the specified deadline".into());
        }
        assert_eq!(
            classify(&deadline),
            Some(Outcome::Failed {
                reason: "DeadlineExceeded".into(),
                message: "pull did not finish within the deadline".into(),
                permanent: false,
            })
        );

        let (reason, message, permanent) = failed(classify(&pod("Failed", None, None)));
        assert_eq!(reason, "PodFailed");
        assert!(!message.is_empty());
        assert!(!permanent);

        let mut evicted = pod("Failed", None, None);
        if let Some(status) = evicted.status.as_mut() {
            status.reason = Some("Evicted".into());
            status.message = Some("The node was low on resource: memory.".into());
        }
        let (reason, message, permanent) = failed(classify(&evicted));
        assert_eq!(reason, "Evicted");
        assert_eq!(message, "The node was low on resource: memory.");
        assert!(!permanent);
    }

    #[test]
    fn permanence_rules() {
        assert!(is_permanent("InvalidImageName", ""));
        assert!(is_permanent("ErrImageNeverPull", ""));
        assert!(is_permanent("ErrImagePull", "Manifest Unknown"));
        assert!(!is_permanent("ErrImagePull", "no such host"));
        assert!(!is_permanent("ErrImagePull", "context deadline exceeded"));
        assert!(!is_permanent("ImagePullBackOff", ""));
    }

    #[test]
    fn other_containers_are_ignored() {
        let other = container(
            "sidecar",
            Some(waiting("ErrImagePull", Some("not found"))),
            "",
        );
        assert_eq!(classify(&pod("Pending", None, Some(other))), None);
    }
}
