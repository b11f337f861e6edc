//! One actor per target cluster, running on its own Arbiter: connects, keeps
//! one watch per resource kind for the whole cluster (Prefetch objects,
//! nodes, pull pods, and each workload kind some Prefetch selects), feeds
//! them into the pure indexes of `crate::pull::index`, and tells each
//! PrefetchActor only the changes that concern it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, ListParams};
use kube::client::ClientBuilder;
use kube::client::retry::RetryPolicy;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tower::buffer::BufferLayer;
use tower::filter::FilterLayer;
use tower::limit::RateLimitLayer;
use tower::retry::RetryLayer;
use tower::util::MapResponseLayer;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::actors::cluster_link::{
    AdoptSlot, ClusterContext, ClusterLink, PairsPlanned, ReleaseSlot, RequestSlots, WriteAllowed,
    WriteRefused,
};
use crate::actors::delete_pull_pod_until_gone;
use crate::actors::prefetch::{
    ClusterPairLimit, GetNodeGrid, NodeChanged, PodChanged, PodDeleted, Preempt, PrefetchActor,
    Shutdown, SlotsGranted, SpecChanged, Workloads, WorkloadsChanged,
};
use crate::actors::status::{ClusterHealth, ClusterHealthChanged, StatusActor};
use crate::api::{Prefetch, PrefetchSpec, WorkloadKind};
use crate::config::{ClusterTarget, Config};
use crate::error::{Error, api_status_code, describe_kube_error, describe_watch_error};
use crate::leader::WriteGate;
use crate::metrics::Metrics;
use crate::pull::dispatch::DispatchQueue;
use crate::pull::grid::{GridQuery, NodeGrid};
use crate::pull::index::{
    NodeIndex, WorkloadChange, WorkloadEntry, WorkloadIndex, WorkloadKey, WorkloadSelector,
    targeting_of,
};
use crate::pull::limits::{self, Claim};
use crate::pull::namespaces::{NamespacePolicy, PREFETCH_FROM_ANNOTATION};
use crate::pull::podspec::{PREFETCH_UID_LABEL, managed_selector};
use crate::pull::targeting::{NodeTargeting, NodeView};
use crate::pull::workload::{PodTemplated, WorkloadImages};

/// Nodes per page of the node list. A page is decoded whole, image lists
/// included, so kube's default of 500 raised each cluster's (re)list peak:
/// 3 clusters of 1,000 nodes peaked 4 MiB higher (BENCHMARKS.md).
const NODE_LIST_PAGE: u32 = 100;

/// What a PrefetchActor was last given; its events are routed by these.
struct Delivered {
    spec: PrefetchSpec,
    targeting: NodeTargeting,
    selector: WorkloadSelector,
}

struct PrefetchEntry {
    /// `None` until nodes, pull pods and the workload kinds it selects were
    /// listed: planning earlier would see no nodes (and call that READY) or
    /// create pods that already exist instead of adopting them.
    addr: Option<Addr<PrefetchActor>>,
    latest: Arc<Prefetch>,
    delivered: Option<Delivered>,
}

impl PrefetchEntry {
    /// Whose share its pull slots count against: its namespace, the team.
    fn tenant(&self) -> String {
        self.latest.namespace().unwrap_or_default()
    }

    fn label(&self) -> String {
        format!(
            "{}/{}",
            self.latest.namespace().unwrap_or_default(),
            self.latest.name_any()
        )
    }
}

/// The watch of one workload kind across the cluster.
struct KindWatch {
    task: tokio::task::JoinHandle<()>,
    /// Tells events of this watch from those of a stopped earlier one.
    generation: u64,
    /// The last error while the kind has not been listed yet.
    error: Option<String>,
}

/// The core watches every cluster actor runs, by the name its logs use.
const PREFETCHES_WATCH: &str = "prefetches";
const NODES_WATCH: &str = "nodes";
const NAMESPACES_WATCH: &str = "namespaces";
const PODS_WATCH: &str = "pull pods";

pub struct ClusterActor {
    target: ClusterTarget,
    config: Arc<Config>,
    /// Every write of this cluster's client passes it (leader election).
    gate: WriteGate,
    status: Addr<StatusActor>,
    metrics: Metrics,
    span: tracing::Span,
    shared: Option<Arc<ClusterContext>>,
    connect_attempts: u32,
    prefetches: HashMap<String, PrefetchEntry>,
    prefetches_synced: bool,
    prefetch_init_seen: BTreeSet<String>,
    nodes: NodeIndex,
    workloads: WorkloadIndex,
    kind_watches: BTreeMap<WorkloadKind, KindWatch>,
    watch_generation: u64,
    pods: BTreeMap<(String, String), Pod>,
    pods_buffer: Option<BTreeMap<(String, String), Pod>>,
    pods_synced: bool,
    /// Who may use which namespace besides their own (the namespaces'
    /// annotations over `policy.cross_namespace`).
    namespace_policy: NamespacePolicy,
    namespaces_buffer: Option<BTreeMap<String, String>>,
    namespaces_synced: bool,
    /// Pairs each Prefetch would plan, and those the cluster's pair limit
    /// refuses.
    pair_claims: BTreeMap<String, usize>,
    pairs_refused: BTreeSet<String>,
    /// The pull pod slots, handed out round robin across Prefetches.
    queue: DispatchQueue,
    background: Vec<tokio::task::JoinHandle<()>>,
    last_health: Option<ClusterHealth>,
    /// The core watches whose last word was an error. The cluster is
    /// Connected again only once each of them has delivered an event: events
    /// another watch queued before the outage prove nothing.
    /// (Whether each was refused, 403.) A successful /readyz probe clears
    /// the others: a watch can resume after an outage without any event.
    failed_watches: BTreeMap<&'static str, bool>,
    version: String,
    /// The API server answers but says it is not ready (its `/readyz`): its
    /// etcd is down, say, which no watch shows, as the API server serves
    /// them from its cache.
    not_ready: bool,
    /// RBAC refused a pull pod create: Forbidden until one is allowed (a
    /// watch set up before the grant was revoked goes on working).
    write_refused: bool,
}

/// How often a connected cluster's `/readyz` is asked.
const READYZ_INTERVAL: Duration = Duration::from_secs(5);

