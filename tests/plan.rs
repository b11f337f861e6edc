//! `kube-prefetch plan` on the sim: it lists exactly the pulls that `run`
//! then makes, and says why every other node gets none.

mod harness;
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use harness::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use kube_prefetch::api::{Phase, Prefetch};
use serde_json::{Value, json};

const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// `kube-prefetch plan` with `extra` arguments: its stdout, which must be
/// all it printed there (logs go to stderr).
async fn run_plan(config: &std::path::Path, extra: &[&str]) -> Result<String> {
    let (ok, stdout, stderr) = run_subcommand("plan", config, extra).await?;
    ensure!(ok, "plan failed: {stdout}{stderr}");
    Ok(stdout)
}

/// The plan of `namespace/name` in `cluster` from `plan -o json`.
fn prefetch_plan<'a>(
    doc: &'a Value,
    cluster: &str,
    namespace: &str,
    name: &str,
) -> Result<&'a Value> {
    doc["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"] == cluster)
        .flat_map(|c| c["prefetches"].as_array().into_iter().flatten())
        .find(|p| p["namespace"] == namespace && p["name"] == name)
        .with_context(|| format!("no plan for {namespace}/{name} in {cluster}: {doc:#}"))
}

fn pairs(list: &Value) -> BTreeSet<(String, String)> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["node"].as_str().unwrap_or_default().to_string(),
                p["image"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn skipped(plan: &Value) -> BTreeSet<(String, String)> {
    plan["skipped"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                s["node"].as_str().unwrap_or_default().to_string(),
                s["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Node changes the test makes, undone whatever happens.
struct NodeChanges {
    nodes: Api<Node>,
    cordoned: String,
    reporting: String,
    images_before: Value,
}

impl NodeChanges {
    async fn undo(&self) -> Result<()> {
        self.nodes
            .patch(
                &self.cordoned,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { "unschedulable": null } })),
            )
            .await?;
        self.nodes
            .patch_status(
                &self.reporting,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": { "images": self.images_before } })),
            )
            .await?;
        Ok(())
    }
}

/// Issue 10, acceptance 3: the skip reasons for an arm64-only workload, a
/// tainted node, a cordoned node and a node that already reports the image,
/// and `plan`'s pulls equal the pods `run` creates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_lists_the_pulls_run_makes_and_why_nodes_get_none() -> Result<()> {
    let _serial = setup().await;
    let cluster = support::cluster_names()[0].clone();
    let ns = support::TestNamespace::create(&cluster, "plan").await?;
    let client = ns.client();
    let nodes: Api<Node> = Api::all(client.clone());
    let all = nodes.list(&ListParams::default()).await?.items;
    let fake_workers: Vec<&Node> = all
        .iter()
        .filter(|n| n.name_any().contains("-worker") && !n.name_any().contains("real"))
        .collect();
    let arch = |n: &Node| {
        n.labels()
            .get("kubernetes.io/arch")
            .cloned()
            .unwrap_or_default()
    };
    let amd64: Vec<String> = fake_workers
        .iter()
        .filter(|n| arch(n) == "amd64")
        .map(|n| n.name_any())
        .collect();
    ensure!(amd64.len() >= 2, "two amd64 fake workers needed: {amd64:?}");
    let (cordoned, reporting) = (amd64[0].clone(), amd64[1].clone());
    let images_before = nodes
        .get_status(&reporting)
        .await?
        .status
        .and_then(|s| s.images)
        .map(|images| serde_json::to_value(images).unwrap_or(Value::Null))
        .unwrap_or(Value::Null);
    let changes = NodeChanges {
        nodes: nodes.clone(),
        cordoned: cordoned.clone(),
        reporting: reporting.clone(),
        images_before,
    };
    let result = scenario(&client, &ns, &cluster, &changes, &all).await;
    let undone = changes.undo().await;
    result?;
    undone?;
    ns.cleanup().await?;
    Ok(())
}

