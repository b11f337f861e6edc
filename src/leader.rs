//! Leader election, so that several replicas can run with one active: they
//! compete for a Lease in the cluster kube-prefetch itself runs in (the
//! in-cluster config, or `KUBECONFIG` outside a cluster), not in the targets.
//!
//! Holding the Lease is not enough to write safely: a leader that cannot
//! reach its home API server cannot renew, and the lease manager keeps
//! saying "leader" while a standby takes the Lease over. So every write to
//! a target cluster passes a [`WriteGate`], open only until shortly before
//! the Lease, as last read back from the API server, could be taken.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::config::LeaderElection;
use crate::error::describe_kube_error;

/// How long a lease stays valid without renewal, and how early the holder
/// renews it: a standby takes over at most this long after a leader dies.
const LEASE_DURATION_SECONDS: u64 = 15;
const LEASE_GRACE_SECONDS: u64 = 5;

/// The gate closes this long before the Lease could be taken: room for a
/// write already sent to land, and for clock skew between replicas (a
/// standby judges expiry by its own clock against our `renewTime`).
const WRITE_MARGIN: Duration = Duration::from_secs(3);

/// How often the holder reads its Lease back, to move the gate on.
const FENCE_PERIOD: Duration = Duration::from_secs(1);

/// What a refused write fails with (and the log shows).
pub const WRITE_REFUSED: &str = "write refused: this instance does not hold a confirmed leader lease (it could not renew it, lost it, or is shutting down)";

/// Whether this process may write to the target clusters now. Without
/// leader election it is always open; with it, open until a moment (the
/// Lease's `renewTime` + duration - [`WRITE_MARGIN`]) moved on by each
/// successful read-back of the Lease, and closed for good on loss or
/// shutdown. Every target client checks it before each mutating request.
#[derive(Clone, Debug)]
pub struct WriteGate {
    /// Milliseconds since the Unix epoch until which writes are allowed.
    until_ms: Arc<AtomicU64>,
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl WriteGate {
    /// Always open (no leader election).
    pub fn open() -> Self {
        WriteGate {
            until_ms: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }

    /// Closed until [`WriteGate::open_until`] moves it.
    pub fn closed() -> Self {
        WriteGate {
            until_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn allows_writes(&self) -> bool {
        self.allows_writes_at(SystemTime::now())
    }

    fn allows_writes_at(&self, now: SystemTime) -> bool {
        unix_ms(now) < self.until_ms.load(Ordering::Acquire)
    }

    /// Allows writes until `until`, unless closed for good meanwhile.
    fn open_until(&self, until: SystemTime) {
        let until = unix_ms(until);
        // Never reopens a gate closed for good, never moves back.
        let _ = self
            .until_ms
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                (current != CLOSED_FOR_GOOD && until > current).then_some(until)
            });
    }

    /// No more writes from this process, whatever the Lease says later.
    pub fn close(&self) {
        self.until_ms.store(CLOSED_FOR_GOOD, Ordering::Release);
    }

    /// `request` if it may go out now: reads always, writes (anything but
    /// GET, HEAD, OPTIONS) only while the gate is open. The tower filter in
    /// every target cluster's client.
    pub fn check<B>(&self, request: http::Request<B>) -> Result<http::Request<B>, tower::BoxError> {
        let method = request.method();
        let reads = *method == http::Method::GET
            || *method == http::Method::HEAD
            || *method == http::Method::OPTIONS;
        if reads || self.allows_writes() {
            Ok(request)
        } else {
            Err(WRITE_REFUSED.into())
        }
    }
}

/// Closed for good: 1 ms after the epoch, in the past like any expired
/// value, but distinct from the 0 of a gate not opened yet.
const CLOSED_FOR_GOOD: u64 = 1;

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
    gate: WriteGate,
    fence: JoinHandle<()>,
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
    let manager = LeaseManagerBuilder::new(client.clone(), &settings.lease_name)
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
    let gate = WriteGate::closed();
    let leases: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let fence = tokio::spawn(fence(
        leases,
        settings.lease_name.clone(),
        identity,
        gate.clone(),
    ));
    Ok(Leadership {
        state,
        manager,
        gate,
        fence,
    })
}

/// The moment until which `lease`, read back from the API server, lets
/// `identity` write: `renewTime` + duration - [`WRITE_MARGIN`], or `None`
/// when another instance holds it (or it says nothing usable).
pub fn writable_until(lease: &Lease, identity: &str) -> Option<SystemTime> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let renewed: SystemTime = spec.renew_time.as_ref()?.0.into();
    let duration = u64::try_from(spec.lease_duration_seconds?).ok()?;
    renewed
        .checked_add(Duration::from_secs(duration))?
        .checked_sub(WRITE_MARGIN)
}

