//! A phase a person can trust: a READY Prefetch stays READY while its pairs
//! are re-verified every `retry_after`, and leaves READY only when a check
//! fails. Every status write is seen through a watch, so a flip that lasts
//! one write is caught, not only what a poll happens to sample.

mod harness;
mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, ensure};
use futures::StreamExt;
use harness::*;
use k8s_openapi::api::core::v1::ResourceQuota;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube_prefetch::api::{Phase, Prefetch, PullCounts};
use serde_json::json;

const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Every (phase, pulls) the Prefetch's status had, in order, deduplicated.
#[derive(Clone, Default)]
struct PhaseLog(Arc<Mutex<Vec<(Phase, PullCounts)>>>);

impl PhaseLog {
    fn start(api: Api<Prefetch>, name: &str) -> (Self, tokio::task::JoinHandle<()>) {
        let log = PhaseLog::default();
        let sink = log.clone();
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let task = tokio::spawn(async move {
            let mut stream = watcher::watcher(api, config).boxed();
            while let Some(event) = stream.next().await {
                let Ok(watcher::Event::Apply(prefetch) | watcher::Event::InitApply(prefetch)) =
                    event
                else {
                    continue;
                };
                let Some(status) = prefetch.status else {
                    continue;
                };
                let Some(phase) = status.phase else {
                    continue;
                };
                let Ok(mut seen) = sink.0.lock() else {
                    return;
                };
                let entry = (phase, status.pulls);
                if seen.last() != Some(&entry) {
                    seen.push(entry);
                }
            }
        });
        (log, task)
    }

    fn take(&self) -> Vec<(Phase, PullCounts)> {
        self.0
            .lock()
            .map(|mut seen| std::mem::take(&mut *seen))
            .unwrap_or_default()
    }
}

/// Issue 10, acceptance 4: with `retry_after: 5`, a READY Prefetch watched
/// for 30 s shows nothing but READY while its pairs are re-verified (and
/// says so in `pulls.reverifying`); once a check cannot run (a ResourceQuota
/// of zero pods forbids the pull pod) it goes RUNNING, then FAILED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_stays_ready_while_reverified_and_leaves_when_a_check_fails() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[0].clone();
    let ns = support::TestNamespace::create(&cluster, "steady").await?;
    let client = ns.client();
    let prefetches = ns.api::<Prefetch>();
    apply(
        &prefetches,
        prefetch_json(
            "steady",
            json!({ "images": ["busybox:1.36"], "node_filter": "1-worker", "retry_after": 5 }),
        ),
    )
    .await?;
    let log = PodLog::start(client.clone()).await?;
    let _orchestrator = Orchestrator::start(
        "steady",
        Options {
            max_attempts: 2,
            backoff_initial: "1s",
            backoff_max: "2s",
            ..Options::default()
        },
    )
    .await?;
    let ready = wait_phase(&client, ns.name(), "steady", Phase::Ready, READY_TIMEOUT).await?;
    let pairs = ready.pulls.total;
    ensure!(pairs >= 2, "the sim has several workers: {ready:?}");

    let (phases, watch) = PhaseLog::start(prefetches.clone(), "steady");
    let pods_before = log.pods_in(ns.name()).len();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let watched = phases.take();
    let rechecks = log.pods_in(ns.name()).len() - pods_before;
    // Six rounds of checks were due in 30 s; on a loaded machine fewer run.
    ensure!(
        rechecks >= pairs as usize * 2,
        "pairs were re-verified with pull pods: {rechecks} pods for {pairs} pairs"
    );
    let not_ready: Vec<_> = watched.iter().filter(|(p, _)| *p != Phase::Ready).collect();
    ensure!(
        not_ready.is_empty(),
        "READY flipped while re-verifications succeeded: {not_ready:?} (all: {watched:?})"
    );
    ensure!(
        watched.iter().any(|(_, pulls)| pulls.reverifying > 0),
        "re-verification shown in pulls.reverifying: {watched:?}"
    );
    ensure!(
        watched
            .iter()
            .all(|(_, pulls)| pulls.ready == pairs && pulls.in_flight == 0),
        "ready stays {pairs} and nothing counts as a first pull: {watched:?}"
    );

    // No pod may be created any more: the next check of each pair fails.
    let quota: ResourceQuota = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": { "name": "no-pods" },
        "spec": { "hard": { "pods": "0" } }
    }))?;
    let quotas = ns.api::<ResourceQuota>();
    quotas.create(&PostParams::default(), &quota).await?;
    // The sim runs no quota controller: write the status it would, which is
    // what admission enforces.
    quotas
        .patch_status(
            "no-pods",
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "status": { "hard": { "pods": "0" }, "used": { "pods": "0" } } }),
            ),
        )
        .await?;
    let failed = wait_phase(&client, ns.name(), "steady", Phase::Failed, READY_TIMEOUT).await?;
    let after = phases.take();
    ensure!(
        after.iter().any(|(phase, _)| *phase == Phase::Running),
        "a failed check shows RUNNING while it is retried: {after:?}"
    );
    ensure!(
        failed
            .failures
            .iter()
            .any(|f| f.reason == "PodCreateFailed" && f.last_error.contains("no-pods")),
        "the failure names the quota: {failed:?}"
    );
    watch.abort();
    ns.cleanup().await?;
    Ok(())
}
