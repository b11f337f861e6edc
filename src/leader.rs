//! Leader election, so that several replicas can run with one active: they
//! compete for a Lease in the cluster kube-prefetch itself runs in (the
//! in-cluster config, or `KUBECONFIG` outside a cluster), not in the targets.

use std::time::Duration;

use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::LeaderElection;
use crate::error::describe_kube_error;

/// How long a lease stays valid without renewal, and how early the holder
/// renews it: a standby takes over at most this long after a leader dies.
const LEASE_DURATION_SECONDS: u64 = 15;
const LEASE_GRACE_SECONDS: u64 = 5;

/// Start-up failures of leader election. Each carries its cause as text,
/// already reduced to the distinct messages of its chain: the causes repeat
/// each other's text (kube-lease-manager's error embeds the kube error,
/// which embeds the API status), and printing the chain printed it four
/// times.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error(
        "leader election: cannot build a client for the home cluster (in-cluster config or KUBECONFIG): {cause}"
    )]
    HomeClient { cause: String },
    #[error("leader election: cannot use Lease {namespace}/{name} in the home cluster: {cause}")]
    Lease {
        namespace: String,
        name: String,
        cause: String,
    },
    #[error("leader election: the lease manager stopped before this instance became the leader")]
    Stopped,
}

impl LeaderError {
    fn home_client(error: &kube::Error) -> Self {
        LeaderError::HomeClient {
            cause: describe_kube_error(error),
        }
    }

    fn lease(settings: &LeaderElection, error: &LeaseManagerError) -> Self {
        let cause = match error {
            LeaseManagerError::KubeError(error) => describe_kube_error(error),
            other => other.to_string(),
        };
        LeaderError::Lease {
            namespace: settings.namespace.clone(),
            name: settings.lease_name.clone(),
            cause,
        }
    }
}

/// Held while this instance is the leader; dropping it releases the Lease.
pub struct Leadership {
    state: watch::Receiver<bool>,
    manager: JoinHandle<Result<LeaseManager, LeaseManagerError>>,
}

/// A name for this instance: the pod's name in a cluster, else host and pid.
fn identity() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "kube-prefetch".into());
            format!("{host}-{}", std::process::id())
        })
}

/// Waits until this instance holds the Lease.
pub async fn acquire(settings: &LeaderElection) -> Result<Leadership, LeaderError> {
    let client = kube::Client::try_default()
        .await
        .map_err(|error| LeaderError::home_client(&error))?;
    let identity = identity();
    let manager = LeaseManagerBuilder::new(client, &settings.lease_name)
        .with_namespace(&settings.namespace)
        .with_identity(&identity)
        .with_duration(LEASE_DURATION_SECONDS)
        .with_grace(LEASE_GRACE_SECONDS)
        .build()
        .await
        .map_err(|error| LeaderError::lease(settings, &error))?;
    let (mut state, manager) = manager.watch().await;
    info!(%identity, lease = %format!("{}/{}", settings.namespace, settings.lease_name), "waiting to become the leader");
    while !*state.borrow_and_update() {
        if state.changed().await.is_err() {
            return Err(LeaderError::Stopped);
        }
    }
    info!(%identity, "became the leader");
    Ok(Leadership { state, manager })
}

impl Leadership {
    /// Resolves when the Lease is lost (another instance took it, or it
    /// could not be renewed in time).
    pub async fn lost(&mut self) {
        loop {
            if !*self.state.borrow_and_update() {
                return;
            }
            if self.state.changed().await.is_err() {
                return;
            }
        }
    }

    /// Gives the Lease up so that a standby takes over at once.
    pub async fn release(self) {
        drop(self.state);
        match tokio::time::timeout(Duration::from_secs(5), self.manager).await {
            Ok(Ok(Ok(_))) => info!("released the leader lease"),
            Ok(Ok(Err(error))) => warn!(%error, "could not release the leader lease"),
            Ok(Err(error)) => warn!(%error, "lease manager task failed"),
            Err(_) => warn!("releasing the leader lease timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `kube-prefetch run` prints (`{:#}` of the anyhow error) when the
    /// Lease is forbidden: each cause once.
    #[test]
    fn lease_error_prints_its_cause_once() {
        let status = kube::core::Status {
            code: 403,
            message: "leases.coordination.k8s.io \"kube-prefetch\" is forbidden: User \"x\" cannot get resource \"leases\"".into(),
            reason: "Forbidden".into(),
            ..kube::core::Status::default()
        };
        let cause = LeaseManagerError::KubeError(kube::Error::Api(Box::new(status)));
        let error = anyhow::Error::from(LeaderError::lease(&LeaderElection::default(), &cause));
        assert_eq!(
            format!("{error:#}"),
            "leader election: cannot use Lease kube-prefetch/kube-prefetch in the home cluster: leases.coordination.k8s.io \"kube-prefetch\" is forbidden: User \"x\" cannot get resource \"leases\" (HTTP 403)"
        );

        let other = LeaseManagerError::NonexistentLease("kube-prefetch".into());
        let error = anyhow::Error::from(LeaderError::lease(&LeaderElection::default(), &other));
        assert_eq!(
            format!("{error:#}"),
            "leader election: cannot use Lease kube-prefetch/kube-prefetch in the home cluster: Lease resource `kube-prefetch` doesn't exist"
        );
    }
}
