//! `deploy/target/rbac.yaml`, as shipped, is exactly what kube-prefetch needs
//! in a target cluster: before it is applied the unprivileged `operator` user
//! of a sim cluster may do nothing and `kube-prefetch check` names what is
//! missing; once its rules are bound to `operator`, `check` and `plan` pass
//! and a real orchestrator that reaches the cluster only as `operator` gets
//! a Prefetch READY, creates and deletes its pull pods, writes status and
//! records (and re-records) events, without a single 403. The same grant
//! still refuses what kube-prefetch has no business doing (secrets, exec,
//! writing workloads, nodes or Prefetch specs, RBAC) or never does (update
//! status, write core/v1 events).

mod harness;
mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use harness::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::api::events::v1::Event as EventsV1;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use kube_prefetch::api::{Phase, Prefetch};
use serde_json::json;

const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// A failed pull is judged about a second after its pod starts and retried
/// after a few more (backoff 1 s, x4).
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
const HEALTHY_IMAGE: &str = "busybox:1.36";
const CRONJOB_IMAGE: &str = "alpine:3.20";
const FAILING_IMAGE: &str = "fail.invalid/y:1";

/// Whether `client`'s user may do `verb` on `resource` cluster-wide (in every
/// namespace, for a namespaced resource), as the API server answers.
async fn may(client: &Client, verb: &str, group: &str, resource: &str) -> Result<bool> {
    let (resource, subresource) = match resource.split_once('/') {
        Some((resource, sub)) => (resource, Some(sub.to_string())),
        None => (resource, None),
    };
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                subresource,
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .with_context(|| format!("SelfSubjectAccessReview {verb} {group}/{resource}"))?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// Runs `kube-prefetch <command> --config <config>`: whether it exited 0,
/// and its stdout followed by any stderr.
async fn run_binary(command: &str, config: &Path) -> Result<(bool, String)> {
    let (ok, mut text, stderr) = run_subcommand(command, config, &[]).await?;
    if !stderr.is_empty() {
        text.push_str("--- stderr ---\n");
        text.push_str(&stderr);
    }
    Ok((ok, text))
}

/// Lines that report an authorization failure: "forbidden" in any case, or
/// 403 as a number of its own (not inside a UID, name or duration).
fn forbidden_lines(log: &str) -> Vec<&str> {
    let standalone_403 = |line: &str| {
        line.match_indices("403").any(|(at, _)| {
            let before = line[..at].chars().next_back();
            let after = line[at + 3..].chars().next();
            let part_of_word =
                |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || "._-".contains(c));
            !part_of_word(before) && !part_of_word(after)
        })
    };
    log.lines()
        .filter(|line| line.to_lowercase().contains("forbidden") || standalone_403(line))
        .collect()
}

