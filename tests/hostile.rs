//! Hostile and broken input (issue 8): what a person sees when a value or a
//! Prefetch is wrong. The command-line tests need no cluster (they point at
//! a closed port); the Prefetch tests run against the sim clusters.

mod harness;
mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result};
use harness::*;
use k8s_openapi::api::core::v1::Toleration;
use kube::api::PostParams;
use kube_prefetch::api::{Phase, Prefetch};
use serde_json::json;

const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The API server's note when a CEL rule (the label keys') was skipped
/// because a simpler check already failed.
const NOT_CHECKED: &str = ", <nil>: Invalid value: null: some validation rules were not checked because the object was invalid; correct the existing errors to complete validation]";

/// The message of the API server's refusal, as `kubectl` shows it.
fn api_server_message(error: &anyhow::Error) -> String {
    error
        .chain()
        .find_map(|cause| match cause.downcast_ref::<kube::Error>() {
            Some(kube::Error::Api(status)) => Some(status.message.clone()),
            _ => None,
        })
        .unwrap_or_else(|| format!("not an API server refusal: {error:#}"))
}

/// A kubeconfig whose one context, `dead`, points at a closed port.
const DEAD_KUBECONFIG: &str = "apiVersion: v1
kind: Config
clusters:
- name: dead
  cluster:
    server: https://127.0.0.1:1
contexts:
- name: dead
  context:
    cluster: dead
    user: dead
current-context: dead
users:
- name: dead
  user:
    token: x
";

/// Writes the dead kubeconfig and a config naming it into `dir`.
fn dead_cluster_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("kubeconfig"), DEAD_KUBECONFIG).expect("write kubeconfig");
    let config = dir.join("kube-prefetch.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{extra}\n[[kubeconfig]]\npath = \"kubeconfig\"\n"
        ),
    )
    .expect("write config");
    config
}

/// Runs the binary with stdout and stderr captured (pipes, not terminals),
/// without any KUBE_PREFETCH__ override from the caller's environment.
fn kube_prefetch(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kube-prefetch"));
    command.args(args).env_remove("NO_COLOR");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KUBE_PREFETCH__") {
            command.env_remove(name);
        }
    }
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("running kube-prefetch")
}

#[test]
fn check_into_a_pipe_prints_no_colour_codes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dead_cluster_config(dir.path(), "");
    let output = kube_prefetch(&["check", "--config", &config.to_string_lossy()], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.starts_with(&format!(
            "config {} is valid: 1 cluster(s)\ndead: PROBLEM\n  unreachable: ",
            config.display()
        )),
        "{stdout}"
    );
    assert!(
        !stdout.contains('\x1b'),
        "colour codes on stdout: {stdout:?}"
    );
    assert!(
        !stderr.contains('\x1b'),
        "colour codes on stderr: {stderr:?}"
    );
}

#[test]
fn leader_election_start_up_error_prints_its_cause_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dead_cluster_config(dir.path(), "[leader_election]\nenabled = true\n");
    let kubeconfig = dir.path().join("kubeconfig");
    let output = kube_prefetch(
        &["run", "--config", &config.to_string_lossy()],
        &[("KUBECONFIG", &kubeconfig)],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert_eq!(
        last,
        "kube-prefetch: error: leader election: cannot use Lease kube-prefetch/kube-prefetch in the home cluster: ServiceError: client error (Connect): tcp connect error: Connection refused (os error 111)"
    );
}

#[test]
fn check_refuses_a_bad_value_naming_file_line_and_column() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dead_cluster_config(dir.path(), "[defaults]\napi_qps = 1e-20\n");
    let output = kube_prefetch(&["check", "--config", &config.to_string_lossy()], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "kube-prefetch: error: {}:4:11: defaults.api_qps must be a number from 0.1 to 10000 requests per second, found 1e-20",
            config.display()
        )
    );
}

