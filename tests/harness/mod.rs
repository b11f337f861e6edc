//! Runs the real `kube-prefetch` binary against the sim clusters and watches
//! what it does: the pull pods it creates and deletes, the status it writes
//! and serves. Used by the orchestrator tests.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, CustomResourceExt, ResourceExt};
use kube_prefetch::actors::status::{ClusterHealth, StatusView};
use kube_prefetch::api::{Phase, Prefetch, PrefetchStatus};
use tokio::sync::{Mutex as AsyncMutex, MutexGuard, OnceCell};

use crate::support;

pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by=kube-prefetch";
pub const NODE_ANNOTATION: &str = "cache.techsquad.rocks/node";
pub const IMAGE_ANNOTATION: &str = "cache.techsquad.rocks/image";
pub const HELPER_IMAGE: &str = "ghcr.io/kube-prefetch/kube-prefetch-noop:test";

/// Every orchestrator test runs its own kube-prefetch, which sees every
/// Prefetch of every cluster: two at once would fight. One at a time.
static SERIAL: AsyncMutex<()> = AsyncMutex::const_new(());

static CRD_INSTALLED: OnceCell<()> = OnceCell::const_new();

/// Takes the per-binary lock and makes sure the sim clusters run and have
/// the CRD installed.
pub async fn setup() -> MutexGuard<'static, ()> {
    let guard = SERIAL.lock().await;
    support::sim().await;
    CRD_INSTALLED
        .get_or_init(|| async {
            for cluster in support::cluster_names() {
                install_crd(&support::client(&cluster).await)
                    .await
                    .unwrap_or_else(|error| panic!("installing the CRD in {cluster}: {error:#}"));
            }
        })
        .await;
    guard
}

pub async fn install_crd(client: &Client) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = Prefetch::crd();
    let name = crd.name_any();
    crds.patch(
        &name,
        &PatchParams::apply("kube-prefetch-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .context("applying the Prefetch CRD")?;
    support::wait_crd_established(client, &name).await
}

/// Options of one orchestrator run; the defaults make failures fast.
#[derive(Clone, Debug)]
pub struct Options {
    pub cross_namespace: bool,
    /// `[[kubeconfig]]` tables to use instead of "the sim kubeconfig, all contexts".
    pub kubeconfig_toml: Option<String>,
    pub backoff_initial: &'static str,
    pub backoff_max: &'static str,
    pub backoff_multiplier: f32,
    pub max_attempts: u32,
    pub status_debounce: &'static str,
    /// Appended to the generated config file (e.g. a `[leader_election]` table).
    pub extra_toml: String,
    /// Extra environment variables of the process.
    pub env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            cross_namespace: false,
            kubeconfig_toml: None,
            backoff_initial: "1s",
            backoff_max: "10s",
            backoff_multiplier: 4.0,
            max_attempts: 3,
            status_debounce: "200ms",
            extra_toml: String::new(),
            env: Vec::new(),
        }
    }
}

/// A running `kube-prefetch run` process.
pub struct Orchestrator {
    child: Option<std::process::Child>,
    env: Vec<(String, String)>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kube-prefetch"))
}

pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

