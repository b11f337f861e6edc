//! Test support for integration tests against the simulated clusters of
//! `clusters/sim` (real kube-apiservers with fake nodes, see the README).
//!
//! ```ignore
//! mod support;
//!
//! #[tokio::test]
//! async fn something() {
//!     for cluster in support::cluster_names() {
//!         let ns = support::TestNamespace::create(&cluster, "something").await.expect("namespace");
//!         let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = ns.api();
//!         // ...
//!         ns.cleanup().await.expect("cleanup");
//!     }
//! }
//! ```
//!
//! [`sim`] starts the clusters with `clusters/sim/up` when they do not run
//! (the script holds a file lock, so parallel test binaries do not race, and
//! is a no-op when they run). Everything that talks to a cluster comes in two
//! forms: `try_*` returns the error, the plain form panics with the whole
//! error chain, for tests where a failure to reach the cluster is a failure.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::{Discovery, Scope, verbs};
use kube::{Client, Config, ResourceExt};
use tokio::sync::OnceCell;

/// Clusters and fake nodes per cluster that [`sim`] asks `up` for, unless
/// `SIM_CLUSTERS` / `SIM_NODES` say otherwise (the Makefile exports both).
pub const DEFAULT_CLUSTERS: usize = 3;
pub const DEFAULT_NODES: usize = 4;
/// The Kubernetes version the sim apiservers report.
pub const K8S_VERSION: &str = "v1.36.3";
/// Polling defaults for [`wait_for`]: generous, as CI machines are small.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Running simulated clusters.
#[derive(Debug, Clone)]
pub struct Sim {
    /// `clusters/sim/run`: per-cluster state, logs and kubeconfigs.
    pub run_dir: PathBuf,
    /// Admin kubeconfig with one context per cluster, named like the cluster.
    pub kubeconfig: PathBuf,
    /// Cluster (= context) names, in index order: `sim-1`, `sim-2`, ...
    pub clusters: Vec<String>,
}

impl Sim {
    /// Kubeconfig of the unprivileged `operator` user of one cluster; its
    /// context is `<cluster>-operator`.
    pub fn operator_kubeconfig(&self, cluster: &str) -> PathBuf {
        self.run_dir.join(cluster).join("operator.kubeconfig")
    }

    /// Directory with the logs of one cluster's etcd, kube-apiserver and kwok.
    pub fn log_dir(&self, cluster: &str) -> PathBuf {
        self.run_dir.join(cluster)
    }
}

/// Root of the work tree (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `clusters/sim/run`, or `$KUBE_PREFETCH_SIM_RUN` as the scripts honour it.
pub fn run_dir() -> PathBuf {
    match std::env::var_os("KUBE_PREFETCH_SIM_RUN") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => repo_root().join("clusters/sim/run"),
    }
}

/// Path of the admin kubeconfig (it exists only while clusters run).
pub fn kubeconfig_path() -> PathBuf {
    run_dir().join("kubeconfig")
}

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

/// Number of fake nodes each cluster is started with (`SIM_NODES`, default 4).
pub fn node_count() -> usize {
    env_count("SIM_NODES", DEFAULT_NODES)
}

/// Names of the simulated clusters, which are also their context names in
/// the admin kubeconfig. While clusters run this reads the kubeconfig; before
/// that it is what [`sim`] will start (`SIM_CLUSTERS`, default 3).
pub fn cluster_names() -> Vec<String> {
    if let Ok(names) = clusters_in_kubeconfig(&kubeconfig_path())
        && !names.is_empty()
    {
        return names;
    }
    (1..=env_count("SIM_CLUSTERS", DEFAULT_CLUSTERS))
        .map(|i| format!("sim-{i}"))
        .collect()
}

fn clusters_in_kubeconfig(path: &Path) -> Result<Vec<String>> {
    let config = Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    let mut indexed: Vec<(u32, String)> = config
        .contexts
        .into_iter()
        .filter_map(|c| {
            let index = c.name.strip_prefix("sim-")?.parse().ok()?;
            Some((index, c.name))
        })
        .collect();
    indexed.sort();
    Ok(indexed.into_iter().map(|(_, name)| name).collect())
}

static SIM: OnceCell<std::result::Result<Sim, String>> = OnceCell::const_new();

