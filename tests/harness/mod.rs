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
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Subject};
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
    /// More lines of the `[defaults]` table (e.g. `max_parallel_per_node = 5`).
    pub defaults_toml: String,
    /// Appended to the generated config file (e.g. a `[leader_election]` table).
    pub extra_toml: String,
    /// Extra environment variables of the process.
    pub env: Vec<(String, String)>,
    /// Starts as a leader-election standby: it serves `/healthz` but is
    /// not ready (`/readyz` 503) until it leads, so `start` waits for the
    /// former only.
    pub standby: bool,
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
            defaults_toml: String::new(),
            extra_toml: String::new(),
            env: Vec::new(),
            standby: false,
        }
    }
}

impl Options {
    /// These options with leader election on: the Lease `kube-prefetch` in
    /// `namespace` of the sim kubeconfig's current context (sim-1).
    pub fn with_leader_election(self, namespace: &str) -> Options {
        Options {
            extra_toml: format!(
                "[leader_election]\nenabled = true\nnamespace = \"{namespace}\"\nlease_name = \"kube-prefetch\"\n"
            ),
            env: vec![(
                "KUBECONFIG".to_string(),
                support::kubeconfig_path().display().to_string(),
            )],
            ..self
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

/// Runs `kube-prefetch <command> --config <config> <extra...>` without
/// colours or stdin: whether it exited 0, its stdout and its stderr.
pub async fn run_subcommand(
    command: &str,
    config: &Path,
    extra: &[&str],
) -> Result<(bool, String, String)> {
    let output = tokio::process::Command::new(binary())
        .arg(command)
        .arg("--config")
        .arg(config)
        .args(extra)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("running kube-prefetch {command}"))?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

impl Orchestrator {
    pub async fn start(test: &str, options: Options) -> Result<Orchestrator> {
        let standby = options.standby;
        let mut orchestrator = Orchestrator::prepare(test, options)?;
        orchestrator.spawn()?;
        // A standby is not ready (it waits for the lease), but it serves.
        if standby {
            orchestrator.wait_path("/healthz").await?;
        } else {
            orchestrator.wait_ready().await?;
        }
        Ok(orchestrator)
    }

    /// Writes the config of a process without starting it (`spawn` and
    /// `wait_ready` do that), so other commands can use the same config.
    pub fn prepare(test: &str, options: Options) -> Result<Orchestrator> {
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
{defaults}

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
            defaults = options.defaults_toml,
        );
        let config_path = dir.path().join("kube-prefetch.toml");
        std::fs::write(&config_path, config)?;
        let log_path = support::repo_root()
            .join("target/test-logs")
            .join(format!("{test}.log"));
        // One log per test name, fresh for each run; a restart within the
        // run (`spawn` again) appends.
        let _ = std::fs::remove_file(&log_path);
        Ok(Orchestrator {
            env: options.env.clone(),
            child: None,
            port,
            dir,
            config_path,
            log_path,
        })
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
        self.wait_path("/readyz").await
    }

    /// Waits until `path` answers 200.
    pub async fn wait_path(&self, path: &str) -> Result<()> {
        let url = format!("{}{path}", self.url());
        support::wait_for(
            &format!("kube-prefetch {path}"),
            Duration::from_secs(30),
            || {
                let url = url.clone();
                async move {
                    let ok =
                        tokio::task::spawn_blocking(move || ureq::get(&url).call().is_ok()).await?;
                    Ok(ok.then_some(()))
                }
            },
        )
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

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().context("not running")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "still running after {timeout:?}; log:\n{}",
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The status code and body of `GET path`, whatever the code.
    pub async fn get_any(&self, path: &str) -> Result<(u16, String)> {
        let url = format!("{}{path}", self.url());
        tokio::task::spawn_blocking(move || -> Result<(u16, String)> {
            let mut response = ureq::get(&url)
                .config()
                .http_status_as_error(false)
                .build()
                .call()?;
            let code = response.status().as_u16();
            Ok((code, response.body_mut().read_to_string()?))
        })
        .await?
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
    wait_status(
        client,
        namespace,
        name,
        &phase.to_string(),
        timeout,
        |status| status.phase == Some(phase),
    )
    .await
}

/// Waits until the Prefetch's status satisfies `done` (`what` names it in
/// the timeout error, which also shows the last status seen).
pub async fn wait_status(
    client: &Client,
    namespace: &str,
    name: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&PrefetchStatus) -> bool,
) -> Result<PrefetchStatus> {
    let deadline = Instant::now() + timeout;
    let mut last: Option<String>;
    loop {
        match prefetch_status(client, namespace, name).await {
            Ok(Some(status)) if done(&status) => return Ok(status),
            Ok(status) => last = status.map(|s| format!("{s:?}")),
            Err(error) => last = Some(format!("error: {error:#}")),
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {timeout:?} waiting for Prefetch {namespace}/{name} to be {what}; last status: {last:?}"
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
    /// Relays the port to the real API server from now on, until the
    /// returned [`Relay`] is closed or dropped.
    pub async fn open(&self) -> Result<Relay> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .with_context(|| format!("listening on 127.0.0.1:{}", self.port))?;
        let upstream = self.upstream.clone();
        let connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let accepted = connections.clone();
        let listener = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let connection = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut all = accepted.lock().unwrap_or_else(|e| e.into_inner());
                all.retain(|c| !c.is_finished());
                all.push(connection);
            }
        });
        Ok(Relay {
            listener,
            connections,
        })
    }
}

/// The TCP relay of an open [`ClosedPortCluster`].
pub struct Relay {
    listener: tokio::task::JoinHandle<()>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    /// Closes the port and cuts every connection through it: to a client
    /// the API server is gone, mid-request and mid-watch.
    pub fn close(&self) {
        self.listener.abort();
        for connection in self
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            connection.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.close();
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

/// The sum of the samples of metric `name` (in Prometheus text) whose
/// labels include `cluster="<cluster>"`.
pub fn metric_sum(metrics: &str, name: &str, cluster: &str) -> f64 {
    let label = format!("cluster=\"{cluster}\"");
    metrics
        .lines()
        .filter(|line| line.starts_with(name) && line.contains(&label))
        .filter_map(|line| line.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
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

/// A node that KWOK plays (it reports it Ready and runs its pods).
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

pub const RBAC_YAML: &str = "deploy/target/rbac.yaml";
/// Marks the RBAC objects this test creates, so a run that was killed
/// before its cleanup is swept up by the next one.
pub const TEST_LABEL: &str = "kube-prefetch.test/rbac";
/// The one ClusterRole and the one ClusterRoleBinding of the shipped file.
pub fn shipped_rbac() -> Result<(ClusterRole, ClusterRoleBinding)> {
    let path = support::repo_root().join(RBAC_YAML);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let documents: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(&text).with_context(|| format!("parsing {RBAC_YAML}"))?;
    let mut roles = Vec::new();
    let mut bindings = Vec::new();
    for document in documents.into_iter().filter(|d| !d.is_null()) {
        match document["kind"].as_str() {
            Some("ClusterRole") => roles.push(serde_json::from_value::<ClusterRole>(document)?),
            Some("ClusterRoleBinding") => {
                bindings.push(serde_json::from_value::<ClusterRoleBinding>(document)?)
            }
            other => bail!("{RBAC_YAML}: unexpected document of kind {other:?}"),
        }
    }
    let ([role], [binding]) = (roles.as_slice(), bindings.as_slice()) else {
        bail!(
            "{RBAC_YAML} should hold one ClusterRole and one ClusterRoleBinding, not {} and {}",
            roles.len(),
            bindings.len()
        );
    };
    anyhow::ensure!(
        binding.role_ref.kind == "ClusterRole" && binding.role_ref.name == role.name_any(),
        "{RBAC_YAML}: the binding refers to {} {}, not to the ClusterRole {} of the file",
        binding.role_ref.kind,
        binding.role_ref.name,
        role.name_any()
    );
    anyhow::ensure!(
        !role.rules.clone().unwrap_or_default().is_empty(),
        "{RBAC_YAML}: the ClusterRole has no rules"
    );
    Ok((role.clone(), binding.clone()))
}

/// The shipped objects under a unique name, bound to the user `operator`;
/// the rules are left exactly as shipped.
pub fn granted_to_operator(
    (mut role, mut binding): (ClusterRole, ClusterRoleBinding),
    name: &str,
) -> (ClusterRole, ClusterRoleBinding) {
    for metadata in [&mut role.metadata, &mut binding.metadata] {
        metadata.name = Some(name.to_string());
        metadata
            .labels
            .get_or_insert_default()
            .insert(TEST_LABEL.to_string(), "true".to_string());
    }
    binding.role_ref.name = name.to_string();
    binding.subjects = Some(vec![Subject {
        api_group: Some("rbac.authorization.k8s.io".into()),
        kind: "User".into(),
        name: "operator".into(),
        namespace: None,
    }]);
    (role, binding)
}

/// Deletes the test's RBAC objects (all of them, or those of one run) and
/// waits until they are gone.
pub async fn delete_rbac(client: &Client, name: Option<&str>) -> Result<()> {
    let roles: Api<ClusterRole> = Api::all(client.clone());
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    let mut params = ListParams::default().labels(&format!("{TEST_LABEL}=true"));
    if let Some(name) = name {
        params = params.fields(&format!("metadata.name={name}"));
    }
    bindings
        .delete_collection(&DeleteParams::default(), &params)
        .await
        .context("deleting ClusterRoleBindings")?;
    roles
        .delete_collection(&DeleteParams::default(), &params)
        .await
        .context("deleting ClusterRoles")?;
    let (roles, bindings, params) = (&roles, &bindings, &params);
    support::wait_for(
        "the test's ClusterRole(s) and ClusterRoleBinding(s) to be gone",
        support::DEFAULT_TIMEOUT,
        move || async move {
            let left: Vec<String> = bindings
                .list(params)
                .await?
                .iter()
                .map(|b| format!("ClusterRoleBinding {}", b.name_any()))
                .chain(
                    roles
                        .list(params)
                        .await?
                        .iter()
                        .map(|r| format!("ClusterRole {}", r.name_any())),
                )
                .collect();
            if left.is_empty() {
                Ok(Some(()))
            } else {
                bail!("still there: {left:?}")
            }
        },
    )
    .await
}

/// Runs `clusters/sim/daemon CLUSTER COMPONENT ACTION`.
pub fn sim_daemon(cluster: &str, component: &str, action: &str) -> Result<()> {
    let script = support::repo_root().join("clusters/sim/daemon");
    let output = std::process::Command::new(&script)
        .args([cluster, component, action])
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "clusters/sim/daemon {cluster} {component} {action}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// A killed sim daemon, started again by [`KilledDaemon::start`] or, if the
/// test fails first, on drop: later tests need the cluster.
pub struct KilledDaemon {
    cluster: String,
    component: &'static str,
    running: bool,
}

impl KilledDaemon {
    pub fn kill(cluster: &str, component: &'static str) -> Result<KilledDaemon> {
        sim_daemon(cluster, component, "kill")?;
        Ok(KilledDaemon {
            cluster: cluster.to_string(),
            component,
            running: false,
        })
    }

    pub fn start(&mut self) -> Result<()> {
        sim_daemon(&self.cluster, self.component, "start")?;
        self.running = true;
        Ok(())
    }
}

impl Drop for KilledDaemon {
    fn drop(&mut self) {
        if !self.running
            && let Err(error) = sim_daemon(&self.cluster, self.component, "start")
        {
            eprintln!(
                "starting {} of {} again: {error:#}",
                self.component, self.cluster
            );
        }
    }
}