impl Orchestrator {
    pub async fn start(test: &str, options: Options) -> Result<Orchestrator> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("kube-prefetch-{test}-"))
            .tempdir()?;
        let port = free_port()?;
        let kubeconfig = options.kubeconfig_toml.clone().unwrap_or_else(|| {
            format!(
                "[[kubeconfig]]\npath = {:?}\n",
                support::kubeconfig_path().display().to_string()
            )
        });
        let config = format!(
            r#"[server]
listen = "127.0.0.1:{port}"

[defaults]
status_debounce = "{debounce}"

[backoff]
initial = "{initial}"
max = "{max}"
multiplier = {multiplier:.1}
max_attempts = {attempts}

[policy]
cross_namespace = {cross}
# The fake-node tests check the helper method's pod shape; tests/real_nodes.rs
# runs both methods on a real kubelet.
pull_method = "helper"
helper_image = "{HELPER_IMAGE}"

{kubeconfig}
{extra}"#,
            initial = options.backoff_initial,
            max = options.backoff_max,
            multiplier = options.backoff_multiplier,
            attempts = options.max_attempts,
            cross = options.cross_namespace,
            extra = options.extra_toml,
            debounce = options.status_debounce,
        );
        let config_path = dir.path().join("kube-prefetch.toml");
        std::fs::write(&config_path, config)?;
        let log_path = support::repo_root()
            .join("target/test-logs")
            .join(format!("{test}.log"));
        // One log per test name, fresh for each run; a restart within the
        // run (`spawn` again) appends.
        let _ = std::fs::remove_file(&log_path);
        let mut orchestrator = Orchestrator {
            env: options.env.clone(),
            child: None,
            port,
            dir,
            config_path,
            log_path,
        };
        orchestrator.spawn()?;
        orchestrator.wait_ready().await?;
        Ok(orchestrator)
    }

    /// Starts the process (again, after `kill`), appending to the same log.
    pub fn spawn(&mut self) -> Result<()> {
        if let Some(parent) = self.log_path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        let child = std::process::Command::new(binary())
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "info,kube_prefetch=debug")
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting kube-prefetch")?;
        self.child = Some(child);
        Ok(())
    }

    pub async fn wait_ready(&self) -> Result<()> {
        let url = format!("{}/readyz", self.url());
        support::wait_for("kube-prefetch /readyz", Duration::from_secs(30), || {
            let url = url.clone();
            async move {
                let ok =
                    tokio::task::spawn_blocking(move || ureq::get(&url).call().is_ok()).await?;
                Ok(ok.then_some(()))
            }
        })
        .await
        .with_context(|| format!("log:\n{}", self.log_tail(40)))
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Sends a Unix signal (e.g. "HUP") to the running process.
    pub fn signal(&self, name: &str) -> Result<()> {
        let pid = self.child.as_ref().context("not running")?.id();
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()?;
        ensure(status.success(), || format!("kill -{name} {pid} failed"))
    }

    /// SIGKILL: no chance to clean anything up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn status(&self) -> Result<StatusView> {
        let url = format!("{}/api/v1/status", self.url());
        let body = tokio::task::spawn_blocking(move || -> Result<String> {
            let mut response = ureq::get(&url).call()?;
            Ok(response.body_mut().read_to_string()?)
        })
        .await??;
        serde_json::from_str(&body).context("parsing /api/v1/status")
    }

    pub async fn get(&self, path: &str) -> Result<String> {
        let url = format!("{}{path}", self.url());
        tokio::task::spawn_blocking(move || -> Result<String> {
            let mut response = ureq::get(&url).call()?;
            Ok(response.body_mut().read_to_string()?)
        })
        .await?
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Orchestrator {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- kube-prefetch log ({}) ---\n{}",
                self.log_path.display(),
                self.log_tail(80)
            );
        }
        self.kill();
    }
}

/// One observed pull pod.
#[derive(Clone, Debug)]
pub struct SeenPod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub node: String,
    pub image: String,
    pub first_seen: Instant,
    pub deleted: bool,
    pub pod: Pod,
}

