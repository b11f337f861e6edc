//! Pulls on real nodes: a real kubelet v1.36, containerd and runc in sim-1
//! (`clusters/sim/up --real-nodes 1`) pulling from registries on loopback.
//! Every scenario runs once per pull method (`direct` and `helper`; only one
//! if `REAL_NODE_METHOD` names it), and checks the image in the node's own
//! containerd, not only our status.
//!
//! Ignored by a plain `cargo test` (they need the real nodes, which only
//! `up --real-nodes` starts); `make test` starts them and runs
//! `cargo test --test real_nodes -- --ignored --test-threads 1`.

mod harness;
mod realnode;
mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use harness::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use kube_prefetch::api::{Phase, Prefetch};
use kube_prefetch::pull::targeting::NodeView;
use realnode::*;
use serde_json::json;

const READY_TIMEOUT: Duration = Duration::from_secs(120);

fn assert_restricted(pod: &Pod) -> Result<()> {
    let spec = pod.spec.as_ref().context("pull pod without spec")?;
    ensure(spec.automount_service_account_token == Some(false), || {
        "pull pod mounts a token".to_string()
    })?;
    for container in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        let sc = container
            .security_context
            .as_ref()
            .context("container without securityContext")?;
        ensure(
            sc.run_as_non_root == Some(true)
                && sc.run_as_user == Some(65534)
                && sc.read_only_root_filesystem == Some(true)
                && sc.allow_privilege_escalation == Some(false),
            || format!("{}: not restricted: {sc:?}", container.name),
        )?;
    }
    Ok(())
}

/// Acceptance 1: the article's sample, its Deployment pointed at the local
/// registry, pulled for real, seen in containerd and in the Node's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs real nodes: make test runs it after `clusters/sim/up --real-nodes 1`"]
async fn article_sample_pulls_on_the_real_node() -> Result<()> {
    let _serial = setup().await;
    let info = real_info()?;
    let root = support::repo_root();
    let client = support::client(&info.cluster).await;
    let prefetches: Api<Prefetch> = Api::namespaced(client.clone(), "default");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    for method in methods()? {
        let repo = support::unique_name(&format!("test/nginx-{method}"));
        let pushed = push_image(&[&format!("{repo}:1.7.9")]).await?;
        let image = format!("{}/{repo}:1.7.9", info.registries.plain);
        let manifest = std::fs::read_to_string(root.join("deploy/examples/nginx-deployment.yaml"))?
            .replace("image: nginx:1.7.9", &format!("image: {image}"));
        ensure(manifest.contains(&image), || {
            "the sample Deployment no longer names nginx:1.7.9".to_string()
        })?;
        let dir = tempfile::tempdir()?;
        let deployment_path = dir.path().join("nginx-deployment.yaml");
        std::fs::write(&deployment_path, manifest)?;
        let log = PodLog::start(client.clone()).await?;
        kubectl_apply(
            &info.cluster,
            None,
            &root.join("deploy/examples/prefetch-sample.yaml"),
        )
        .await?;
        kubectl_apply(&info.cluster, None, &deployment_path).await?;
        let cleanup = support::Cleanup::new(&info.cluster, "article sample", |client| async move {
            let prefetches: Api<Prefetch> = Api::namespaced(client.clone(), "default");
            let deployments: Api<Deployment> = Api::namespaced(client, "default");
            let _ = prefetches
                .delete("prefetch-sample", &DeleteParams::default())
                .await;
            let _ = deployments
                .delete("nginx-deployment", &DeleteParams::default())
                .await;
            Ok(())
        });

        let started = Instant::now();
        let run = orchestrator("article", method, &info).await?;
        let status = wait_phase(
            &client,
            "default",
            "prefetch-sample",
            Phase::Ready,
            READY_TIMEOUT,
        )
        .await
        .with_context(|| run.log_tail(30))?;
        let took = started.elapsed();
        assert_eq!(status.images, vec![image.clone()], "{method}");
        assert_eq!(status.pulls.failed, 0, "{method}");

        // The real node pulled it: containerd has the tag, the pull pod
        // reported the image ID, and the pod is gone.
        let held = containerd_images(&info).await?;
        assert!(
            held.contains(&image),
            "{method}: {image} not in containerd: {held:?}"
        );
        let pods = real_node_pods(&log, "default", &info.node().name);
        assert_eq!(pods.len(), 1, "{method}: pull pods on the real node");
        let id = pulled_image_id(&pods[0]).context("no imageID reported")?;
        let digest = pushed.rsplit_once('@').map(|(_, d)| d).unwrap_or_default();
        assert!(id.ends_with(digest), "{method}: imageID {id} vs {pushed}");
        println!(
            "{method}: article sample READY in {took:.1?}; real-node pod ended: {}",
            describe_end(&pods[0])
        );
        wait_no_pull_pods(&client, "default", Duration::from_secs(30)).await?;
        let lag = wait_in_node_status(&client, &info.node().name, &image).await?;
        println!("{method}: {image} in Node status.images {lag:.1?} after READY");

        drop(run);
        cleanup.run().await?;
        let _ = (&prefetches, &deployments);
    }
    Ok(())
}

