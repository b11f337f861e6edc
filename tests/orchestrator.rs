//! The orchestrator end to end: one kube-prefetch process for all sim
//! clusters, asserting what a user would check (pull pods, status, events,
//! the aggregated status API).

mod harness;
mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use harness::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Node};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube_prefetch::api::{Phase, Prefetch};
use serde_json::json;

const READY_TIMEOUT: Duration = Duration::from_secs(90);

fn deployment_json(
    name: &str,
    labels: serde_json::Value,
    pod_spec: serde_json::Value,
) -> serde_json::Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name, "labels": labels.clone() },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": labels.clone() },
            "template": { "metadata": { "labels": labels }, "spec": pod_spec },
        },
    })
}

/// Acceptance 1, 2 and 8: the article's manifests, verbatim, on every cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn article_sample_becomes_ready_on_every_worker_of_every_cluster() -> Result<()> {
    let _serial = setup().await;
    let root = support::repo_root();
    let clusters = support::cluster_names();
    let mut logs = Vec::new();
    let mut cleanups = Vec::new();
    for cluster in &clusters {
        logs.push(PodLog::start(support::client(cluster).await).await?);
        for manifest in ["prefetch-sample.yaml", "nginx-deployment.yaml"] {
            kubectl_apply(cluster, None, &root.join("deploy/examples").join(manifest)).await?;
        }
        cleanups.push(support::Cleanup::new(
            cluster,
            "article sample",
            |client| async move {
                let prefetches: Api<Prefetch> = Api::namespaced(client.clone(), "default");
                let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
                let _ = prefetches
                    .delete("prefetch-sample", &DeleteParams::default())
                    .await;
                let _ = deployments
                    .delete("nginx-deployment", &DeleteParams::default())
                    .await;
                Ok(())
            },
        ));
    }

    let orchestrator = Orchestrator::start("article-sample", Options::default()).await?;

    for (cluster, log) in clusters.iter().zip(&logs) {
        let client = support::client(cluster).await;
        let status = wait_phase(
            &client,
            "default",
            "prefetch-sample",
            Phase::Ready,
            READY_TIMEOUT,
        )
        .await?;
        let workers = workers(cluster);
        assert_eq!(
            status.images,
            vec!["docker.io/library/nginx:1.7.9".to_string()]
        );
        assert_eq!(
            status.nodes as usize,
            workers.len(),
            "{cluster}: targeted nodes"
        );
        assert_eq!(
            status.pulls.ready as usize,
            workers.len(),
            "{cluster}: ready pulls"
        );
        assert_eq!(status.pulls.failed, 0);
        assert!(
            status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        );

        // A pull pod ran on every worker, and on nothing else.
        let pulled_on: BTreeSet<String> = log
            .pods_in("default")
            .iter()
            .map(|p| p.node.clone())
            .collect();
        let expected: BTreeSet<String> = workers.iter().cloned().collect();
        assert_eq!(pulled_on, expected, "{cluster}: nodes that got a pull pod");
        for seen in log.pods_in("default") {
            assert_eq!(seen.image, "docker.io/library/nginx:1.7.9");
            // Acceptance 8: the no-op helper is copied in and run, nothing of the image.
            let spec = seen.pod.spec.clone().context("pull pod without spec")?;
            assert_eq!(spec.node_name.as_deref(), Some(seen.node.as_str()));
            assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
            let init = &spec.init_containers.clone().unwrap_or_default()[0];
            assert_eq!(init.image.as_deref(), Some(HELPER_IMAGE));
            assert_eq!(
                init.command.clone().unwrap_or_default(),
                vec!["/kube-prefetch-noop", "install", "/kube-prefetch/noop"]
            );
            let main = &spec.containers[0];
            assert_eq!(main.image.as_deref(), Some("docker.io/library/nginx:1.7.9"));
            assert_eq!(
                main.command.clone().unwrap_or_default(),
                vec!["/kube-prefetch/noop"]
            );
        }
        wait_no_pull_pods(&client, "default", Duration::from_secs(30)).await?;
    }

    // Acceptance 2: the aggregated view.
    let view = orchestrator.status().await?;
    for cluster in &clusters {
        assert!(
            is_connected(&view, cluster),
            "{cluster} not Connected: {view:?}"
        );
        let entry = view
            .clusters
            .iter()
            .find(|c| &c.name == cluster)
            .context("cluster missing")?;
        let sample = entry
            .prefetches
            .iter()
            .find(|p| p.namespace == "default" && p.name == "prefetch-sample")
            .with_context(|| format!("{cluster}: prefetch-sample missing in {entry:?}"))?;
        assert_eq!(sample.phase, Phase::Ready);
        assert_eq!(sample.pulls.ready as usize, workers(cluster).len());
        assert_eq!(sample.pulls.total as usize, workers(cluster).len());
        assert_eq!(sample.pulls.in_flight, 0);
    }
    let metrics = orchestrator.get("/metrics").await?;
    assert!(
        metrics.contains("kube_prefetch_pull_pods_created_total"),
        "{metrics}"
    );
    assert!(metrics.contains("state=\"Connected\""), "{metrics}");

    for cleanup in cleanups {
        cleanup.run().await?;
    }
    Ok(())
}

