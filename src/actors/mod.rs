//! Actors: thin shells that move watch events into the pure logic of
//! `crate::pull` and its decisions out to the API server.
//!
//! Supervisor ─► ClusterActor (one per context, own Arbiter) ─► PrefetchActor
//! (one per Prefetch); everyone reports to the StatusActor.

pub mod cluster;
pub mod prefetch;
pub mod status;
pub mod supervisor;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};

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