/// The schema's limits, as the real API server applies them: an over-limit
/// or bad-key Prefetch is refused with the schema's message, and one right
/// at the limits is accepted (so the CEL rule fits the cost budget).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_or_bad_key_prefetches_are_refused_by_the_api_server() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[0].clone();
    let ns = support::TestNamespace::create(&cluster, "limits").await?;
    let prefetches = ns.api::<Prefetch>();

    let images: Vec<String> = (0..257).map(|i| format!("busybox:{i}")).collect();
    let secrets: Vec<String> = (0..65).map(|i| format!("secret-{i}")).collect();
    let cases = [
        (
            "too-many-images",
            json!({ "images": images }),
            "[spec.images: Too many: 257: must have at most 256 items{NOT_CHECKED}",
        ),
        (
            "long-image",
            json!({ "images": ["a".repeat(1025)] }),
            "[spec.images[0]: Too long: may not be more than 1024 bytes{NOT_CHECKED}",
        ),
        (
            "repeated-kind",
            json!({ "filter_by_labels": { "app": "web" }, "workload_kinds": ["Deployment", "Job", "Deployment"] }),
            "spec.workload_kinds[2]: Duplicate value: \"Deployment\"",
        ),
        (
            "bad-filter-key",
            json!({ "filter_by_labels": { "app!": "web" } }),
            "spec.filter_by_labels: Invalid value: keys must be label keys: an optional DNS subdomain prefix and '/', then at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
        ),
        (
            "bad-node-selector-key",
            json!({ "node_selector": { "zone/": "a" } }),
            "spec.node_selector: Invalid value: keys must be label keys: an optional DNS subdomain prefix and '/', then at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
        ),
        (
            "bad-namespace",
            json!({ "namespaces": ["Team_A"] }),
            "spec.namespaces[0]: Invalid value: \"Team_A\": spec.namespaces[0] in body should match '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'",
        ),
        (
            "too-many-secrets",
            json!({ "image_pull_secrets": secrets }),
            "[spec.image_pull_secrets: Too many: 65: must have at most 64 items{NOT_CHECKED}",
        ),
        (
            "huge-parallel",
            json!({ "max_parallel": 2147483647 }),
            "spec.max_parallel: Invalid value: 2147483647: spec.max_parallel in body should be less than or equal to 10000",
        ),
        (
            "huge-retry",
            json!({ "retry_after": 9223372036854775807_i64 }),
            "spec.retry_after: Invalid value: 9223372036854775807: spec.retry_after in body should be less than or equal to 2592000",
        ),
    ];
    let mut mismatches = Vec::new();
    for (name, spec, expected) in cases {
        // A plain create, as `kubectl create` (or `kubectl apply` of a new
        // object) sends it.
        let object: Prefetch = serde_json::from_value(prefetch_json(name, spec))?;
        let refused = prefetches.create(&PostParams::default(), &object).await;
        let message = match refused {
            Ok(_) => "accepted".to_string(),
            Err(error) => api_server_message(&error.into()),
        };
        let expected = format!(
            "Prefetch.cache.techsquad.rocks \"{name}\" is invalid: {}",
            expected.replace("{NOT_CHECKED}", NOT_CHECKED)
        );
        if message != expected {
            mismatches.push(format!(
                "{name}:\n  got      {message}\n  expected {expected}"
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));

    let at_limits = prefetch_json(
        "at-the-limits",
        json!({
            // Each image as long as allowed: etcd must store it all.
            "images": (0..256)
                .map(|i| format!("registry.example/{i:03}/{}", "a".repeat(1003)))
                .collect::<Vec<_>>(),
            "filter_by_labels": (0..64)
                .map(|i| (format!("team-{i}.example.com/{}", "k".repeat(63)), "v".repeat(63)))
                .collect::<std::collections::BTreeMap<_, _>>(),
            "workload_kinds": ["Deployment", "StatefulSet", "DaemonSet", "CronJob", "Job"],
            "namespaces": (0..64).map(|i| format!("ns-{i}")).collect::<Vec<_>>(),
            "tolerations": [{ "key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule" }],
            "max_parallel": 10000,
            "retry_after": 2592000,
        }),
    );
    apply(&prefetches, at_limits)
        .await
        .context("a Prefetch right at the limits was refused")?;
    ns.cleanup().await?;
    Ok(())
}

/// A Prefetch with only `images` keeps off the NoSchedule-tainted
/// control-plane node; one whose `tolerations` tolerate the taint gets it,
/// and its pull pod carries the toleration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_only_prefetch_keeps_off_tainted_nodes_unless_tolerated() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[0].clone();
    let ns = support::TestNamespace::create(&cluster, "taints").await?;
    let client = ns.client();
    let log = PodLog::start(client.clone()).await?;
    let prefetches = ns.api::<Prefetch>();
    // Tags of this run only: no node reports them already.
    let plain_image = format!("registry.example/hostile/plain:{}", ns.name());
    let tolerating_image = format!("registry.example/hostile/tolerating:{}", ns.name());
    let control_plane_toleration: Toleration = serde_json::from_value(json!({
        "key": "node-role.kubernetes.io/control-plane",
        "operator": "Exists",
        "effect": "NoSchedule",
    }))?;
    apply(
        &prefetches,
        prefetch_json("plain", json!({ "images": [plain_image] })),
    )
    .await?;
    apply(
        &prefetches,
        prefetch_json(
            "tolerating",
            json!({ "images": [tolerating_image], "tolerations": [control_plane_toleration] }),
        ),
    )
    .await?;
    let kubeconfig = support::kubeconfig_path().display().to_string();
    let _orchestrator = Orchestrator::start(
        "taints",
        Options {
            kubeconfig_toml: Some(format!(
                "[[kubeconfig]]\npath = {kubeconfig:?}\ncontexts = [{cluster:?}]\n"
            )),
            ..Options::default()
        },
    )
    .await?;

    let workers: BTreeSet<String> = workers(&cluster).into_iter().collect();
    let control_plane = format!("{cluster}-control-plane");
    let plain = wait_phase(&client, ns.name(), "plain", Phase::Ready, READY_TIMEOUT).await?;
    assert_eq!(plain.nodes as usize, workers.len(), "{plain:?}");
    let tolerating = wait_phase(
        &client,
        ns.name(),
        "tolerating",
        Phase::Ready,
        READY_TIMEOUT,
    )
    .await?;
    assert_eq!(
        tolerating.nodes as usize,
        workers.len() + 1,
        "{tolerating:?}"
    );

    let pulled_on = |image: &str| -> BTreeSet<String> {
        log.pods_in(ns.name())
            .into_iter()
            .filter(|pod| {
                pod.image
                    .ends_with(image.rsplit('/').next().unwrap_or(image))
            })
            .map(|pod| pod.node)
            .collect()
    };
    assert_eq!(pulled_on(&plain_image), workers, "plain pull pods");
    let mut everywhere = workers.clone();
    everywhere.insert(control_plane.clone());
    assert_eq!(
        pulled_on(&tolerating_image),
        everywhere,
        "tolerating pull pods"
    );
    let on_control_plane = log
        .pods_in(ns.name())
        .into_iter()
        .find(|pod| pod.node == control_plane)
        .context("no pull pod on the control plane")?;
    let tolerations = on_control_plane
        .pod
        .spec
        .and_then(|spec| spec.tolerations)
        .unwrap_or_default();
    assert!(
        tolerations.contains(&control_plane_toleration),
        "{tolerations:?}"
    );
    ns.cleanup().await?;
    Ok(())
}