impl ClusterActor {
    pub fn new(
        target: ClusterTarget,
        config: Arc<Config>,
        gate: WriteGate,
        status: Addr<StatusActor>,
        metrics: Metrics,
    ) -> Self {
        let span = info_span!("cluster", cluster = %target.name);
        let namespace_policy = NamespacePolicy::new(config.policy.cross_namespace);
        ClusterActor {
            target,
            config,
            gate,
            status,
            metrics,
            span,
            shared: None,
            connect_attempts: 0,
            prefetches: HashMap::new(),
            prefetches_synced: false,
            prefetch_init_seen: BTreeSet::new(),
            nodes: NodeIndex::default(),
            workloads: WorkloadIndex::default(),
            kind_watches: BTreeMap::new(),
            watch_generation: 0,
            pods: BTreeMap::new(),
            pods_buffer: None,
            pods_synced: false,
            namespace_policy,
            namespaces_buffer: None,
            namespaces_synced: false,
            pair_claims: BTreeMap::new(),
            pairs_refused: BTreeSet::new(),
            queue: DispatchQueue::new(0, 0),
            background: Vec::new(),
            last_health: None,
            failed_watches: BTreeMap::new(),
            version: String::new(),
            not_ready: false,
            write_refused: false,
        }
    }

    fn report(&mut self, health: ClusterHealth) {
        if self.last_health.as_ref() == Some(&health) {
            return;
        }
        match &health {
            ClusterHealth::Connected { version } => info!(%version, "connected"),
            other => warn!(state = other.label(), detail = ?other, "cluster not usable"),
        }
        self.last_health = Some(health.clone());
        self.status.do_send(ClusterHealthChanged {
            cluster: self.target.name.clone(),
            health,
        });
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        let target = self.target.clone();
        let api_qps = self.config.defaults.api_qps;
        let gate = self.gate.clone();
        let metrics = self.metrics.clone();
        let fut = async move { connect(&target, api_qps, gate, metrics).await }
            .instrument(self.span.clone());
        ctx.spawn(fut.into_actor(self).map(|result, actor, ctx| {
            let _span = actor.span.clone().entered();
            match result {
                Ok((client, version)) => {
                    actor.connect_attempts = 0;
                    actor.on_connected(client, version, ctx);
                }
                Err(health) => {
                    actor.report(health);
                    actor.retry_connect_later(ctx);
                }
            }
        }));
    }

    fn retry_connect_later(&mut self, ctx: &mut Context<Self>) {
        // Grows from 1 s to 10 s: quick to notice a cluster coming back, gentle
        // on one that stays down.
        let delay =
            Duration::from_secs(1u64 << self.connect_attempts.min(3)).min(Duration::from_secs(10));
        self.connect_attempts = self.connect_attempts.saturating_add(1);
        debug!(?delay, "retrying connection");
        ctx.run_later(delay, |actor, ctx| actor.connect(ctx));
    }