/// Acceptance 3: event-driven, not polled (retry_after is 300 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_change_and_new_node_start_pulls_within_two_seconds() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[1].clone();
    let ns = support::TestNamespace::create(&cluster, "react").await?;
    let client = ns.client();
    let log = PodLog::start(client.clone()).await?;
    let labels = json!({ "app": "web" });
    apply(
        &ns.api::<Deployment>(),
        deployment_json(
            "web",
            labels,
            json!({ "containers": [{ "name": "web", "image": "busybox:1.36" }] }),
        ),
    )
    .await?;
    apply(
        &ns.api::<Prefetch>(),
        prefetch_json("web", json!({ "filter_by_labels": { "app": "web" }, "node_filter": "worker", "retry_after": 300 })),
    )
    .await?;
    let _orchestrator = Orchestrator::start("react", Options::default()).await?;
    wait_phase(&client, ns.name(), "web", Phase::Ready, READY_TIMEOUT).await?;

    // The workload's image changes.
    let changed_at = Instant::now();
    let deployments = ns.api::<Deployment>();
    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "template": { "spec": { "containers": [{ "name": "web", "image": "busybox:1.37" }] } } } })),
        )
        .await?;
    let workers = workers(&cluster);
    let new_image = "docker.io/library/busybox:1.37";
    support::wait_for(
        "pulls of the new image on every worker",
        Duration::from_secs(10),
        || {
            let pods = log.pods_in(ns.name());
            let workers = workers.clone();
            async move {
                let nodes: BTreeSet<String> = pods
                    .iter()
                    .filter(|p| p.image == new_image)
                    .map(|p| p.node.clone())
                    .collect();
                Ok((nodes.len() == workers.len()).then_some(()))
            }
        },
    )
    .await?;
    for seen in log
        .pods_in(ns.name())
        .iter()
        .filter(|p| p.image == new_image)
    {
        let delay = seen.first_seen.saturating_duration_since(changed_at);
        assert!(
            delay <= Duration::from_secs(2),
            "pull on {} started {delay:?} after the change",
            seen.node
        );
    }
    wait_phase(&client, ns.name(), "web", Phase::Ready, READY_TIMEOUT).await?;

    // A new worker node joins (KWOK makes it Ready).
    let node_name = support::unique_name(&format!("{cluster}-worker-new"));
    let nodes: Api<Node> = Api::all(client.clone());
    let node_cleanup = delete_nodes_later(&cluster, vec![node_name.clone()]);
    apply(&nodes, fake_node(&node_name, "amd64", json!({}))).await?;
    let ready_at = wait_nodes_ready(&nodes, vec![node_name.clone()]).await?;
    let seen = support::wait_for("a pull on the new node", Duration::from_secs(10), || {
        let pods = log.pods_in(ns.name());
        let node_name = node_name.clone();
        async move {
            Ok(pods
                .into_iter()
                .find(|p| p.node == node_name && p.image == new_image))
        }
    })
    .await?;
    // The test notices Ready by polling every 200 ms, so allow for that too.
    let delay = seen.first_seen.saturating_duration_since(ready_at);
    assert!(
        delay <= Duration::from_secs(2),
        "pull on the new node started {delay:?} after it became Ready"
    );

    node_cleanup.run().await?;
    ns.cleanup().await?;
    Ok(())
}

