//! Shared by the real-node tests and the pull-method benchmark: what `up
//! --real-nodes` wrote, pushing images, looking into a node's containerd,
//! and a kube-prefetch for sim-1 with a given pull method.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use serde::Deserialize;
use tokio::sync::OnceCell;

use crate::harness::{Options, Orchestrator, PodLog};
use crate::support;

pub const METHODS: [&str; 2] = ["direct", "helper"];

/// The pull methods these tests run: both, or only the one `REAL_NODE_METHOD`
/// names (`make test` runs each method on its own set of clusters, side by
/// side).
pub fn methods() -> Result<Vec<&'static str>> {
    match std::env::var("REAL_NODE_METHOD") {
        Ok(wanted) if !wanted.is_empty() => METHODS
            .iter()
            .find(|method| **method == wanted)
            .map(|method| vec![*method])
            .with_context(|| format!("REAL_NODE_METHOD={wanted:?}: expected one of {METHODS:?}")),
        _ => Ok(METHODS.to_vec()),
    }
}
/// The kubelet refreshes its image list every 30 s and reports it with the
/// next node status (every 10 s on the sim's real nodes).
pub const NODE_IMAGES_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, Deserialize)]
pub struct RealInfo {
    pub cluster: String,
    pub registries: Registries,
    pub auth: Credentials,
    pub bin: Binaries,
    pub nodes: Vec<RealNode>,
}

#[derive(Debug, Deserialize)]
pub struct Registries {
    pub plain: String,
    pub auth: String,
    pub slow: String,
}

#[derive(Debug, Deserialize)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Deserialize)]
pub struct Binaries {
    pub ctr: PathBuf,
    pub crictl: PathBuf,
}

#[derive(Debug, Deserialize)]
pub struct RealNode {
    pub name: String,
    pub dir: PathBuf,
    pub containerd_socket: PathBuf,
}

impl RealInfo {
    pub fn node(&self) -> &RealNode {
        &self.nodes[0]
    }
}

/// What `up --real-nodes` wrote; fails clearly when the real nodes are not up.
pub fn real_info() -> Result<RealInfo> {
    let path = support::run_dir().join("real-nodes.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {}: start the real nodes with `clusters/sim/up --real-nodes 1`",
            path.display()
        )
    })?;
    let info: RealInfo =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if info.nodes.is_empty() {
        bail!("{} lists no real node", path.display());
    }
    Ok(info)
}

/// `clusters/sim/push-image ARGS`: the pushed reference with its digest.
pub async fn push_image(args: &[&str]) -> Result<String> {
    let script = support::repo_root().join("clusters/sim/push-image");
    let output = tokio::process::Command::new(&script)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "push-image {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?.trim().to_string())
}

/// Runs one of the node's runtime tools (ctr, crictl) against its containerd.
pub async fn node_tool(info: &RealInfo, ctr: bool, args: &[&str]) -> Result<String> {
    let socket = info.node().containerd_socket.display().to_string();
    let mut command = if ctr {
        let mut c = tokio::process::Command::new(&info.bin.ctr);
        c.args(["-a", &socket, "-n", "k8s.io"]);
        c
    } else {
        let mut c = tokio::process::Command::new(&info.bin.crictl);
        c.args(["--runtime-endpoint", &format!("unix://{socket}")]);
        c
    };
    let output = command
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    if !output.status.success() {
        bail!(
            "{} {} failed: {}",
            if ctr { "ctr" } else { "crictl" },
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// The references the node's containerd holds (tags and digests).
pub async fn containerd_images(info: &RealInfo) -> Result<BTreeSet<String>> {
    Ok(node_tool(info, true, &["images", "ls", "-q"])
        .await?
        .lines()
        .map(str::to_string)
        .collect())
}

pub async fn wait_in_node_status(
    client: &kube::Client,
    node: &str,
    image: &str,
) -> Result<Duration> {
    let nodes: Api<Node> = Api::all(client.clone());
    let start = Instant::now();
    support::wait_for(
        &format!("{image} in Node {node} status.images"),
        NODE_IMAGES_TIMEOUT,
        || {
            let nodes = nodes.clone();
            async move {
                let node = nodes.get(node).await?;
                let listed = node
                    .status
                    .and_then(|s| s.images)
                    .unwrap_or_default()
                    .iter()
                    .any(|i| i.names.iter().flatten().any(|n| n == image));
                Ok(listed.then_some(()))
            }
        },
    )
    .await?;
    Ok(start.elapsed())
}

static HELPER_IMAGE_REF: OnceCell<String> = OnceCell::const_new();

/// The pull pods' helper image, built from our own static no-op binary and
/// pushed to the plain registry (once per test run).
pub async fn helper_image(info: &RealInfo) -> Result<String> {
    HELPER_IMAGE_REF
        .get_or_try_init(|| async {
            let noop = env!("CARGO_BIN_EXE_kube-prefetch-noop");
            push_image(&[
                "--binary",
                noop,
                "--user",
                "65532",
                "kube-prefetch/noop:test",
            ])
            .await?;
            Ok::<_, anyhow::Error>(format!("{}/kube-prefetch/noop:test", info.registries.plain))
        })
        .await
        .cloned()
}

/// One kube-prefetch for sim-1 only, with the given pull method.
pub async fn orchestrator(test: &str, method: &str, info: &RealInfo) -> Result<Orchestrator> {
    orchestrator_with(test, method, info, Options::default()).await
}

pub async fn orchestrator_with(
    test: &str,
    method: &str,
    info: &RealInfo,
    options: Options,
) -> Result<Orchestrator> {
    let helper = helper_image(info).await?;
    let mut env = options.env.clone();
    env.push((
        "KUBE_PREFETCH__POLICY__PULL_METHOD".to_string(),
        method.to_string(),
    ));
    env.push(("KUBE_PREFETCH__POLICY__HELPER_IMAGE".to_string(), helper));
    let options = Options {
        kubeconfig_toml: Some(format!(
            "[[kubeconfig]]\npath = {:?}\ncontexts = [{:?}]\n",
            support::kubeconfig_path().display().to_string(),
            info.cluster
        )),
        env,
        ..options
    };
    Orchestrator::start(&format!("real-{test}-{method}"), options).await
}

/// The pull pods that ran on the real node, as last seen before deletion.
pub fn real_node_pods(log: &PodLog, namespace: &str, node: &str) -> Vec<Pod> {
    log.pods_in(namespace)
        .into_iter()
        .filter(|seen| seen.node == node)
        .map(|seen| seen.pod)
        .collect()
}

/// The `imageID` the kubelet reported for the pull container: proof it pulled.
pub fn pulled_image_id(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == "pull")
        .map(|c| c.image_id.clone())
        .filter(|id| !id.is_empty())
}

/// How the pull pod ended, for the log: phase and the pull container's state.
pub fn describe_end(pod: &Pod) -> String {
    let status = pod.status.clone().unwrap_or_default();
    let container = status
        .container_statuses
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.name == "pull");
    let state = container.and_then(|c| c.state).map(|s| {
        if let Some(t) = s.terminated {
            format!(
                "terminated {} exit {}",
                t.reason.unwrap_or_default(),
                t.exit_code
            )
        } else if let Some(w) = s.waiting {
            format!("waiting {}", w.reason.unwrap_or_default())
        } else if s.running.is_some() {
            "running".to_string()
        } else {
            "unknown".to_string()
        }
    });
    format!(
        "phase {} / pull container {}",
        status.phase.unwrap_or_default(),
        state.unwrap_or_else(|| "not reported".to_string())
    )
}