    fn on_connected(&mut self, client: Client, version: String, ctx: &mut Context<Self>) {
        // New watches: nothing of the old ones is still failing.
        self.failed_watches.clear();
        let defaults = &self.config.defaults;
        let reporter = Reporter {
            controller: "kube-prefetch".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let shared = Arc::new(ClusterContext {
            cluster: self.target.name.clone(),
            client: client.clone(),
            config: self.config.clone(),
            status: self.status.clone(),
            metrics: self.metrics.clone(),
            recorder: Recorder::new(client.clone(), reporter),
            to_cluster: ClusterLink::new(&ctx.address()),
        });
        self.shared = Some(shared);
        self.queue = DispatchQueue::new(
            defaults.max_parallel_per_node,
            defaults.max_parallel_per_cluster,
        );
        self.version = version.clone();
        self.report(ClusterHealth::Connected { version });

        let addr = ctx.address();
        let prefetches: Api<Prefetch> = Api::all(client.clone());
        self.spawn_watch(
            prefetches,
            watcher::Config::default(),
            PREFETCHES_WATCH,
            addr.clone(),
            PrefetchEvent,
        );
        let nodes: Api<Node> = Api::all(client.clone());
        self.spawn_watch(
            nodes,
            watcher::Config::default().page_size(NODE_LIST_PAGE),
            NODES_WATCH,
            addr.clone(),
            NodeEvent,
        );
        let namespaces: Api<Namespace> = Api::all(client.clone());
        self.spawn_watch(
            namespaces,
            watcher::Config::default(),
            NAMESPACES_WATCH,
            addr.clone(),
            NamespaceEvent,
        );
        let pods: Api<Pod> = Api::all(client.clone());
        self.spawn_watch(
            pods,
            watcher::Config::default().labels(&managed_selector()),
            PODS_WATCH,
            addr.clone(),
            PodEvent,
        );
        let span = self.span.clone();
        self.background
            .push(actix::spawn(probe_readyz(client, addr).instrument(span)));
    }

    /// Runs a watch as a task that forwards every event to this actor; the
    /// watcher itself re-lists and backs off when the connection breaks.
    fn spawn_watch<K, M>(
        &mut self,
        api: Api<K>,
        config: watcher::Config,
        what: &'static str,
        addr: Addr<Self>,
        wrap: fn(watcher::Event<K>) -> M,
    ) where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
        M: Message<Result = ()> + Send + 'static,
        Self: Handler<M> + Handler<WatchFailed>,
    {
        let span = self.span.clone();
        let task = actix::spawn(
            async move {
                let mut stream = watcher(api, config).default_backoff().boxed();
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(event) => addr.do_send(wrap(event)),
                        // 410 Expired (e.g. after an API server restart):
                        // the watcher lists again at once; nothing is wrong.
                        Err(error) if watch_error_code(&error) == Some(410) => {
                            debug!(watch = what, error = %describe_watch_error(&error), "watch expired; listing again");
                        }
                        Err(error) => addr.do_send::<WatchFailed>(WatchFailed {
                            what,
                            forbidden: watch_error_code(&error) == Some(403),
                            error: describe_watch_error(&error),
                        }),
                    }
                }
            }
            .instrument(span),
        );
        self.background.push(task);
    }

    fn selector_of(&self, prefetch: &Prefetch) -> WorkloadSelector {
        WorkloadSelector::for_spec(
            &prefetch.spec,
            &prefetch.namespace().unwrap_or_default(),
            &self.namespace_policy,
        )
    }

    /// One watch per workload kind some Prefetch selects: started when the
    /// first needs it, stopped (and its index dropped) when none does.
    fn ensure_kind_watches(&mut self, ctx: &mut Context<Self>) {
        let needed: BTreeSet<WorkloadKind> = self
            .prefetches
            .values()
            .flat_map(|entry| self.selector_of(&entry.latest).kinds)
            .collect();
        let unneeded: Vec<WorkloadKind> = self
            .kind_watches
            .keys()
            .filter(|kind| !needed.contains(kind))
            .copied()
            .collect();
        for kind in unneeded {
            if let Some(watch) = self.kind_watches.remove(&kind) {
                info!(%kind, "no Prefetch selects this kind any more; stopping its watch");
                watch.task.abort();
            }
            self.workloads.drop_kind(kind);
        }
        let Some(shared) = self.shared.clone() else {
            return;
        };
        for kind in needed {
            if self.kind_watches.contains_key(&kind) {
                continue;
            }
            self.watch_generation += 1;
            let generation = self.watch_generation;
            info!(%kind, "watching workloads of this kind");
            let task = spawn_kind_watch(
                kind,
                shared.client.clone(),
                generation,
                ctx.address(),
                self.span.clone(),
            );
            self.workloads.kind_mut(kind);
            self.kind_watches.insert(
                kind,
                KindWatch {
                    task,
                    generation,
                    error: None,
                },
            );
        }
    }

    /// Whether every kind `selector` needs was listed or failed to be (the
    /// Prefetch then reports the failure instead of waiting silently).
    fn workloads_settled(&self, selector: &WorkloadSelector) -> bool {
        selector.kinds.iter().all(|kind| {
            self.workloads.is_kind_synced(*kind)
                || self
                    .kind_watches
                    .get(kind)
                    .is_some_and(|watch| watch.error.is_some())
        })
    }

    fn workloads_for(&self, selector: &WorkloadSelector) -> Workloads {
        let errors = selector
            .kinds
            .iter()
            .filter_map(|kind| {
                let watch = self.kind_watches.get(kind)?;
                let error = watch.error.as_ref()?;
                Some(format!("cannot watch {kind}s: {error}"))
            })
            .collect::<Vec<String>>();
        Workloads {
            entries: self.workloads.select(selector),
            errors: selector.refusal.iter().cloned().chain(errors).collect(),
        }
    }

    fn targeted_nodes(&self, targeting: &NodeTargeting) -> Vec<Arc<NodeView>> {
        self.nodes
            .values()
            .filter(|node| targeting.targets(node))
            .cloned()
            .collect()
    }

    /// Starts the actor of `uid`, or gives it its new spec, once everything
    /// it plans from has been listed. Nothing is sent while the spec is
    /// unchanged (our own status writes come back as Prefetch events).
    fn deliver(&mut self, uid: &str) {
        if !(self.nodes.is_synced() && self.pods_synced && self.namespaces_synced) {
            return;
        }
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let Some(entry) = self.prefetches.get(uid) else {
            return;
        };
        // The selection also changes when a namespace's annotation does.
        let selector = self.selector_of(&entry.latest);
        if entry.delivered.as_ref().is_some_and(|delivered| {
            delivered.spec == entry.latest.spec && delivered.selector == selector
        }) {
            return;
        }
        if !self.workloads_settled(&selector) {
            // Planning now would drop every pair of the kinds not listed yet.
            return;
        }
        let targeting = targeting_of(&entry.latest.spec);
        let nodes = self.targeted_nodes(&targeting);
        let workloads = self.workloads_for(&selector);
        let latest = entry.latest.clone();
        let label = entry.label();
        let addr = match &entry.addr {
            Some(addr) => {
                addr.do_send(SpecChanged {
                    prefetch: latest.clone(),
                    nodes,
                    workloads,
                });
                addr.clone()
            }
            None => {
                let existing_pods: Vec<Pod> = self
                    .pods
                    .values()
                    .filter(|pod| {
                        pod.labels().get(PREFETCH_UID_LABEL).map(String::as_str) == Some(uid)
                    })
                    .cloned()
                    .collect();
                info!(prefetch = %label, "watching Prefetch");
                PrefetchActor::new(shared, (*latest).clone(), nodes, workloads, existing_pods)
                    .start()
            }
        };
        if let Some(entry) = self.prefetches.get_mut(uid) {
            entry.addr = Some(addr);
            entry.delivered = Some(Delivered {
                spec: latest.spec.clone(),
                targeting,
                selector,
            });
        }
    }

    fn deliver_all(&mut self) {
        let uids: Vec<String> = self.prefetches.keys().cloned().collect();
        for uid in uids {
            self.deliver(&uid);
        }
    }

    fn apply_prefetch(&mut self, prefetch: Prefetch, ctx: &mut Context<Self>) {
        let Some(uid) = prefetch.uid() else {
            return;
        };
        if prefetch.metadata.deletion_timestamp.is_some() {
            // Finalizers of others may keep it around; its work stops now.
            self.stop_prefetch(&uid, ctx);
            return;
        }
        let latest = Arc::new(prefetch);
        match self.prefetches.get_mut(&uid) {
            Some(entry) => entry.latest = latest,
            None => {
                self.prefetches.insert(
                    uid.clone(),
                    PrefetchEntry {
                        addr: None,
                        latest,
                        delivered: None,
                    },
                );
            }
        }
        self.ensure_kind_watches(ctx);
        self.deliver(&uid);
    }

    /// Tells the Prefetches whose standing under the cluster's pair limit
    /// changed (oldest first keep theirs, see `pull::limits`).
    fn apply_pair_limit(&mut self) {
        let limit = self.config.defaults.max_pairs_per_cluster;
        let claims: Vec<Claim> = self
            .pair_claims
            .iter()
            .filter_map(|(uid, pairs)| {
                let entry = self.prefetches.get(uid)?;
                Some(Claim {
                    created: entry
                        .latest
                        .metadata
                        .creation_timestamp
                        .as_ref()
                        .map(|time| time.0.to_string())
                        .unwrap_or_default(),
                    uid: uid.clone(),
                    pairs: *pairs,
                })
            })
            .collect();
        let refused = limits::refused(&claims, limit);
        for uid in refused.symmetric_difference(&self.pairs_refused) {
            if let Some(PrefetchEntry {
                addr: Some(addr), ..
            }) = self.prefetches.get(uid)
            {
                addr.do_send(ClusterPairLimit(refused.contains(uid).then_some(limit)));
            }
        }
        self.pairs_refused = refused;
    }

    fn stop_prefetch(&mut self, uid: &str, ctx: &mut Context<Self>) {
        // Its claim goes; the others may fit now.
        self.pairs_refused.remove(uid);
        if self.pair_claims.remove(uid).is_some() {
            self.apply_pair_limit();
        }
        if let Some(entry) = self.prefetches.remove(uid) {
            // Its slots go to the others at once; its pods are deleted by
            // its actor (or, if that fails, by the orphan sweep).
            self.queue.remove_owner(uid);
            self.grant_slots();
            if let Some(addr) = &entry.addr {
                info!(prefetch = %entry.label(), "Prefetch deleted; stopping its work");
                addr.do_send(Shutdown);
            }
            self.ensure_kind_watches(ctx);
        }
    }

    fn apply_node(&mut self, node: &Node) {
        let view = NodeView::from_node(node);
        if let Some(change) = self.nodes.apply(view.name.clone(), view) {
            self.route_node_change(change);
        }
    }

    /// Only the Prefetches that target the node before or after the change
    /// hear of it; each gets the entry by reference.
    fn route_node_change(&self, change: crate::pull::index::NodeChange) {
        for entry in self.prefetches.values() {
            if let (Some(addr), Some(delivered)) = (&entry.addr, &entry.delivered)
                && change.concerns(&delivered.targeting)
            {
                addr.do_send(NodeChanged(change.clone()));
            }
        }
    }

    /// Each Prefetch selecting a changed workload gets its new selection,
    /// once per batch of changes.
    fn route_workload_changes(&self, kind: WorkloadKind, changes: &[WorkloadChange]) {
        if changes.is_empty() {
            return;
        }
        for entry in self.prefetches.values() {
            if let (Some(addr), Some(delivered)) = (&entry.addr, &entry.delivered)
                && changes
                    .iter()
                    .any(|change| delivered.selector.concerns(kind, change))
            {
                addr.do_send(WorkloadsChanged(self.workloads_for(&delivered.selector)));
            }
        }
    }

    /// Tells the Prefetches selecting `kind` that its watch failed or
    /// recovered (their status shows it).
    fn route_kind_health(&self, kind: WorkloadKind) {
        for entry in self.prefetches.values() {
            if let (Some(addr), Some(delivered)) = (&entry.addr, &entry.delivered)
                && delivered.selector.kinds.contains(&kind)
            {
                addr.do_send(WorkloadsChanged(self.workloads_for(&delivered.selector)));
            }
        }
    }

    fn route_pod(&mut self, pod: Pod, deleted: bool) {
        let Some(uid) = pod.labels().get(PREFETCH_UID_LABEL).cloned() else {
            return;
        };
        match self.prefetches.get(&uid) {
            Some(PrefetchEntry {
                addr: Some(addr), ..
            }) => {
                if deleted {
                    addr.do_send(PodDeleted(pod));
                } else {
                    addr.do_send(PodChanged(pod));
                }
            }
            // Not started yet: it takes its pods from `self.pods` when it is.
            Some(_) => {}
            None if !deleted && self.prefetches_synced => self.delete_orphan(&pod),
            None => {}
        }
    }

    /// A pull pod whose Prefetch no longer exists (deleted while we were
    /// down, for instance) is removed so nothing leaks.
    fn delete_orphan(&mut self, pod: &Pod) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        if pod.metadata.deletion_timestamp.is_some() {
            return;
        }
        let namespace = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        info!(pod = %format!("{namespace}/{name}"), "deleting pull pod of a Prefetch that no longer exists");
        let task = actix::spawn(
            delete_pull_pod_until_gone(shared.client.clone(), namespace, name)
                .instrument(self.span.clone()),
        );
        self.background.retain(|task| !task.is_finished());
        self.background.push(task);
    }

    fn sweep_orphans(&mut self) {
        if !(self.prefetches_synced && self.pods_synced) {
            return;
        }
        let orphans: Vec<Pod> = self
            .pods
            .values()
            .filter(|pod| {
                pod.labels()
                    .get(PREFETCH_UID_LABEL)
                    .is_none_or(|uid| !self.prefetches.contains_key(uid))
            })
            .cloned()
            .collect();
        for pod in orphans {
            self.delete_orphan(&pod);
        }
    }
}