/// Acceptance 4: a node that reports the image gets no pull pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_reporting_the_image_gets_no_pull_pod() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[2].clone();
    let ns = support::TestNamespace::create(&cluster, "present").await?;
    let client = ns.client();
    let log = PodLog::start(client.clone()).await?;
    let workers = workers(&cluster);
    let holder = workers[1].clone();
    let image = format!("docker.io/library/redis:{}", ns.name());
    let nodes: Api<Node> = Api::all(client.clone());
    let images_patch =
        json!({ "status": { "images": [{ "names": [image.clone()], "sizeBytes": 1000 }] } });
    nodes
        .patch_status(
            &holder,
            &PatchParams::default(),
            &Patch::Merge(&images_patch),
        )
        .await?;
    let cleanup = {
        let holder = holder.clone();
        support::Cleanup::new(
            &cluster,
            format!("images of {holder}"),
            move |client| async move {
                let nodes: Api<Node> = Api::all(client);
                nodes
                    .patch_status(
                        &holder,
                        &PatchParams::default(),
                        &Patch::Merge(json!({ "status": { "images": null } })),
                    )
                    .await?;
                Ok(())
            },
        )
    };
    // The Prefetch names the image the short way; the node reports it fully qualified.
    let short = image.trim_start_matches("docker.io/library/").to_string();
    apply(
        &ns.api::<Prefetch>(),
        prefetch_json(
            "cache",
            json!({ "images": [short], "node_filter": "worker" }),
        ),
    )
    .await?;
    let _orchestrator = Orchestrator::start("present", Options::default()).await?;
    let status = wait_phase(&client, ns.name(), "cache", Phase::Ready, READY_TIMEOUT).await?;
    assert_eq!(status.pulls.ready as usize, workers.len());
    let pulled: BTreeSet<String> = log
        .pods_in(ns.name())
        .iter()
        .map(|p| p.node.clone())
        .collect();
    let expected: BTreeSet<String> = workers.iter().filter(|w| **w != holder).cloned().collect();
    assert_eq!(pulled, expected, "pull pods must skip {holder}");
    cleanup.run().await?;
    ns.cleanup().await?;
    Ok(())
}

/// Acceptance 5: a failing image is retried with growing delays, reported,
/// and leaves nothing behind; a healthy image beside it still gets ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_image_is_retried_reported_and_cleaned_up() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[0].clone();
    let ns = support::TestNamespace::create(&cluster, "failing").await?;
    let client = ns.client();
    let log = PodLog::start(client.clone()).await?;
    apply(
        &ns.api::<Deployment>(),
        deployment_json(
            "mixed",
            json!({ "app": "mixed" }),
            json!({ "containers": [
                { "name": "broken", "image": "fail.invalid/x:1" },
                { "name": "fine", "image": "busybox:1.36" },
            ] }),
        ),
    )
    .await?;
    apply(
        &ns.api::<Prefetch>(),
        prefetch_json(
            "mixed",
            json!({ "filter_by_labels": { "app": "mixed" }, "node_filter": "worker" }),
        ),
    )
    .await?;
    let _orchestrator = Orchestrator::start("failing", Options::default()).await?;

    // Attempts are visible while it retries.
    let mut attempts_seen = BTreeSet::new();
    let deadline = Instant::now() + READY_TIMEOUT;
    let status = loop {
        let status = prefetch_status(&client, ns.name(), "mixed").await?;
        if let Some(status) = &status {
            attempts_seen.extend(status.failures.iter().map(|f| f.attempts));
        }
        // FAILED comes with the first pair that gives up; wait for all three.
        let workers_count = support::node_count() - 1;
        match status {
            Some(status)
                if status.phase == Some(Phase::Failed)
                    && status.pulls.failed as usize == workers_count =>
            {
                break status;
            }
            other => assert!(
                Instant::now() < deadline,
                "phase never became FAILED: {other:?}"
            ),
        }
        tokio::time::sleep(support::POLL_INTERVAL).await;
    };
    let workers = workers(&cluster);
    assert!(
        attempts_seen.len() >= 2,
        "attempt counts seen while retrying: {attempts_seen:?}"
    );
    assert_eq!(status.pulls.failed as usize, workers.len(), "{status:?}");
    assert_eq!(
        status.pulls.ready as usize,
        workers.len(),
        "busybox ready everywhere: {status:?}"
    );
    for failure in &status.failures {
        assert_eq!(failure.image, "fail.invalid/x:1");
        assert_eq!(failure.attempts, 3, "{failure:?}");
        assert!(
            failure.reason.contains("ErrImagePull") || failure.reason.contains("ImagePullBackOff"),
            "{failure:?}"
        );
    }
    let message = status.message.clone().unwrap_or_default();
    assert!(message.contains("fail.invalid/x:1"), "message: {message}");

    // Growing delays between attempts on the same node.
    for worker in &workers {
        let mut created: Vec<Instant> = log
            .pods_in(ns.name())
            .iter()
            .filter(|p| &p.node == worker && p.image == "fail.invalid/x:1")
            .map(|p| p.first_seen)
            .collect();
        created.sort();
        assert_eq!(created.len(), 3, "{worker}: attempts");
        let first_gap = created[1] - created[0];
        let second_gap = created[2] - created[1];
        assert!(
            second_gap > first_gap,
            "{worker}: gaps {first_gap:?} then {second_gap:?}"
        );
    }

    // A Warning event on the Prefetch.
    let events: Api<Event> = ns.api();
    let warnings = events
        .list(&ListParams::default().fields("involvedObject.name=mixed,type=Warning"))
        .await?;
    assert!(
        warnings
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("PullFailed")),
        "warning events: {:?}",
        warnings
            .items
            .iter()
            .map(|e| (&e.reason, &e.message))
            .collect::<Vec<_>>()
    );
    wait_no_pull_pods(&client, ns.name(), Duration::from_secs(30)).await?;
    ns.cleanup().await?;
    Ok(())
}