/// A Prefetch stored before the schema checked label keys (here: the CEL
/// rule is removed for a moment) must not turn `app!` into the selector
/// `app!=web`, which would pull the images of every workload whose app is
/// not web. It is FAILED, its status names the key, nothing is pulled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_bad_label_key_selects_nothing_and_is_reported() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[0].clone();
    let client = support::client(&cluster).await;
    let ns = support::TestNamespace::create(&cluster, "badkey").await?;
    let log = PodLog::start(client.clone()).await?;

    let restore_crd = support::Cleanup::new(&cluster, "the Prefetch CRD", |client| async move {
        install_crd(&client).await
    });
    let mut lax = serde_json::to_value(<Prefetch as kube::CustomResourceExt>::crd())?;
    let filter = &mut lax["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"]["filter_by_labels"];
    filter
        .as_object_mut()
        .context("filter_by_labels in the CRD schema")?
        .remove("x-kubernetes-validations");
    let crds: kube::Api<
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    > = kube::Api::all(client.clone());
    crds.patch(
        "prefetches.cache.techsquad.rocks",
        &kube::api::PatchParams::apply("kube-prefetch-tests").force(),
        &kube::api::Patch::Apply(&lax),
    )
    .await
    .context("relaxing the CRD")?;
    let prefetches = ns.api::<Prefetch>();
    let other_image = format!("registry.example/hostile/other:{}", ns.name());
    let deployments = ns.api::<k8s_openapi::api::apps::v1::Deployment>();
    apply(
        &deployments,
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": { "name": "other", "labels": { "app": "other" } },
            "spec": {
                "replicas": 1,
                "selector": { "matchLabels": { "app": "other" } },
                "template": {
                    "metadata": { "labels": { "app": "other" } },
                    "spec": { "containers": [{ "name": "app", "image": other_image }] },
                },
            },
        }),
    )
    .await?;
    apply(
        &prefetches,
        prefetch_json("bad-key", json!({ "filter_by_labels": { "app!": "web" } })),
    )
    .await
    .context("the relaxed CRD refused the bad key")?;
    restore_crd.run().await?;

    let kubeconfig = support::kubeconfig_path().display().to_string();
    let _orchestrator = Orchestrator::start(
        "badkey",
        Options {
            kubeconfig_toml: Some(format!(
                "[[kubeconfig]]\npath = {kubeconfig:?}\ncontexts = [{cluster:?}]\n"
            )),
            ..Options::default()
        },
    )
    .await?;
    let status = wait_phase(&client, ns.name(), "bad-key", Phase::Failed, READY_TIMEOUT).await?;
    assert_eq!(
        status.message.as_deref(),
        Some(
            "filter_by_labels: key \"app!\" is not a label key: an optional DNS subdomain prefix and '/', then at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit; no workload is selected"
        )
    );
    // Long enough for a watch on `app!=web` to have found `other`.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pulled: Vec<String> = log
        .pods_in(ns.name())
        .into_iter()
        .map(|pod| format!("{} on {}", pod.image, pod.node))
        .collect();
    assert!(pulled.is_empty(), "pulled: {pulled:?}");
    ns.cleanup().await?;
    Ok(())
}