/// Acceptance 2: no shell, root user, multi-arch index; the pull pod keeps
/// its restricted security context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs real nodes: make test runs it after `clusters/sim/up --real-nodes 1`"]
async fn awkward_images_pull_with_a_restricted_pod() -> Result<()> {
    let _serial = setup().await;
    let info = real_info()?;
    for method in methods()? {
        let ns =
            support::TestNamespace::create(&info.cluster, &format!("awkward-{method}")).await?;
        let noshell = support::unique_name("test/noshell");
        let rootuser = support::unique_name("test/rootuser");
        let multi = support::unique_name("test/multi");
        push_image(&[&format!("{noshell}:1")]).await?;
        push_image(&["--user", "root", &format!("{rootuser}:1")]).await?;
        push_image(&["--arch", "amd64,arm64", &format!("{multi}:1")]).await?;
        let images: Vec<String> = [&noshell, &rootuser, &multi]
            .iter()
            .map(|repo| format!("{}/{repo}:1", info.registries.plain))
            .collect();
        let log = PodLog::start(ns.client()).await?;
        let run = orchestrator("awkward", method, &info).await?;
        apply(
            &ns.api::<Prefetch>(),
            prefetch_json(
                "awkward",
                json!({ "images": images, "node_filter": "real-worker" }),
            ),
        )
        .await?;
        let status = wait_phase(
            &ns.client(),
            ns.name(),
            "awkward",
            Phase::Ready,
            READY_TIMEOUT,
        )
        .await
        .with_context(|| run.log_tail(30))?;
        assert_eq!(status.pulls.ready, 3, "{method}: {status:?}");
        let held = containerd_images(&info).await?;
        for image in &images {
            assert!(held.contains(image), "{method}: {image} not in {held:?}");
        }
        let pods = real_node_pods(&log, ns.name(), &info.node().name);
        assert_eq!(pods.len(), 3, "{method}: pull pods");
        for pod in &pods {
            assert_restricted(pod)?;
            assert!(
                pulled_image_id(pod).is_some(),
                "{method}: {}",
                describe_end(pod)
            );
            println!("{method}: {}", describe_end(pod));
        }
        wait_no_pull_pods(&ns.client(), ns.name(), Duration::from_secs(30)).await?;
        drop(run);
        ns.cleanup().await?;
    }
    Ok(())
}

/// Acceptance 3: a missing image fails for real, with the registry's words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs real nodes: make test runs it after `clusters/sim/up --real-nodes 1`"]
async fn missing_image_fails_with_the_registry_message() -> Result<()> {
    let _serial = setup().await;
    let info = real_info()?;
    for method in methods()? {
        let ns =
            support::TestNamespace::create(&info.cluster, &format!("missing-{method}")).await?;
        let image = format!(
            "{}/{}:1",
            info.registries.plain,
            support::unique_name("test/missing")
        );
        let run = orchestrator("missing", method, &info).await?;
        apply(
            &ns.api::<Prefetch>(),
            prefetch_json(
                "missing",
                json!({ "images": [image], "node_filter": "real-worker" }),
            ),
        )
        .await?;
        let status = wait_phase(
            &ns.client(),
            ns.name(),
            "missing",
            Phase::Failed,
            READY_TIMEOUT,
        )
        .await
        .with_context(|| run.log_tail(30))?;
        let failure = status
            .failures
            .iter()
            .find(|f| f.node == info.node().name)
            .with_context(|| format!("{method}: no failure for the real node: {status:?}"))?;
        assert!(failure.permanent, "{method}: {failure:?}");
        assert!(
            failure.last_error.contains("not found") && failure.last_error.contains(&image),
            "{method}: {failure:?}"
        );
        println!(
            "{method}: missing image: {} {}",
            failure.reason, failure.last_error
        );
        wait_no_pull_pods(&ns.client(), ns.name(), Duration::from_secs(30)).await?;
        drop(run);
        ns.cleanup().await?;
    }
    Ok(())
}

