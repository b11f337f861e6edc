//! The fleet-scale core on the sim clusters: status written by server-side
//! apply, incremental planning that keeps satisfied pairs, pull pods told
//! apart by uid, fair dispatch, verification that survives a restart.
//! Every test asserts what a user sees: pull pods, status fields, logs.

mod harness;
mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use harness::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube_prefetch::api::{Phase, Prefetch};
use serde_json::json;

const READY_TIMEOUT: Duration = Duration::from_secs(90);

async fn patch_spec(api: &Api<Prefetch>, name: &str, spec: serde_json::Value) -> Result<i64> {
    let patched = api
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await?;
    Ok(patched.metadata.generation.unwrap_or_default())
}

/// After FAILED -> READY the failure message is gone from the status, not
/// left behind by a patch that only sets the fields present.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_then_ready_leaves_no_failure_message() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[0].clone();
    let ns = support::TestNamespace::create(&cluster, "cleared").await?;
    let client = ns.client();
    let prefetches = ns.api::<Prefetch>();
    apply(
        &prefetches,
        prefetch_json(
            "flip",
            json!({ "images": ["fail.invalid/x:1"], "node_filter": "worker2" }),
        ),
    )
    .await?;
    let _orchestrator = Orchestrator::start("cleared", Options::default()).await?;
    let failed = wait_phase(&client, ns.name(), "flip", Phase::Failed, READY_TIMEOUT).await?;
    let message = failed.message.clone().unwrap_or_default();
    ensure!(
        message.contains("fail.invalid/x:1"),
        "FAILED says why: {failed:?}"
    );
    ensure!(!failed.failures.is_empty(), "{failed:?}");

    patch_spec(&prefetches, "flip", json!({ "images": ["busybox:1.36"] })).await?;
    let ready = wait_phase(&client, ns.name(), "flip", Phase::Ready, READY_TIMEOUT).await?;
    ensure!(ready.message.is_none(), "message left: {ready:?}");
    ensure!(ready.failures.is_empty(), "failures left: {ready:?}");
    ensure!(ready.pulls.failed == 0, "{ready:?}");
    // The object itself, not just our parsing of it, has no message.
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        ns.name(),
        &kube::api::ApiResource::erase::<Prefetch>(&()),
    );
    let object = raw.get("flip").await?;
    let status = object.data.get("status").cloned().unwrap_or_default();
    ensure!(
        status.get("message").is_none(),
        "raw status still has a message: {status}"
    );
    ns.cleanup().await?;
    Ok(())
}

/// Editing `workload_kinds` of a READY Prefetch changes nothing it pulls:
/// it stays READY and no pull pod is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_workload_kinds_of_a_ready_prefetch_keeps_it_ready() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[1].clone();
    let ns = support::TestNamespace::create(&cluster, "kinds").await?;
    let client = ns.client();
    let log = PodLog::start(client.clone()).await?;
    apply(
        &ns.api::<Deployment>(),
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": { "name": "web", "labels": { "app": "web" } },
            "spec": {
                "replicas": 0,
                "selector": { "matchLabels": { "app": "web" } },
                "template": {
                    "metadata": { "labels": { "app": "web" } },
                    "spec": { "containers": [{ "name": "web", "image": "busybox:1.36" }] },
                },
            },
        }),
    )
    .await?;
    let prefetches = ns.api::<Prefetch>();
    apply(
        &prefetches,
        prefetch_json(
            "web",
            json!({ "filter_by_labels": { "app": "web" }, "node_filter": "worker", "retry_after": 3600 }),
        ),
    )
    .await?;
    let _orchestrator = Orchestrator::start("kinds", Options::default()).await?;
    let ready = wait_phase(&client, ns.name(), "web", Phase::Ready, READY_TIMEOUT).await?;
    let workers = workers(&cluster);
    ensure!(ready.pulls.ready as usize == workers.len(), "{ready:?}");
    wait_no_pull_pods(&client, ns.name(), Duration::from_secs(30)).await?;
    let pods_before = log.pods_in(ns.name()).len();
    ensure!(pods_before == workers.len(), "one pull per worker");

    let generation = patch_spec(
        &prefetches,
        "web",
        json!({ "workload_kinds": ["Deployment", "StatefulSet", "DaemonSet"] }),
    )
    .await?;
    // READY throughout: until the edit is observed and for a while after.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut observed_at: Option<Instant> = None;
    loop {
        let status = prefetch_status(&client, ns.name(), "web")
            .await?
            .unwrap_or_default();
        ensure!(
            status.phase == Some(Phase::Ready),
            "left READY after the edit: {status:?}"
        );
        if observed_at.is_none() && status.observed_generation == Some(generation) {
            observed_at = Some(Instant::now());
        }
        if observed_at.is_some_and(|at| at.elapsed() >= Duration::from_secs(5)) {
            ensure!(status.pulls.ready as usize == workers.len(), "{status:?}");
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the edit was never observed: {status:?}"
        );
        tokio::time::sleep(support::POLL_INTERVAL).await;
    }
    let pods_after = log.pods_in(ns.name()).len();
    ensure!(
        pods_after == pods_before,
        "{} pull pods created by the edit",
        pods_after - pods_before
    );
    ns.cleanup().await?;
    Ok(())
}

