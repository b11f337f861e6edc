//! The simulated clusters of `clusters/sim` behave like the real clusters the
//! operator will meet, in the ways its tests rely on. Each test runs on every
//! cluster at once. The clusters are started by `support::sim()` if needed.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::{StreamExt, TryStreamExt, future};
use k8s_openapi::api::core::v1::{ContainerState, Event, Node, Pod};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
    WatchEvent, WatchParams,
};
use kube::{Client, ResourceExt};
use serde_json::json;

use support::{DEFAULT_TIMEOUT, TestNamespace, wait_for};

/// Runs `check` on every sim cluster concurrently; fails naming each cluster
/// whose check failed.
async fn on_every_cluster<F, Fut>(check: F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let sim = support::sim().await;
    let results = future::join_all(sim.clusters.iter().map(|c| {
        let cluster = c.clone();
        let run = check(cluster.clone());
        async move { (cluster, run.await) }
    }))
    .await;
    let failures: Vec<String> = results
        .into_iter()
        .filter_map(|(cluster, result)| result.err().map(|e| format!("{cluster}: {e:#}")))
        .collect();
    assert!(failures.is_empty(), "failed on:\n{}", failures.join("\n"));
}

fn pod(name: &str, node: &str, restart_policy: &str, image: &str, init_image: Option<&str>) -> Pod {
    let mut spec = json!({
        "nodeName": node,
        "restartPolicy": restart_policy,
        "containers": [{"name": "main", "image": image}],
    });
    if let Some(init) = init_image {
        spec["initContainers"] = json!([{"name": "init", "image": init}]);
    }
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("a valid pod manifest")
}

