//! The dashboard's live feed against a running kube-prefetch on the sim
//! clusters: `/api/v1/events` streams the status at once and again when a
//! Prefetch changes, without the client asking again; the page and its
//! assets are served from the binary; a Prefetch's drill-down lists every
//! node with its pairs or the reason it is skipped.

mod harness;
mod support;

use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use harness::*;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use kube_prefetch::actors::status::StatusView;
use kube_prefetch::api::{Phase, Prefetch};
use serde_json::{Value, json};

/// Reads the event stream on a thread and hands over each `status` event's
/// data, parsed. The thread ends when the server closes the stream.
fn subscribe(url: String) -> mpsc::Receiver<Result<StatusView>> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let response = match ureq::get(&url).call() {
            Ok(response) => response,
            Err(error) => {
                let _ = sender.send(Err(error.into()));
                return;
            }
        };
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string();
        if content_type != "text/event-stream" {
            let _ = sender.send(Err(anyhow::anyhow!("content type {content_type:?}")));
            return;
        }
        let reader = BufReader::new(response.into_body().into_reader());
        let mut event = String::new();
        let mut data = String::new();
        for line in reader.lines() {
            let Ok(line) = line else { return };
            if let Some(name) = line.strip_prefix("event: ") {
                event = name.to_string();
            } else if let Some(chunk) = line.strip_prefix("data: ") {
                data.push_str(chunk);
            } else if line.is_empty() {
                if event == "status" {
                    let parsed = serde_json::from_str(&data).context("status event data");
                    if sender.send(parsed).is_err() {
                        return;
                    }
                }
                event.clear();
                data.clear();
            }
        }
    });
    receiver
}

/// The next status event that satisfies `check`, within `timeout`.
fn next_matching(
    events: &mpsc::Receiver<Result<StatusView>>,
    timeout: Duration,
    what: &str,
    check: impl Fn(&StatusView) -> bool,
) -> Result<StatusView> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(view) => {
                let view = view?;
                if check(&view) {
                    return Ok(view);
                }
                last = Some(view);
            }
            Err(_) => bail!("no status event with {what} within {timeout:?}; last: {last:?}"),
        }
    }
}

fn phase_of(view: &StatusView, namespace: &str, name: &str) -> Option<Phase> {
    view.clusters
        .iter()
        .flat_map(|cluster| &cluster.prefetches)
        .find(|p| p.namespace == namespace && p.name == name)
        .map(|p| p.phase)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_a_status_update_when_a_prefetch_changes() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[0].clone();
    let ns = support::TestNamespace::create(&cluster, "dashboard-events").await?;
    let orchestrator = Orchestrator::start("dashboard-events", Options::default()).await?;
    let events = subscribe(format!("{}/api/v1/events", orchestrator.url()));

    // At once: the current status, the same document as /api/v1/status.
    let first = tokio::task::block_in_place(|| {
        next_matching(&events, Duration::from_secs(5), "anything", |_| true)
    })?;
    let names: Vec<&str> = first.clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, support::cluster_names(), "{first:?}");
    assert_eq!(phase_of(&first, ns.name(), "live"), None);

    // A new Prefetch shows up on the same stream, and its way to READY too.
    apply(
        &ns.api::<Prefetch>(),
        json!({
            "apiVersion": "cache.techsquad.rocks/v1",
            "kind": "Prefetch",
            "metadata": { "name": "live" },
            "spec": { "images": ["busybox:1.36"], "node_filter": "worker" },
        }),
    )
    .await?;
    let namespace = ns.name().to_string();
    let ready = tokio::task::block_in_place(|| {
        next_matching(
            &events,
            Duration::from_secs(60),
            "the Prefetch READY",
            |view| phase_of(view, &namespace, "live") == Some(Phase::Ready),
        )
    })?;
    let summary = ready
        .clusters
        .iter()
        .flat_map(|c| &c.prefetches)
        .find(|p| p.name == "live")
        .context("the Prefetch")?;
    assert_eq!(summary.pulls.ready as usize, workers(&cluster).len());

    // Deleting it is streamed as well.
    ns.api::<Prefetch>()
        .delete("live", &Default::default())
        .await
        .context("deleting the Prefetch")?;
    tokio::task::block_in_place(|| {
        next_matching(
            &events,
            Duration::from_secs(30),
            "the Prefetch gone",
            |view| phase_of(view, &namespace, "live").is_none(),
        )
    })?;
    drop(orchestrator);
    ns.cleanup().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_page_and_assets_are_served_from_the_binary() -> Result<()> {
    let _serial = setup().await;
    let orchestrator = Orchestrator::start("dashboard-page", Options::default()).await?;
    for (path, content_type, needle) in [
        ("/", "text/html; charset=utf-8", "<main>"),
        (
            "/assets/dashboard.js",
            "text/javascript; charset=utf-8",
            "new EventSource(\"/api/v1/events\")",
        ),
        (
            "/assets/dashboard.css",
            "text/css; charset=utf-8",
            "progress",
        ),
    ] {
        let url = format!("{}{path}", orchestrator.url());
        let (served_type, csp, body) = tokio::task::spawn_blocking(move || -> Result<_> {
            let mut response = ureq::get(&url).call()?;
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|value| value.to_str().ok())
                    .unwrap_or_default()
                    .to_string()
            };
            let served_type = header("content-type");
            let csp = header("content-security-policy");
            Ok((served_type, csp, response.body_mut().read_to_string()?))
        })
        .await??;
        assert_eq!(served_type, content_type, "{path}");
        assert!(csp.starts_with("default-src 'self'"), "{path}: {csp}");
        assert!(body.contains(needle), "{path} lacks {needle}");
    }
    Ok(())
}