/// A pull pod deleted by someone else mid-pull is pulled again exactly
/// once, and the deletion is not counted as a failed attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_deleted_mid_pull_is_retried_once_and_not_counted() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[2].clone();
    let ns = support::TestNamespace::create(&cluster, "vanish").await?;
    let client = ns.client();
    let log = PodLog::start(client.clone()).await?;
    let node = format!("{cluster}-worker2");
    apply(
        &ns.api::<Prefetch>(),
        prefetch_json(
            "slow",
            json!({ "images": ["slow.invalid/app:1"], "node_filter": node }),
        ),
    )
    .await?;
    let orchestrator = Orchestrator::start("vanish", Options::default()).await?;
    let first = support::wait_for("the first pull pod", Duration::from_secs(20), || {
        let found = log.pods_in(ns.name()).into_iter().next();
        async move { Ok(found) }
    })
    .await?;
    let pods: Api<Pod> = ns.api();
    pods.delete(&first.name, &DeleteParams::default()).await?;

    let status = wait_phase(&client, ns.name(), "slow", Phase::Ready, READY_TIMEOUT).await?;
    ensure!(status.pulls.ready == 1, "{status:?}");
    ensure!(status.pulls.failed == 0, "{status:?}");
    ensure!(
        status.failures.is_empty(),
        "counted as a failure: {status:?}"
    );
    let uids: BTreeSet<String> = log.pods_in(ns.name()).into_iter().map(|p| p.uid).collect();
    ensure!(
        uids.len() == 2,
        "pull pods created: {} (want the first and one retry)",
        uids.len()
    );
    let retries = log_lines_with(
        &orchestrator.log_path,
        "pull pod deleted before it finished; retrying",
    );
    ensure!(retries.len() == 1, "retries logged: {retries:#?}");
    wait_no_pull_pods(&client, ns.name(), Duration::from_secs(30)).await?;
    ns.cleanup().await?;
    Ok(())
}

/// Two Prefetches competing for the slot of one node take turns: neither
/// waits for the other to finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_prefetches_competing_for_one_node_both_progress() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[0].clone();
    let ns = support::TestNamespace::create(&cluster, "fair").await?;
    let client = ns.client();
    let log = PodLog::start(client.clone()).await?;
    let node = format!("{cluster}-worker2");
    let prefetches = ns.api::<Prefetch>();
    let images = |repo: &str| -> Vec<String> { (1..=6).map(|i| format!("{repo}:1.{i}")).collect() };
    for (name, repo) in [("first", "busybox"), ("second", "alpine")] {
        apply(
            &prefetches,
            prefetch_json(name, json!({ "images": images(repo), "node_filter": node })),
        )
        .await?;
    }
    // One pull at a time on the node (the default), so the two compete for
    // every slot.
    let _orchestrator = Orchestrator::start("fair", Options::default()).await?;
    for name in ["first", "second"] {
        wait_phase(&client, ns.name(), name, Phase::Ready, READY_TIMEOUT).await?;
    }
    let mut pods = log.pods_in(ns.name());
    ensure!(pods.len() == 12, "{} pull pods, want 12", pods.len());
    pods.sort_by_key(|pod| pod.first_seen);
    let order: Vec<&str> = pods
        .iter()
        .map(|pod| {
            if pod.image.contains("busybox") {
                "first"
            } else {
                "second"
            }
        })
        .collect();
    // In the first half of all pulls, each had at least two: they took turns.
    for name in ["first", "second"] {
        let early = order[..6].iter().filter(|owner| **owner == name).count();
        ensure!(
            early >= 2,
            "{name} had {early} of the first 6 pulls: {order:?}"
        );
    }
    ns.cleanup().await?;
    Ok(())
}