/// Creates the pod and records every version of it the API server reports
/// (watching from the creation's resourceVersion, so no state is missed)
/// until `done` holds for one.
async fn create_and_watch(
    api: &Api<Pod>,
    pod: &Pod,
    done: impl Fn(&Pod) -> bool,
) -> Result<Vec<Pod>> {
    let created = api
        .create(&PostParams::default(), pod)
        .await
        .context("creating pod")?;
    let name = created.name_any();
    let version = created
        .resource_version()
        .context("created pod has no resourceVersion")?;
    let params = WatchParams::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(120);
    let mut events = api
        .watch(&params, &version)
        .await
        .context("watching pod")?
        .boxed();
    let mut seen = vec![created];
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    loop {
        if done(seen.last().expect("at least the created pod")) {
            return Ok(seen);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let event = match tokio::time::timeout(left, events.try_next()).await {
            Ok(event) => event.context("pod watch")?,
            Err(_) => bail!(
                "timed out after {DEFAULT_TIMEOUT:?}; states seen: {:?}",
                seen.iter().map(summary).collect::<Vec<_>>()
            ),
        };
        match event {
            Some(WatchEvent::Added(p) | WatchEvent::Modified(p)) => seen.push(p),
            Some(WatchEvent::Deleted(_)) => bail!("pod {name} was deleted while watched"),
            Some(WatchEvent::Bookmark(_)) => {}
            Some(WatchEvent::Error(e)) => bail!("watch error: {e:?}"),
            None => bail!("watch of pod {name} ended early"),
        }
    }
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn container_state(pod: &Pod) -> Option<&ContainerState> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()
}

fn waiting_reason(pod: &Pod) -> Option<&str> {
    container_state(pod)?.waiting.as_ref()?.reason.as_deref()
}

/// One line per observed pod state, for failure messages.
fn summary(pod: &Pod) -> String {
    let state = match container_state(pod) {
        Some(s) if s.running.is_some() => "running".to_string(),
        Some(s) if s.terminated.is_some() => "terminated".to_string(),
        Some(s) => format!(
            "waiting {:?}",
            s.waiting.as_ref().and_then(|w| w.reason.clone())
        ),
        None => "-".to_string(),
    };
    format!("{}/{state}", phase(pod))
}

#[tokio::test]
async fn run_to_completion_pod_succeeds() {
    on_every_cluster(|cluster| async move {
        let ns = TestNamespace::create(&cluster, "succeeds").await?;
        let pods: Api<Pod> = ns.api();
        let manifest = pod(
            "job-like",
            &format!("{cluster}-worker"),
            "Never",
            "registry.example.com/tools/report:1.2",
            Some("busybox:1.36"),
        );
        let seen = create_and_watch(&pods, &manifest, |p| phase(p) == "Succeeded").await?;
        let phases: Vec<&str> = seen.iter().map(phase).filter(|p| !p.is_empty()).collect();
        let mut order = phases.clone();
        order.dedup();
        ensure!(
            order == ["Pending", "Running", "Succeeded"],
            "phases went {phases:?}"
        );
        ensure!(
            seen.iter()
                .any(|p| container_state(p).is_some_and(|s| s.running.is_some())),
            "container never ran: {:?}",
            seen.iter().map(summary).collect::<Vec<_>>()
        );

        let done = seen.last().expect("a final state");
        let status = done.status.as_ref().context("no status")?;
        let main = &status
            .container_statuses
            .as_ref()
            .context("no container statuses")?[0];
        let terminated = main
            .state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .context("main not terminated")?;
        ensure!(
            terminated.exit_code == 0,
            "exit code {}",
            terminated.exit_code
        );
        ensure!(
            terminated.reason.as_deref() == Some("Completed"),
            "reason {:?}",
            terminated.reason
        );
        ensure!(!main.image_id.is_empty(), "imageID is empty");
        ensure!(
            main.image == "registry.example.com/tools/report:1.2",
            "image {}",
            main.image
        );
        let init = &status
            .init_container_statuses
            .as_ref()
            .context("no init container statuses")?[0];
        let init_done = init
            .state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .context("init not terminated")?;
        ensure!(
            init_done.reason.as_deref() == Some("Completed") && init_done.exit_code == 0,
            "init: {init_done:?}"
        );
        ensure!(
            status.pod_ip.is_some() && status.host_ip.is_some(),
            "pod has no IPs"
        );

        ns.cleanup().await
    })
    .await;
}

#[tokio::test]
async fn unresolvable_image_backs_off_with_a_warning_event() {
    on_every_cluster(|cluster| async move {
        let ns = TestNamespace::create(&cluster, "pull-fails").await?;
        let pods: Api<Pod> = ns.api();
        let image = "fail.invalid/missing/app:1.0";
        let manifest = pod(
            "cannot-pull",
            &format!("{cluster}-worker2"),
            "Never",
            image,
            None,
        );
        let seen = create_and_watch(&pods, &manifest, |p| {
            waiting_reason(p) == Some("ImagePullBackOff")
        })
        .await?;
        let err_pull = seen
            .iter()
            .find(|p| waiting_reason(p) == Some("ErrImagePull"))
            .context("ErrImagePull was never reported before ImagePullBackOff")?;
        let message = container_state(err_pull)
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.message.clone())
            .unwrap_or_default();
        ensure!(
            message.contains(&format!("failed to pull and unpack image \"{image}\""))
                && message.contains("no such host"),
            "ErrImagePull message: {message}"
        );

        let events: Api<Event> = ns.api();
        let selector = "involvedObject.name=cannot-pull,type=Warning,reason=Failed".to_string();
        let warning = wait_for("a Warning event Failed", DEFAULT_TIMEOUT, || async {
            let list = events
                .list(&ListParams::default().fields(&selector))
                .await?;
            Ok(list.items.into_iter().next())
        })
        .await?;
        ensure!(
            warning
                .message
                .as_deref()
                .unwrap_or("")
                .contains("fail.invalid"),
            "event message: {:?}",
            warning.message
        );

        // The pull never succeeds: the pod stays Pending and never runs.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = pods.get("cannot-pull").await?;
        ensure!(
            phase(&now) == "Pending",
            "phase is {} after backing off",
            phase(&now)
        );
        ensure!(
            waiting_reason(&now) == Some("ImagePullBackOff"),
            "now {}",
            summary(&now)
        );

        ns.cleanup().await
    })
    .await;
}