fn dockerconfig_secret(info: &RealInfo) -> Result<Secret> {
    let auth = format!("{}:{}", info.auth.username, info.auth.password);
    let config = json!({ "auths": { info.registries.auth.clone(): {
        "username": info.auth.username,
        "password": info.auth.password,
        "auth": base64_encode(auth.as_bytes()),
    }}});
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": { "name": "regcred" },
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": { ".dockerconfigjson": config.to_string() },
    }))?)
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn deployment(name: &str, image: &str, pull_secret: Option<&str>) -> serde_json::Value {
    let mut pod_spec = json!({ "containers": [{ "name": "app", "image": image }] });
    if let Some(secret) = pull_secret {
        pod_spec["imagePullSecrets"] = json!([{ "name": secret }]);
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name, "labels": { "app": name } },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": name } },
            "template": { "metadata": { "labels": { "app": name } }, "spec": pod_spec },
        },
    })
}

/// Acceptance 4: the workload's imagePullSecrets open the private registry;
/// without them the pull is refused, judged permanent, and said clearly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs real nodes: make test runs it after `clusters/sim/up --real-nodes 1`"]
async fn private_image_needs_the_workload_pull_secret() -> Result<()> {
    let _serial = setup().await;
    let info = real_info()?;
    for method in methods()? {
        let ns =
            support::TestNamespace::create(&info.cluster, &format!("private-{method}")).await?;
        let allowed = support::unique_name("private/allowed");
        let refused = support::unique_name("private/refused");
        for repo in [&allowed, &refused] {
            push_image(&["--registry", "auth", &format!("{repo}:1")]).await?;
        }
        let allowed = format!("{}/{allowed}:1", info.registries.auth);
        let refused = format!("{}/{refused}:1", info.registries.auth);
        ns.api::<Secret>()
            .create(&Default::default(), &dockerconfig_secret(&info)?)
            .await?;
        apply(
            &ns.api::<Deployment>(),
            deployment("with-secret", &allowed, Some("regcred")),
        )
        .await?;
        apply(
            &ns.api::<Deployment>(),
            deployment("without-secret", &refused, None),
        )
        .await?;
        let run = orchestrator("private", method, &info).await?;
        for (name, app) in [("allowed", "with-secret"), ("refused", "without-secret")] {
            apply(
                &ns.api::<Prefetch>(),
                prefetch_json(
                    name,
                    json!({ "filter_by_labels": { "app": app }, "node_filter": "real-worker" }),
                ),
            )
            .await?;
        }
        wait_phase(
            &ns.client(),
            ns.name(),
            "allowed",
            Phase::Ready,
            READY_TIMEOUT,
        )
        .await
        .with_context(|| run.log_tail(30))?;
        assert!(containerd_images(&info).await?.contains(&allowed));
        let status = wait_phase(
            &ns.client(),
            ns.name(),
            "refused",
            Phase::Failed,
            READY_TIMEOUT,
        )
        .await
        .with_context(|| run.log_tail(30))?;
        let failure = status
            .failures
            .first()
            .with_context(|| format!("{method}: no failure listed: {status:?}"))?;
        assert!(failure.permanent, "{method}: {failure:?}");
        assert_eq!(failure.attempts, 1, "{method}: permanent means no retry");
        let text = failure.last_error.to_lowercase();
        assert!(
            text.contains("unauthorized") || text.contains("authorization"),
            "{method}: {failure:?}"
        );
        println!(
            "{method}: refused private image: {} {}",
            failure.reason, failure.last_error
        );
        assert!(!containerd_images(&info).await?.contains(&refused));
        wait_no_pull_pods(&ns.client(), ns.name(), Duration::from_secs(30)).await?;
        drop(run);
        ns.cleanup().await?;
    }
    Ok(())
}

