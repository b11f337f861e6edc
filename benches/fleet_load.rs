//! Load drivers for `benches/fleet.sh` (issue 7's fleet benchmarks), run
//! against a sim cluster the script started. Prints numbers; asserts nothing.
//!
//! `cargo bench --bench fleet_load -- churn KUBECONFIG CONTEXT RATE SECONDS`
//!   Node churn as kubelets make it: RATE status updates per second for
//!   SECONDS, round robin over the worker nodes that list images; each update
//!   renames one of the node's `filler` images (the images the benchmark's
//!   Prefetches want stay listed), so kube-prefetch sees a changed image list.
//!
//! `cargo bench --bench fleet_load -- bare KUBECONFIG CONTEXT NAMESPACE IMAGES CONCURRENCY QPS`
//!   The bare loop of benchmark 4: for every worker node x every image of the
//!   comma-separated IMAGES, the same pull pod kube-prefetch creates
//!   (`build_pull_pod`, the default `direct` method), with the same client
//!   (`build_client`, the same request limiter at QPS), at most CONCURRENCY
//!   pods at once and one per node: create, wait until `classify` judges it,
//!   delete, and wait until it is gone. Prints the time from the first create
//!   to the last deletion.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ContainerImage, Node, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use kube_prefetch::actors::cluster::build_client;
use kube_prefetch::config::ClusterTarget;
use kube_prefetch::pull::outcome::classify;
use kube_prefetch::pull::plan::{PullSettings, PullTarget};
use kube_prefetch::pull::podspec::{PREFETCH_UID_LABEL, PullMethod, PullPodParams, build_pull_pod};
use serde_json::json;
use tokio::sync::{Semaphore, oneshot};

const BARE_UID: &str = "bare-loop";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    // cargo bench passes `--bench`; our arguments are the rest.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["churn", kubeconfig, context, rate, seconds] => {
            let rate: f64 = rate.parse().context("RATE")?;
            let seconds: f64 = seconds.parse().context("SECONDS")?;
            churn(connect(kubeconfig, context, None).await?, rate, seconds).await
        }
        [
            "bare",
            kubeconfig,
            context,
            namespace,
            images,
            concurrency,
            qps,
        ] => {
            let qps: f64 = qps.parse().context("QPS")?;
            let concurrency: usize = concurrency.parse().context("CONCURRENCY")?;
            let images: Vec<String> = images.split(',').map(str::to_string).collect();
            let client = connect(kubeconfig, context, Some(qps)).await?;
            bare(client, namespace, &images, concurrency).await
        }
        _ => bail!(
            "usage: fleet_load churn KUBECONFIG CONTEXT RATE SECONDS | bare KUBECONFIG CONTEXT NAMESPACE IMAGES CONCURRENCY QPS"
        ),
    }
}

async fn connect(kubeconfig: &str, context: &str, qps: Option<f64>) -> Result<Client> {
    let target = ClusterTarget {
        name: context.to_string(),
        kubeconfig: kubeconfig.into(),
        context: context.to_string(),
    };
    // A bench is no replica of a leader-elected Deployment: writes are open.
    build_client(&target, qps, kube_prefetch::leader::WriteGate::open(), None)
        .await
        .with_context(|| format!("client for {context} in {kubeconfig}"))
}

async fn worker_nodes(client: &Client) -> Result<Vec<Node>> {
    let nodes: Api<Node> = Api::all(client.clone());
    Ok(nodes
        .list(&ListParams::default())
        .await
        .context("listing nodes")?
        .items
        .into_iter()
        .filter(|node| node.name_any().contains("worker"))
        .collect())
}

async fn churn(client: Client, rate: f64, seconds: f64) -> Result<()> {
    if rate <= 0.0 || seconds <= 0.0 {
        bail!("RATE and SECONDS must be > 0");
    }
    let mut lists: Vec<(String, Vec<ContainerImage>)> = worker_nodes(&client)
        .await?
        .into_iter()
        .filter_map(|node| {
            let images = node.status.as_ref()?.images.clone()?;
            let has_filler = images
                .iter()
                .any(|image| image.names.iter().flatten().any(|n| n.contains("filler")));
            has_filler.then(|| (node.name_any(), images))
        })
        .collect();
    if lists.is_empty() {
        bail!(
            "no worker node lists a filler image (start the sim with benches/fleet.sh's --node-images)"
        );
    }
    let total = (rate * seconds).round() as u64;
    let failed = Arc::new(Mutex::new(0u64));
    let nodes: Api<Node> = Api::all(client);
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..total {
        ticks.tick().await;
        let index = (k as usize) % lists.len();
        let (name, images) = &mut lists[index];
        if let Some(filler) = images
            .iter_mut()
            .rev()
            .find(|image| image.names.iter().flatten().any(|n| n.contains("filler")))
        {
            filler.names = Some(vec![format!("registry.example/fleet/filler-churn-{k}:1")]);
        }
        let patch = json!({ "status": { "images": images } });
        let (nodes, name, failed) = (nodes.clone(), name.clone(), failed.clone());
        // Concurrent, so a slow response does not lower the rate.
        tasks.push(tokio::spawn(async move {
            if let Err(error) = nodes
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                eprintln!("patching {name}: {error}");
                if let Ok(mut failed) = failed.lock() {
                    *failed += 1;
                }
            }
        }));
    }
    for task in tasks {
        task.await.context("patch task")?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let failed = failed.lock().map(|f| *f).unwrap_or_default();
    println!(
        "churn: {total} node status updates in {elapsed:.1} s ({:.1}/s) over {} nodes, {failed} failed",
        total as f64 / elapsed,
        lists.len()
    );
    Ok(())
}