/// The running simulated clusters; starts them (once per test binary) with
/// `clusters/sim/up` if needed. Panics with the script's output if that fails.
pub async fn sim() -> Sim {
    match try_sim().await {
        Ok(sim) => sim,
        Err(err) => panic!("simulated clusters are not available: {err:#}"),
    }
}

/// [`sim`], returning the error instead of panicking.
pub async fn try_sim() -> Result<Sim> {
    SIM.get_or_init(|| async { start_sim().await.map_err(|e| format!("{e:#}")) })
        .await
        .clone()
        .map_err(|e| anyhow!(e))
}

async fn start_sim() -> Result<Sim> {
    let script = repo_root().join("clusters/sim/up");
    let clusters = env_count("SIM_CLUSTERS", DEFAULT_CLUSTERS);
    let nodes = node_count();
    // `up` keeps clusters that already run, so this is quick when they do;
    // it also creates any missing node. Its own lock serializes callers.
    let output = tokio::process::Command::new(&script)
        .arg("--clusters")
        .arg(clusters.to_string())
        .arg("--nodes")
        .arg(nodes.to_string())
        .current_dir(repo_root())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "{} --clusters {clusters} --nodes {nodes} failed ({}):\n{}{}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let kubeconfig = kubeconfig_path();
    let names = clusters_in_kubeconfig(&kubeconfig)?;
    if names.len() < clusters {
        bail!(
            "{} has contexts {names:?}, expected at least {clusters} clusters",
            kubeconfig.display()
        );
    }
    Ok(Sim {
        run_dir: run_dir(),
        kubeconfig,
        clusters: names,
    })
}

/// Builds a client for one context of a kubeconfig file.
pub async fn client_from(kubeconfig: &Path, context: &str) -> Result<Client> {
    let file = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading kubeconfig {}", kubeconfig.display()))?;
    let options = KubeConfigOptions {
        context: Some(context.to_string()),
        ..Default::default()
    };
    let config = Config::from_custom_kubeconfig(file, &options)
        .await
        .with_context(|| format!("context {context} of {}", kubeconfig.display()))?;
    Client::try_from(config).with_context(|| format!("client for context {context}"))
}

/// Admin client (group system:masters) for a context of the sim kubeconfig,
/// e.g. `"sim-1"`. Starts the clusters if needed.
pub async fn try_client(context: &str) -> Result<Client> {
    let sim = try_sim().await?;
    client_from(&sim.kubeconfig, context).await
}

/// [`try_client`], panicking on error.
pub async fn client(context: &str) -> Client {
    match try_client(context).await {
        Ok(client) => client,
        Err(err) => panic!("admin client for {context}: {err:#}"),
    }
}

/// Client of the user `operator` of one cluster, e.g. `"sim-2"`. The user is
/// only in `system:authenticated`: it may do nothing until RBAC grants it.
pub async fn try_operator_client(cluster: &str) -> Result<Client> {
    let sim = try_sim().await?;
    client_from(
        &sim.operator_kubeconfig(cluster),
        &format!("{cluster}-operator"),
    )
    .await
}

/// [`try_operator_client`], panicking on error.
pub async fn operator_client(cluster: &str) -> Client {
    match try_operator_client(cluster).await {
        Ok(client) => client,
        Err(err) => panic!("operator client for {cluster}: {err:#}"),
    }
}

/// Runs `clusters/sim/kubectl` (the sim's own kubectl build, on the sim
/// kubeconfig) and returns its stdout; an error carries its stderr.
pub async fn kubectl(args: &[&str]) -> Result<String> {
    try_sim().await?;
    let script = repo_root().join("clusters/sim/kubectl");
    let output = tokio::process::Command::new(&script)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "kubectl {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8(output.stdout).context("kubectl printed non-UTF-8")
}

/// A name that is unique across test processes and runs: `<prefix>-<6 hex>`,
/// cut to a valid DNS label.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded randomly per process; mixing in time, pid and a
    // counter makes names differ across processes and within one.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    if let Ok(since_epoch) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        hasher.write_u128(since_epoch.as_nanos());
    }
    let suffix = format!("{:06x}", hasher.finish() & 0xff_ffff);
    let mut base: String = prefix
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    base.truncate(63 - suffix.len() - 1);
    let base = base.trim_matches('-');
    if base.is_empty() {
        format!("t-{suffix}")
    } else {
        format!("{base}-{suffix}")
    }
}

