//! The two pull methods on a real node (see README, "Pull methods"): for each,
//! one Prefetch of PULLS fresh images (4 MiB each, never on the node before)
//! on `sim-1-real-worker`, pulled one at a time as the kubelet pulls
//! serially. Prints, per method: time to READY, each pull pod's life (created
//! to deleted), failures, and the pod states the API server reported.
//!
//! Needs the real nodes: `clusters/sim/up --real-nodes 1`, then
//! `cargo bench --bench pull_methods [-- PULLS]` (default 10).

#[path = "../tests/harness/mod.rs"]
mod harness;
#[path = "../tests/realnode/mod.rs"]
mod realnode;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use kube_prefetch::api::{Phase, Prefetch};
use serde_json::json;

/// Per pod uid: when it was first seen, when deleted, and each distinct state.
#[derive(Default)]
struct Life {
    created: Option<Instant>,
    deleted: Option<Instant>,
    states: Vec<String>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let pulls: usize = match std::env::args().skip(1).find(|a| !a.starts_with('-')) {
        Some(n) => n.parse().context("PULLS must be a number")?,
        None => 10,
    };
    let info = realnode::real_info()?;
    let _serial = harness::setup().await;
    println!(
        "{pulls} pulls of 4 MiB images per method on {} (kubelet v1.36.3, containerd v2.4.2)\n",
        info.node().name
    );
    for method in realnode::METHODS {
        run(method, pulls, &info).await?;
    }
    Ok(())
}

async fn run(method: &str, pulls: usize, info: &realnode::RealInfo) -> Result<()> {
    let ns = support::TestNamespace::create(&info.cluster, &format!("bench-{method}")).await?;
    let mut images = Vec::new();
    for _ in 0..pulls {
        let repo = support::unique_name(&format!("bench/{method}"));
        realnode::push_image(&["--size", "4", &format!("{repo}:1")]).await?;
        images.push(format!("{}/{repo}:1", info.registries.plain));
    }
    let lives: Arc<Mutex<BTreeMap<String, Life>>> = Arc::default();
    let watch = {
        let lives = lives.clone();
        let api: Api<Pod> = ns.api();
        tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(Ok(event)) = stream.next().await {
                let (pod, deleted) = match event {
                    watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => (pod, false),
                    watcher::Event::Delete(pod) => (pod, true),
                    _ => continue,
                };
                let mut lives = lives.lock().unwrap_or_else(|e| e.into_inner());
                let life = lives.entry(pod.uid().unwrap_or_default()).or_default();
                let now = Instant::now();
                life.created.get_or_insert(now);
                if deleted {
                    life.deleted = Some(now);
                } else {
                    let state = realnode::describe_end(&pod);
                    if life.states.last() != Some(&state) {
                        life.states.push(state);
                    }
                }
            }
        })
    };
    let run = realnode::orchestrator_with(
        "bench",
        method,
        info,
        harness::Options {
            status_debounce: "1s",
            ..harness::Options::default()
        },
    )
    .await?;
    let started = Instant::now();
    harness::apply(
        &ns.api::<Prefetch>(),
        harness::prefetch_json(
            "bench",
            json!({ "images": images, "node_filter": "real-worker" }),
        ),
    )
    .await?;
    let status = harness::wait_phase(
        &ns.client(),
        ns.name(),
        "bench",
        Phase::Ready,
        Duration::from_secs(600),
    )
    .await
    .with_context(|| run.log_tail(30))?;
    let to_ready = started.elapsed();
    harness::wait_no_pull_pods(&ns.client(), ns.name(), Duration::from_secs(60)).await?;
    watch.abort();

    let lives = std::mem::take(&mut *lives.lock().unwrap_or_else(|e| e.into_inner()));
    let mut durations: Vec<Duration> = lives
        .values()
        .filter_map(|l| Some(l.deleted? - l.created?))
        .collect();
    durations.sort();
    let mut sequences: BTreeMap<String, usize> = BTreeMap::new();
    for life in lives.values() {
        *sequences.entry(life.states.join(" -> ")).or_default() += 1;
    }
    let median = durations
        .get(durations.len() / 2)
        .copied()
        .unwrap_or_default();
    let max = durations.last().copied().unwrap_or_default();
    println!(
        "method {method}: READY in {to_ready:.1?} ({:.2?} per pull); pods {}, failed pulls {}; pod life median {median:.2?}, max {max:.2?}",
        to_ready / pulls.max(1) as u32,
        lives.len(),
        status.pulls.failed,
    );
    for (sequence, count) in sequences {
        println!("  {count} x {sequence}");
    }
    println!();
    drop(run);
    ns.cleanup().await?;
    Ok(())
}