/// A NotReady node gets no pull pod for a Prefetch's `images`, even when
/// the Prefetch tolerates every taint: nothing would pull there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_only_prefetch_keeps_off_not_ready_nodes() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[0].clone();
    let ns = support::TestNamespace::create(&cluster, "notready").await?;
    let client = ns.client();
    let log = PodLog::start(client.clone()).await?;

    // No kwok annotation: no simulated kubelet keeps this node Ready.
    let node_name = support::unique_name("hostile-notready");
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
    apply(
        &nodes,
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": node_name, "labels": { "kubernetes.io/os": "linux" } },
        }),
    )
    .await?;
    let remove_node = {
        let node_name = node_name.clone();
        support::Cleanup::new(&cluster, format!("node {node_name}"), |client| async move {
            let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
            let _ = nodes
                .delete(&node_name, &kube::api::DeleteParams::default())
                .await;
            Ok(())
        })
    };
    let not_ready = json!({ "status": { "conditions": [{ "type": "Ready", "status": "False", "reason": "KubeletNotReady", "message": "set by the test" }] } });
    nodes
        .patch_status(
            &node_name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&not_ready),
        )
        .await?;

    let image = format!("registry.example/hostile/notready:{}", ns.name());
    apply(
        &ns.api::<Prefetch>(),
        prefetch_json(
            "everywhere",
            json!({ "images": [image], "tolerations": [{ "operator": "Exists" }] }),
        ),
    )
    .await?;
    let kubeconfig = support::kubeconfig_path().display().to_string();
    let _orchestrator = Orchestrator::start(
        "notready",
        Options {
            kubeconfig_toml: Some(format!(
                "[[kubeconfig]]\npath = {kubeconfig:?}\ncontexts = [{cluster:?}]\n"
            )),
            ..Options::default()
        },
    )
    .await?;
    let status = wait_phase(
        &client,
        ns.name(),
        "everywhere",
        Phase::Ready,
        READY_TIMEOUT,
    )
    .await?;
    let mut ready_nodes: BTreeSet<String> = workers(&cluster).into_iter().collect();
    ready_nodes.insert(format!("{cluster}-control-plane"));
    assert_eq!(status.nodes as usize, ready_nodes.len(), "{status:?}");
    let pulled_on: BTreeSet<String> = log
        .pods_in(ns.name())
        .into_iter()
        .map(|pod| pod.node)
        .collect();
    assert_eq!(pulled_on, ready_nodes);
    remove_node.run().await?;
    ns.cleanup().await?;
    Ok(())
}

/// Adoption trusts only the pod we would create: a pod in another tenant's
/// namespace with our exact name, labels and annotations is not taken for
/// the pair's pull (it would hold a slot and could mark the pair done); the
/// pair gets its own pod, and the foreign pod is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_labelled_as_ours_in_another_namespace_is_not_adopted() -> Result<()> {
    use kube::ResourceExt;
    use kube_prefetch::pull::podspec::{
        IMAGE_ANNOTATION, MANAGED_BY_LABEL, MANAGED_BY_VALUE, NODE_ANNOTATION, PREFETCH_UID_LABEL,
        pull_pod_name,
    };
    let _serial = setup().await;
    let cluster = support::cluster_names()[0].clone();
    let ours = support::TestNamespace::create(&cluster, "adopt-ours").await?;
    let theirs = support::TestNamespace::create(&cluster, "adopt-theirs").await?;
    let log = PodLog::start(ours.client()).await?;
    let orchestrator = Orchestrator::start("hostile-adoption", Options::default()).await?;
    // A tag of this run only: no node reports it already.
    let image = format!("registry.example/hostile/adopt:{}", ours.name());
    let spec = |suspend: bool| json!({ "images": [image.clone()], "node_filter": "worker", "suspend": suspend });
    // Suspended: nothing is pulled until the foreign pod is there.
    let prefetches = ours.api::<Prefetch>();
    let victim = apply(&prefetches, prefetch_json("victim", spec(true))).await?;
    let uid = victim.uid().context("the Prefetch's uid")?;
    let node = workers(&cluster)[0].clone();
    let normalised = kube_prefetch::pull::image::normalize(&image)?;
    let name = pull_pod_name(&uid, &node, &normalised);
    let foreign = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": { MANAGED_BY_LABEL: MANAGED_BY_VALUE, PREFETCH_UID_LABEL: uid },
            "annotations": { NODE_ANNOTATION: node, IMAGE_ANNOTATION: normalised },
        },
        "spec": {
            "nodeName": node,
            "containers": [{ "name": "pull", "image": normalised }],
        },
    });
    let pods = theirs.api::<k8s_openapi::api::core::v1::Pod>();
    apply(&pods, foreign).await?;
    let expected = format!(
        "not adopting a pod labelled as our pull pod: it is in namespace {}, not in {} where we create it pod={}/{name}",
        theirs.name(),
        ours.name(),
        theirs.name()
    );
    support::wait_for("the refusal in the log", Duration::from_secs(30), || {
        let seen = log_lines_with(&orchestrator.log_path, "not adopting a pod labelled");
        let expected = expected.clone();
        async move {
            Ok(seen
                .iter()
                .any(|line| line.contains(&expected))
                .then_some(()))
        }
    })
    .await?;

    apply(&prefetches, prefetch_json("victim", spec(false))).await?;
    wait_phase(
        &ours.client(),
        ours.name(),
        "victim",
        Phase::Ready,
        READY_TIMEOUT,
    )
    .await?;
    let pulled_on: BTreeSet<String> = log
        .pods_in(ours.name())
        .into_iter()
        .map(|pod| pod.node)
        .collect();
    assert!(
        pulled_on.contains(&node),
        "no pull pod of ours on {node}: {pulled_on:?}"
    );
    // Not ours to delete either.
    assert!(
        pods.get_opt(&name).await?.is_some(),
        "the foreign pod was deleted"
    );
    drop(orchestrator);
    ours.cleanup().await?;
    theirs.cleanup().await?;
    Ok(())
}