/// What the orchestrator, reaching the cluster only as `operator`, must get
/// done with the Prefetches of [`shipped_target_rbac_is_exactly_what_kube_prefetch_needs`].
async fn works_as_operator(
    orchestrator: &Orchestrator,
    log: &PodLog,
    ns: &support::TestNamespace,
    cluster: &str,
    target: &str,
) -> Result<()> {
    let admin = ns.client();
    // READY: nodes, Prefetches and all workload kinds were read, pull pods
    // created and watched, the status written.
    let status = wait_phase(&admin, ns.name(), "x", Phase::Ready, READY_TIMEOUT).await?;
    let workers = workers(cluster);
    let images: BTreeSet<String> = status.images.iter().cloned().collect();
    let expected_images: BTreeSet<String> = [HEALTHY_IMAGE, CRONJOB_IMAGE]
        .iter()
        .map(|image| format!("docker.io/library/{image}"))
        .collect();
    ensure!(
        images == expected_images,
        "Prefetch x should have the images of the Deployment and the CronJob, \
         {expected_images:?}: {status:?}"
    );
    ensure!(
        status.nodes as usize == workers.len()
            && status.pulls.ready as usize == workers.len() * expected_images.len(),
        "Prefetch x should be ready on all {} workers: {status:?}",
        workers.len()
    );
    let expected_pairs: BTreeSet<(String, String)> = workers
        .iter()
        .flat_map(|node| {
            expected_images
                .iter()
                .map(move |image| (node.clone(), image.clone()))
        })
        .collect();
    let healthy_pairs: BTreeSet<(String, String)> = log
        .pairs_in(ns.name())
        .into_iter()
        .filter(|(_, image)| image != FAILING_IMAGE)
        .collect();
    ensure!(
        healthy_pairs == expected_pairs,
        "pull pods (node, image) created: {healthy_pairs:?}, expected {expected_pairs:?}"
    );

    // The failing image: a Warning event on its Prefetch (created)...
    let events: Api<Event> = ns.api();
    let warnings = support::wait_for(
        "a PullFailed Warning event on Prefetch broken",
        EVENT_TIMEOUT,
        || async {
            let list = events
                .list(&ListParams::default().fields("involvedObject.name=broken,type=Warning"))
                .await?;
            let found: Vec<Event> = list
                .items
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some("PullFailed"))
                .collect();
            Ok((!found.is_empty()).then_some(found))
        },
    )
    .await?;
    let message = warnings[0].message.clone().unwrap_or_default();
    ensure!(
        message.contains(FAILING_IMAGE),
        "PullFailed event without the image: {message}"
    );
    // ... and, as the failures repeat, patched into a series.
    let events_v1: Api<EventsV1> = ns.api();
    support::wait_for(
        "the PullFailed event to be patched into a series (count >= 2)",
        EVENT_TIMEOUT,
        || async {
            let list = events_v1.list(&ListParams::default()).await?;
            let counts: Vec<i32> = list
                .items
                .iter()
                .filter(|e| {
                    e.reason.as_deref() == Some("PullFailed")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("broken")
                })
                .map(|e| e.series.as_ref().map_or(1, |s| s.count))
                .collect();
            if counts.iter().any(|count| *count >= 2) {
                Ok(Some(()))
            } else {
                bail!("PullFailed event counts: {counts:?}")
            }
        },
    )
    .await?;
    let failed = wait_phase(&admin, ns.name(), "broken", Phase::Failed, READY_TIMEOUT).await?;
    ensure!(
        failed
            .message
            .as_deref()
            .is_some_and(|m| m.contains(FAILING_IMAGE)),
        "Prefetch broken is FAILED without naming {FAILING_IMAGE}: {failed:?}"
    );

    // Every pull pod, healthy or failing, was deleted again.
    ensure!(
        log.pods_in(ns.name())
            .iter()
            .any(|p| p.image == FAILING_IMAGE),
        "no pull pod for {FAILING_IMAGE}: {:?}",
        log.pairs_in(ns.name())
    );
    wait_no_pull_pods(&admin, ns.name(), Duration::from_secs(30)).await?;
    let view = orchestrator.status().await?;
    ensure!(
        is_connected(&view, target),
        "{target} not Connected: {view:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_target_rbac_is_exactly_what_kube_prefetch_needs() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[1].clone();
    let sim = support::sim().await;
    let admin = support::client(&cluster).await;
    let operator = support::operator_client(&cluster).await;
    // The operator kubeconfig's only context names the cluster kube-prefetch sees.
    let target = format!("{cluster}-operator");
    let shipped = shipped_rbac()?;

    // A run killed before its cleanup leaves its grant behind: sweep it.
    delete_rbac(&admin, None).await?;

    let dir = tempfile::Builder::new()
        .prefix("kube-prefetch-rbac-")
        .tempdir()?;
    let kubeconfig_toml = format!(
        "[[kubeconfig]]\npath = {:?}\n",
        sim.operator_kubeconfig(&cluster).display().to_string()
    );
    let config = dir.path().join("operator.toml");
    std::fs::write(&config, &kubeconfig_toml)?;

    // 1. Nothing granted yet: check fails and names every missing right.
    let (ok, output) = run_binary("check", &config).await?;
    assert!(
        !ok,
        "check passed for an operator with no rights:\n{output}"
    );
    assert!(
        output.contains(&format!("{target}: PROBLEM")),
        "check does not flag {target}:\n{output}"
    );
    for right in [
        "watch prefetches.cache.techsquad.rocks",
        "patch prefetches/status.cache.techsquad.rocks",
        "watch nodes",
        "watch pods",
        "create pods",
        "delete pods",
        "watch deployments.apps",
        "create events.events.k8s.io",
    ] {
        let line = format!("RBAC: not allowed to {right};");
        assert!(
            output.contains(&line),
            "check does not name the missing right {right:?}:\n{output}"
        );
    }

    // 2. The shipped rules, bound to `operator` under a unique name.
    let name = support::unique_name("kube-prefetch-rbac-test");
    let rbac_cleanup = {
        let name = name.clone();
        support::Cleanup::new(
            &cluster,
            format!("ClusterRole and ClusterRoleBinding {name}"),
            move |client| async move { delete_rbac(&client, Some(&name)).await },
        )
    };
    let (role, binding) = granted_to_operator(shipped, &name);
    Api::<ClusterRole>::all(admin.clone())
        .create(&PostParams::default(), &role)
        .await
        .with_context(|| format!("creating ClusterRole {name}"))?;
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(&PostParams::default(), &binding)
        .await
        .with_context(|| format!("creating ClusterRoleBinding {name}"))?;

    // 3. check passes (the authorizer learns of the binding through a watch).
    let last_check = std::sync::Mutex::new(String::new());
    let last_check = &last_check;
    let waited = support::wait_for(
        "kube-prefetch check to pass as operator",
        Duration::from_secs(30),
        || async {
            let (ok, output) = run_binary("check", &config).await?;
            *last_check.lock().unwrap() = output;
            Ok(ok.then_some(()))
        },
    )
    .await;
    let output = last_check.lock().unwrap().clone();
    waited.with_context(|| format!("last output:\n{output}"))?;
    assert!(
        output.contains(&format!("{target}: ok")) && !output.contains("not allowed"),
        "{output}"
    );

    // ... and the grant goes no further than kube-prefetch's job.
    let mut too_much = Vec::new();
    for (verb, group, resource) in [
        ("get", "", "secrets"),
        ("list", "", "secrets"),
        ("get", "", "configmaps"),
        ("create", "", "events"),
        ("create", "", "pods/exec"),
        ("get", "", "pods/log"),
        ("update", "", "pods"),
        ("patch", "", "pods"),
        ("create", "", "serviceaccounts/token"),
        ("create", "", "namespaces"),
        ("delete", "", "namespaces"),
        ("patch", "", "nodes"),
        ("delete", "", "nodes"),
        ("patch", "", "nodes/status"),
        ("create", "cache.techsquad.rocks", "prefetches"),
        ("update", "cache.techsquad.rocks", "prefetches/status"),
        ("update", "cache.techsquad.rocks", "prefetches"),
        ("patch", "cache.techsquad.rocks", "prefetches"),
        ("delete", "cache.techsquad.rocks", "prefetches"),
        ("create", "apps", "deployments"),
        ("patch", "apps", "deployments"),
        ("delete", "apps", "daemonsets"),
        ("create", "batch", "jobs"),
        ("create", "rbac.authorization.k8s.io", "clusterrolebindings"),
        ("bind", "rbac.authorization.k8s.io", "clusterroles"),
        ("escalate", "rbac.authorization.k8s.io", "clusterroles"),
        ("impersonate", "", "users"),
    ] {
        if may(&operator, verb, group, resource).await? {
            let group = if group.is_empty() { "core" } else { group };
            too_much.push(format!("{verb} {resource} ({group})"));
        }
    }
    assert!(
        too_much.is_empty(),
        "{RBAC_YAML} grants more than kube-prefetch needs: {too_much:?}"
    );

    // 4. Workloads and Prefetches (made as admin) for an orchestrator that
    // reaches the cluster only as `operator`.
    let ns = support::TestNamespace::create(&cluster, "rbac").await?;
    let labels = json!({ "app": "x" });
    apply(
        &ns.api::<Deployment>(),
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": { "name": "x", "labels": labels },
            "spec": {
                "replicas": 1,
                "selector": { "matchLabels": labels },
                "template": {
                    "metadata": { "labels": labels },
                    "spec": { "containers": [{ "name": "x", "image": HEALTHY_IMAGE }] },
                },
            },
        }),
    )
    .await?;
    apply(
        &ns.api::<CronJob>(),
        json!({
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": { "name": "x-nightly", "labels": labels },
            "spec": {
                "schedule": "0 3 * * *",
                "jobTemplate": { "spec": { "template": { "spec": {
                    "restartPolicy": "Never",
                    "containers": [{ "name": "x", "image": CRONJOB_IMAGE }],
                } } } },
            },
        }),
    )
    .await?;
    // Every workload kind, so every workload rule is used.
    apply(
        &ns.api::<Prefetch>(),
        prefetch_json(
            "x",
            json!({
                "filter_by_labels": { "app": "x" },
                "workload_kinds": ["Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"],
                "node_filter": "worker",
            }),
        ),
    )
    .await?;
    apply(
        &ns.api::<Prefetch>(),
        prefetch_json(
            "broken",
            json!({ "images": [FAILING_IMAGE], "node_filter": "worker" }),
        ),
    )
    .await?;

    // The dry run reads nodes, Prefetches and all five workload kinds.
    let (ok, output) = run_binary("plan", &config).await?;
    assert!(ok, "plan failed as operator:\n{output}");
    assert!(
        forbidden_lines(&output).is_empty(),
        "plan as operator:\n{output}"
    );
    let workers = workers(&cluster).len();
    let planned = format!(
        "{}/x: {} pull(s) on {workers} node(s)",
        ns.name(),
        2 * workers
    );
    assert!(
        output.contains(&planned) && output.contains(CRONJOB_IMAGE),
        "plan as operator should show {planned:?}, with the CronJob's {CRONJOB_IMAGE}:\n{output}"
    );

    let log = PodLog::start(admin.clone()).await?;
    let mut orchestrator = Orchestrator::start(
        "rbac-operator",
        Options {
            kubeconfig_toml: Some(kubeconfig_toml),
            ..Options::default()
        },
    )
    .await?;
    let outcome = works_as_operator(&orchestrator, &log, &ns, &cluster, &target).await;
    orchestrator.kill();
    // The harness appends to one log per test name: keep only this run's.
    let text = orchestrator.log();
    let this_run = text
        .rfind(&format!("listen=127.0.0.1:{}", orchestrator.port))
        .map_or(text.as_str(), |at| {
            &text[text[..at].rfind('\n').map_or(0, |nl| nl + 1)..]
        });
    let refused = forbidden_lines(this_run);
    let refused = match refused.len() {
        0..=10 => refused.join("\n"),
        n => format!("{}\n... and {} more", refused[..10].join("\n"), n - 10),
    };
    let log_path = orchestrator.log_path.display();
    outcome.with_context(|| format!("requests refused ({log_path}):\n{refused}"))?;
    assert!(
        refused.is_empty(),
        "kube-prefetch was refused as operator ({log_path}):\n{refused}"
    );

    // 5. Cleanup, and the grant is really gone.
    ns.cleanup().await?;
    rbac_cleanup.run().await?;
    support::wait_for(
        "the operator to lose the rights again",
        support::DEFAULT_TIMEOUT,
        || async {
            Ok(
                (!may(&operator, "watch", "cache.techsquad.rocks", "prefetches").await?
                    && !may(&operator, "list", "", "pods").await?)
                    .then_some(()),
            )
        },
    )
    .await?;
    Ok(())
}