/// `GET path` as JSON, with its status code.
async fn get_json(orchestrator: &Orchestrator, path: &str) -> Result<(u16, Value)> {
    let (code, body) = orchestrator.get_any(path).await?;
    let json = serde_json::from_str(&body).with_context(|| format!("{path}: {body}"))?;
    Ok((code, json))
}

/// The row of `node` in a drill-down answer.
fn row<'a>(grid: &'a Value, node: &str) -> Option<&'a Value> {
    grid["nodes"]
        .as_array()?
        .iter()
        .find(|row| row["node"] == node)
}

/// Issue 10: a Prefetch's drill-down lists every node of its cluster, each
/// with its pairs' states or the reason `plan` gives for skipping it, is
/// bounded by `limit` and searchable with `q`; an unknown cluster or
/// Prefetch is a JSON 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_down_shows_every_node_with_its_pairs_or_why_it_is_skipped() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[0].clone();
    let ns = support::TestNamespace::create(&cluster, "drill-down").await?;
    // A worker of our own, cordoned: node_filter passes it, cordoning skips it.
    let cordoned = support::unique_name(&format!("{cluster}-worker-cordoned"));
    let nodes: Api<Node> = Api::all(ns.client());
    let node_cleanup = delete_nodes_later(&cluster, vec![cordoned.clone()]);
    apply(
        &nodes,
        fake_node(&cordoned, "amd64", json!({ "unschedulable": true })),
    )
    .await?;
    wait_nodes_ready(&nodes, vec![cordoned.clone()]).await?;
    let prefetches = ns.api::<Prefetch>();
    apply(
        &prefetches,
        prefetch_json(
            "filtered",
            json!({ "images": ["busybox:1.36"], "node_filter": "worker" }),
        ),
    )
    .await?;
    // No node_filter: the control plane's NoSchedule taint skips it.
    apply(
        &prefetches,
        prefetch_json("everywhere", json!({ "images": ["busybox:1.36"] })),
    )
    .await?;
    let orchestrator = Orchestrator::start("drill-down", Options::default()).await?;
    for name in ["filtered", "everywhere"] {
        wait_phase(
            &ns.client(),
            ns.name(),
            name,
            Phase::Ready,
            Duration::from_secs(60),
        )
        .await?;
    }

    let base = format!("/api/v1/clusters/{cluster}/prefetches/{}", ns.name());
    let (code, grid) = get_json(&orchestrator, &format!("{base}/filtered/nodes")).await?;
    assert_eq!(code, 200, "{grid}");
    assert_eq!(grid["cluster"], cluster.as_str());
    assert_eq!(grid["namespace"], ns.name());
    assert_eq!(grid["name"], "filtered");
    assert_eq!(grid["phase"], "READY");
    assert_eq!(grid["images"], json!(["docker.io/library/busybox:1.36"]));
    let in_cluster = nodes.list(&ListParams::default()).await?.items.len();
    assert_eq!(grid["total_nodes"], in_cluster, "{grid}");
    assert_eq!(grid["omitted"], 0);
    let control_plane = format!("{cluster}-control-plane");
    let skipped = row(&grid, &control_plane).context("the control plane listed")?;
    assert_eq!(skipped["state"], "skipped", "{skipped}");
    assert_eq!(skipped["reason"], "node_filter");
    assert_eq!(skipped["text"], "name does not contain node_filter");
    let cordoned_row = row(&grid, &cordoned).context("the cordoned node listed")?;
    assert_eq!(cordoned_row["state"], "skipped", "{cordoned_row}");
    assert_eq!(cordoned_row["reason"], "cordoned");
    assert_eq!(cordoned_row["text"], "node is cordoned");
    for worker in workers(&cluster) {
        let targeted = row(&grid, &worker).with_context(|| format!("{worker} listed"))?;
        assert_eq!(targeted["state"], "targeted", "{targeted}");
        assert_eq!(
            targeted["pairs"][0]["image"], "docker.io/library/busybox:1.36",
            "{targeted}"
        );
        assert_eq!(targeted["pairs"][0]["state"], "ready", "{targeted}");
    }
    assert_eq!(grid["targeted_nodes"], workers(&cluster).len());
    assert_eq!(grid["skipped_nodes"]["node_filter"], 1, "{grid}");
    assert_eq!(grid["skipped_nodes"]["cordoned"], 1, "{grid}");

    let (_, everywhere) = get_json(&orchestrator, &format!("{base}/everywhere/nodes")).await?;
    let tainted = row(&everywhere, &control_plane).context("the control plane listed")?;
    assert_eq!(tainted["reason"], "taint_not_tolerated", "{tainted}");
    assert_eq!(tainted["text"], "a taint is not tolerated");

    // Bounded: `limit` rows, the rest counted; `q` finds one by name.
    let (_, one) = get_json(&orchestrator, &format!("{base}/filtered/nodes?limit=1")).await?;
    assert_eq!(one["nodes"].as_array().map(Vec::len), Some(1), "{one}");
    assert_eq!(one["limit"], 1);
    assert_eq!(one["omitted"], in_cluster - 1, "{one}");
    let (_, found) = get_json(
        &orchestrator,
        &format!("{base}/filtered/nodes?q=CONTROL-plane"),
    )
    .await?;
    assert_eq!(found["matched"], 1, "{found}");
    assert_eq!(found["nodes"][0]["node"], control_plane.as_str());

    // Unknown: a JSON 404 that says what was not found.
    let (code, missing) = get_json(&orchestrator, &format!("{base}/nope/nodes")).await?;
    assert_eq!(code, 404, "{missing}");
    assert_eq!(
        missing["error"],
        format!("no Prefetch {}/nope in cluster {cluster}", ns.name())
    );
    let (code, missing) = get_json(
        &orchestrator,
        "/api/v1/clusters/no-such-cluster/prefetches/default/x/nodes",
    )
    .await?;
    assert_eq!(code, 404, "{missing}");
    assert_eq!(missing["error"], "no cluster no-such-cluster");

    drop(orchestrator);
    node_cleanup.run().await?;
    ns.cleanup().await?;
    Ok(())
}