#[tokio::test]
async fn deleted_pods_disappear() {
    on_every_cluster(|cluster| async move {
        let ns = TestNamespace::create(&cluster, "delete").await?;
        let pods: Api<Pod> = ns.api();
        let node = format!("{cluster}-worker3");
        // A long-running pod, deleted with the default grace period.
        let manifest = pod("server", &node, "Always", "nginx:1.27", None);
        create_and_watch(&pods, &manifest, |p| phase(p) == "Running").await?;
        pods.delete("server", &DeleteParams::default()).await?;
        // And one deleted with grace period 0 right after creation.
        let manifest = pod("short-lived", &node, "Never", "busybox:1.36", None);
        pods.create(&PostParams::default(), &manifest).await?;
        pods.delete(
            "short-lived",
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await?;

        for name in ["server", "short-lived"] {
            wait_for(
                &format!("pod {name} to disappear"),
                DEFAULT_TIMEOUT,
                || async { Ok(pods.get_opt(name).await?.is_none().then_some(())) },
            )
            .await?;
        }
        ns.cleanup().await
    })
    .await;
}

#[tokio::test]
async fn slow_pull_takes_about_thirty_seconds() {
    on_every_cluster(|cluster| async move {
        let ns = TestNamespace::create(&cluster, "slow-pull").await?;
        let pods: Api<Pod> = ns.api();
        let manifest = pod(
            "slow",
            &format!("{cluster}-worker"),
            "Never",
            "slow.invalid/big/image:3",
            None,
        );
        let start = Instant::now();
        pods.create(&PostParams::default(), &manifest).await?;
        let started = wait_for(
            "the slow pod to leave Pending",
            Duration::from_secs(90),
            || async {
                let p = pods.get("slow").await?;
                Ok((!phase(&p).is_empty() && phase(&p) != "Pending").then(|| start.elapsed()))
            },
        )
        .await?;
        ensure!(
            (Duration::from_secs(25)..Duration::from_secs(60)).contains(&started),
            "left Pending after {started:?}"
        );
        wait_for("the slow pod to succeed", DEFAULT_TIMEOUT, || async {
            Ok((phase(&pods.get("slow").await?) == "Succeeded").then_some(()))
        })
        .await?;
        ns.cleanup().await
    })
    .await;
}

#[tokio::test]
async fn custom_resource_status_subresource_works() {
    on_every_cluster(|cluster| async move {
        let client = support::try_client(&cluster).await?;
        // A group of its own per run, so parallel runs and other tests never
        // share the cluster-scoped CRD.
        let group = format!("{}.simtest.example.com", support::unique_name("g").replace('-', ""));
        let crd_name = format!("widgets.{group}");
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        let crd: CustomResourceDefinition = serde_json::from_value(json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": crd_name},
            "spec": {
                "group": group,
                "scope": "Namespaced",
                "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
                "versions": [{
                    "name": "v1",
                    "served": true,
                    "storage": true,
                    "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {"type": "object", "properties": {"size": {"type": "integer"}}},
                            "status": {"type": "object", "properties": {
                                "phase": {"type": "string"},
                                "observedGeneration": {"type": "integer"}
                            }}
                        }
                    }}
                }]
            }
        }))?;
        crds.create(&PostParams::default(), &crd).await.context("creating CRD")?;
        let remove_crd = {
            let crd_name = crd_name.clone();
            support::Cleanup::new(&cluster, format!("CRD {crd_name}"), move |client| async move {
                let crds: Api<CustomResourceDefinition> = Api::all(client);
                crds.delete(&crd_name, &DeleteParams::default()).await.ok();
                let crds = &crds;
                let crd_name = &crd_name;
                wait_for("the CRD to be gone", DEFAULT_TIMEOUT, move || async move {
                    Ok(crds.get_opt(crd_name).await?.is_none().then_some(()))
                })
                .await
            })
        };
        support::wait_crd_established(&client, &crd_name).await?;

        let ns = TestNamespace::create(&cluster, "crd").await?;
        let resource = ApiResource {
            group: group.clone(),
            version: "v1".into(),
            api_version: format!("{group}/v1"),
            kind: "Widget".into(),
            plural: "widgets".into(),
        };
        let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns.name(), &resource);
        let widget: DynamicObject = serde_json::from_value(json!({
            "apiVersion": format!("{group}/v1"),
            "kind": "Widget",
            "metadata": {"name": "w1"},
            "spec": {"size": 3},
        }))?;
        // Right after Established the new path may still 404 for a moment.
        wait_for("creating a Widget", DEFAULT_TIMEOUT, || async {
            match widgets.create(&PostParams::default(), &widget).await {
                Ok(created) => Ok(Some(created)),
                Err(kube::Error::Api(s)) if s.is_not_found() => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
        .await?;

        let status = json!({"status": {"phase": "Ready", "observedGeneration": 1}});
        widgets.patch_status("w1", &PatchParams::default(), &Patch::Merge(&status)).await?;
        // With a status subresource, the main resource ignores status changes
        // and the status subresource ignores spec changes.
        let both = json!({"spec": {"size": 5}, "status": {"phase": "Overwritten"}});
        widgets.patch("w1", &PatchParams::default(), &Patch::Merge(&both)).await?;
        let spec_via_status = json!({"spec": {"size": 7}});
        widgets.patch_status("w1", &PatchParams::default(), &Patch::Merge(&spec_via_status)).await?;

        let now = widgets.get("w1").await?;
        ensure!(now.data["spec"]["size"] == 5, "spec: {}", now.data["spec"]);
        ensure!(now.data["status"]["phase"] == "Ready", "status: {}", now.data["status"]);
        ensure!(now.data["status"]["observedGeneration"] == 1, "status: {}", now.data["status"]);

        ns.cleanup().await?;
        remove_crd.run().await
    })
    .await;
}