async fn scenario(
    client: &Client,
    ns: &support::TestNamespace,
    cluster: &str,
    changes: &NodeChanges,
    all: &[Node],
) -> Result<()> {
    let suffix = support::unique_name("img");
    let own_image = format!("registry.invalid/plan/{suffix}-own:1");
    let arm_image = format!("registry.invalid/plan/{suffix}-arm:1");
    changes
        .nodes
        .patch(
            &changes.cordoned,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "unschedulable": true } })),
        )
        .await?;
    changes
        .nodes
        .patch_status(
            &changes.reporting,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "images": [
                { "names": [own_image], "sizeBytes": 1000 }
            ] } })),
        )
        .await?;
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": "edge", "labels": { "app": "edge" } },
        "spec": {
            "selector": { "matchLabels": { "app": "edge" } },
            "template": {
                "metadata": { "labels": { "app": "edge" } },
                "spec": {
                    "affinity": { "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{ "matchExpressions": [
                            { "key": "kubernetes.io/arch", "operator": "In", "values": ["arm64"] }
                        ] }]
                    } } },
                    "containers": [{ "name": "app", "image": arm_image }]
                }
            }
        }
    }))?;
    apply(&ns.api::<Deployment>(), serde_json::to_value(&deployment)?).await?;
    let prefetches = ns.api::<Prefetch>();
    apply(
        &prefetches,
        prefetch_json(
            "edge",
            json!({ "filter_by_labels": { "app": "edge" }, "node_filter": "worker" }),
        ),
    )
    .await?;
    apply(
        &prefetches,
        prefetch_json("own", json!({ "images": [own_image] })),
    )
    .await?;

    let mut orchestrator = Orchestrator::prepare("plan", Options::default())?;
    let doc: Value =
        serde_json::from_str(&run_plan(&orchestrator.config_path, &["-o", "json"]).await?)
            .context("plan -o json prints JSON")?;
    let edge = prefetch_plan(&doc, cluster, ns.name(), "edge")?;
    let own = prefetch_plan(&doc, cluster, ns.name(), "own")?;

    // Every node has pulls or a reason; each reason is the one expected.
    for node in all {
        let name = node.name_any();
        let arm = node.labels().get("kubernetes.io/arch").map(String::as_str) == Some("arm64");
        let tainted = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.effect == "NoSchedule"));
        let expected_edge = if !name.contains("worker") {
            Some("node_filter")
        } else if name == changes.cordoned {
            Some("cordoned")
        } else if !arm {
            Some("workload_affinity")
        } else {
            None
        };
        let expected_own = if name == changes.cordoned {
            Some("cordoned")
        } else if tainted {
            Some("taint_not_tolerated")
        } else {
            None
        };
        for (plan, expected, image) in [
            (edge, expected_edge, &arm_image),
            (own, expected_own, &own_image),
        ] {
            let reasons = skipped(plan);
            match expected {
                Some(reason) => ensure!(
                    reasons.contains(&(name.clone(), reason.to_string())),
                    "{name} skipped for {reason}: {plan:#}"
                ),
                None => ensure!(
                    pairs(&plan["pulls"]).contains(&(name.clone(), image.clone()))
                        || pairs(&plan["no_pull"]).contains(&(name.clone(), image.clone())),
                    "{name} planned for {image}: {plan:#}"
                ),
            }
        }
    }
    ensure!(
        own["no_pull"]
            == json!([{ "node": changes.reporting, "image": own_image, "reason": "already_on_node" }]),
        "the reporting node needs no pull: {own:#}"
    );
    ensure!(
        !pairs(&edge["pulls"]).is_empty(),
        "the arm64 node gets a pull: {edge:#}"
    );

    // The text form groups by reason, and -v names the nodes.
    let text = run_plan(&orchestrator.config_path, &["-v"]).await?;
    let cordoned_line = format!("skipped 1 node(s), node is cordoned: {}", changes.cordoned);
    ensure!(
        text.contains(&cordoned_line),
        "plan -v shows {cordoned_line:?}:\n{text}"
    );
    let quiet = run_plan(&orchestrator.config_path, &[]).await?;
    ensure!(
        quiet.contains("skipped 1 node(s), node is cordoned\n"),
        "plan without -v counts:\n{quiet}"
    );

    // The run makes exactly the planned pulls.
    let mut planned = pairs(&edge["pulls"]);
    planned.extend(pairs(&own["pulls"]));
    let log = PodLog::start(client.clone()).await?;
    orchestrator.spawn()?;
    orchestrator.wait_ready().await?;
    for name in ["edge", "own"] {
        wait_phase(client, ns.name(), name, Phase::Ready, READY_TIMEOUT).await?;
    }
    let made: BTreeSet<(String, String)> = log
        .pods_in(ns.name())
        .into_iter()
        .map(|pod| (pod.node, pod.image))
        .collect();
    ensure!(
        made == planned,
        "plan said {planned:?}, run pulled {made:?}"
    );
    Ok(())
}