/// Watches every object of one workload kind in the cluster, trimmed to
/// what planning uses before it reaches the actor.
fn spawn_kind_watch(
    kind: WorkloadKind,
    client: Client,
    generation: u64,
    addr: Addr<ClusterActor>,
    span: tracing::Span,
) -> tokio::task::JoinHandle<()> {
    let task = async move {
        match kind {
            WorkloadKind::Deployment => watch_kind::<Deployment>(client, generation, addr).await,
            WorkloadKind::StatefulSet => watch_kind::<StatefulSet>(client, generation, addr).await,
            WorkloadKind::DaemonSet => watch_kind::<DaemonSet>(client, generation, addr).await,
            WorkloadKind::Job => watch_kind::<Job>(client, generation, addr).await,
            WorkloadKind::CronJob => watch_kind::<CronJob>(client, generation, addr).await,
        }
    };
    actix::spawn(task.instrument(span))
}

async fn watch_kind<K>(client: Client, generation: u64, addr: Addr<ClusterActor>)
where
    K: Resource<DynamicType = ()>
        + PodTemplated
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    let kind = K::KIND;
    let api: Api<K> = Api::all(client);
    let key = |object: &K| (object.namespace().unwrap_or_default(), object.name_any());
    let trim = |object: &K| {
        object.pod_spec().map(|spec| WorkloadEntry {
            labels: object.labels().clone(),
            workload: WorkloadImages::from_pod_spec(
                kind,
                &object.namespace().unwrap_or_default(),
                &object.name_any(),
                spec,
            ),
        })
    };
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(item) = stream.next().await {
        let update = match item {
            Ok(watcher::Event::Init) => WorkloadUpdate::Init,
            Ok(watcher::Event::InitApply(object)) => {
                WorkloadUpdate::InitApply(key(&object), trim(&object))
            }
            Ok(watcher::Event::InitDone) => WorkloadUpdate::InitDone,
            Ok(watcher::Event::Apply(object)) => WorkloadUpdate::Apply(key(&object), trim(&object)),
            Ok(watcher::Event::Delete(object)) => WorkloadUpdate::Delete(key(&object)),
            Err(error) => {
                let message = describe_watch_error(&error);
                warn!(%kind, error = %message, "workload watch failed; retrying");
                WorkloadUpdate::Failed(message)
            }
        };
        addr.do_send(WorkloadEvent {
            kind,
            generation,
            update,
        });
    }
}

