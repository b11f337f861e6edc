//! The command line: `run` (default), `check`, `plan`, `status`, `crd`.

use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use actix::Actor;
use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use tracing::{info, warn};

use crate::actors::cluster::build_client;
use crate::actors::status::{ClusterHealth, STANDBY, SetStandby, StatusActor, StatusView};
use crate::actors::supervisor::{ClusterRegistry, Reload, StopClusters, Supervisor};
use crate::api::{Phase, Prefetch, WorkloadKind};
use crate::config::{self, ClusterTarget, Config};
use crate::error::{api_status_code, describe_kube_error};
use crate::leader::WriteGate;
use crate::metrics::Metrics;
use crate::pull::explain::{Explanation, VerifiedInput, explain};
use crate::pull::namespaces::{NamespacePolicy, PREFETCH_FROM_ANNOTATION};
use crate::pull::plan::{ExtraImages, Planner};
use crate::pull::targeting::{NodeTargeting, NodeView};
use crate::pull::workload::{PodTemplated, WorkloadImages};

const DEFAULT_CONFIG: &str = "config/kube-prefetch.toml";

#[derive(Parser, Debug)]
#[command(
    name = "kube-prefetch",
    version,
    about = "Keeps container images warm on the nodes of many Kubernetes clusters"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "KUBE_PREFETCH_LOG_FORMAT")]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Exit codes of `kube-prefetch status`, shown by `status --help`.
const STATUS_EXIT_CODES: &str = "\
Exit codes:
  0  every cluster is Connected and no Prefetch is FAILED
  1  the status could not be read (instance not running, bad answer)
  2  bad command line
  3  some cluster is not Connected (Connecting, Unreachable, Forbidden, CrdMissing, Crashed)
  4  every cluster is Connected, but some Prefetch is FAILED
With --watch the command runs until interrupted.";

/// How `kube-prefetch status` prints the status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StatusFormat {
    Table,
    Wide,
    Json,
}

/// How `kube-prefetch plan` prints the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PlanFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the orchestrator (the default).
    Run {
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "KUBE_PREFETCH_CONFIG")]
        config: PathBuf,
    },
    /// Check the config and every cluster: reachable, version, CRD, RBAC.
    Check {
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "KUBE_PREFETCH_CONFIG")]
        config: PathBuf,
    },
    /// Dry run: the pulls that would be made, per cluster and Prefetch, and
    /// why every other node gets none (counts per reason).
    Plan {
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "KUBE_PREFETCH_CONFIG")]
        config: PathBuf,
        /// Name the nodes (and pairs) of every group, not only their count.
        #[arg(long, short)]
        verbose: bool,
        /// Output format: `text`, or `json` (every pull, pair and skipped
        /// node, ungrouped).
        #[arg(long, short, value_enum, default_value_t = PlanFormat::Text)]
        output: PlanFormat,
    },
    /// Print the aggregated status of a running instance.
    #[command(after_help = STATUS_EXIT_CODES)]
    Status {
        /// Base URL of the running instance.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Output format: `table`, `wide` (adds version, images and message)
        /// or `json` (the document of `GET /api/v1/status`).
        #[arg(long, short, value_enum, default_value_t = StatusFormat::Table)]
        output: StatusFormat,
        /// Same as `-o json` (kept for scripts written before `-o`).
        #[arg(long, conflicts_with = "output")]
        json: bool,
        /// Keep printing the status until interrupted: redrawn in place on a
        /// terminal, appended otherwise (one JSON document per line for `-o json`).
        #[arg(long, short)]
        watch: bool,
        /// Seconds between two refreshes with `--watch`.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=3600))]
        interval: u64,
    },
    /// Print the Prefetch CRD (the YAML that deploy/crd.yaml holds).
    Crd,
}

pub fn init_logging(cli: &Cli) {
    // An empty RUST_LOG counts as unset, not as "log nothing".
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|value| !value.trim().is_empty())
        .and_then(|value| tracing_subscriber::EnvFilter::try_new(value).ok())
        .unwrap_or_else(|| {
            tracing_subscriber::EnvFilter::new(
                "info,kube_client=warn,kube_runtime=warn,actix_server=warn",
            )
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour_wanted(std::io::stderr().is_terminal()))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Colour only for a terminal, and not when NO_COLOR is set
/// (https://no-color.org): escape codes in a pipe or a log file are noise.
fn colour_wanted(is_terminal: bool) -> bool {
    is_terminal && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty())
}

