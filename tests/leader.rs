//! Leader election: two replicas, one active; the standby takes over when
//! the leader dies.

mod harness;
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use harness::*;
use kube_prefetch::api::{Phase, Prefetch};
use serde_json::json;

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
    let second = Orchestrator::start("leader-second", options).await?;
    // Ready (HTTP up) comes before its first look at the Lease.
    support::wait_for(
        "the second instance to wait",
        Duration::from_secs(10),
        || {
            let waits =
                !log_lines_with(&second.log_path, "waiting to become the leader").is_empty();
            async move { Ok(waits.then_some(())) }
        },
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