/// Records every pull pod of one cluster as the API server reports it.
pub struct PodLog {
    seen: Arc<Mutex<BTreeMap<String, SeenPod>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PodLog {
    pub async fn start(client: Client) -> Result<PodLog> {
        let seen: Arc<Mutex<BTreeMap<String, SeenPod>>> = Arc::default();
        let api: Api<Pod> = Api::all(client);
        let ready = Arc::new(tokio::sync::Notify::new());
        let task = {
            let seen = seen.clone();
            let ready = ready.clone();
            tokio::spawn(async move {
                let mut stream = watcher(api, watcher::Config::default().labels(MANAGED_BY))
                    .default_backoff()
                    .boxed();
                while let Some(event) = stream.next().await {
                    let Ok(event) = event else { continue };
                    let (pod, deleted) = match event {
                        watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => (pod, false),
                        watcher::Event::Delete(pod) => (pod, true),
                        watcher::Event::InitDone => {
                            ready.notify_one();
                            continue;
                        }
                        watcher::Event::Init => continue,
                    };
                    let uid = pod.uid().unwrap_or_default();
                    let annotations = pod.annotations();
                    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                    let entry = seen.entry(uid.clone()).or_insert_with(|| SeenPod {
                        name: pod.name_any(),
                        namespace: pod.namespace().unwrap_or_default(),
                        uid,
                        node: annotations
                            .get(NODE_ANNOTATION)
                            .cloned()
                            .unwrap_or_default(),
                        image: annotations
                            .get(IMAGE_ANNOTATION)
                            .cloned()
                            .unwrap_or_default(),
                        first_seen: Instant::now(),
                        deleted: false,
                        pod: pod.clone(),
                    });
                    entry.deleted |= deleted;
                    if !deleted {
                        entry.pod = pod;
                    }
                }
            })
        };
        tokio::time::timeout(Duration::from_secs(30), ready.notified())
            .await
            .map_err(|_| anyhow!("pod watch did not sync within 30 s"))?;
        Ok(PodLog { seen, task })
    }

    /// Every pod seen so far (one entry per pod UID).
    pub fn pods(&self) -> Vec<SeenPod> {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn pods_in(&self, namespace: &str) -> Vec<SeenPod> {
        self.pods()
            .into_iter()
            .filter(|p| p.namespace == namespace)
            .collect()
    }

    /// The (node, image) pairs pulled in a namespace.
    pub fn pairs_in(&self, namespace: &str) -> BTreeSet<(String, String)> {
        self.pods_in(namespace)
            .into_iter()
            .map(|p| (p.node, p.image))
            .collect()
    }
}

impl Drop for PodLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn prefetch_status(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<PrefetchStatus>> {
    let api: Api<Prefetch> = Api::namespaced(client.clone(), namespace);
    Ok(api.get(name).await?.status)
}

/// Waits until the Prefetch's status has `phase`, returning that status.
pub async fn wait_phase(
    client: &Client,
    namespace: &str,
    name: &str,
    phase: Phase,
    timeout: Duration,
) -> Result<PrefetchStatus> {
    let deadline = Instant::now() + timeout;
    let mut last: Option<String>;
    loop {
        match prefetch_status(client, namespace, name).await {
            Ok(Some(status)) if status.phase == Some(phase) => return Ok(status),
            Ok(status) => last = status.map(|s| format!("{s:?}")),
            Err(error) => last = Some(format!("error: {error:#}")),
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {timeout:?} waiting for Prefetch {namespace}/{name} to be {phase}; last status: {last:?}"
            );
        }
        tokio::time::sleep(support::POLL_INTERVAL).await;
    }
}

/// Waits until no pull pod is left in `namespace`.
pub async fn wait_no_pull_pods(client: &Client, namespace: &str, timeout: Duration) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    support::wait_for(&format!("no pull pod left in {namespace}"), timeout, || {
        let api = api.clone();
        async move {
            let pods = api.list(&ListParams::default().labels(MANAGED_BY)).await?;
            if pods.items.is_empty() {
                Ok(Some(()))
            } else {
                let names: Vec<String> = pods.items.iter().map(|p| p.name_any()).collect();
                Err(anyhow!("still there: {names:?}"))
            }
        }
    })
    .await
}

/// Applies a YAML or JSON manifest with the sim's kubectl.
pub async fn kubectl_apply(
    context: &str,
    namespace: Option<&str>,
    manifest: &Path,
) -> Result<String> {
    let manifest = manifest.display().to_string();
    let mut args = vec!["--context", context, "apply", "-f", manifest.as_str()];
    if let Some(namespace) = namespace {
        args.extend(["--namespace", namespace]);
    }
    support::kubectl(&args).await
}

/// A kubeconfig whose only context, `context`, reaches `cluster` through a
/// port that nothing listens on, until [`ClosedPortCluster::open`] starts a
/// TCP relay there: a cluster that is unreachable, then comes back.
pub struct ClosedPortCluster {
    pub path: PathBuf,
    pub port: u16,
    upstream: String,
}

pub fn closed_port_kubeconfig(
    dir: &Path,
    cluster: &str,
    context: &str,
) -> Result<ClosedPortCluster> {
    let mut kubeconfig = kube::config::Kubeconfig::read_from(support::kubeconfig_path())?;
    let named_context = kubeconfig
        .contexts
        .iter()
        .find(|c| c.name == cluster)
        .cloned()
        .context("sim context")?;
    let cluster_name = named_context
        .context
        .as_ref()
        .map(|c| c.cluster.clone())
        .context("context cluster")?;
    let port = free_port()?;
    let mut upstream = String::new();
    for named in &mut kubeconfig.clusters {
        if named.name == cluster_name
            && let Some(entry) = named.cluster.as_mut()
        {
            let server = entry.server.clone().context("server")?;
            upstream = server.trim_start_matches("https://").to_string();
            entry.server = Some(format!("https://127.0.0.1:{port}"));
        }
    }
    kubeconfig.contexts = vec![kube::config::NamedContext {
        name: context.into(),
        ..named_context
    }];
    kubeconfig.current_context = Some(context.into());
    let path = dir.join(format!("{context}.kubeconfig"));
    // JSON is valid YAML.
    std::fs::write(&path, serde_json::to_string_pretty(&kubeconfig)?)?;
    Ok(ClosedPortCluster {
        path,
        port,
        upstream,
    })
}

impl ClosedPortCluster {
    /// Relays the port to the real API server from now on.
    pub async fn open(&self) -> Result<tokio::task::JoinHandle<()>> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await?;
        let upstream = self.upstream.clone();
        Ok(tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }))
    }
}