/// Cross-namespace use is the target namespace's decision: with
/// `policy.cross_namespace` off, a namespace whose annotation names the
/// Prefetch's namespace is used, one without it is refused with a message
/// naming the rule, and annotating it later lets the Prefetch finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_decides_who_may_prefetch_into_it() -> Result<()> {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, Patch, PatchParams};
    let _serial = setup().await;
    let cluster = support::cluster_names()[1].clone();
    let home = support::TestNamespace::create(&cluster, "from").await?;
    let shared = support::TestNamespace::create(&cluster, "shared").await?;
    let closed = support::TestNamespace::create(&cluster, "closed").await?;
    let log = PodLog::start(home.client()).await?;
    let app = format!("cross-{}", home.name());
    for ns in [&shared, &closed] {
        let labels = json!({ "app": app });
        apply(
            &ns.api::<Deployment>(),
            json!({
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": { "name": "app", "labels": labels },
                "spec": {
                    "replicas": 1,
                    "selector": { "matchLabels": labels },
                    "template": {
                        "metadata": { "labels": labels },
                        "spec": { "containers": [{ "name": "app", "image": format!("registry.example/hostile/{}:1", ns.name()) }] },
                    },
                },
            }),
        )
        .await?;
    }
    let namespaces: Api<Namespace> = Api::all(home.client());
    let annotate = |name: String, value: String| {
        let namespaces = namespaces.clone();
        async move {
            namespaces
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "metadata": { "annotations": { "cache.techsquad.rocks/prefetch-from": value } } })),
                )
                .await
                .with_context(|| format!("annotating namespace {name}"))
        }
    };
    annotate(
        shared.name().to_string(),
        format!("someone-else, {}", home.name()),
    )
    .await?;

    let _orchestrator = Orchestrator::start("hostile-cross-namespace", Options::default()).await?;
    let prefetches = home.api::<Prefetch>();
    let spec = json!({
        "filter_by_labels": { "app": app },
        "namespaces": [shared.name(), closed.name()],
        "node_filter": "worker",
    });
    apply(&prefetches, prefetch_json("remote", spec)).await?;
    let status = wait_phase(
        &home.client(),
        home.name(),
        "remote",
        Phase::Failed,
        READY_TIMEOUT,
    )
    .await?;
    assert_eq!(
        status.message.as_deref(),
        Some(
            format!(
                "namespace {} refused: cross-namespace prefetching is disabled by policy (policy.cross_namespace = false) and the namespace has no annotation cache.techsquad.rocks/prefetch-from naming {}",
                closed.name(),
                home.name()
            )
            .as_str()
        )
    );
    // The namespace that allows it is used meanwhile.
    let workers = workers(&cluster).len();
    support::wait_for("pull pods in the allowing namespace", READY_TIMEOUT, || {
        let count = log.pods_in(shared.name()).len();
        async move { Ok((count >= workers).then_some(())) }
    })
    .await?;
    assert!(log.pods_in(closed.name()).is_empty());

    // An annotation naming someone else refuses, and says so.
    annotate(closed.name().to_string(), "someone-else".into()).await?;
    let expected = format!(
        "namespace {} refused: its annotation cache.techsquad.rocks/prefetch-from = \"someone-else\" does not name {}",
        closed.name(),
        home.name()
    );
    support::wait_for("the annotation's refusal", Duration::from_secs(30), || {
        let client = home.client();
        let (namespace, expected) = (home.name().to_string(), expected.clone());
        async move {
            let status = prefetch_status(&client, &namespace, "remote").await?;
            Ok(
                (status.and_then(|s| s.message).as_deref() == Some(expected.as_str()))
                    .then_some(()),
            )
        }
    })
    .await?;

    // Naming the Prefetch's namespace lets it in: READY.
    annotate(closed.name().to_string(), home.name().to_string()).await?;
    wait_phase(
        &home.client(),
        home.name(),
        "remote",
        Phase::Ready,
        READY_TIMEOUT,
    )
    .await?;
    assert_eq!(log.pods_in(closed.name()).len(), workers);
    home.cleanup().await?;
    shared.cleanup().await?;
    closed.cleanup().await?;
    Ok(())
}