fn is_forbidden<T>(result: &kube::Result<T>) -> bool {
    matches!(result, Err(kube::Error::Api(s)) if s.is_forbidden())
}

#[tokio::test]
async fn operator_user_needs_rbac() {
    on_every_cluster(|cluster| async move {
        let admin = support::try_client(&cluster).await?;
        let operator = support::try_operator_client(&cluster).await?;
        let operator_pods: Api<Pod> = Api::all(operator.clone());

        let denied = operator_pods.list(&ListParams::default().limit(1)).await;
        ensure!(is_forbidden(&denied), "operator listing pods before any grant: {denied:?}");

        let name = support::unique_name("simtest-pod-reader");
        let role: ClusterRole = serde_json::from_value(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
        }))?;
        let binding: ClusterRoleBinding = serde_json::from_value(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "operator"}]
        }))?;
        let roles: Api<ClusterRole> = Api::all(admin.clone());
        let bindings: Api<ClusterRoleBinding> = Api::all(admin.clone());
        roles.create(&PostParams::default(), &role).await?;
        bindings.create(&PostParams::default(), &binding).await?;
        let cleanup = {
            let name = name.clone();
            support::Cleanup::new(&cluster, format!("RBAC {name}"), move |client: Client| async move {
                Api::<ClusterRoleBinding>::all(client.clone()).delete(&name, &DeleteParams::default()).await.ok();
                Api::<ClusterRole>::all(client).delete(&name, &DeleteParams::default()).await.ok();
                Ok(())
            })
        };

        // The authorizer learns of new bindings through a watch: poll.
        wait_for("the operator to be allowed to list pods", DEFAULT_TIMEOUT, || async {
            Ok(operator_pods.list(&ListParams::default().limit(1)).await.ok())
        })
        .await?;
        let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::all(operator.clone());
        let secrets_denied = secrets.list(&ListParams::default().limit(1)).await;
        ensure!(is_forbidden(&secrets_denied), "the grant covers pods only: {secrets_denied:?}");

        cleanup.run().await?;
        wait_for("the operator to be forbidden again", DEFAULT_TIMEOUT, || async {
            Ok(is_forbidden(&operator_pods.list(&ListParams::default().limit(1)).await).then_some(()))
        })
        .await
    })
    .await;
}