/// `text` in the ANSI colour `code` (e.g. "32" for green), or plain.
fn paint(text: &str, code: &str, colour: bool) -> String {
    if colour {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

/// One cluster's part of the `check` report.
fn check_report(cluster: &str, result: &Result<Vec<String>, Vec<String>>, colour: bool) -> String {
    let (verdict, lines) = match result {
        Ok(lines) => (paint("ok", "32", colour), lines),
        Err(lines) => (paint("PROBLEM", "1;31", colour), lines),
    };
    let mut report = format!("{cluster}: {verdict}\n");
    for line in lines {
        report.push_str(&format!("  {line}\n"));
    }
    report
}

pub fn run_command(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command.unwrap_or(Command::Run {
        config: PathBuf::from(DEFAULT_CONFIG),
    }) {
        Command::Run { config } => run(config).map(|()| ExitCode::SUCCESS),
        Command::Check { config } => check(config),
        Command::Plan {
            config,
            verbose,
            output,
        } => plan(config, verbose, output),
        Command::Status {
            url,
            output,
            json,
            watch,
            interval,
        } => {
            let format = if json { StatusFormat::Json } else { output };
            status(&url, format, watch.then(|| Duration::from_secs(interval)))
        }
        Command::Crd => {
            print!(
                "{}",
                crate::api::crd_yaml().context("rendering the CRD as YAML")?
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<(Config, Vec<ClusterTarget>)> {
    let config = config::load(path)?;
    let targets = config::resolve_clusters(&config)?;
    Ok((config, targets))
}

fn run(config_path: PathBuf) -> anyhow::Result<()> {
    let (config, targets) = load(&config_path)?;
    let system = actix::System::new();
    let result = system.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let mut terminate =
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;

        let status = StatusActor::default().start();
        // Before the first HTTP request can ask.
        if config.leader_election.enabled {
            status.do_send(SetStandby(true));
        }
        let metrics = Metrics::default();
        let listen = config.server.listen;
        // Filled by the supervisor; the drill-down asks the clusters in it.
        let clusters = ClusterRegistry::default();
        let server = crate::http::serve(listen, status.clone(), metrics.clone(), clusters.clone())?;
        let server_handle = server.handle();
        actix::spawn(server);
        info!(%listen, clusters = targets.len(), "kube-prefetch running");

        // A standby serves its endpoints but touches no cluster, and is not
        // ready: its empty status is not the fleet's.
        let mut leadership = None;
        let gate = if config.leader_election.enabled {
            let acquired = tokio::select! {
                acquired = crate::leader::acquire(&config.leader_election) => acquired?,
                _ = terminate.recv() => return anyhow::Ok(()),
                _ = tokio::signal::ctrl_c() => return anyhow::Ok(()),
            };
            // The gate opens once the Lease is read back as ours.
            if !acquired.confirmed().await {
                acquired.release().await;
                anyhow::bail!("became the leader but could not read the Lease back; exiting");
            }
            status.do_send(SetStandby(false));
            let gate = acquired.gate();
            leadership = Some(acquired);
            gate
        } else {
            WriteGate::open()
        };
        let supervisor = Supervisor::new(
            config_path,
            config,
            targets,
            gate.clone(),
            status,
            metrics,
            clusters,
        )
        .start();
        let mut lease_lost = false;
        let outcome = {
            let lost = async {
                match leadership.as_mut() {
                    Some(leadership) => leadership.lost().await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(lost);
            loop {
                tokio::select! {
                    _ = hangup.recv() => {
                        info!("SIGHUP: reloading the config");
                        supervisor.do_send(Reload);
                    }
                    _ = terminate.recv() => break Ok(()),
                    _ = tokio::signal::ctrl_c() => break Ok(()),
                    // Exiting is the safe answer: two active instances would
                    // fight over the same pods. The restarted process waits as
                    // a standby. The gate is already closed: no write goes out.
                    _ = &mut lost => {
                        lease_lost = true;
                        break Err(anyhow::anyhow!("lost the leader lease; exiting"));
                    }
                }
            }
        };
        // Dispatch stops first, then any write still on its way is refused,
        // and only then may a standby take over (the Lease is released last).
        info!("shutting down: stopping every cluster");
        if let Err(error) = supervisor.send(StopClusters).await {
            warn!(%error, "could not stop the clusters");
        }
        gate.close();
        server_handle.stop(true).await;
        match leadership {
            Some(leadership) if lease_lost => leadership.abandon(),
            Some(leadership) => leadership.release().await,
            None => {}
        }
        outcome
    });
    actix::System::current().stop();
    result
}

/// A single-threaded runtime for the one-shot commands.
fn block_on<F: std::future::Future>(future: F) -> anyhow::Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(runtime.block_on(future))
}

/// The verbs kube-prefetch needs in each target cluster.
const REQUIRED_ACCESS: &[(&str, &str, &str)] = &[
    ("cache.techsquad.rocks", "prefetches", "list"),
    ("cache.techsquad.rocks", "prefetches", "watch"),
    ("cache.techsquad.rocks", "prefetches/status", "patch"),
    ("", "nodes", "list"),
    ("", "nodes", "watch"),
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("", "pods", "create"),
    ("", "pods", "delete"),
    ("apps", "deployments", "list"),
    ("apps", "deployments", "watch"),
    ("apps", "statefulsets", "list"),
    ("apps", "statefulsets", "watch"),
    ("apps", "daemonsets", "list"),
    ("apps", "daemonsets", "watch"),
    ("batch", "jobs", "list"),
    ("batch", "jobs", "watch"),
    ("batch", "cronjobs", "list"),
    ("batch", "cronjobs", "watch"),
    // The event recorder creates an event, then patches it into a series.
    ("events.k8s.io", "events", "create"),
    ("events.k8s.io", "events", "patch"),
];

fn check(config_path: PathBuf) -> anyhow::Result<ExitCode> {
    let (_, targets) = load(&config_path)?;
    println!(
        "config {} is valid: {} cluster(s)",
        config_path.display(),
        targets.len()
    );
    let colour = colour_wanted(std::io::stdout().is_terminal());
    let problems = block_on(async {
        let mut problems = 0;
        for target in &targets {
            let result = check_cluster(target).await;
            if result.is_err() {
                problems += 1;
            }
            print!("{}", check_report(&target.name, &result, colour));
        }
        problems
    })?;
    Ok(if problems == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn check_cluster(target: &ClusterTarget) -> Result<Vec<String>, Vec<String>> {
    let client = build_client(target, None, WriteGate::open(), None)
        .await
        .map_err(|error| vec![error.to_string()])?;
    let version = tokio::time::timeout(Duration::from_secs(10), client.apiserver_version())
        .await
        .map_err(|_| vec!["no answer within 10 s".to_string()])?
        .map_err(|error| vec![format!("unreachable: {}", describe_kube_error(&error))])?;
    let mut lines = vec![format!("server version {}", version.git_version)];
    let mut failed = false;
    let prefetches: Api<Prefetch> = Api::all(client.clone());
    match prefetches.list(&ListParams::default().limit(1)).await {
        Ok(_) => lines.push("Prefetch CRD installed".into()),
        Err(error) if api_status_code(&error) == Some(404) => {
            failed = true;
            lines.push("Prefetch CRD missing: apply deploy/crd.yaml".into());
        }
        Err(error) => {
            failed = true;
            lines.push(format!(
                "listing Prefetches: {}",
                describe_kube_error(&error)
            ));
        }
    }
    for (group, resource, verb) in REQUIRED_ACCESS {
        let (resource, subresource) = match resource.split_once('/') {
            Some((resource, sub)) => (resource.to_string(), Some(sub.to_string())),
            None => (resource.to_string(), None),
        };
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    group: Some(group.to_string()),
                    resource: Some(resource.clone()),
                    subresource: subresource.clone(),
                    verb: Some(verb.to_string()),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
        let what = format!(
            "{verb} {resource}{}{}",
            subresource.map(|s| format!("/{s}")).unwrap_or_default(),
            if group.is_empty() {
                String::new()
            } else {
                format!(".{group}")
            }
        );
        match api.create(&PostParams::default(), &review).await {
            Ok(answer) if answer.status.as_ref().is_some_and(|s| s.allowed) => {}
            Ok(_) => {
                failed = true;
                lines.push(format!(
                    "RBAC: not allowed to {what}; apply deploy/target/rbac.yaml"
                ));
            }
            Err(error) => {
                failed = true;
                lines.push(format!(
                    "RBAC check for {what} failed: {}",
                    describe_kube_error(&error)
                ));
            }
        }
    }
    if failed { Err(lines) } else { Ok(lines) }
}

fn plan(config_path: PathBuf, verbose: bool, format: PlanFormat) -> anyhow::Result<ExitCode> {
    let (config, targets) = load(&config_path)?;
    let (failures, clusters) = block_on(async {
        let mut failures = 0;
        let mut clusters = Vec::new();
        for target in &targets {
            let planned = plan_cluster(&config, target).await;
            if planned.is_err() {
                failures += 1;
            }
            if format == PlanFormat::Text {
                print!("{}", render_cluster_plan(&target.name, &planned, verbose));
            }
            clusters.push(cluster_plan_json(&target.name, &planned));
        }
        (failures, clusters)
    })?;
    if format == PlanFormat::Json {
        let document = serde_json::json!({ "clusters": clusters });
        println!(
            "{}",
            serde_json::to_string_pretty(&document).context("printing the plan as JSON")?
        );
    }
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One Prefetch's dry run.
struct PrefetchPlan {
    namespace: String,
    name: String,
    explanation: Explanation,
    invalid_images: Vec<String>,
    problems: Vec<String>,
}

/// `names` after a colon with -v; nothing otherwise.
fn named(verbose: bool, names: &[&str]) -> String {
    if verbose {
        format!(": {}", names.join(", "))
    } else {
        String::new()
    }
}

fn render_cluster_plan(
    cluster: &str,
    planned: &anyhow::Result<Vec<PrefetchPlan>>,
    verbose: bool,
) -> String {
    let prefetches = match planned {
        Ok(prefetches) => prefetches,
        Err(error) => return format!("{cluster}: cannot plan: {error:#}\n"),
    };
    let mut out = format!("{cluster}:\n");
    if prefetches.is_empty() {
        out.push_str("  no Prefetch objects\n");
    }
    for plan in prefetches {
        let explained = &plan.explanation;
        let pull_nodes: std::collections::BTreeSet<&str> = explained
            .pulls
            .iter()
            .map(|pull| pull.node.as_str())
            .collect();
        out.push_str(&format!(
            "  {}/{}: {} pull(s) on {} node(s); {} pair(s) need no pull; {} node(s) skipped\n",
            plan.namespace,
            plan.name,
            explained.pulls.len(),
            pull_nodes.len(),
            explained.no_pull.len(),
            explained.skipped.len()
        ));
        for ((image, namespace), nodes) in explained.pulls_by_image() {
            out.push_str(&format!(
                "    pull {image} on {} node(s) (pods in {namespace}){}\n",
                nodes.len(),
                named(verbose, &nodes)
            ));
        }
        for (reason, pairs) in explained.no_pull_by_reason() {
            let names: Vec<String> = pairs
                .iter()
                .map(|key| format!("{} {}", key.node, key.image))
                .collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            out.push_str(&format!(
                "    no pull, {}: {} pair(s){}\n",
                reason.describe(),
                pairs.len(),
                named(verbose, &names)
            ));
        }
        for (reason, nodes) in explained.skipped_by_reason() {
            out.push_str(&format!(
                "    skipped {} node(s), {}{}\n",
                nodes.len(),
                reason.describe(),
                named(verbose, &nodes)
            ));
        }
        for invalid in &plan.invalid_images {
            out.push_str(&format!("    skipped: {invalid}\n"));
        }
        for problem in &plan.problems {
            out.push_str(&format!("    problem: {problem}\n"));
        }
    }
    out
}

fn cluster_plan_json(
    cluster: &str,
    planned: &anyhow::Result<Vec<PrefetchPlan>>,
) -> serde_json::Value {
    let prefetches = match planned {
        Ok(prefetches) => prefetches,
        Err(error) => {
            return serde_json::json!({ "name": cluster, "error": format!("{error:#}") });
        }
    };
    let prefetches: Vec<serde_json::Value> = prefetches
        .iter()
        .map(|plan| {
            let explained = &plan.explanation;
            serde_json::json!({
                "namespace": plan.namespace,
                "name": plan.name,
                "pulls": explained.pulls,
                "no_pull": explained.no_pull.iter().map(|(key, reason)| serde_json::json!({
                    "node": &*key.node, "image": &*key.image, "reason": reason,
                })).collect::<Vec<_>>(),
                "skipped": explained.skipped.iter().map(|(node, reason)| serde_json::json!({
                    "node": node, "reason": reason,
                })).collect::<Vec<_>>(),
                "invalid_images": plan.invalid_images,
                "problems": plan.problems,
            })
        })
        .collect();
    serde_json::json!({ "name": cluster, "error": null, "prefetches": prefetches })
}

async fn list_workloads<K>(
    client: &Client,
    namespace: &str,
    labels: &str,
) -> anyhow::Result<Vec<WorkloadImages>>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + PodTemplated
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let list = api
        .list(&ListParams::default().labels(labels))
        .await
        .map_err(|error| {
            anyhow::anyhow!(
                "listing {}s in {namespace}: {}",
                K::KIND,
                describe_kube_error(&error)
            )
        })?;
    Ok(list
        .items
        .iter()
        .filter_map(|object| {
            object.pod_spec().map(|spec| {
                WorkloadImages::from_pod_spec(K::KIND, namespace, &object.name_any(), spec)
            })
        })
        .collect())
}

async fn plan_cluster(
    config: &Config,
    target: &ClusterTarget,
) -> anyhow::Result<Vec<PrefetchPlan>> {
    let client = build_client(target, None, WriteGate::open(), None).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let nodes: Vec<NodeView> = nodes
        .list(&ListParams::default())
        .await
        .map_err(|error| anyhow::anyhow!("listing nodes: {}", describe_kube_error(&error)))?
        .items
        .iter()
        .map(NodeView::from_node)
        .collect();
    let prefetches: Api<Prefetch> = Api::all(client.clone());
    let prefetches = prefetches
        .list(&ListParams::default())
        .await
        .map_err(|error| anyhow::anyhow!("listing Prefetches: {}", describe_kube_error(&error)))?;
    // The namespaces' annotations decide cross-namespace use, as in `run`.
    let mut policy = NamespacePolicy::new(config.policy.cross_namespace);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespaces = namespaces
        .list(&ListParams::default())
        .await
        .map_err(|error| anyhow::anyhow!("listing namespaces: {}", describe_kube_error(&error)))?;
    for namespace in &namespaces.items {
        if let Some(from) = namespace.annotations().get(PREFETCH_FROM_ANNOTATION) {
            policy.set(&namespace.name_any(), Some(from));
        }
    }
    let mut plans = Vec::new();
    for prefetch in &prefetches.items {
        let own = prefetch.namespace().unwrap_or_default();
        let spec = &prefetch.spec;
        let (namespaces, _) = spec.workload_namespaces(&own, |target| policy.allows(&own, target));
        // An invalid label key builds no selector: the Prefetch's own
        // images are still planned, its problem is printed below.
        let (kinds, labels) = match spec.label_selector() {
            Ok(labels) => (spec.selected_workload_kinds(), labels),
            Err(_) => (Vec::new(), String::new()),
        };
        let mut workloads = Vec::new();
        for namespace in &namespaces {
            for kind in kinds.iter().copied() {
                let found = match kind {
                    WorkloadKind::Deployment => {
                        list_workloads::<Deployment>(&client, namespace, &labels).await?
                    }
                    WorkloadKind::StatefulSet => {
                        list_workloads::<StatefulSet>(&client, namespace, &labels).await?
                    }
                    WorkloadKind::DaemonSet => {
                        list_workloads::<DaemonSet>(&client, namespace, &labels).await?
                    }
                    WorkloadKind::Job => list_workloads::<Job>(&client, namespace, &labels).await?,
                    WorkloadKind::CronJob => {
                        list_workloads::<CronJob>(&client, namespace, &labels).await?
                    }
                };
                workloads.extend(found);
            }
        }
        let planner = Planner::new(
            &workloads,
            &ExtraImages {
                images: spec.images.clone(),
                namespace: own.clone(),
                image_pull_secrets: spec.image_pull_secrets.clone(),
            },
            NodeTargeting::from_spec(spec),
            spec.respects_workload_scheduling(),
            config.policy.tolerate_all_taints,
        );
        // What a run would restore from the status instead of pulling.
        let record = prefetch
            .status
            .as_ref()
            .and_then(|status| status.verified.as_ref());
        let verified = record.map(|record| VerifiedInput {
            record,
            retry_after: spec.retry_after_or(config.defaults.retry_after),
            now_wall: k8s_openapi::jiff::Timestamp::now(),
        });
        plans.push(PrefetchPlan {
            namespace: own.clone(),
            name: prefetch.name_any(),
            explanation: explain(&planner, &nodes, verified),
            invalid_images: planner
                .invalid_images()
                .iter()
                .map(ToString::to_string)
                .collect(),
            problems: spec.spec_problems(),
        });
    }
    Ok(plans)
}

/// Exit code of `status` for one snapshot (see [`STATUS_EXIT_CODES`]).
pub fn status_exit_code(view: &StatusView) -> u8 {
    let all_connected = view
        .clusters
        .iter()
        .all(|cluster| matches!(cluster.health, ClusterHealth::Connected { .. }));
    let any_failed = view
        .clusters
        .iter()
        .flat_map(|cluster| &cluster.prefetches)
        .any(|prefetch| prefetch.phase == Phase::Failed);
    if !all_connected {
        3
    } else if any_failed {
        4
    } else {
        0
    }
}

/// One answer of `GET /api/v1/status`: the body as served (printed as is for
/// `-o json`) and its parsed form.
fn fetch_status(agent: &ureq::Agent, endpoint: &str) -> anyhow::Result<(String, StatusView)> {
    let body = agent
        .get(endpoint)
        .call()
        .with_context(|| format!("asking {endpoint} (is kube-prefetch running there?)"))?
        .body_mut()
        .read_to_string()
        .with_context(|| format!("reading the answer of {endpoint}"))?;
    let view: StatusView = serde_json::from_str(&body)
        .with_context(|| format!("{endpoint} did not answer with a status document"))?;
    Ok((body, view))
}

fn status(url: &str, format: StatusFormat, watch: Option<Duration>) -> anyhow::Result<ExitCode> {
    let endpoint = format!("{}/api/v1/status", url.trim_end_matches('/'));
    // A hung instance must not hang a script or freeze a watch.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let stdout = std::io::stdout();
    let terminal = stdout.is_terminal();
    let colour = colour_wanted(terminal);
    let Some(interval) = watch else {
        let (body, view) = fetch_status(&agent, &endpoint)?;
        print!("{}", render_status(&body, &view, format, colour));
        return Ok(ExitCode::from(status_exit_code(&view)));
    };
    loop {
        let frame = match fetch_status(&agent, &endpoint) {
            Ok((body, view)) => render_status(&body, &view, format, colour),
            // The instance may be restarting: say so and keep watching.
            Err(error) => format!("{error:#}\n"),
        };
        let mut out = stdout.lock();
        let written = if terminal {
            // Home and clear, then the frame: a redraw in place, like watch(1).
            write!(
                out,
                "\x1b[H\x1b[2J{endpoint} every {}s, Ctrl-C stops\n\n{frame}",
                interval.as_secs()
            )
        } else if format == StatusFormat::Json {
            write!(out, "{frame}")
        } else {
            writeln!(out, "{frame}")
        };
        // A closed pipe (`status --watch | head`) ends the watch quietly.
        if written.and_then(|()| out.flush()).is_err() {
            return Ok(ExitCode::SUCCESS);
        }
        drop(out);
        std::thread::sleep(interval);
    }
}

/// What `status` prints for one snapshot: `body` as served for JSON (one
/// line, so a watch appends one document per line), else a table.
pub fn render_status(body: &str, view: &StatusView, format: StatusFormat, colour: bool) -> String {
    match format {
        StatusFormat::Json => format!("{}\n", body.trim_end()),
        StatusFormat::Table => status_table(view, false, colour),
        StatusFormat::Wide => status_table(view, true, colour),
    }
}

const TABLE_HEADERS: &[&str] = &[
    "CLUSTER",
    "STATE",
    "PREFETCH",
    "PHASE",
    "NODES",
    "READY",
    "IN-FLIGHT",
    "FAILED",
    "TOTAL",
];

const WIDE_HEADERS: &[&str] = &[
    "CLUSTER",
    "STATE",
    "VERSION",
    "PREFETCH",
    "PHASE",
    "NODES",
    "IMAGES",
    "READY",
    "IN-FLIGHT",
    "FAILED",
    "TOTAL",
    "MESSAGE",
];

fn state_colour(health: &ClusterHealth) -> &'static str {
    match health {
        ClusterHealth::Connected { .. } => "32",
        ClusterHealth::Connecting => "33",
        _ => "1;31",
    }
}

fn phase_colour(phase: Phase) -> &'static str {
    match phase {
        Phase::Ready => "32",
        Phase::Failed => "1;31",
        Phase::Running => "36",
        Phase::Pending => "33",
    }
}

/// One table cell: its text, and the colour it gets on a terminal.
struct Cell {
    text: String,
    colour: Option<&'static str>,
}

impl Cell {
    fn plain(text: impl Into<String>) -> Cell {
        Cell {
            text: text.into(),
            colour: None,
        }
    }
    fn painted(text: impl Into<String>, colour: &'static str) -> Cell {
        Cell {
            text: text.into(),
            colour: Some(colour),
        }
    }
}

/// The table of `status` (`wide` adds the cluster version, the image count
/// and the message), then one line per cluster that is not Connected, with
/// its reason.
pub fn status_table(view: &StatusView, wide: bool, colour: bool) -> String {
    if view.standby {
        return format!("{STANDBY}\n");
    }
    let headers = if wide { WIDE_HEADERS } else { TABLE_HEADERS };
    let mut rows: Vec<Vec<Cell>> = vec![headers.iter().map(|h| Cell::plain(*h)).collect()];
    for cluster in &view.clusters {
        let state = || Cell::painted(cluster.health.label(), state_colour(&cluster.health));
        let version = || {
            Cell::plain(match &cluster.health {
                ClusterHealth::Connected { version } => version.as_str(),
                _ => "",
            })
        };
        if cluster.prefetches.is_empty() {
            let mut row = vec![Cell::plain(cluster.name.clone()), state()];
            if wide {
                row.push(version());
            }
            row.push(Cell::plain("-"));
            rows.push(row);
        }
        for prefetch in &cluster.prefetches {
            let mut row = vec![Cell::plain(cluster.name.clone()), state()];
            if wide {
                row.push(version());
            }
            row.push(Cell::plain(format!(
                "{}/{}",
                prefetch.namespace, prefetch.name
            )));
            row.push(Cell::painted(
                prefetch.phase.to_string(),
                phase_colour(prefetch.phase),
            ));
            row.push(Cell::plain(prefetch.nodes.to_string()));
            if wide {
                row.push(Cell::plain(prefetch.images.len().to_string()));
            }
            row.push(Cell::plain(prefetch.pulls.ready.to_string()));
            row.push(Cell::plain(prefetch.pulls.in_flight.to_string()));
            row.push(Cell::plain(prefetch.pulls.failed.to_string()));
            row.push(Cell::plain(prefetch.pulls.total.to_string()));
            if wide {
                row.push(Cell::plain(prefetch.message.clone().unwrap_or_default()));
            }
            rows.push(row);
        }
    }
    // Widths in characters, from the plain text: colour codes take no room.
    let mut widths = vec![0; headers.len()];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.text.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (index, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if index > 0 {
                line.push_str("  ");
            }
            match cell.colour {
                Some(code) if colour => line.push_str(&paint(&cell.text, code, true)),
                _ => line.push_str(&cell.text),
            }
            line.push_str(&" ".repeat(width - cell.text.chars().count()));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    for cluster in &view.clusters {
        match &cluster.health {
            ClusterHealth::Unreachable { reason } | ClusterHealth::CrdMissing { reason } => {
                out.push_str(&format!("{}: {reason}\n", cluster.name));
            }
            ClusterHealth::Forbidden { what } => {
                out.push_str(&format!("{}: {what}\n", cluster.name))
            }
            ClusterHealth::Crashed { reason } => {
                out.push_str(&format!("{}: crashed: {reason}\n", cluster.name))
            }
            _ if cluster.restarts > 0 => out.push_str(&format!(
                "{}: restarted {} after a panic; last: {}\n",
                cluster.name,
                crate::actors::status::times(cluster.restarts),
                cluster.last_panic.as_deref().unwrap_or("unknown"),
            )),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::status::{ClusterView, PrefetchSummary};
    use crate::api::PullCounts;

    #[test]
    fn check_report_is_coloured_only_when_asked() {
        let ok: Result<Vec<String>, Vec<String>> = Ok(vec!["server version v1.36.3".into()]);
        let problem: Result<Vec<String>, Vec<String>> =
            Err(vec!["Prefetch CRD missing: apply deploy/crd.yaml".into()]);
        assert_eq!(
            check_report("sim-1", &ok, false),
            "sim-1: ok\n  server version v1.36.3\n"
        );
        assert_eq!(
            check_report("sim-2", &problem, false),
            "sim-2: PROBLEM\n  Prefetch CRD missing: apply deploy/crd.yaml\n"
        );
        assert_eq!(
            check_report("sim-1", &ok, true),
            "sim-1: \x1b[32mok\x1b[0m\n  server version v1.36.3\n"
        );
        assert_eq!(
            check_report("sim-2", &problem, true),
            "sim-2: \x1b[1;31mPROBLEM\x1b[0m\n  Prefetch CRD missing: apply deploy/crd.yaml\n"
        );
        // A pipe or a file is never a terminal.
        assert!(!colour_wanted(false));
    }

    fn summary(name: &str, phase: Phase, counts: [u32; 4]) -> PrefetchSummary {
        let [ready, in_flight, failed, total] = counts;
        PrefetchSummary {
            namespace: "default".into(),
            name: name.into(),
            phase,
            images: vec!["docker.io/library/nginx:1.7.9".into()],
            nodes: 3,
            pulls: PullCounts {
                ready,
                reverifying: 0,
                in_flight,
                failed,
                total,
            },
            message: (phase == Phase::Failed).then(|| "1 pull failed".to_string()),
            failures: Vec::new(),
        }
    }

    fn sample_view() -> StatusView {
        StatusView {
            standby: false,
            clusters: vec![
                ClusterView {
                    name: "sim-1".into(),
                    health: ClusterHealth::Connected {
                        version: "v1.36.3".into(),
                    },
                    prefetches: vec![
                        summary("cache", Phase::Ready, [3, 0, 0, 3]),
                        summary("broken", Phase::Failed, [2, 0, 1, 3]),
                    ],
                    restarts: 0,
                    last_panic: None,
                },
                ClusterView {
                    name: "sim-2".into(),
                    health: ClusterHealth::Unreachable {
                        reason: "connection refused".into(),
                    },
                    prefetches: Vec::new(),
                    restarts: 0,
                    last_panic: None,
                },
            ],
        }
    }

    #[test]
    fn table_has_aligned_columns_and_cluster_reasons() {
        assert_eq!(
            status_table(&sample_view(), false, false),
            "\
CLUSTER  STATE        PREFETCH        PHASE   NODES  READY  IN-FLIGHT  FAILED  TOTAL
sim-1    Connected    default/cache   READY   3      3      0          0       3
sim-1    Connected    default/broken  FAILED  3      2      0          1       3
sim-2    Unreachable  -
sim-2: connection refused
"
        );
    }

    #[test]
    fn a_standby_says_so_instead_of_an_empty_table() {
        let view = StatusView {
            standby: true,
            clusters: Vec::new(),
        };
        assert_eq!(
            status_table(&view, false, false),
            "standby: waiting for the leader lease; the leader serves the status\n"
        );
    }

    #[test]
    fn table_names_crashed_and_restarted_clusters() {
        let mut view = sample_view();
        view.clusters[0].restarts = 2;
        view.clusters[0].last_panic = Some("panicked at src/x.rs:1:2: boom".into());
        view.clusters[1].health = ClusterHealth::Crashed {
            reason: "panicked at src/y.rs:3:4: bang; restarting in 1s (panics in a row: 1)".into(),
        };
        let table = status_table(&view, false, false);
        assert!(
            table.ends_with(
                "\
sim-2    Crashed    -
sim-1: restarted 2 times after a panic; last: panicked at src/x.rs:1:2: boom
sim-2: crashed: panicked at src/y.rs:3:4: bang; restarting in 1s (panics in a row: 1)
"
            ),
            "{table}"
        );
    }

    #[test]
    fn wide_table_adds_version_images_and_message() {
        assert_eq!(
            status_table(&sample_view(), true, false),
            "\
CLUSTER  STATE        VERSION  PREFETCH        PHASE   NODES  IMAGES  READY  IN-FLIGHT  FAILED  TOTAL  MESSAGE
sim-1    Connected    v1.36.3  default/cache   READY   3      1       3      0          0       3
sim-1    Connected    v1.36.3  default/broken  FAILED  3      1       2      0          1       3      1 pull failed
sim-2    Unreachable           -
sim-2: connection refused
"
        );
    }

    #[test]
    fn colours_do_not_shift_columns() {
        let coloured = status_table(&sample_view(), false, true);
        assert!(coloured.contains("\x1b[32mREADY\x1b[0m   3"), "{coloured}");
        assert!(
            coloured.contains("\x1b[1;31mFAILED\x1b[0m  3"),
            "{coloured}"
        );
        assert!(
            coloured.contains("\x1b[1;31mUnreachable\x1b[0m  -"),
            "{coloured}"
        );
        let stripped = coloured
            .replace("\x1b[32m", "")
            .replace("\x1b[1;31m", "")
            .replace("\x1b[0m", "");
        assert_eq!(stripped, status_table(&sample_view(), false, false));
    }

    #[test]
    fn json_output_is_the_served_document_on_one_line() {
        let body = r#"{"clusters":[]}"#;
        let view = StatusView {
            standby: false,
            clusters: Vec::new(),
        };
        assert_eq!(
            render_status(body, &view, StatusFormat::Json, true),
            "{\"clusters\":[]}\n"
        );
    }

    #[test]
    fn exit_code_says_what_is_wrong() {
        let mut view = sample_view();
        assert_eq!(status_exit_code(&view), 3, "sim-2 is unreachable");
        view.clusters[1].health = ClusterHealth::Connected {
            version: "v1.36.3".into(),
        };
        assert_eq!(status_exit_code(&view), 4, "default/broken is FAILED");
        view.clusters[0].prefetches[1].phase = Phase::Running;
        assert_eq!(status_exit_code(&view), 0);
        view.clusters[0].health = ClusterHealth::Connecting;
        assert_eq!(status_exit_code(&view), 3);
    }

    #[test]
    fn status_help_documents_exit_codes_and_json_alias() {
        use clap::CommandFactory;
        let mut command = Cli::command();
        let help = command
            .find_subcommand_mut("status")
            .map(|status| status.render_long_help().to_string())
            .unwrap_or_default();
        assert!(help.contains("Exit codes:"), "{help}");
        assert!(
            help.contains("4  every cluster is Connected, but some Prefetch is FAILED"),
            "{help}"
        );
        let json = Cli::try_parse_from(["kube-prefetch", "status", "--json"]);
        assert!(
            matches!(
                json,
                Ok(Cli {
                    command: Some(Command::Status { json: true, .. }),
                    ..
                })
            ),
            "{json:?}"
        );
        let both = Cli::try_parse_from(["kube-prefetch", "status", "--json", "-o", "wide"]);
        assert!(both.is_err(), "--json with -o wide is a contradiction");
    }
}