pub enum WorkloadUpdate {
    Init,
    InitApply(WorkloadKey, Option<WorkloadEntry>),
    InitDone,
    Apply(WorkloadKey, Option<WorkloadEntry>),
    Delete(WorkloadKey),
    Failed(String),
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct WorkloadEvent {
    pub kind: WorkloadKind,
    pub generation: u64,
    pub update: WorkloadUpdate,
}

async fn connect(
    target: &ClusterTarget,
    api_qps: f64,
    gate: WriteGate,
    metrics: Metrics,
) -> Result<(Client, String), ClusterHealth> {
    let client = build_client(target, Some(api_qps), gate, Some(metrics))
        .await
        .map_err(|error| ClusterHealth::Unreachable {
            reason: error.to_string(),
        })?;
    let version = client
        .apiserver_version()
        .await
        .map_err(|error| ClusterHealth::Unreachable {
            reason: describe_kube_error(&error),
        })?;
    // One cheap list proves both that the CRD is installed and that we may read it.
    let prefetches: Api<Prefetch> = Api::all(client.clone());
    match prefetches.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok((client, version.git_version)),
        Err(error) => Err(match api_status_code(&error) {
            Some(404) => ClusterHealth::CrdMissing {
                reason: "the Prefetch CRD (prefetches.cache.techsquad.rocks) is not installed; apply deploy/crd.yaml".into(),
            },
            Some(401) | Some(403) => ClusterHealth::Forbidden {
                what: format!(
                    "list prefetches.cache.techsquad.rocks: {}; apply deploy/target/rbac.yaml",
                    describe_kube_error(&error)
                ),
            },
            _ => ClusterHealth::Unreachable {
                reason: describe_kube_error(&error),
            },
        }),
    }
}

/// Builds a client for one kubeconfig context, limited to `api_qps`
/// requests per second when given, whose writes pass `gate` (one place for
/// every write, whoever makes it), counting the API server's answers in
/// `metrics` when given. Must run on the Arbiter that will use the client:
/// its connection pool lives on that runtime.
pub async fn build_client(
    target: &ClusterTarget,
    api_qps: Option<f64>,
    gate: WriteGate,
    metrics: Option<Metrics>,
) -> Result<Client, Error> {
    let kubeconfig =
        Kubeconfig::read_from(&target.kubeconfig).map_err(|source| Error::ReadKubeconfig {
            cluster: target.name.clone(),
            path: target.kubeconfig.clone(),
            source,
        })?;
    let options = KubeConfigOptions {
        context: Some(target.context.clone()),
        ..KubeConfigOptions::default()
    };
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|source| Error::KubeconfigContext {
            cluster: target.name.clone(),
            context: target.context.clone(),
            source,
        })?;
    config.connect_timeout = Some(Duration::from_secs(5));
    let rate = api_qps.and_then(request_rate);
    // kube's own retry of 429, 503 and 504 answers sits below any layer
    // added here, so its retries would bypass the rate limit (and the
    // answer count): with a limit, the same retry is added above it instead.
    config.default_retry = rate.is_none();
    let builder = ClientBuilder::try_from(config).map_err(|source| Error::BuildClient {
        cluster: target.name.clone(),
        source,
    })?;
    // Innermost: every answer the server gave is counted, retried or not.
    let cluster = target.name.clone();
    let count = MapResponseLayer::new(move |response: http::Response<_>| {
        if let Some(metrics) = &metrics {
            metrics.api_response(&cluster, response.status().as_u16());
        }
        response
    });
    let builder = builder.with_layer(&count);
    // Outside the rate limit: a refused write takes no request slot.
    let gate = FilterLayer::new(move |request| gate.check(request));
    Ok(match rate {
        // Counts request starts, retries included; a long-running watch
        // holds no slot. The retry layer clones the service below it for
        // each retry: the buffer makes every clone share one rate limit.
        Some(rate) => builder
            .with_layer(&RateLimitLayer::new(rate.0, rate.1))
            .with_layer(&BufferLayer::new(1024))
            .with_layer(&RetryLayer::new(RetryPolicy::server_retry()))
            .with_layer(&gate)
            .build(),
        None => builder.with_layer(&gate).build(),
    })
}