/// Per pod name: who waits for it to be judged, then for it to be gone.
#[derive(Default)]
struct Waiters {
    judged: HashMap<String, oneshot::Sender<()>>,
    gone: HashMap<String, oneshot::Sender<()>>,
}

async fn bare(
    client: Client,
    namespace: &str,
    images: &[String],
    concurrency: usize,
) -> Result<()> {
    let nodes: Vec<String> = worker_nodes(&client)
        .await?
        .iter()
        .map(|node| node.name_any())
        .collect();
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let waiters = Arc::new(Mutex::new(Waiters::default()));

    // One watch of our pods, as kube-prefetch has one per cluster.
    let watched = {
        let waiters = waiters.clone();
        let config = watcher::Config::default().labels(&format!("{PREFETCH_UID_LABEL}={BARE_UID}"));
        let stream = watcher(pods.clone(), config);
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                let Ok(mut waiters) = waiters.lock() else {
                    return;
                };
                match event {
                    Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                        if classify(&pod).is_some()
                            && let Some(tx) = waiters.judged.remove(&pod.name_any())
                        {
                            let _ = tx.send(());
                        }
                    }
                    Ok(watcher::Event::Delete(pod)) => {
                        if let Some(tx) = waiters.gone.remove(&pod.name_any()) {
                            let _ = tx.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(error) => eprintln!("watch: {error}"),
                }
            }
        })
    };
    // Let the watch start before the first create, so no event is missed.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let slots = Arc::new(Semaphore::new(concurrency));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for node in nodes.clone() {
        let (pods, waiters, slots, images, namespace) = (
            pods.clone(),
            waiters.clone(),
            slots.clone(),
            images.to_vec(),
            namespace.to_string(),
        );
        // One task per node: its pulls one after the other (one per node).
        tasks.push(tokio::spawn(async move {
            let mut deletions = Vec::new();
            for image in images {
                let permit = slots.acquire().await.context("slots closed")?;
                let target = PullTarget::new(
                    node.as_str(),
                    image.as_str(),
                    PullSettings {
                        namespace: namespace.clone(),
                        ..PullSettings::default()
                    },
                );
                let pod = build_pull_pod(&PullPodParams {
                    prefetch_namespace: &namespace,
                    prefetch_name: BARE_UID,
                    prefetch_uid: BARE_UID,
                    target: &target,
                    method: PullMethod::Direct,
                    helper_image: "",
                    timeout_seconds: 600,
                    priority_class: None,
                });
                let name = pod.name_any();
                let (judged_tx, judged) = oneshot::channel();
                let (gone_tx, gone) = oneshot::channel();
                if let Ok(mut waiters) = waiters.lock() {
                    waiters.judged.insert(name.clone(), judged_tx);
                    waiters.gone.insert(name.clone(), gone_tx);
                }
                pods.create(&PostParams::default(), &pod)
                    .await
                    .with_context(|| format!("creating {name}"))?;
                judged
                    .await
                    .with_context(|| format!("{name} never judged"))?;
                drop(permit);
                // As kube-prefetch: the slot is free once judged; the delete
                // runs beside the next pull.
                let client = pods.clone().into_client();
                let namespace = namespace.clone();
                deletions.push(tokio::spawn(async move {
                    kube_prefetch::actors::delete_pull_pod(client, &namespace, &name)
                        .await
                        .map_err(|error| anyhow::anyhow!("deleting {name}: {error}"))?;
                    gone.await.with_context(|| format!("{name} never gone"))
                }));
            }
            for deletion in deletions {
                deletion.await.context("delete task")??;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await.context("node task")??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    watched.abort();
    let pulls = nodes.len() * images.len();
    println!(
        "bare loop: {pulls} pulls ({} nodes x {} images), concurrency {concurrency}: all judged and deleted in {elapsed:.2} s ({:.1} pulls/s)",
        nodes.len(),
        images.len(),
        pulls as f64 / elapsed
    );
    Ok(())
}