/// Acceptance 6: workloads in other namespaces, with their pull secrets and
/// service account, only when the policy allows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_namespace_follows_the_policy() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[1].clone();
    let home = support::TestNamespace::create(&cluster, "home").await?;
    let apps = support::TestNamespace::create(&cluster, "apps").await?;
    let client = home.client();
    let log = PodLog::start(client.clone()).await?;
    apply(
        &apps.api::<Deployment>(),
        deployment_json(
            "private",
            json!({ "app": "private" }),
            json!({
                "imagePullSecrets": [{ "name": "regcred" }],
                "serviceAccountName": "builder",
                "containers": [{ "name": "app", "image": "registry.example.com/team/app:2" }],
            }),
        ),
    )
    .await?;
    apply(
        &home.api::<Prefetch>(),
        prefetch_json(
            "remote",
            json!({ "filter_by_labels": { "app": "private" }, "namespaces": [apps.name()], "node_filter": "worker" }),
        ),
    )
    .await?;

    let allowed = Orchestrator::start(
        "cross-allowed",
        Options {
            cross_namespace: true,
            ..Options::default()
        },
    )
    .await?;
    wait_phase(&client, home.name(), "remote", Phase::Ready, READY_TIMEOUT).await?;
    let pods = log.pods_in(apps.name());
    assert_eq!(
        pods.len(),
        workers(&cluster).len(),
        "pull pods in {}",
        apps.name()
    );
    assert!(log.pods_in(home.name()).is_empty());
    for seen in &pods {
        let spec = seen.pod.spec.clone().context("spec")?;
        let secrets: Vec<String> = spec
            .image_pull_secrets
            .unwrap_or_default()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(secrets, vec!["regcred"]);
        assert_eq!(spec.service_account_name.as_deref(), Some("builder"));
        assert_eq!(spec.automount_service_account_token, Some(false));
    }
    drop(allowed);

    let _refused = Orchestrator::start("cross-refused", Options::default()).await?;
    let status = wait_phase(&client, home.name(), "remote", Phase::Failed, READY_TIMEOUT).await?;
    let message = status.message.unwrap_or_default();
    assert!(
        message.contains(apps.name()) && message.contains("policy.cross_namespace"),
        "message: {message}"
    );
    home.cleanup().await?;
    apps.cleanup().await?;
    Ok(())
}

