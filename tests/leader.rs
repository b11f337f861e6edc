//! Leader election: two replicas, one active; the standby takes over when
//! the leader dies.

mod harness;
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use harness::*;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube_prefetch::api::{Phase, Prefetch};
use serde_json::json;
use tokio::task::JoinHandle;

fn prefetch(name: &str, image: &str) -> serde_json::Value {
    json!({
        "apiVersion": "cache.techsquad.rocks/v1",
        "kind": "Prefetch",
        "metadata": { "name": name },
        "spec": { "images": [image], "node_filter": "worker" },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_works_and_a_standby_takes_over() -> Result<()> {
    let _serial = setup().await;
    let clusters = support::cluster_names();
    // The Lease lives in the "home" cluster: sim-1, the kubeconfig's current context.
    let home = support::TestNamespace::create(&clusters[0], "lease").await?;
    let work = support::TestNamespace::create(&clusters[1], "leader").await?;
    let log = PodLog::start(work.client()).await?;
    let options = Options::default().with_leader_election(home.name());
    let mut first = Orchestrator::start("leader-first", options.clone()).await?;
    support::wait_for(
        "the first instance to lead",
        Duration::from_secs(30),
        || {
            let leads = !log_lines_with(&first.log_path, "became the leader").is_empty();
            async move { Ok(leads.then_some(())) }
        },
    )
    .await?;
    let second = Orchestrator::start(
        "leader-second",
        Options {
            standby: true,
            ..options
        },
    )
    .await?;
    support::wait_for(
        "the second instance to wait",
        Duration::from_secs(30),
        || {
            let waits =
                !log_lines_with(&second.log_path, "waiting to become the leader").is_empty();
            async move { Ok(waits.then_some(())) }
        },
    )
    .await?;
    // A standby is not ready: its empty status is not the fleet's.
    assert_eq!(
        second.get_any("/readyz").await?,
        (
            503,
            "standby: waiting for the leader lease; the leader serves the status\n".to_string()
        )
    );
    assert_eq!(
        second.get("/api/v1/status").await?,
        r#"{"standby":true,"clusters":[]}"#
    );

    let prefetches = work.api::<Prefetch>();
    apply(&prefetches, prefetch("one", "busybox:1.36")).await?;
    wait_phase(
        &work.client(),
        work.name(),
        "one",
        Phase::Ready,
        Duration::from_secs(60),
    )
    .await?;
    // One active instance: one pull pod per worker, not two.
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for pod in log.pods_in(work.name()) {
        *per_node.entry(pod.node).or_default() += 1;
    }
    assert!(
        per_node.values().all(|count| *count == 1),
        "pull pods per node: {per_node:?}"
    );
    assert!(
        log_lines_with(&second.log_path, "became the leader").is_empty(),
        "the standby must not lead while the leader lives"
    );

    // The leader dies without releasing the Lease; the standby takes over
    // once it expires.
    first.kill();
    support::wait_for("the standby to lead", Duration::from_secs(45), || {
        let leads = !log_lines_with(&second.log_path, "became the leader").is_empty();
        async move { Ok(leads.then_some(())) }
    })
    .await?;
    apply(&prefetches, prefetch("two", "alpine:3.20")).await?;
    wait_phase(
        &work.client(),
        work.name(),
        "two",
        Phase::Ready,
        Duration::from_secs(60),
    )
    .await?;
    drop(second);
    work.cleanup().await?;
    home.cleanup().await?;
    Ok(())
}

/// A TCP proxy to one API server, to make it unreachable for one process
/// only: `kill` closes the listener and every connection.
struct Proxy {
    port: u16,
    accept: JoinHandle<()>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Result<Proxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let connections = connections.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let connection = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    if let Ok(mut all) = connections.lock() {
                        all.push(connection);
                    }
                }
            }
        });
        Ok(Proxy {
            port,
            accept,
            connections,
        })
    }

    fn kill(&self) {
        self.accept.abort();
        if let Ok(mut all) = self.connections.lock() {
            for connection in all.drain(..) {
                connection.abort();
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The address of `cluster`'s API server in the sim kubeconfig.
fn api_server_of(cluster: &str) -> Result<SocketAddr> {
    let path = support::kubeconfig_path();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path)?;
    let server = kubeconfig
        .clusters
        .iter()
        .find(|named| named.name == cluster)
        .and_then(|named| named.cluster.as_ref())
        .and_then(|c| c.server.clone())
        .with_context(|| format!("no server for {cluster} in {}", path.display()))?;
    server
        .trim_start_matches("https://")
        .parse()
        .with_context(|| format!("server {server} is not https://IP:PORT"))
}

/// A copy of the sim kubeconfig in `dir` whose `upstream` is reached
/// through `proxy_port` (the certificate is for the IP: the port may change).
fn kubeconfig_through_proxy(
    dir: &std::path::Path,
    upstream: SocketAddr,
    proxy_port: u16,
) -> Result<std::path::PathBuf> {
    let text = std::fs::read_to_string(support::kubeconfig_path())?;
    let proxied = dir.join("kubeconfig-proxied");
    std::fs::write(
        &proxied,
        text.replace(
            &format!("https://{upstream}"),
            &format!("https://127.0.0.1:{proxy_port}"),
        ),
    )?;
    Ok(proxied)
}

/// When a log line was written (the tracing timestamp it starts with).
fn logged_at(line: &str) -> Option<Timestamp> {
    line.split_whitespace().next()?.parse().ok()
}

/// Leadership gates every write: a leader whose home API server becomes
/// unreachable cannot renew, so it stops (and exits) before its Lease could
/// be taken; the standby takes over and does the work. On SIGTERM the new
/// leader stops its clusters before it releases the Lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_renew_stops_before_its_lease_expires() -> Result<()> {
    let _serial = setup().await;
    let clusters = support::cluster_names();
    let home = support::TestNamespace::create(&clusters[0], "lease-cut").await?;
    let work = support::TestNamespace::create(&clusters[1], "leader-cut").await?;
    let dir = tempfile::tempdir()?;
    // Only the first replica's Lease traffic goes through the proxy; its
    // target clusters are reached directly.
    let upstream = api_server_of(&clusters[0])?;
    let proxy = Proxy::start(upstream).await?;
    let proxied = kubeconfig_through_proxy(dir.path(), upstream, proxy.port)?;
    let lease_toml = format!(
        "[leader_election]\nenabled = true\nnamespace = \"{}\"\nlease_name = \"kube-prefetch\"\n",
        home.name()
    );
    let replica = |name: &str, kubeconfig: String, standby: bool| Options {
        extra_toml: lease_toml.clone(),
        env: vec![
            ("KUBECONFIG".to_string(), kubeconfig),
            ("POD_NAME".to_string(), name.to_string()),
        ],
        standby,
        ..Options::default()
    };
    let mut old = Orchestrator::start(
        "leader-cut-old",
        replica("replica-old", proxied.display().to_string(), false),
    )
    .await?;
    let mut new = Orchestrator::start(
        "leader-cut-new",
        replica(
            "replica-new",
            support::kubeconfig_path().display().to_string(),
            true,
        ),
    )
    .await?;
    let prefetches = work.api::<Prefetch>();
    apply(&prefetches, prefetch("one", "busybox:1.36")).await?;
    wait_phase(
        &work.client(),
        work.name(),
        "one",
        Phase::Ready,
        Duration::from_secs(60),
    )
    .await?;

    // The old leader's home API server becomes unreachable for it.
    proxy.kill();
    let leases: Api<Lease> = Api::namespaced(home.client(), home.name());
    let spec = leases
        .get("kube-prefetch")
        .await?
        .spec
        .context("a Lease spec")?;
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-old"));
    let renewed = spec.renew_time.context("a renewTime")?.0;
    let expires =
        renewed + SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(15).into());

    // It stops by itself before the Lease could be taken ...
    let status = old.wait_exit(Duration::from_secs(30)).await?;
    assert!(!status.success());
    let log = old.log();
    assert_eq!(
        log.lines().last(),
        Some("kube-prefetch: error: lost the leader lease; exiting")
    );
    let stopped_writing = log
        .lines()
        .find(|line| line.contains("no more writes, before another instance may take it"))
        .and_then(logged_at)
        .context("the old leader never said it stopped writing")?;
    assert!(stopped_writing < expires, "{stopped_writing} >= {expires}");
    let last_logged = log
        .lines()
        .filter_map(logged_at)
        .max()
        .context("timestamps in the old leader's log")?;
    assert!(
        last_logged < expires,
        "the old leader logged at {last_logged}, after its Lease could expire at {expires}:\n{}",
        old.log_tail(20)
    );

    // ... and the standby takes over and does the new work.
    support::wait_for("the standby to lead", Duration::from_secs(45), || {
        let leads = !log_lines_with(&new.log_path, "became the leader").is_empty();
        async move { Ok(leads.then_some(())) }
    })
    .await?;
    let took_over = log_lines_with(&new.log_path, "became the leader")
        .first()
        .and_then(|line| logged_at(line))
        .context("when the standby took over")?;
    assert!(took_over >= expires, "{took_over} < {expires}");
    apply(&prefetches, prefetch("two", "alpine:3.20")).await?;
    wait_phase(
        &work.client(),
        work.name(),
        "two",
        Phase::Ready,
        Duration::from_secs(60),
    )
    .await?;

    // SIGTERM: dispatch stops before the Lease is released.
    new.signal("TERM")?;
    new.wait_exit(Duration::from_secs(30)).await?;
    let log = new.log();
    let position = |needle: &str| {
        log.find(needle)
            .with_context(|| format!("{needle:?} not in the log:\n{}", new.log_tail(20)))
    };
    assert!(position("stopped every cluster")? < position("released the leader lease")?);
    work.cleanup().await?;
    home.cleanup().await?;
    Ok(())
}