/// A Prefetch planning more (node, image) pairs than
/// `defaults.max_pairs_per_prefetch` is FAILED, saying which limit, and
/// costs nothing else: no pull pod of it, and another Prefetch beside it
/// finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetch_over_the_pair_limit_fails_and_plans_nothing() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[0].clone();
    let ns = support::TestNamespace::create(&cluster, "pairs").await?;
    let log = PodLog::start(ns.client()).await?;
    let workers = workers(&cluster).len();
    // One image on every worker fits; two do not.
    let _orchestrator = Orchestrator::start(
        "hostile-pair-limit",
        Options {
            env: vec![(
                "KUBE_PREFETCH__DEFAULTS__MAX_PAIRS_PER_PREFETCH".into(),
                workers.to_string(),
            )],
            ..Options::default()
        },
    )
    .await?;
    let image = |tag: &str| format!("registry.example/hostile/pairs-{tag}:{}", ns.name());
    let prefetches = ns.api::<Prefetch>();
    apply(
        &prefetches,
        prefetch_json(
            "too-big",
            json!({ "images": [image("a"), image("b")], "node_filter": "worker" }),
        ),
    )
    .await?;
    apply(
        &prefetches,
        prefetch_json(
            "fits",
            json!({ "images": [image("c")], "node_filter": "worker" }),
        ),
    )
    .await?;
    let status = wait_phase(
        &ns.client(),
        ns.name(),
        "too-big",
        Phase::Failed,
        READY_TIMEOUT,
    )
    .await?;
    assert_eq!(
        status.message.as_deref(),
        Some(
            format!(
                "too many (node, image) pairs: more than {workers}, the limit per Prefetch (defaults.max_pairs_per_prefetch); select fewer images or nodes"
            )
            .as_str()
        )
    );
    assert_eq!(status.pulls.total, 0, "{status:?}");
    wait_phase(&ns.client(), ns.name(), "fits", Phase::Ready, READY_TIMEOUT).await?;
    let images: BTreeSet<String> = log
        .pods_in(ns.name())
        .into_iter()
        .map(|pod| pod.image)
        .collect();
    assert!(
        images.iter().all(|pulled| pulled.contains("pairs-c")),
        "pull pods of the refused Prefetch: {images:?}"
    );
    ns.cleanup().await?;
    Ok(())
}

/// A status is kept under its size limit in bytes whatever the spec holds:
/// 256 long (valid) image references would make a status over 64 KiB; it is
/// written anyway, saying how many images its list shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_status_is_bounded_and_says_so() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[0].clone();
    let ns = support::TestNamespace::create(&cluster, "status-size").await?;
    let _orchestrator = Orchestrator::start("hostile-status-size", Options::default()).await?;
    // 17 + 1 + 230 characters of name (the limit is 255) and a 128-character tag.
    let images: Vec<String> = (0..256)
        .map(|i| {
            format!(
                "registry.example/{}/i{i:03}:{}",
                "p".repeat(230),
                "t".repeat(128)
            )
        })
        .collect();
    apply(
        &ns.api::<Prefetch>(),
        // No node matches: the status is all there is.
        prefetch_json(
            "long-names",
            json!({ "images": images, "node_filter": "no-such-node" }),
        ),
    )
    .await?;
    let status = wait_phase(
        &ns.client(),
        ns.name(),
        "long-names",
        Phase::Ready,
        READY_TIMEOUT,
    )
    .await?;
    let shown = status.images.len();
    assert!(shown > 0 && shown < 256, "{shown} images shown");
    assert_eq!(
        status.message.as_deref(),
        Some(
            format!(
                "nothing to prefetch: no node is targeted; `kube-prefetch plan` or the dashboard's drill-down says why each node is skipped; status.images lists {shown} of 256 images: a status is kept under 65536 bytes"
            )
            .as_str()
        )
    );
    assert!(serde_json::to_vec(&status)?.len() <= 65536);
    ns.cleanup().await?;
    Ok(())
}