/// Acceptance 7: only nodes where the workload's pods could run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduling_constraints_limit_the_nodes() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[2].clone();
    let ns = support::TestNamespace::create(&cluster, "sched").await?;
    let client = ns.client();
    let log = PodLog::start(client.clone()).await?;
    let prefix = support::unique_name("sched");
    let node = |suffix: &str| format!("{prefix}-worker-{suffix}");
    let nodes: Api<Node> = Api::all(client.clone());
    let mut created = Vec::new();
    for (suffix, arch, spec) in [
        ("amd", "amd64", json!({})),
        ("arm", "arm64", json!({})),
        (
            "tainted",
            "amd64",
            json!({ "taints": [{ "key": "dedicated", "value": "gpu", "effect": "NoSchedule" }] }),
        ),
        ("cordoned", "amd64", json!({ "unschedulable": true })),
    ] {
        apply(&nodes, fake_node(&node(suffix), arch, spec)).await?;
        created.push(node(suffix));
    }
    // Not managed by KWOK: it never reports Ready.
    let mut not_ready = fake_node(&node("notready"), "amd64", json!({}));
    not_ready["metadata"]["annotations"] = json!({});
    apply(&nodes, not_ready).await?;
    created.push(node("notready"));
    let node_cleanup = delete_nodes_later(&cluster, created.clone());
    apply(
        &ns.api::<Deployment>(),
        deployment_json(
            "armonly",
            json!({ "app": "armonly" }),
            json!({ "nodeSelector": { "kubernetes.io/arch": "arm64" }, "containers": [{ "name": "a", "image": "busybox:1.36" }] }),
        ),
    )
    .await?;
    apply(
        &ns.api::<Deployment>(),
        deployment_json(
            "plain",
            json!({ "app": "plain" }),
            json!({ "containers": [{ "name": "p", "image": "alpine:3.20" }] }),
        ),
    )
    .await?;
    for (name, app) in [("arm", "armonly"), ("plain", "plain")] {
        apply(
            &ns.api::<Prefetch>(),
            prefetch_json(
                name,
                json!({ "filter_by_labels": { "app": app }, "node_filter": prefix }),
            ),
        )
        .await?;
    }
    // Let KWOK mark its nodes Ready before planning starts.
    wait_nodes_ready(
        &nodes,
        vec![node("amd"), node("arm"), node("tainted"), node("cordoned")],
    )
    .await?;
    let _orchestrator = Orchestrator::start("sched", Options::default()).await?;
    let arm = wait_phase(&client, ns.name(), "arm", Phase::Ready, READY_TIMEOUT).await?;
    let plain = wait_phase(&client, ns.name(), "plain", Phase::Ready, READY_TIMEOUT).await?;
    assert_eq!(arm.nodes, 1, "{arm:?}");
    assert_eq!(plain.nodes, 2, "{plain:?}");
    let pairs = log.pairs_in(ns.name());
    let expected: BTreeSet<(String, String)> = [
        (node("arm"), "docker.io/library/busybox:1.36".to_string()),
        (node("amd"), "docker.io/library/alpine:3.20".to_string()),
        (node("arm"), "docker.io/library/alpine:3.20".to_string()),
    ]
    .into_iter()
    .collect();
    assert_eq!(pairs, expected);
    node_cleanup.run().await?;
    ns.cleanup().await?;
    Ok(())
}

/// Acceptance 9: SIGKILL in the middle of a fan-out, then a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_sigkill_adopts_in_flight_pods() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[0].clone();
    let ns = support::TestNamespace::create(&cluster, "restart").await?;
    let client = ns.client();
    let log = PodLog::start(client.clone()).await?;
    apply(
        &ns.api::<Prefetch>(),
        prefetch_json(
            "slow",
            // The deadline matters only if the simulator loses a pod (kwok
            // now and then stops moving one): it is judged and pulled again.
            json!({ "images": ["slow.invalid/big:1"], "node_filter": "worker", "pull_timeout_seconds": 40 }),
        ),
    )
    .await?;
    let workers = workers(&cluster);
    let mut orchestrator = Orchestrator::start("restart", Options::default()).await?;
    support::wait_for("pull pods on every worker", Duration::from_secs(20), || {
        let count = log.pods_in(ns.name()).len();
        let want = workers.len();
        async move { Ok((count == want).then_some(())) }
    })
    .await?;
    orchestrator.kill();
    let before: Vec<SeenPod> = log.pods_in(ns.name());
    assert!(
        before.iter().all(|p| !p.deleted),
        "the slow pulls were still in flight"
    );
    let restarted_at = Instant::now();
    orchestrator.spawn()?;
    orchestrator.wait_ready().await?;
    let status = wait_phase(
        &client,
        ns.name(),
        "slow",
        Phase::Ready,
        Duration::from_secs(240),
    )
    .await?;
    assert_eq!(status.pulls.ready as usize, workers.len());
    // No pod was created twice: the restarted process adopted every pod in
    // flight and created none while they were (a pod created again can only
    // be a retry after the 40 s deadline).
    let adopted = log_lines_with(&orchestrator.log_path, "adopted existing pull pod");
    assert_eq!(adopted.len(), workers.len(), "adopted: {adopted:#?}");
    let before_uids: BTreeSet<String> = before.iter().map(|p| p.uid.clone()).collect();
    for pod in log.pods_in(ns.name()) {
        if !before_uids.contains(&pod.uid) {
            assert!(
                pod.first_seen >= restarted_at + Duration::from_secs(40),
                "{} on {} was created again {:?} after the restart",
                pod.name,
                pod.node,
                pod.first_seen.saturating_duration_since(restarted_at)
            );
        }
    }
    wait_no_pull_pods(&client, ns.name(), Duration::from_secs(30)).await?;
    ns.cleanup().await?;
    Ok(())
}