/// Acceptance 5: an image the kubelet reports in `status.images` is not
/// pulled again for a second Prefetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs real nodes: make test runs it after `clusters/sim/up --real-nodes 1`"]
async fn image_reported_by_the_kubelet_is_not_pulled_again() -> Result<()> {
    let _serial = setup().await;
    let info = real_info()?;
    for method in methods()? {
        let ns =
            support::TestNamespace::create(&info.cluster, &format!("reported-{method}")).await?;
        let repo = support::unique_name("test/reported");
        push_image(&[&format!("{repo}:1")]).await?;
        let image = format!("{}/{repo}:1", info.registries.plain);
        let log = PodLog::start(ns.client()).await?;
        let run = orchestrator("reported", method, &info).await?;
        let spec = json!({ "images": [image], "node_filter": "real-worker" });
        apply(&ns.api::<Prefetch>(), prefetch_json("first", spec.clone())).await?;
        wait_phase(
            &ns.client(),
            ns.name(),
            "first",
            Phase::Ready,
            READY_TIMEOUT,
        )
        .await?;
        wait_in_node_status(&ns.client(), &info.node().name, &image).await?;
        let pods_before = log.pods_in(ns.name()).len();
        assert_eq!(pods_before, 1, "{method}: the first Prefetch pulled once");

        apply(&ns.api::<Prefetch>(), prefetch_json("second", spec)).await?;
        let status = wait_phase(
            &ns.client(),
            ns.name(),
            "second",
            Phase::Ready,
            READY_TIMEOUT,
        )
        .await?;
        assert_eq!(status.pulls.ready, 1, "{method}: {status:?}");
        // Give a stray pod time to show up before saying there is none.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pods: Vec<String> = log
            .pods_in(ns.name())
            .iter()
            .map(|p| p.name.clone())
            .collect();
        assert_eq!(
            pods.len(),
            1,
            "{method}: the second Prefetch made a pull pod: {pods:?}"
        );
        drop(run);
        ns.cleanup().await?;
    }
    Ok(())
}

fn kubelet_pid(info: &RealInfo) -> Result<u32> {
    let path = info.node().dir.join("kubelet.pid");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.trim().parse()?)
}

fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(") ")
                .map(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

async fn start_real_nodes_again() -> Result<()> {
    let script = support::repo_root().join("clusters/sim/up");
    let output = tokio::process::Command::new(&script)
        .args(["--clusters", &support::cluster_names().len().to_string()])
        .args(["--nodes", &support::node_count().to_string()])
        .args(["--real-nodes", "1"])
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    if !output.status.success() {
        bail!(
            "up --real-nodes 1: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Acceptance 6: the kubelet stops in the middle of a slow, large pull. The
/// pull is judged at its deadline and retried; the node lifecycle controller
/// marks the node NotReady and our pods leave it; once the kubelet is back
/// the pull completes and the runtime keeps nothing of the deleted pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs real nodes: make test runs it after `clusters/sim/up --real-nodes 1`"]
async fn kubelet_stopped_mid_pull_recovers() -> Result<()> {
    let _serial = setup().await;
    let info = real_info()?;
    for method in methods()? {
        let ns =
            support::TestNamespace::create(&info.cluster, &format!("kubelet-{method}")).await?;
        let repo = support::unique_name("test/big");
        push_image(&["--size", "48", &format!("{repo}:1")]).await?;
        // Through the slow registry: 48 MiB at 4 MiB/s takes about 12 s, and up
        // to 22 s seen on a loaded machine, hence the 30 s deadline.
        let image = format!("{}/{repo}:1", info.registries.slow);
        let log = PodLog::start(ns.client()).await?;
        let run = orchestrator_with(
            "kubelet",
            method,
            &info,
            Options {
                max_attempts: 20,
                backoff_max: "5s",
                ..Options::default()
            },
        )
        .await?;
        apply(
            &ns.api::<Prefetch>(),
            prefetch_json(
                "big",
                json!({ "images": [image], "node_filter": "real-worker", "pull_timeout_seconds": 30 }),
            ),
        )
        .await?;
        // Wait for the pull to start (the kubelet's Pulling event), then stop it.
        let events: Api<k8s_openapi::api::core::v1::Event> = ns.api();
        support::wait_for("the kubelet to start pulling", READY_TIMEOUT, || {
            let events = events.clone();
            let image = image.clone();
            async move {
                let list = events.list(&ListParams::default()).await?;
                Ok(list
                    .items
                    .iter()
                    .any(|e| {
                        e.reason.as_deref() == Some("Pulling")
                            && e.message.as_deref().unwrap_or_default().contains(&image)
                    })
                    .then_some(()))
            }
        })
        .await?;
        let pid = kubelet_pid(&info)?;
        let killed_at = Instant::now();
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        support::wait_for("the kubelet to exit", Duration::from_secs(30), || async {
            Ok((!process_alive(pid)).then_some(()))
        })
        .await
        .with_context(|| format!("{method}: kubelet pid {pid}"))?;
        assert!(
            !containerd_images(&info).await?.contains(&image),
            "{method}: the pull finished before the kubelet stopped; the test proves nothing"
        );

        // The first pod outlives its deadline with nobody to enforce it: it is
        // judged and deleted (the node still looks Ready for up to the grace
        // period, so the pair is retried meanwhile).
        let first = log
            .pods_in(ns.name())
            .first()
            .map(|p| p.uid.clone())
            .with_context(|| format!("{method}: no pull pod seen"))?;
        support::wait_for(
            "the stuck pull pod to be judged and deleted",
            Duration::from_secs(90),
            || async {
                Ok(log
                    .pods_in(ns.name())
                    .iter()
                    .any(|p| p.uid == first && p.deleted)
                    .then_some(()))
            },
        )
        .await
        .with_context(|| format!("{method}: {}", run.log_tail(30)))?;
        let judged_after = killed_at.elapsed();
        let status = prefetch_status(&ns.client(), ns.name(), "big")
            .await?
            .with_context(|| format!("{method}: no status"))?;
        assert_ne!(status.phase, Some(Phase::Ready), "{method}: {status:?}");

        // The node lifecycle controller marks the node NotReady once its
        // heartbeats stop for the grace period; then it is no target, and
        // nothing of ours stays on it.
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(ns.client());
        let node_name = info.node().name.clone();
        support::wait_for(
            "the node to go NotReady",
            Duration::from_secs(120),
            || async {
                let node = nodes.get(&node_name).await?;
                Ok((!NodeView::from_node(&node).ready).then_some(()))
            },
        )
        .await
        .with_context(|| format!("{method}: node {node_name}"))?;
        let not_ready_after = killed_at.elapsed();
        wait_no_pull_pods(&ns.client(), ns.name(), Duration::from_secs(30))
            .await
            .with_context(|| format!("{method}: pull pods left on the NotReady node"))?;
        let down = prefetch_status(&ns.client(), ns.name(), "big")
            .await?
            .with_context(|| format!("{method}: no status"))?;
        println!(
            "{method}: while the node is NotReady: phase {:?}, message {:?}, pulls {:?}",
            down.phase, down.message, down.pulls
        );

        start_real_nodes_again().await?;
        let restarted = Instant::now();
        // Until the node lifecycle controller lifts the unreachable taint the
        // node is no target, and a Prefetch with no target is READY (0 of 0):
        // wait for its one pull to be done.
        wait_status(
            &ns.client(),
            ns.name(),
            "big",
            "READY with its pull done",
            READY_TIMEOUT,
            |status| status.phase == Some(Phase::Ready) && status.pulls.ready == 1,
        )
        .await
        .with_context(|| format!("{method}: {}", run.log_tail(30)))?;
        if !containerd_images(&info).await?.contains(&image) {
            let ends: Vec<String> = real_node_pods(&log, ns.name(), &info.node().name)
                .iter()
                .map(|pod| {
                    format!(
                        "{}: {}",
                        pod.uid().unwrap_or_default(),
                        serde_json::to_string(&pod.status).unwrap_or_default()
                    )
                })
                .collect();
            bail!(
                "{method}: READY but {image} is not in the node's containerd; pull pods: {ends:#?}"
            );
        }
        println!(
            "{method}: stuck pull judged {judged_after:.1?} after the kubelet stopped; node NotReady after {not_ready_after:.1?}; READY {:.1?} after it restarted; {} pull pods in all",
            restarted.elapsed(),
            log.pods_in(ns.name()).len()
        );
        wait_no_pull_pods(&ns.client(), ns.name(), Duration::from_secs(30))
            .await
            .with_context(|| format!("{method}: after READY"))?;
        // Nothing of the deleted pods stays in the runtime.
        support::wait_for(
            "the runtime to drop the namespace's sandboxes",
            Duration::from_secs(60),
            || async {
                let left =
                    node_tool(&info, false, &["pods", "-q", "--namespace", ns.name()]).await?;
                Ok(left.trim().is_empty().then_some(()))
            },
        )
        .await
        .with_context(|| format!("{method}: sandboxes left in the runtime"))?;
        drop(run);
        ns.cleanup().await?;
    }
    Ok(())
}