/// A `Prefetch` named `name` with `spec`, as JSON for [`apply`].
pub fn prefetch_json(name: &str, spec: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "cache.techsquad.rocks/v1",
        "kind": "Prefetch",
        "metadata": { "name": name },
        "spec": spec,
    })
}

/// Creates or replaces an object from JSON, by server-side apply.
pub async fn apply<K>(api: &Api<K>, object: serde_json::Value) -> Result<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let name = object["metadata"]["name"]
        .as_str()
        .ok_or_else(|| anyhow!("object without a name: {object}"))?
        .to_string();
    api.patch(
        &name,
        &PatchParams::apply("kube-prefetch-tests").force(),
        &Patch::Apply(&object),
    )
    .await
    .with_context(|| format!("applying {name}"))
}

/// Status view helpers.
pub fn cluster_state(view: &StatusView, cluster: &str) -> Option<String> {
    view.clusters
        .iter()
        .find(|c| c.name == cluster)
        .map(|c| c.health.label().to_string())
}

pub fn is_connected(view: &StatusView, cluster: &str) -> bool {
    view.clusters
        .iter()
        .any(|c| c.name == cluster && matches!(c.health, ClusterHealth::Connected { .. }))
}

/// The worker node names of a sim cluster (as `clusters/sim/up` creates them).
pub fn workers(cluster: &str) -> Vec<String> {
    let nodes = support::node_count();
    (1..nodes)
        .map(|i| {
            if i == 1 {
                format!("{cluster}-worker")
            } else {
                format!("{cluster}-worker{i}")
            }
        })
        .collect()
}

/// Lines of a log file that contain `needle`.
pub fn log_lines_with(path: &Path, needle: &str) -> Vec<String> {
    match std::fs::File::open(path) {
        Ok(file) => BufReader::new(file)
            .lines()
            .map_while(|l| l.ok())
            .filter(|l| l.contains(needle))
            .collect(),
        Err(_) => Vec::new(),
    }
}

pub fn ensure(condition: bool, message: impl FnOnce() -> String) -> Result<()> {
    if condition { Ok(()) } else { bail!(message()) }
}

// Fake nodes of a test's own, beside the sim's shared ones.

/// Waits until KWOK reports every named node Ready; returns when it saw that.
pub async fn wait_nodes_ready(nodes: &Api<Node>, names: Vec<String>) -> Result<Instant> {
    support::wait_for("test nodes Ready", Duration::from_secs(30), || {
        let nodes = nodes.clone();
        let names = names.clone();
        async move {
            for name in names {
                let ready = nodes
                    .get(&name)
                    .await?
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                if !ready {
                    return Ok(None);
                }
            }
            Ok(Some(Instant::now()))
        }
    })
    .await
}

/// Deletes test nodes at the end of the test, or when it fails.
pub fn delete_nodes_later(cluster: &str, names: Vec<String>) -> support::Cleanup {
    support::Cleanup::new(
        cluster,
        format!("nodes {names:?}"),
        move |client| async move {
            let nodes: Api<Node> = Api::all(client);
            for name in names {
                let _ = nodes.delete(&name, &DeleteParams::default()).await;
            }
            Ok(())
        },
    )
}

pub fn fake_node(name: &str, arch: &str, extra_spec: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": { "kwok.x-k8s.io/node": "fake" },
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": arch,
                "type": "kwok",
            },
        },
        "spec": extra_spec,
    })
}