/// Acceptance 10: deleting stops the work and removes in-flight pods;
/// editing re-plans at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_edit_take_effect_at_once() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[1].clone();
    let ns = support::TestNamespace::create(&cluster, "edit").await?;
    let client = ns.client();
    let log = PodLog::start(client.clone()).await?;
    let prefetches = ns.api::<Prefetch>();
    apply(
        &prefetches,
        prefetch_json(
            "slow",
            json!({ "images": ["slow.invalid/app:1"], "node_filter": "worker" }),
        ),
    )
    .await?;
    apply(
        &prefetches,
        prefetch_json(
            "moving",
            json!({ "images": ["busybox:1.36"], "node_filter": "worker2", "retry_after": 300 }),
        ),
    )
    .await?;
    let _orchestrator = Orchestrator::start("edit", Options::default()).await?;
    support::wait_for("slow pulls in flight", Duration::from_secs(20), || {
        let count = log
            .pods_in(ns.name())
            .iter()
            .filter(|p| p.image.starts_with("slow.invalid/"))
            .count();
        let want = workers(&cluster).len();
        async move { Ok((count == want).then_some(())) }
    })
    .await?;
    prefetches.delete("slow", &DeleteParams::default()).await?;
    let deleted_at = Instant::now();
    let pods: Api<k8s_openapi::api::core::v1::Pod> = ns.api();
    support::wait_for("slow pull pods removed", Duration::from_secs(10), || {
        let pods = pods.clone();
        async move {
            let left = pods.list(&ListParams::default().labels(MANAGED_BY)).await?;
            Ok((!left.items.iter().any(|p| {
                p.annotations()
                    .get(IMAGE_ANNOTATION)
                    .is_some_and(|i| i.starts_with("slow.invalid/"))
            }))
            .then_some(()))
        }
    })
    .await?;
    assert!(
        deleted_at.elapsed() < Duration::from_secs(10),
        "well before the 30 s slow pull finishes"
    );

    wait_phase(&client, ns.name(), "moving", Phase::Ready, READY_TIMEOUT).await?;
    let target = format!("{cluster}-worker3");
    let edited_at = Instant::now();
    prefetches
        .patch(
            "moving",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "node_filter": "worker3" } })),
        )
        .await?;
    let seen = support::wait_for(
        "a pull on worker3 after the edit",
        Duration::from_secs(10),
        || {
            let found = log
                .pods_in(ns.name())
                .into_iter()
                .find(|p| p.node == target);
            async move { Ok(found) }
        },
    )
    .await?;
    let delay = seen.first_seen.saturating_duration_since(edited_at);
    assert!(
        delay <= Duration::from_secs(2),
        "re-planned {delay:?} after the edit"
    );
    let status = wait_phase(&client, ns.name(), "moving", Phase::Ready, READY_TIMEOUT).await?;
    assert_eq!(status.nodes, 1);
    ns.cleanup().await?;
    Ok(())
}