/// Polls `check` every [`POLL_INTERVAL`] until it returns `Some`, failing
/// after `timeout` with `what` and the last error `check` returned.
///
/// `check` returns a new future per poll, so that future cannot hold a
/// `&mut` to the caller's state; to keep state between polls, share it, e.g.
/// `let last = std::sync::Mutex::new(None); let last = &last;` and
/// `move || async move { *last.lock().unwrap() = ...; ... }`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(err) => last_error = Some(err),
        }
        if Instant::now() >= deadline {
            return Err(match last_error {
                Some(err) => err.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

type CleanupFn = Box<dyn FnOnce(Client) -> Pin<Box<dyn Future<Output = Result<()>> + Send>> + Send>;

/// Runs a cleanup action against one cluster either when [`Cleanup::run`] is
/// awaited or, if the test never got there (a failed assertion), when it is
/// dropped. On drop the action runs on a fresh runtime in its own thread with
/// a fresh client: the test's runtime may be a single thread that is busy
/// dropping us, so nothing that needs it can be awaited there.
pub struct Cleanup {
    what: String,
    kubeconfig: PathBuf,
    context: String,
    action: Option<CleanupFn>,
}

impl Cleanup {
    /// `action` gets an admin client of `context` (sim kubeconfig).
    pub fn new<F, Fut>(context: &str, what: impl Into<String>, action: F) -> Self
    where
        F: FnOnce(Client) -> Fut + Send + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        Self {
            what: what.into(),
            kubeconfig: kubeconfig_path(),
            context: context.to_string(),
            action: Some(Box::new(move |client| Box::pin(action(client)))),
        }
    }

    /// Runs the action now.
    pub async fn run(mut self) -> Result<()> {
        let Some(action) = self.action.take() else {
            return Ok(());
        };
        let client = client_from(&self.kubeconfig, &self.context).await?;
        action(client)
            .await
            .with_context(|| format!("cleanup of {} in {}", self.what, self.context))
    }

    /// Forgets the action: nothing is cleaned up.
    pub fn disarm(mut self) {
        self.action = None;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Some(action) = self.action.take() else {
            return;
        };
        let kubeconfig = self.kubeconfig.clone();
        let context = self.context.clone();
        let what = self.what.clone();
        let outcome = std::thread::spawn(move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("runtime for cleanup")?;
            runtime.block_on(async move {
                let client = client_from(&kubeconfig, &context).await?;
                tokio::time::timeout(DEFAULT_TIMEOUT, action(client))
                    .await
                    .map_err(|_| anyhow!("timed out after {DEFAULT_TIMEOUT:?}"))?
            })
        })
        .join();
        // Never panic here: drop may run while a failed test unwinds.
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("cleanup of {what} in {}: {err:#}", self.context),
            Err(_) => eprintln!("cleanup of {what} in {}: panicked", self.context),
        }
    }
}

/// A namespace `t-<test name>-<random>` on one cluster, removed with all its
/// contents by [`TestNamespace::cleanup`] or on drop.
pub struct TestNamespace {
    name: String,
    context: String,
    client: Client,
    cleanup: Option<Cleanup>,
}