#[tokio::test]
async fn nodes_look_like_a_kind_cluster() {
    let nodes_per_cluster = support::node_count();
    on_every_cluster(|cluster| async move {
        let client = support::try_client(&cluster).await?;
        let nodes: Api<Node> = Api::all(client);
        let mut expected = vec![
            format!("{cluster}-control-plane"),
            format!("{cluster}-worker"),
        ];
        expected.extend((2..nodes_per_cluster).map(|i| format!("{cluster}-worker{i}")));
        expected.truncate(nodes_per_cluster);
        let last_worker = (nodes_per_cluster > 1).then(|| expected[nodes_per_cluster - 1].clone());

        for name in &expected {
            let node = nodes
                .get(name)
                .await
                .with_context(|| format!("node {name}"))?;
            let labels = node.labels();
            let annotations = node.annotations();
            ensure!(
                annotations.get("kwok.x-k8s.io/node").map(String::as_str) == Some("fake"),
                "{name}: {annotations:?}"
            );
            ensure!(
                labels.get("kubernetes.io/hostname") == Some(name),
                "{name}: {labels:?}"
            );
            ensure!(
                labels.get("kubernetes.io/os").map(String::as_str) == Some("linux"),
                "{name}: {labels:?}"
            );
            let arch = if Some(name) == last_worker.as_ref() {
                "arm64"
            } else {
                "amd64"
            };
            ensure!(
                labels.get("kubernetes.io/arch").map(String::as_str) == Some(arch),
                "{name}: {labels:?}"
            );

            let status = node.status.as_ref().context("no node status")?;
            let ready = status
                .conditions
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            ensure!(ready, "{name} is not Ready");
            let info = status.node_info.as_ref().context("no nodeInfo")?;
            ensure!(
                info.architecture == arch,
                "{name}: nodeInfo.architecture {}",
                info.architecture
            );
            ensure!(
                info.kubelet_version == support::K8S_VERSION,
                "{name}: kubelet {}",
                info.kubelet_version
            );

            let taints = node
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default();
            if name.ends_with("-control-plane") {
                ensure!(
                    labels.contains_key("node-role.kubernetes.io/control-plane"),
                    "{name}: {labels:?}"
                );
                ensure!(
                    taints
                        .iter()
                        .any(|t| t.key == "node-role.kubernetes.io/control-plane"
                            && t.effect == "NoSchedule"),
                    "{name}: taints {taints:?}"
                );
            } else {
                ensure!(taints.is_empty(), "worker {name} has taints {taints:?}");
            }
        }
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn kubectl_sees_ready_nodes_and_server_version() {
    let sim = support::sim().await;
    let cluster = sim
        .clusters
        .get(1)
        .cloned()
        .unwrap_or_else(|| sim.clusters[0].clone());
    let out = support::kubectl(&["--context", &cluster, "get", "nodes"])
        .await
        .expect("kubectl get nodes");
    let ready: Vec<&str> = out
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(1) == Some("Ready"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        ready.len() >= support::node_count(),
        "Ready nodes of {cluster}:\n{out}"
    );
    for name in [
        format!("{cluster}-control-plane"),
        format!("{cluster}-worker"),
    ] {
        assert!(
            ready.contains(&name.as_str()),
            "{name} missing from:\n{out}"
        );
    }

    let version = support::kubectl(&["--context", &cluster, "version", "-o", "json"])
        .await
        .expect("kubectl version");
    let version: serde_json::Value =
        serde_json::from_str(&version).expect("kubectl version prints JSON");
    assert_eq!(
        version["serverVersion"]["gitVersion"],
        support::K8S_VERSION,
        "{version}"
    );
    assert_eq!(
        version["clientVersion"]["gitVersion"],
        support::K8S_VERSION,
        "{version}"
    );
}