/// Acceptance 11: bad input gets a clear error and nothing else breaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_reported_clearly() -> Result<()> {
    let _serial = setup().await;
    let dir = tempfile::tempdir()?;

    // Malformed TOML: non-zero exit, file:line:col.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\nlisten = \"127.0.0.1:1\"\n[defaults\nretry_after = 3\n",
    )?;
    let output = std::process::Command::new(binary())
        .args(["check", "--config"])
        .arg(&bad)
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!("{}:3:", bad.display())),
        "stderr: {stderr}"
    );

    // An unknown context is named.
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(
        &unknown,
        format!(
            "[[kubeconfig]]\npath = {:?}\ncontexts = [\"sim-1\", \"sim-9\"]\n",
            support::kubeconfig_path().display().to_string()
        ),
    )?;
    let output = std::process::Command::new(binary())
        .args(["run", "--config"])
        .arg(&unknown)
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("sim-9"), "stderr: {stderr}");

    // Schema validation by the API server.
    let cluster = support::cluster_names()[0].clone();
    let ns = support::TestNamespace::create(&cluster, "invalid").await?;
    let prefetches = ns.api::<Prefetch>();
    let negative = apply(
        &prefetches,
        prefetch_json("negative", json!({ "retry_after": -5 })),
    )
    .await;
    let error = format!(
        "{:#}",
        negative
            .err()
            .context("negative retry_after was accepted")?
    );
    assert!(
        error.contains("retry_after") && error.contains("greater than or equal to 0"),
        "{error}"
    );
    let bad_label = apply(
        &prefetches,
        prefetch_json(
            "badlabel",
            json!({ "filter_by_labels": { "app": "not a label!" } }),
        ),
    )
    .await;
    let error = format!(
        "{:#}",
        bad_label
            .err()
            .context("invalid label value was accepted")?
    );
    assert!(error.contains("filter_by_labels"), "{error}");

    // A cluster behind a closed port: Unreachable, the others work, and it
    // connects once the port opens.
    let late = closed_port_kubeconfig(dir.path(), "sim-3", "late")?;
    let kubeconfig_toml = format!(
        "[[kubeconfig]]\npath = {:?}\ncontexts = [\"sim-1\", \"sim-2\"]\n\n[[kubeconfig]]\npath = {:?}\n",
        support::kubeconfig_path().display().to_string(),
        late.path.display().to_string()
    );
    apply(
        &prefetches,
        prefetch_json(
            "fine",
            json!({ "images": ["busybox:1.36"], "node_filter": "worker" }),
        ),
    )
    .await?;
    let orchestrator = Orchestrator::start(
        "closed-port",
        Options {
            kubeconfig_toml: Some(kubeconfig_toml),
            ..Options::default()
        },
    )
    .await?;
    support::wait_for(
        "late cluster Unreachable, others Connected",
        Duration::from_secs(30),
        || {
            let orchestrator = &orchestrator;
            async move {
                let view = orchestrator.status().await?;
                Ok(
                    (cluster_state(&view, "late").as_deref() == Some("Unreachable")
                        && is_connected(&view, "sim-1")
                        && is_connected(&view, "sim-2"))
                    .then_some(()),
                )
            }
        },
    )
    .await?;
    wait_phase(&ns.client(), ns.name(), "fine", Phase::Ready, READY_TIMEOUT).await?;
    let _proxy = late.open().await?;
    support::wait_for(
        "late cluster Connected once its port opens",
        Duration::from_secs(30),
        || {
            let orchestrator = &orchestrator;
            async move { Ok(is_connected(&orchestrator.status().await?, "late").then_some(())) }
        },
    )
    .await?;
    ns.cleanup().await?;
    Ok(())
}

/// A node whose kubelet never answers (not managed by KWOK, marked Ready by
/// hand): its pull pod is judged failed once it outlives its deadline, and
/// deleted, instead of holding the node's slot for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_pod_on_a_dead_kubelet_is_judged_at_its_deadline() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[2].clone();
    let ns = support::TestNamespace::create(&cluster, "deadline").await?;
    let client = ns.client();
    let node_name = support::unique_name("silent-worker");
    let nodes: Api<Node> = Api::all(client.clone());
    let mut node = fake_node(&node_name, "amd64", json!({}));
    node["metadata"]["annotations"] = json!({});
    apply(&nodes, node).await?;
    let node_cleanup = delete_nodes_later(&cluster, vec![node_name.clone()]);
    let ready = json!({ "status": { "conditions": [{ "type": "Ready", "status": "True", "reason": "KubeletReady", "message": "set by the test" }] } });
    nodes
        .patch_status(&node_name, &PatchParams::default(), &Patch::Merge(&ready))
        .await?;
    apply(
        &ns.api::<Prefetch>(),
        prefetch_json("stuck", json!({ "images": ["busybox:1.36"], "node_filter": node_name, "pull_timeout_seconds": 3 })),
    )
    .await?;
    let _orchestrator = Orchestrator::start("deadline", Options::default()).await?;
    let failure = support::wait_for(
        "a DeadlineExceeded failure",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            let ns_name = ns.name().to_string();
            async move {
                let status = prefetch_status(&client, &ns_name, "stuck").await?;
                Ok(status.and_then(|s| {
                    s.failures
                        .into_iter()
                        .find(|f| f.reason == "DeadlineExceeded")
                }))
            }
        },
    )
    .await?;
    assert_eq!(failure.node, node_name);
    assert!(failure.last_error.contains("within 3s"), "{failure:?}");
    // The overdue pod itself is deleted.
    let pod_name = failure
        .last_error
        .split_whitespace()
        .nth(2)
        .context("pod name in the message")?
        .to_string();
    let pods: Api<k8s_openapi::api::core::v1::Pod> = ns.api();
    support::wait_for("the overdue pod deleted", Duration::from_secs(10), || {
        let pods = pods.clone();
        let pod_name = pod_name.clone();
        async move {
            match pods.get_opt(&pod_name).await? {
                // A retry reuses the name after its backoff: a newer pod is fine.
                Some(pod)
                    if pod.metadata.deletion_timestamp.is_none() && pod_is_older_than(&pod, 3) =>
                {
                    Ok(None)
                }
                _ => Ok(Some(())),
            }
        }
    })
    .await?;
    node_cleanup.run().await?;
    ns.cleanup().await?;
    Ok(())
}