/// All Prefetches of a cluster together stay under
/// `defaults.max_pairs_per_cluster`: the older keeps its pairs, the newer
/// one that would pass the limit is FAILED saying so, and gets its turn
/// once the older is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetches_over_the_cluster_pair_limit_wait_their_turn() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[0].clone();
    let ns = support::TestNamespace::create(&cluster, "cluster-pairs").await?;
    let workers = workers(&cluster).len();
    let _orchestrator = Orchestrator::start(
        "hostile-cluster-pair-limit",
        Options {
            env: vec![(
                "KUBE_PREFETCH__DEFAULTS__MAX_PAIRS_PER_CLUSTER".into(),
                workers.to_string(),
            )],
            ..Options::default()
        },
    )
    .await?;
    let spec = |tag: &str| json!({ "images": [format!("registry.example/hostile/cluster-{tag}:{}", ns.name())], "node_filter": "worker" });
    let prefetches = ns.api::<Prefetch>();
    apply(&prefetches, prefetch_json("older", spec("a"))).await?;
    wait_phase(
        &ns.client(),
        ns.name(),
        "older",
        Phase::Ready,
        READY_TIMEOUT,
    )
    .await?;
    apply(&prefetches, prefetch_json("newer", spec("b"))).await?;
    let status = wait_phase(
        &ns.client(),
        ns.name(),
        "newer",
        Phase::Failed,
        READY_TIMEOUT,
    )
    .await?;
    assert_eq!(
        status.message.as_deref(),
        Some(
            format!(
                "too many (node, image) pairs in this cluster: this Prefetch's {workers} would take all Prefetches past {workers}, the limit per cluster (defaults.max_pairs_per_cluster); older Prefetches keep theirs"
            )
            .as_str()
        )
    );
    assert_eq!(status.pulls.total, 0, "{status:?}");
    prefetches
        .delete("older", &kube::api::DeleteParams::default())
        .await?;
    wait_phase(
        &ns.client(),
        ns.name(),
        "newer",
        Phase::Ready,
        READY_TIMEOUT,
    )
    .await?;
    ns.cleanup().await?;
    Ok(())
}

/// The resident memory of a process, in KiB (Linux).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Applies an ordinary Prefetch (one image of this run on every worker)
/// and returns how long it took to be READY.
async fn ordinary_ready_in(ns: &support::TestNamespace, name: &str, tag: &str) -> Result<Duration> {
    let started = std::time::Instant::now();
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    apply(
        &ns.api::<Prefetch>(),
        prefetch_json(
            name,
            json!({ "images": [format!("registry.example/ordinary/{name}:{tag}")], "node_filter": "worker" }),
        ),
    )
    .await?;
    let applied = started.elapsed();
    wait_phase(&ns.client(), ns.name(), name, Phase::Ready, READY_TIMEOUT).await?;
    let ready = started.elapsed();
    // The split, to tell the API server's delay from ours (compare with
    // the log's timestamps).
    eprintln!(
        "{}/{name}: apply sent at {:.3} s since the epoch, answered after {applied:?}, READY after {ready:?}",
        ns.name(),
        wall.as_secs_f64()
    );
    Ok(ready)
}