/// A restart of a READY Prefetch whose pairs were satisfied by pulls (the
/// sim's nodes report no images) pulls nothing again: the status' record
/// of verified pairs carries over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_of_a_ready_prefetch_creates_no_pull_pod() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[1].clone();
    let ns = support::TestNamespace::create(&cluster, "restartready").await?;
    let client = ns.client();
    let log = PodLog::start(client.clone()).await?;
    apply(
        &ns.api::<Prefetch>(),
        prefetch_json(
            "warm",
            json!({ "images": ["busybox:1.36", "alpine:3.20"], "node_filter": "worker", "retry_after": 3600 }),
        ),
    )
    .await?;
    let mut orchestrator = Orchestrator::start("restartready", Options::default()).await?;
    let workers = workers(&cluster);
    let ready = wait_phase(&client, ns.name(), "warm", Phase::Ready, READY_TIMEOUT).await?;
    ensure!(ready.pulls.ready as usize == 2 * workers.len(), "{ready:?}");
    ensure!(
        ready.verified.is_some(),
        "no record of verified pairs: {ready:?}"
    );
    wait_no_pull_pods(&client, ns.name(), Duration::from_secs(30)).await?;
    let before = log.pods_in(ns.name()).len();
    ensure!(
        before == 2 * workers.len(),
        "{before} pulls before the restart"
    );

    orchestrator.kill();
    orchestrator.spawn()?;
    orchestrator.wait_ready().await?;
    support::wait_for(
        "the restarted process to plan",
        Duration::from_secs(30),
        || {
            let lines = log_lines_with(&orchestrator.log_path, "not pulled again");
            async move { Ok((!lines.is_empty()).then_some(lines)) }
        },
    )
    .await?;
    // Give it time to (wrongly) start pulls, then check nothing was pulled.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let status = prefetch_status(&client, ns.name(), "warm")
        .await?
        .unwrap_or_default();
    ensure!(status.phase == Some(Phase::Ready), "{status:?}");
    let after = log.pods_in(ns.name()).len();
    ensure!(
        after == before,
        "{} pull pods created after the restart",
        after - before
    );
    ns.cleanup().await?;
    Ok(())
}

/// The sim's image reporter plays the kubelet for fake nodes annotated
/// `kube-prefetch.sim/report-images=true`: a few seconds after kube-prefetch's
/// pull on such a node succeeds, the node lists the image in
/// `status.images`, largest first, beside the images it had already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_on_a_reporting_fake_node_shows_in_its_image_list() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[2].clone();
    let ns = support::TestNamespace::create(&cluster, "reporter").await?;
    let client = ns.client();
    // A node of its own, so the shared workers keep listing no images.
    let node = support::unique_name(&format!("{cluster}-reporter"));
    let nodes: Api<Node> = Api::all(client.clone());
    let node_cleanup = delete_nodes_later(&cluster, vec![node.clone()]);
    let preloaded = "registry.k8s.io/pause:3.10";
    let mut manifest = fake_node(&node, "amd64", json!({}));
    manifest["metadata"]["annotations"]["kube-prefetch.sim/report-images"] = json!("true");
    // What the node starts with (as `up --node-images` sets it).
    manifest["status"] = json!({ "images": [{ "names": [preloaded], "sizeBytes": 1 }] });
    nodes
        .create(&PostParams::default(), &serde_json::from_value(manifest)?)
        .await
        .context("creating the reporting node")?;
    wait_nodes_ready(&nodes, vec![node.clone()]).await?;

    apply(
        &ns.api::<Prefetch>(),
        prefetch_json(
            "reported",
            json!({ "images": ["busybox:1.36"], "node_filter": node }),
        ),
    )
    .await?;
    let _orchestrator = Orchestrator::start("reporter", Options::default()).await?;
    let ready = wait_phase(&client, ns.name(), "reported", Phase::Ready, READY_TIMEOUT).await?;
    ensure!(ready.pulls.ready == 1, "one pull on the node: {ready:?}");

    let images = support::wait_for("busybox in status.images", Duration::from_secs(30), || {
        let nodes = nodes.clone();
        let node = node.clone();
        async move {
            let images = nodes
                .get(&node)
                .await?
                .status
                .and_then(|status| status.images)
                .unwrap_or_default();
            let listed = images.iter().any(|image| {
                image
                    .names
                    .iter()
                    .flatten()
                    .any(|name| name == "docker.io/library/busybox:1.36")
            });
            Ok(listed.then_some(images))
        }
    })
    .await?;
    let names: Vec<_> = images
        .iter()
        .map(|image| image.names.clone().unwrap_or_default())
        .collect();
    ensure!(
        names.iter().flatten().any(|name| name == preloaded),
        "the image it started with is kept: {names:?}"
    );
    let sizes: Vec<i64> = images
        .iter()
        .map(|image| image.size_bytes.unwrap_or_default())
        .collect();
    ensure!(
        sizes.windows(2).all(|pair| pair[0] >= pair[1]),
        "largest first, as the kubelet lists them: {sizes:?}"
    );
    ns.cleanup().await?;
    node_cleanup.run().await?;
    Ok(())
}