fn pod_is_older_than(pod: &k8s_openapi::api::core::v1::Pod, seconds: i64) -> bool {
    pod.metadata
        .creation_timestamp
        .as_ref()
        .is_some_and(|created| {
            k8s_openapi::jiff::Timestamp::now()
                .duration_since(created.0)
                .as_secs()
                > seconds
        })
}

/// Status writes are debounced: a fan-out of dozens of pulls makes a few
/// writes, not one per pull (bounded generously: at most one write per two
/// pulls; a run takes about 10 s with writes at most every 3 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_makes_few_status_writes() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[0].clone();
    let ns = support::TestNamespace::create(&cluster, "debounce").await?;
    let client = ns.client();
    let log = PodLog::start(client.clone()).await?;
    let images: Vec<String> = (1..=8).map(|i| format!("busybox:1.{i}")).collect();
    apply(
        &ns.api::<Prefetch>(),
        prefetch_json("many", json!({ "images": images, "node_filter": "worker" })),
    )
    .await?;
    let orchestrator = Orchestrator::start(
        "debounce",
        Options {
            status_debounce: "3s",
            ..Options::default()
        },
    )
    .await?;
    let status = wait_phase(&client, ns.name(), "many", Phase::Ready, READY_TIMEOUT).await?;
    let pulls = log.pods_in(ns.name()).len();
    assert_eq!(pulls, 8 * workers(&cluster).len());
    assert_eq!(status.pulls.ready as usize, pulls);
    let metrics = orchestrator.get("/metrics").await?;
    let writes: f64 = metrics
        .lines()
        .filter(|line| {
            line.starts_with("kube_prefetch_status_writes_total")
                && line.contains(&format!("cluster=\"{cluster}\""))
        })
        .filter_map(|line| line.split_whitespace().last()?.parse::<f64>().ok())
        .sum();
    assert!(writes >= 1.0, "no status write counted:\n{metrics}");
    assert!(
        writes * 2.0 <= pulls as f64,
        "{writes} status writes for {pulls} pulls"
    );
    ns.cleanup().await?;
    Ok(())
}

/// SIGHUP re-reads the config: an added cluster starts, the running one is
/// not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_a_cluster_without_touching_the_others() -> Result<()> {
    let _serial = setup().await;
    let kubeconfig = support::kubeconfig_path().display().to_string();
    let only_first = format!("[[kubeconfig]]\npath = {kubeconfig:?}\ncontexts = [\"sim-1\"]\n");
    let orchestrator = Orchestrator::start(
        "sighup",
        Options {
            kubeconfig_toml: Some(only_first.clone()),
            ..Options::default()
        },
    )
    .await?;
    support::wait_for("sim-1 Connected", Duration::from_secs(30), || async {
        Ok(is_connected(&orchestrator.status().await?, "sim-1").then_some(()))
    })
    .await?;
    let view = orchestrator.status().await?;
    assert!(cluster_state(&view, "sim-2").is_none(), "{view:?}");

    let config = std::fs::read_to_string(&orchestrator.config_path)?;
    let both = config.replace(
        "contexts = [\"sim-1\"]",
        "contexts = [\"sim-1\", \"sim-2\"]",
    );
    assert_ne!(config, both);
    std::fs::write(&orchestrator.config_path, both)?;
    orchestrator.signal("HUP")?;
    support::wait_for(
        "sim-2 Connected after SIGHUP",
        Duration::from_secs(30),
        || async {
            let view = orchestrator.status().await?;
            Ok((is_connected(&view, "sim-1") && is_connected(&view, "sim-2")).then_some(()))
        },
    )
    .await?;
    let starts = log_lines_with(&orchestrator.log_path, "starting context=sim-1");
    assert_eq!(starts.len(), 1, "sim-1 was restarted: {starts:#?}");

    // A broken edit is refused and changes nothing.
    std::fs::write(&orchestrator.config_path, "[server\n")?;
    orchestrator.signal("HUP")?;
    support::wait_for("the refused reload logged", Duration::from_secs(10), || {
        let refused = !log_lines_with(&orchestrator.log_path, "config reload failed").is_empty();
        async move { Ok(refused.then_some(())) }
    })
    .await?;
    let view = orchestrator.status().await?;
    assert!(
        is_connected(&view, "sim-1") && is_connected(&view, "sim-2"),
        "{view:?}"
    );
    Ok(())
}