/// Acceptance 2 of issue 8: hostile Prefetches in one namespace of one
/// cluster do not hold up another team's ordinary Prefetch in that cluster
/// or one in another cluster (each READY within twice its time alone), the
/// process stays under its Deployment's memory limit, and every hostile
/// Prefetch shows a clear status. With one slot per node, every node holds a
/// hostile pull when the ordinary Prefetch comes: those are preempted for
/// it (see `pull::dispatch`), so it does not wait a pull on each node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tenants_do_not_hold_up_the_others() -> Result<()> {
    use kube::ResourceExt;
    use kube_prefetch::pull::podspec::{
        IMAGE_ANNOTATION, MANAGED_BY_LABEL, MANAGED_BY_VALUE, NODE_ANNOTATION, PREFETCH_UID_LABEL,
        pull_pod_name,
    };
    let _serial = setup().await;
    let clusters = support::cluster_names();
    let hostile = support::TestNamespace::create(&clusters[0], "hostile").await?;
    let victim = support::TestNamespace::create(&clusters[0], "victim").await?;
    let other = support::TestNamespace::create(&clusters[1], "other").await?;
    let orchestrator = Orchestrator::start("hostile-tenants", Options::default()).await?;
    let pid = orchestrator.pid().context("kube-prefetch's pid")?;

    // Alone first.
    let (alone_same, alone_other) = tokio::try_join!(
        ordinary_ready_in(&victim, "alone", victim.name()),
        ordinary_ready_in(&other, "alone", other.name()),
    )?;

    // The hostile tenant.
    let prefetches = hostile.api::<Prefetch>();
    let kinds = vec!["Deployment"; 10_000];
    let refused = prefetches
        .create(
            &PostParams::default(),
            &serde_json::from_value(prefetch_json(
                "repeated-kinds",
                json!({ "filter_by_labels": { "app": "x" }, "workload_kinds": kinds }),
            ))?,
        )
        .await
        .err()
        .context("10,000 repeated workload kinds were accepted")?;
    assert!(
        refused
            .to_string()
            .contains("Duplicate value: \"Deployment\""),
        "{refused}"
    );
    // 256 invalid references as long as the schema allows.
    let invalid: Vec<String> = (0..256)
        .map(|i| format!("Invalid/{i:03}{}", "X".repeat(1013)))
        .collect();
    apply(
        &prefetches,
        prefetch_json("invalid-images", json!({ "images": invalid })),
    )
    .await?;
    let wide: Vec<String> = (0..256)
        .map(|i| format!("registry.example/hostile/wide-{i:03}:{}", hostile.name()))
        .collect();
    apply(
        &prefetches,
        prefetch_json("every-node", json!({ "images": wide })),
    )
    .await?;
    apply(
        &prefetches,
        prefetch_json(
            "huge-parallel",
            json!({ "images": [format!("registry.example/hostile/parallel:{}", hostile.name())], "max_parallel": 10000 }),
        ),
    )
    .await?;
    // A pod in the hostile namespace posing as the victim's pull pod.
    let target = victim.api::<Prefetch>().get("alone").await?;
    let uid = target.uid().context("uid")?;
    let node = workers(&clusters[0])[0].clone();
    // A pair the victim wants: a pod of it is worth adopting.
    let image = kube_prefetch::pull::image::normalize(&format!(
        "registry.example/ordinary/alone:{}",
        victim.name()
    ))?;
    let name = pull_pod_name(&uid, &node, &image);
    apply(
        &hostile.api::<k8s_openapi::api::core::v1::Pod>(),
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "labels": { MANAGED_BY_LABEL: MANAGED_BY_VALUE, PREFETCH_UID_LABEL: uid },
                "annotations": { NODE_ANNOTATION: node, IMAGE_ANNOTATION: image },
            },
            "spec": { "nodeName": node, "containers": [{ "name": "pull", "image": image }] },
        }),
    )
    .await?;

    // The others, meanwhile.
    let (loaded_same, loaded_other) = tokio::try_join!(
        ordinary_ready_in(&victim, "loaded", victim.name()),
        ordinary_ready_in(&other, "loaded", other.name()),
    )?;
    let rss = rss_kib(pid).context("kube-prefetch's RSS")?;
    assert!(
        rss < 512 * 1024,
        "RSS {rss} KiB, the Deployment's limit is 512 MiB"
    );

    // Every hostile Prefetch says what is going on.
    let status = wait_phase(
        &hostile.client(),
        hostile.name(),
        "invalid-images",
        Phase::Failed,
        READY_TIMEOUT,
    )
    .await?;
    let message = status.message.unwrap_or_default();
    assert!(message.starts_with("invalid image reference"), "{message}");
    assert!(serde_json::to_vec(&message)?.len() < 65536);
    let wide = prefetch_status(&hostile.client(), hostile.name(), "every-node")
        .await?
        .context("a status of every-node")?;
    assert_eq!(
        wide.pulls.total as usize,
        256 * workers(&clusters[0]).len(),
        "{wide:?}"
    );
    // Its pulls that held the nodes when the ordinary Prefetch came were
    // preempted for it, and are not counted as failures.
    assert_eq!(wide.pulls.failed, 0, "{wide:?}");
    assert!(
        orchestrator
            .log()
            .lines()
            .any(|line| line.contains("pull preempted")
                && line.contains(&format!("prefetch={}/every-node", hostile.name()))
                && line.contains(&format!("waiting={}/loaded", victim.name()))),
        "no preemption for {}/loaded in the log",
        victim.name()
    );
    let parallel = prefetch_status(&hostile.client(), hostile.name(), "huge-parallel")
        .await?
        .context("a status of huge-parallel")?;
    assert!(parallel.phase.is_some(), "{parallel:?}");
    assert!(
        orchestrator
            .log()
            .contains(&format!("not adopting a pod labelled as our pull pod: it is in namespace {}, not in {} where we create it", hostile.name(), victim.name())),
        "no refusal of the posing pod in the log"
    );
    // Last, so that the statuses above are checked whatever the timing.
    assert!(
        loaded_same <= alone_same * 2 && loaded_other <= alone_other * 2,
        "same cluster {alone_same:?} alone, {loaded_same:?} beside the hostile tenant; other cluster {alone_other:?} alone, {loaded_other:?}"
    );
    drop(orchestrator);
    hostile.cleanup().await?;
    victim.cleanup().await?;
    other.cleanup().await?;
    Ok(())
}