/// Reads the Lease back every [`FENCE_PERIOD`] and moves the gate on to
/// what it allows. A read that fails or hangs moves nothing: the gate then
/// closes by itself in time. Seeing another holder closes it for good.
async fn fence(leases: Api<Lease>, name: String, identity: String, gate: WriteGate) {
    loop {
        match tokio::time::timeout(FENCE_PERIOD, leases.get(&name)).await {
            Ok(Ok(lease)) => match writable_until(&lease, &identity) {
                Some(until) => gate.open_until(until),
                None => {
                    warn!(holder = ?lease.spec.and_then(|spec| spec.holder_identity), "the leader Lease names another holder; no more writes");
                    gate.close();
                    return;
                }
            },
            Ok(Err(error)) => {
                debug!(error = %describe_kube_error(&error), "could not read the leader Lease back")
            }
            Err(_) => debug!("reading the leader Lease back timed out"),
        }
        tokio::time::sleep(FENCE_PERIOD).await;
    }
}

impl Leadership {
    /// The gate every write to a target cluster passes.
    pub fn gate(&self) -> WriteGate {
        self.gate.clone()
    }

    /// Waits until the Lease is confirmed by a read-back (the gate opens),
    /// at most one lease duration: `false` if it never was.
    pub async fn confirmed(&self) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(LEASE_DURATION_SECONDS);
        while !self.gate.allows_writes() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        true
    }

    /// Resolves when the Lease is lost (another instance took it) or could
    /// have been (not renewed in time: the gate closed by itself); the gate
    /// is then closed for good.
    pub async fn lost(&mut self) {
        loop {
            if !*self.state.borrow_and_update() {
                warn!("another instance holds the leader Lease now; no more writes");
                break;
            }
            if !self.gate.allows_writes() {
                warn!(
                    "the leader Lease was not renewed in time (home API server unreachable?); no more writes, before another instance may take it"
                );
                break;
            }
            tokio::select! {
                changed = self.state.changed() => if changed.is_err() { break },
                // The gate closes by the clock, without an event.
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        self.gate.close();
    }

    /// After [`Leadership::lost`]: stops every request to the home API
    /// server without releasing the Lease. Another instance may hold it by
    /// now (releasing would be a write by a non-holder), and an unreachable
    /// server would only delay the exit past the moment a standby takes over.
    pub fn abandon(self) {
        self.gate.close();
        self.fence.abort();
        self.manager.abort();
        info!("gave up the leader lease without releasing it");
    }

    /// Gives the Lease up so that a standby takes over at once.
    pub async fn release(self) {
        self.gate.close();
        self.fence.abort();
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
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn lease(holder: &str, renewed: SystemTime) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(
                    k8s_openapi::jiff::Timestamp::try_from(renewed).expect("a valid time"),
                )),
                lease_duration_seconds: Some(15),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }
    }

    #[test]
    fn writes_stop_before_the_lease_could_be_taken() {
        let renewed = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let until = writable_until(&lease("me", renewed), "me");
        assert_eq!(until, Some(renewed + Duration::from_secs(12)));
        assert_eq!(writable_until(&lease("other", renewed), "me"), None);
        assert_eq!(writable_until(&Lease::default(), "me"), None);

        let gate = WriteGate::closed();
        assert!(!gate.allows_writes_at(renewed));
        gate.open_until(renewed + Duration::from_secs(12));
        assert!(gate.allows_writes_at(renewed + Duration::from_secs(11)));
        assert!(!gate.allows_writes_at(renewed + Duration::from_secs(12)));
        // An older read-back does not move it back.
        gate.open_until(renewed);
        assert!(gate.allows_writes_at(renewed + Duration::from_secs(11)));
        // Closed for good: a later read-back does not reopen it.
        gate.close();
        gate.open_until(renewed + Duration::from_secs(60));
        assert!(!gate.allows_writes_at(renewed));
    }

    #[test]
    fn a_closed_gate_refuses_writes_not_reads() {
        let gate = WriteGate::closed();
        let request = |method: http::Method| {
            http::Request::builder()
                .method(method)
                .uri("/api/v1/namespaces/a/pods")
                .body(())
                .expect("a request")
        };
        assert!(gate.check(request(http::Method::GET)).is_ok());
        for method in [
            http::Method::POST,
            http::Method::PUT,
            http::Method::PATCH,
            http::Method::DELETE,
        ] {
            let refused = gate.check(request(method)).err().map(|e| e.to_string());
            assert_eq!(
                refused.as_deref(),
                Some(
                    "write refused: this instance does not hold a confirmed leader lease (it could not renew it, lost it, or is shutting down)"
                )
            );
        }
        assert!(WriteGate::open().check(request(http::Method::POST)).is_ok());
    }

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
