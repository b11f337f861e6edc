//! Failure isolation (issue 8, acceptance 3): a panic in one cluster's actor
//! stops only that cluster; the supervisor restarts it with backoff, and
//! the status, `kube-prefetch status` and `/healthz` say so. The panic is
//! injected by the test-only fault hook (`src/actors/fault_hook.rs`, built
//! with the `test-hooks` feature only).

mod harness;
mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use harness::*;
use kube_prefetch::actors::status::{ClusterHealth, StatusView};
use kube_prefetch::api::{Phase, Prefetch};
use serde_json::json;

const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Where the hook's `panic!` is, as the panic message names it
/// ("file:line:column", the column of the macro call).
fn hook_location() -> String {
    let path = "src/actors/fault_hook.rs";
    let source = std::fs::read_to_string(support::repo_root().join(path)).expect("read the hook");
    let (line, text) = source
        .lines()
        .enumerate()
        .find(|(_, text)| text.contains("panic!("))
        .expect("a panic! in the hook");
    let column = text.find("panic!(").expect("panic! column") + 1;
    format!("{path}:{}:{column}", line + 1)
}

fn cluster<'a>(
    view: &'a StatusView,
    name: &str,
) -> Option<&'a kube_prefetch::actors::status::ClusterView> {
    view.clusters.iter().find(|cluster| cluster.name == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_cluster_stops_alone_and_comes_back() -> Result<()> {
    let _serial = setup().await;
    let clusters = support::cluster_names();
    let (a, b) = (clusters[0].clone(), clusters[1].clone());
    let ns_a = support::TestNamespace::create(&a, "isolation").await?;
    let ns_b = support::TestNamespace::create(&b, "isolation").await?;
    let triggers = tempfile::tempdir()?;
    let orchestrator = Orchestrator::start(
        "isolation",
        Options {
            env: vec![(
                "KUBE_PREFETCH_TEST_PANIC_DIR".into(),
                triggers.path().display().to_string(),
            )],
            ..Options::default()
        },
    )
    .await?;
    support::wait_for("both clusters connected", Duration::from_secs(30), || {
        let status = orchestrator.status();
        let (a, b) = (a.clone(), b.clone());
        async move {
            let view = status.await?;
            Ok((is_connected(&view, &a) && is_connected(&view, &b)).then_some(()))
        }
    })
    .await?;

    // Cluster A panics inside its ClusterActor.
    std::fs::write(triggers.path().join(&a), "")?;
    let panic = format!(
        "panicked at {}: test hook: injected panic in cluster {a}",
        hook_location()
    );
    // Crashed for the 1 s backoff: poll faster than that.
    let deadline = Instant::now() + Duration::from_secs(20);
    let crashed = loop {
        let view = orchestrator.status().await?;
        if let Some(ClusterHealth::Crashed { reason }) = cluster(&view, &a).map(|c| &c.health) {
            break (reason.clone(), view);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "cluster {a} never showed Crashed; last status: {view:?}\nlog:\n{}",
            orchestrator.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        crashed.0,
        format!("{panic}; restarting in 1s (panics in a row: 1)")
    );
    assert!(
        is_connected(&crashed.1, &b),
        "cluster {b} must run on: {:?}",
        crashed.1
    );

    // Work in both clusters: B's is done by the untouched cluster, A's by
    // the restarted one.
    let spec = json!({ "images": ["busybox:1.36"], "node_filter": "worker" });
    apply(
        &ns_b.api::<Prefetch>(),
        prefetch_json("other-cluster", spec.clone()),
    )
    .await?;
    apply(&ns_a.api::<Prefetch>(), prefetch_json("after-panic", spec)).await?;
    wait_phase(
        &ns_b.client(),
        ns_b.name(),
        "other-cluster",
        Phase::Ready,
        READY_TIMEOUT,
    )
    .await?;
    wait_phase(
        &ns_a.client(),
        ns_a.name(),
        "after-panic",
        Phase::Ready,
        READY_TIMEOUT,
    )
    .await
    .with_context(|| format!("log:\n{}", orchestrator.log_tail(40)))?;

    let view = orchestrator.status().await?;
    let restarted = cluster(&view, &a).context("cluster A in the status")?;
    assert!(
        matches!(restarted.health, ClusterHealth::Connected { .. }),
        "{restarted:?}"
    );
    assert_eq!(restarted.restarts, 1);
    assert_eq!(restarted.last_panic.as_deref(), Some(panic.as_str()));
    assert_eq!(cluster(&view, &b).map(|c| c.restarts), Some(0));

    // What a person sees: /healthz details, and `kube-prefetch status`.
    assert_eq!(
        orchestrator.get("/healthz").await?,
        format!("ok\ncluster {a}: Connected, restarted once after a panic; last: {panic}\n")
    );
    let output = std::process::Command::new(binary())
        .args(["status", "--url", &orchestrator.url()])
        .env("NO_COLOR", "1")
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.ends_with(&format!(
            "\n{a}: restarted once after a panic; last: {panic}\n"
        )),
        "{stdout}"
    );
    // One panic, one restart: the hook's file is consumed.
    assert_eq!(
        log_lines_with(&orchestrator.log_path, "restarting cluster after a panic").len(),
        1
    );

    drop(orchestrator);
    ns_a.cleanup().await?;
    ns_b.cleanup().await?;
    Ok(())
}
