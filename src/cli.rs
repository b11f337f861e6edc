//! The command line: `run` (default), `check`, `plan`, `status`, `crd`.

use std::io::IsTerminal;
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
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use tracing::info;

use crate::actors::cluster::build_client;
use crate::actors::status::{ClusterHealth, StatusActor, StatusView};
use crate::actors::supervisor::{Reload, Supervisor};
use crate::api::{Prefetch, WorkloadKind};
use crate::config::{self, ClusterTarget, Config};
use crate::error::{api_status_code, describe_kube_error};
use crate::metrics::Metrics;
use crate::pull::plan::{ExtraImages, desired_pulls};
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
    /// Dry run: print the pulls that would be made, per cluster.
    Plan {
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "KUBE_PREFETCH_CONFIG")]
        config: PathBuf,
    },
    /// Print the aggregated status of a running instance as a table.
    Status {
        /// Base URL of the running instance.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
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
        Command::Plan { config } => plan(config),
        Command::Status { url, json } => status(&url, json),
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
        let metrics = Metrics::default();
        let listen = config.server.listen;
        let server = crate::http::serve(listen, status.clone(), metrics.clone())?;
        let server_handle = server.handle();
        actix::spawn(server);
        info!(%listen, clusters = targets.len(), "kube-prefetch running");

        // A standby serves its endpoints but touches no cluster.
        let mut leadership = None;
        if config.leader_election.enabled {
            tokio::select! {
                acquired = crate::leader::acquire(&config.leader_election) => leadership = Some(acquired?),
                _ = terminate.recv() => return anyhow::Ok(()),
                _ = tokio::signal::ctrl_c() => return anyhow::Ok(()),
            }
        }
        let supervisor = Supervisor::new(config_path, config, targets, status, metrics).start();
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
                // a standby.
                _ = &mut lost => break Err(anyhow::anyhow!("lost the leader lease; exiting")),
            }
            }
        };
        info!("shutting down");
        server_handle.stop(true).await;
        if let Some(leadership) = leadership {
            leadership.release().await;
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
    let client = build_client(target, None)
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

fn plan(config_path: PathBuf) -> anyhow::Result<ExitCode> {
    let (config, targets) = load(&config_path)?;
    let failures = block_on(async {
        let mut failures = 0;
        for target in &targets {
            match plan_cluster(&config, target).await {
                Ok(lines) => {
                    println!("{}:", target.name);
                    for line in lines {
                        println!("  {line}");
                    }
                }
                Err(error) => {
                    failures += 1;
                    println!("{}: cannot plan: {error:#}", target.name);
                }
            }
        }
        failures
    })?;
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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

async fn plan_cluster(config: &Config, target: &ClusterTarget) -> anyhow::Result<Vec<String>> {
    let client = build_client(target, None).await?;
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
    let mut lines = Vec::new();
    for prefetch in &prefetches.items {
        let own = prefetch.namespace().unwrap_or_default();
        let spec = &prefetch.spec;
        let (namespaces, _) = spec.workload_namespaces(&own, config.policy.cross_namespace);
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
        let desired = desired_pulls(
            &nodes,
            &workloads,
            &ExtraImages {
                images: spec.images.clone(),
                namespace: own.clone(),
                image_pull_secrets: spec.image_pull_secrets.clone(),
            },
            &NodeTargeting::from_spec(spec),
            spec.respects_workload_scheduling(),
            config.policy.tolerate_all_taints,
        );
        lines.push(format!(
            "{own}/{}: {} pull(s) on {} node(s)",
            prefetch.name_any(),
            desired.pairs.len(),
            desired.nodes.len()
        ));
        for target in desired.pairs.values() {
            let present = nodes
                .iter()
                .find(|node| node.name == target.node)
                .is_some_and(|node| node.images.contains(&target.image));
            lines.push(format!(
                "    {} {} (pod in {}){}",
                target.node,
                target.image,
                target.namespace,
                if present {
                    " — already on the node"
                } else {
                    ""
                }
            ));
        }
        for invalid in &desired.invalid_images {
            lines.push(format!("    skipped: {invalid}"));
        }
        for problem in spec.spec_problems() {
            lines.push(format!("    problem: {problem}"));
        }
    }
    if prefetches.items.is_empty() {
        lines.push("no Prefetch objects".into());
    }
    Ok(lines)
}

fn status(url: &str, json: bool) -> anyhow::Result<ExitCode> {
    let endpoint = format!("{}/api/v1/status", url.trim_end_matches('/'));
    let body = ureq::get(&endpoint)
        .call()
        .with_context(|| format!("asking {endpoint} (is kube-prefetch running there?)"))?
        .body_mut()
        .read_to_string()
        .with_context(|| format!("reading the answer of {endpoint}"))?;
    if json {
        println!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    let view: StatusView = serde_json::from_str(&body)
        .with_context(|| format!("{endpoint} did not answer with a status document"))?;
    print!("{}", status_table(&view));
    let all_connected = view
        .clusters
        .iter()
        .all(|cluster| matches!(cluster.health, ClusterHealth::Connected { .. }));
    Ok(if all_connected {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// The table `kube-prefetch status` prints.
pub fn status_table(view: &StatusView) -> String {
    let mut rows = vec![[
        "CLUSTER".to_string(),
        "STATE".into(),
        "PREFETCH".into(),
        "PHASE".into(),
        "NODES".into(),
        "READY".into(),
        "IN-FLIGHT".into(),
        "FAILED".into(),
        "TOTAL".into(),
    ]];
    for cluster in &view.clusters {
        if cluster.prefetches.is_empty() {
            rows.push([
                cluster.name.clone(),
                cluster.health.label().into(),
                "-".into(),
                "".into(),
                "".into(),
                "".into(),
                "".into(),
                "".into(),
                "".into(),
            ]);
        }
        for prefetch in &cluster.prefetches {
            rows.push([
                cluster.name.clone(),
                cluster.health.label().into(),
                format!("{}/{}", prefetch.namespace, prefetch.name),
                prefetch.phase.to_string(),
                prefetch.nodes.to_string(),
                prefetch.pulls.ready.to_string(),
                prefetch.pulls.in_flight.to_string(),
                prefetch.pulls.failed.to_string(),
                prefetch.pulls.total.to_string(),
            ]);
        }
    }
    let widths: Vec<usize> = (0..9)
        .map(|column| rows.iter().map(|row| row[column].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
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
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