/// `qps` as "n requests per period" for tower's rate limiter; `None` when
/// the limit is off (zero, negative or not a number).
fn request_rate(qps: f64) -> Option<(u64, Duration)> {
    if !qps.is_finite() || qps <= 0.0 {
        return None;
    }
    if qps >= 1.0 {
        Some((qps.round() as u64, Duration::from_secs(1)))
    } else {
        Some((1, Duration::from_secs_f64(1.0 / qps)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_readyz_checks_are_named() {
        let body = "[+]ping ok\n[+]log ok\n[-]etcd failed: reason withheld\n[+]informer-sync ok\nreadyz check failed";
        assert_eq!(failed_readyz_checks(body), "etcd failed: reason withheld");
        assert_eq!(
            failed_readyz_checks(" service unavailable\n"),
            "service unavailable"
        );
    }

    #[test]
    fn request_rate_turns_qps_into_requests_per_period() {
        assert_eq!(request_rate(20.0), Some((20, Duration::from_secs(1))));
        assert_eq!(request_rate(0.5), Some((1, Duration::from_secs(2))));
        assert_eq!(request_rate(0.0), None);
        assert_eq!(request_rate(-3.0), None);
        assert_eq!(request_rate(f64::NAN), None);
    }
}

fn watch_error_code(error: &watcher::Error) -> Option<u16> {
    match error {
        watcher::Error::InitialListFailed(source)
        | watcher::Error::WatchStartFailed(source)
        | watcher::Error::WatchFailed(source) => api_status_code(source),
        watcher::Error::WatchError(status) => Some(status.code),
        _ => None,
    }
}

impl Actor for ClusterActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let _span = self.span.clone().entered();
        info!(context = %self.target.context, kubeconfig = %self.target.kubeconfig.display(), "starting");
        #[cfg(feature = "test-hooks")]
        crate::actors::fault_hook::arm(ctx, &self.target.name);
        self.connect(ctx);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        for task in self.background.drain(..) {
            task.abort();
        }
        for (_, watch) in std::mem::take(&mut self.kind_watches) {
            watch.task.abort();
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct PrefetchEvent(pub watcher::Event<Prefetch>);

#[derive(Message)]
#[rtype(result = "()")]
pub struct NodeEvent(pub watcher::Event<Node>);

#[derive(Message)]
#[rtype(result = "()")]
pub struct PodEvent(pub watcher::Event<Pod>);

#[derive(Message)]
#[rtype(result = "()")]
pub struct NamespaceEvent(pub watcher::Event<Namespace>);

/// A namespace's name and its [`PREFETCH_FROM_ANNOTATION`], if any.
fn prefetch_from(namespace: &Namespace) -> (String, Option<String>) {
    (
        namespace.name_any(),
        namespace
            .annotations()
            .get(PREFETCH_FROM_ANNOTATION)
            .cloned(),
    )
}

impl Handler<NamespaceEvent> for ClusterActor {
    type Result = ();
    fn handle(&mut self, NamespaceEvent(event): NamespaceEvent, _: &mut Self::Context) {
        let _span = self.span.clone().entered();
        self.mark_healthy(Some(NAMESPACES_WATCH));
        let changed = match event {
            watcher::Event::Init => {
                self.namespaces_buffer = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(namespace) => {
                if let (name, Some(annotation)) = prefetch_from(&namespace) {
                    self.namespaces_buffer
                        .get_or_insert_with(BTreeMap::new)
                        .insert(name, annotation);
                }
                false
            }
            watcher::Event::InitDone => {
                let listed = self.namespaces_buffer.take().unwrap_or_default();
                let changed = self.namespace_policy.replace_all(
                    listed
                        .iter()
                        .map(|(name, value)| (name.as_str(), value.as_str())),
                );
                let first = !self.namespaces_synced;
                self.namespaces_synced = true;
                changed || first
            }
            watcher::Event::Apply(namespace) => {
                let (name, annotation) = prefetch_from(&namespace);
                self.namespace_policy.set(&name, annotation.as_deref())
            }
            watcher::Event::Delete(namespace) => {
                self.namespace_policy.set(&namespace.name_any(), None)
            }
        };
        if changed && self.namespaces_synced {
            debug!("namespace annotations changed; re-selecting");
            self.deliver_all();
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct WatchFailed {
    pub what: &'static str,
    pub error: String,
    pub forbidden: bool,
}

impl Handler<PairsPlanned> for ClusterActor {
    type Result = ();
    fn handle(&mut self, msg: PairsPlanned, _: &mut Self::Context) {
        if !self.prefetches.contains_key(&msg.uid) {
            return;
        }
        let first = self
            .pair_claims
            .insert(msg.uid.clone(), msg.pairs)
            .is_none();
        let before = self.pairs_refused.contains(&msg.uid);
        self.apply_pair_limit();
        // Its first claim always gets an answer (it dispatches nothing
        // until then); later ones only when the answer changes.
        if first
            && before == self.pairs_refused.contains(&msg.uid)
            && let Some(PrefetchEntry {
                addr: Some(addr), ..
            }) = self.prefetches.get(&msg.uid)
        {
            let limit = self.config.defaults.max_pairs_per_cluster;
            addr.do_send(ClusterPairLimit(
                self.pairs_refused.contains(&msg.uid).then_some(limit),
            ));
        }
    }
}

impl Handler<PrefetchEvent> for ClusterActor {
    type Result = ();
    fn handle(&mut self, PrefetchEvent(event): PrefetchEvent, ctx: &mut Self::Context) {
        let _span = self.span.clone().entered();
        self.mark_healthy(Some(PREFETCHES_WATCH));
        match event {
            watcher::Event::Init => self.prefetch_init_seen.clear(),
            watcher::Event::InitApply(prefetch) => {
                if let Some(uid) = prefetch.uid() {
                    self.prefetch_init_seen.insert(uid);
                }
                self.apply_prefetch(prefetch, ctx);
            }
            watcher::Event::InitDone => {
                // Anything not re-listed was deleted while the watch was down.
                let gone: Vec<String> = self
                    .prefetches
                    .keys()
                    .filter(|uid| !self.prefetch_init_seen.contains(*uid))
                    .cloned()
                    .collect();
                for uid in gone {
                    self.stop_prefetch(&uid, ctx);
                }
                self.prefetches_synced = true;
                self.sweep_orphans();
            }
            watcher::Event::Apply(prefetch) => self.apply_prefetch(prefetch, ctx),
            watcher::Event::Delete(prefetch) => {
                if let Some(uid) = prefetch.uid() {
                    self.stop_prefetch(&uid, ctx);
                }
            }
        }
    }
}

impl Handler<NodeEvent> for ClusterActor {
    type Result = ();
    fn handle(&mut self, NodeEvent(event): NodeEvent, _: &mut Self::Context) {
        let _span = self.span.clone().entered();
        self.mark_healthy(Some(NODES_WATCH));
        match event {
            watcher::Event::Init => self.nodes.begin_relist(),
            watcher::Event::InitApply(node) => {
                let view = NodeView::from_node(&node);
                self.nodes.relist_apply(view.name.clone(), view);
            }
            watcher::Event::InitDone => {
                for change in self.nodes.finish_relist() {
                    self.route_node_change(change);
                }
                self.deliver_all();
            }
            watcher::Event::Apply(node) => self.apply_node(&node),
            watcher::Event::Delete(node) => {
                if let Some(change) = self.nodes.delete(&node.name_any()) {
                    self.route_node_change(change);
                }
            }
        }
    }
}

impl Handler<WorkloadEvent> for ClusterActor {
    type Result = ();
    fn handle(&mut self, msg: WorkloadEvent, _: &mut Self::Context) {
        let kind = msg.kind;
        if self
            .kind_watches
            .get(&kind)
            .is_none_or(|watch| watch.generation != msg.generation)
        {
            // From a watch stopped since; its kind may be watched anew.
            return;
        }
        let _span = self.span.clone().entered();
        let index = self.workloads.kind_mut(kind);
        match msg.update {
            WorkloadUpdate::Init => index.begin_relist(),
            WorkloadUpdate::InitApply(key, entry) => {
                if let Some(entry) = entry {
                    index.relist_apply(key, entry);
                }
            }
            WorkloadUpdate::InitDone => {
                let changes = index.finish_relist();
                let recovered = self
                    .kind_watches
                    .get_mut(&kind)
                    .and_then(|watch| watch.error.take())
                    .is_some();
                if recovered {
                    self.route_kind_health(kind);
                } else {
                    self.route_workload_changes(kind, &changes);
                }
                self.deliver_all();
            }
            WorkloadUpdate::Apply(key, Some(entry)) => {
                let change = index.apply(key, entry);
                self.route_workload_changes(kind, change.as_slice());
            }
            WorkloadUpdate::Apply(key, None) | WorkloadUpdate::Delete(key) => {
                let change = index.delete(&key);
                self.route_workload_changes(kind, change.as_slice());
            }
            WorkloadUpdate::Failed(error) => {
                // After the first list the index stays usable while the
                // watcher retries; before it, the Prefetches must say why
                // they cannot plan.
                if !index.is_synced()
                    && let Some(watch) = self.kind_watches.get_mut(&kind)
                {
                    let first = watch.error.is_none();
                    watch.error = Some(error);
                    if first {
                        self.route_kind_health(kind);
                        self.deliver_all();
                    }
                }
            }
        }
    }
}

impl Handler<PodEvent> for ClusterActor {
    type Result = ();
    fn handle(&mut self, PodEvent(event): PodEvent, _: &mut Self::Context) {
        let _span = self.span.clone().entered();
        self.mark_healthy(Some(PODS_WATCH));
        let key = |pod: &Pod| (pod.namespace().unwrap_or_default(), pod.name_any());
        match event {
            watcher::Event::Init => self.pods_buffer = Some(BTreeMap::new()),
            watcher::Event::InitApply(pod) => {
                self.pods_buffer
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key(&pod), pod);
            }
            watcher::Event::InitDone => {
                let pods = self.pods_buffer.take().unwrap_or_default();
                // Pods that vanished while the watch was down count as deleted.
                let vanished: Vec<Pod> = self
                    .pods
                    .iter()
                    .filter(|(k, _)| !pods.contains_key(*k))
                    .map(|(_, pod)| pod.clone())
                    .collect();
                self.pods = pods;
                self.pods_synced = true;
                for pod in vanished {
                    self.route_pod(pod, true);
                }
                let current: Vec<Pod> = self.pods.values().cloned().collect();
                for pod in current {
                    self.route_pod(pod, false);
                }
                self.deliver_all();
                self.sweep_orphans();
            }
            watcher::Event::Apply(pod) => {
                self.pods.insert(key(&pod), pod.clone());
                self.route_pod(pod, false);
            }
            watcher::Event::Delete(pod) => {
                self.pods.remove(&key(&pod));
                self.route_pod(pod, true);
            }
        }
    }
}

/// Asks the API server's `/readyz` every [`READYZ_INTERVAL`] and tells the
/// actor what it answered. A refused connection is left to the watches.
async fn probe_readyz(client: Client, addr: Addr<ClusterActor>) {
    loop {
        tokio::time::sleep(READYZ_INTERVAL).await;
        let request = match http::Request::get("/readyz?verbose").body(Vec::new()) {
            Ok(request) => request,
            Err(error) => {
                warn!(%error, "cannot build the /readyz request");
                return;
            }
        };
        let answer = match client.request_text(request).await {
            Ok(_) => Readyz(None),
            Err(kube::Error::Api(status)) => Readyz(Some(failed_readyz_checks(&status.message))),
            Err(error) => {
                debug!(error = %describe_kube_error(&error), "/readyz not answered");
                continue;
            }
        };
        addr.do_send(answer);
    }
}

/// The failed checks of a verbose `/readyz` answer (`[-]etcd failed: ...`),
/// or the whole answer when it names none.
fn failed_readyz_checks(body: &str) -> String {
    let failed: Vec<&str> = body
        .lines()
        .filter_map(|line| line.trim().strip_prefix("[-]"))
        .collect();
    if failed.is_empty() {
        body.trim().to_string()
    } else {
        failed.join("; ")
    }
}

/// What `/readyz` said: `None` ready, `Some(failed checks)` not.
#[derive(Message)]
#[rtype(result = "()")]
struct Readyz(Option<String>);

impl Handler<Readyz> for ClusterActor {
    type Result = ();
    fn handle(&mut self, Readyz(failed): Readyz, _: &mut Self::Context) {
        let _span = self.span.clone().entered();
        match failed {
            Some(failed) => {
                self.not_ready = true;
                self.report(ClusterHealth::Unreachable {
                    reason: format!("the API server is not ready (/readyz): {failed}"),
                });
            }
            // The API server answers: a watch that failed during an outage
            // may have resumed with nothing new to say. Forbidden watches
            // stay failed until they deliver an event themselves.
            None if self.not_ready || !self.failed_watches.is_empty() => {
                self.not_ready = false;
                self.failed_watches.retain(|_, forbidden| *forbidden);
                self.mark_healthy(None);
            }
            None => {}
        }
    }
}

impl Handler<WriteRefused> for ClusterActor {
    type Result = ();
    fn handle(&mut self, msg: WriteRefused, _: &mut Self::Context) {
        let _span = self.span.clone().entered();
        self.write_refused = true;
        self.report(ClusterHealth::Forbidden {
            what: format!("{}; apply deploy/target/rbac.yaml", msg.what),
        });
    }
}

impl Handler<WriteAllowed> for ClusterActor {
    type Result = ();
    fn handle(&mut self, _: WriteAllowed, _: &mut Self::Context) {
        if self.write_refused {
            let _span = self.span.clone().entered();
            self.write_refused = false;
            self.mark_healthy(None);
        }
    }
}

impl ClusterActor {
    /// A watch delivered an event (`watch`), or a check passed (`None`):
    /// the cluster is back once no core watch is still failing.
    fn mark_healthy(&mut self, watch: Option<&'static str>) {
        if let Some(watch) = watch {
            self.failed_watches.remove(watch);
        }
        if !self.failed_watches.is_empty() {
            return;
        }
        let was_down = matches!(
            self.last_health,
            Some(ClusterHealth::Unreachable { .. } | ClusterHealth::Forbidden { .. })
        );
        // Watches served from the API server's cache say nothing of its etcd.
        if was_down && self.shared.is_some() && !self.not_ready && !self.write_refused {
            let version = self.version.clone();
            self.report(ClusterHealth::Connected { version });
        }
    }
}

impl Handler<WatchFailed> for ClusterActor {
    type Result = ();
    fn handle(&mut self, msg: WatchFailed, _: &mut Self::Context) {
        let _span = self.span.clone().entered();
        warn!(watch = msg.what, error = %msg.error, "watch failed; retrying with backoff");
        self.failed_watches.insert(msg.what, msg.forbidden);
        let detail = format!("watching {}: {}", msg.what, msg.error);
        self.report(if msg.forbidden {
            ClusterHealth::Forbidden { what: detail }
        } else {
            ClusterHealth::Unreachable { reason: detail }
        });
    }
}

impl ClusterActor {
    /// Hands free slots to the Prefetches waiting for them, and asks for
    /// the slots the queue takes back for them (see `pull::dispatch`).
    fn grant_slots(&mut self) {
        for (uid, keys) in self.queue.grant() {
            match self
                .prefetches
                .get(&uid)
                .and_then(|entry| entry.addr.as_ref())
            {
                Some(addr) => addr.do_send(SlotsGranted(keys)),
                None => self.queue.remove_owner(&uid),
            }
        }
        for preemption in self.queue.preempt() {
            let waiting = self
                .prefetches
                .get(&preemption.for_owner)
                .map_or_else(|| preemption.for_owner.clone(), PrefetchEntry::label);
            match self
                .prefetches
                .get(&preemption.holder)
                .and_then(|entry| entry.addr.as_ref())
            {
                Some(addr) => addr.do_send(Preempt {
                    node: preemption.node,
                    waiting,
                }),
                None => self.queue.remove_owner(&preemption.holder),
            }
        }
    }
}

impl Handler<RequestSlots> for ClusterActor {
    type Result = ();
    fn handle(&mut self, msg: RequestSlots, _: &mut Self::Context) {
        // A request of a Prefetch stopped meanwhile must not bring it back.
        let Some(tenant) = self.prefetches.get(&msg.uid).map(PrefetchEntry::tenant) else {
            return;
        };
        self.queue
            .request(&msg.uid, &tenant, msg.candidates, msg.cap);
        self.grant_slots();
    }
}

impl Handler<ReleaseSlot> for ClusterActor {
    type Result = ();
    fn handle(&mut self, msg: ReleaseSlot, _: &mut Self::Context) {
        self.queue.release(&msg.uid, &msg.node);
        self.grant_slots();
    }
}

impl Handler<AdoptSlot> for ClusterActor {
    type Result = ();
    fn handle(&mut self, msg: AdoptSlot, _: &mut Self::Context) {
        if let Some(tenant) = self.prefetches.get(&msg.uid).map(PrefetchEntry::tenant) {
            self.queue.force_acquire(&msg.uid, &tenant, &msg.node);
        }
    }
}

/// Why a Prefetch's drill-down has no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GridError {
    /// The cluster has no such Prefetch (HTTP 404).
    NotFound(String),
    /// Not answerable now (HTTP 503): still listing, or stopping.
    Unavailable(String),
}

/// The drill-down of the Prefetch `namespace/name`: the cluster hands its
/// nodes to that Prefetch's actor, which answers from its own state.
#[derive(Message)]
#[rtype(result = "Result<NodeGrid, GridError>")]
pub struct PrefetchNodes {
    pub namespace: String,
    pub name: String,
    pub query: GridQuery,
}

/// How long the Prefetch's actor may take to answer (it is busy at most
/// with one plan; longer means it is stuck, and the caller hears so).
const GRID_TIMEOUT: Duration = Duration::from_secs(10);

impl Handler<PrefetchNodes> for ClusterActor {
    type Result = ResponseFuture<Result<NodeGrid, GridError>>;
    fn handle(&mut self, msg: PrefetchNodes, _: &mut Self::Context) -> Self::Result {
        let cluster = &self.target.name;
        let label = format!("{}/{}", msg.namespace, msg.name);
        let entry = self.prefetches.values().find(|entry| {
            entry.latest.namespace().as_deref() == Some(msg.namespace.as_str())
                && entry.latest.name_any() == msg.name
        });
        let addr = match entry {
            Some(PrefetchEntry {
                addr: Some(addr), ..
            }) => Ok(addr.clone()),
            Some(_) => Err(GridError::Unavailable(format!(
                "Prefetch {label} in cluster {cluster} is not planned yet: the nodes, pull pods and workloads it needs are still being listed"
            ))),
            None if self.prefetches_synced => Err(GridError::NotFound(format!(
                "no Prefetch {label} in cluster {cluster}"
            ))),
            None => Err(GridError::Unavailable(format!(
                "cluster {cluster} has not listed its Prefetches yet ({})",
                self.last_health
                    .as_ref()
                    .map_or("Connecting", ClusterHealth::label)
            ))),
        };
        let nodes = match &addr {
            Ok(_) => self.nodes.values().cloned().collect(),
            Err(_) => Vec::new(),
        };
        let stopped = format!("Prefetch {label} in cluster {cluster} did not answer");
        Box::pin(async move {
            addr?
                .send(GetNodeGrid {
                    nodes,
                    query: msg.query,
                })
                .timeout(GRID_TIMEOUT)
                .await
                .map_err(|error| GridError::Unavailable(format!("{stopped}: {error}")))
        })
    }
}