impl TestNamespace {
    /// Creates the namespace on cluster (context) `context`.
    pub async fn create(context: &str, test_name: &str) -> Result<Self> {
        let client = try_client(context).await?;
        let name = unique_name(&format!("t-{test_name}"));
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": name,
                "labels": { "kube-prefetch.test/sim": "true" }
            }
        }))?;
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .with_context(|| format!("creating namespace {name} in {context}"))?;
        let cleanup = {
            let name = name.clone();
            Cleanup::new(
                context,
                format!("namespace {name}"),
                move |client| async move { delete_namespace(&client, &name).await },
            )
        };
        Ok(Self {
            name,
            context: context.to_string(),
            client,
            cleanup: Some(cleanup),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cluster (context) the namespace lives in.
    pub fn context(&self) -> &str {
        &self.context
    }

    /// Admin client of the namespace's cluster.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// `Api` of a namespaced kind in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Deletes the namespace and everything in it, and waits until it is gone.
    pub async fn cleanup(mut self) -> Result<()> {
        match self.cleanup.take() {
            Some(cleanup) => cleanup.run().await,
            None => Ok(()),
        }
    }
}

/// Deletes a namespace the way the namespace controller would, which the sim
/// clusters do not run (no kube-controller-manager): mark it Terminating,
/// delete every namespaced object in it (pods at once, with grace period 0;
/// finalizers of leftovers dropped, as nothing else would remove them), then
/// clear the namespace's own finalizer and wait until it is gone. Without
/// this, objects of a deleted namespace would linger and show up in
/// all-namespace lists of later tests.
pub async fn delete_namespace(client: &Client, name: &str) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    match namespaces.delete(name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.is_not_found() => return Ok(()),
        Err(err) => return Err(err).with_context(|| format!("deleting namespace {name}")),
    }

    let discovery = Discovery::new(client.clone())
        .run_aggregated()
        .await
        .context("API discovery")?;
    let mut resources = Vec::new();
    for group in discovery.groups() {
        for (resource, caps) in group.recommended_resources() {
            if caps.scope == Scope::Namespaced
                && caps.supports_operation(verbs::DELETE_COLLECTION)
                && caps.supports_operation(verbs::LIST)
            {
                resources.push(resource);
            }
        }
    }

    let immediately = DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    for resource in &resources {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), name, resource);
        if let Err(err) = api
            .delete_collection(&immediately, &ListParams::default())
            .await
        {
            // A resource may vanish (CRD deleted meanwhile) or refuse.
            if !matches!(&err, kube::Error::Api(s) if s.is_not_found() || s.code == 405) {
                return Err(err).with_context(|| format!("deleting {} in {name}", resource.plural));
            }
        }
    }

    let resources = &resources;
    wait_for(
        &format!("the objects in namespace {name} to be deleted"),
        DEFAULT_TIMEOUT,
        move || async move {
            let mut left = Vec::new();
            for resource in resources {
                let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), name, resource);
                let list = match api.list(&ListParams::default()).await {
                    Ok(list) => list,
                    Err(kube::Error::Api(s)) if s.is_not_found() => continue,
                    Err(err) => return Err(err.into()),
                };
                for object in list {
                    let object_name = object.name_any();
                    if !object.finalizers().is_empty() {
                        let drop_finalizers = serde_json::json!({"metadata": {"finalizers": null}});
                        api.patch(
                            &object_name,
                            &PatchParams::default(),
                            &Patch::Merge(&drop_finalizers),
                        )
                        .await
                        .ok();
                    }
                    left.push(format!("{}/{object_name}", resource.plural));
                }
            }
            Ok(left.is_empty().then_some(()))
        },
    )
    .await?;

    // The namespace's own finalizer ("kubernetes") is what the namespace
    // controller removes last, through the finalize subresource.
    match namespaces.get(name).await {
        Ok(mut namespace) => {
            if let Some(spec) = namespace.spec.as_mut() {
                spec.finalizers = Some(Vec::new());
            }
            match namespaces
                .replace_subresource("finalize", name, &PostParams::default(), &namespace)
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(err) => {
                    return Err(err).with_context(|| format!("finalizing namespace {name}"));
                }
            }
        }
        Err(kube::Error::Api(s)) if s.is_not_found() => return Ok(()),
        Err(err) => return Err(err).with_context(|| format!("reading namespace {name}")),
    }

    let namespaces = &namespaces;
    wait_for(
        &format!("namespace {name} to be gone"),
        DEFAULT_TIMEOUT,
        move || async move {
            match namespaces.get_opt(name).await? {
                Some(_) => Ok(None),
                None => Ok(Some(())),
            }
        },
    )
    .await
}

/// Waits until the CRD `name` is Established (its API is served).
pub async fn wait_crd_established(client: &Client, name: &str) -> Result<()> {
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    wait_for(
        &format!("CRD {name} to be established"),
        DEFAULT_TIMEOUT,
        || {
            let crds = crds.clone();
            async move {
                let crd = crds.get(name).await?;
                let established = crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                Ok(established.then_some(()))
            }
        },
    )
    .await
}
