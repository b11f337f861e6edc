//! Actors: thin shells that move watch events into the pure logic of
//! `crate::pull` and its decisions out to the API server.
//!
//! Supervisor ─► ClusterActor (one per context, own Arbiter) ─► PrefetchActor
//! (one per Prefetch); everyone reports to the StatusActor.

pub mod cluster;
pub mod cluster_link;
#[cfg(feature = "test-hooks")]
pub mod fault_hook;
pub mod prefetch;
pub mod status;
pub mod supervisor;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use tracing::warn;

use crate::error::{api_status_code, describe_kube_error};

/// Deletes a pull pod at once (grace period 0: it runs nothing worth
/// stopping gently); a pod already gone counts as deleted. The error is a
/// readable text for the log.
pub async fn delete_pull_pod(
    client: kube::Client,
    namespace: &str,
    name: &str,
) -> Result<(), String> {
    let api: Api<Pod> = Api::namespaced(client, namespace);
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(error) if api_status_code(&error) == Some(404) => Ok(()),
        Err(error) => Err(describe_kube_error(&error)),
    }
}

/// Deletes a pull pod, retrying with backoff (1 s doubling to a minute)
/// until the API server confirms it is gone: a pod left behind would hold
/// its node's pull slot on the kubelet and be adopted again after a restart.
/// Runs until then, or until its Arbiter stops (the cluster is dropped).
pub async fn delete_pull_pod_until_gone(client: kube::Client, namespace: String, name: String) {
    let mut delay = Duration::from_secs(1);
    let mut failures = 0u32;
    loop {
        match delete_pull_pod(client.clone(), &namespace, &name).await {
            Ok(()) => return,
            Err(error) => {
                failures = failures.saturating_add(1);
                warn!(pod = %format!("{namespace}/{name}"), %error, failures, retry_in = ?delay, "could not delete pull pod; retrying");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(60));
    }
}
