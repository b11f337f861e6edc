//! One actor per target cluster, running on its own Arbiter: connects, keeps
//! the shared watches (Prefetch objects, nodes, pull pods) and routes their
//! events to one PrefetchActor per Prefetch.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use kube::client::ClientBuilder;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tower::limit::RateLimitLayer;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::actors::delete_pull_pod;
use crate::actors::prefetch::{
    Kick, NodesChanged, PodChanged, PodDeleted, PrefetchActor, Shutdown, SpecChanged,
};
use crate::actors::status::{ClusterHealth, ClusterHealthChanged, StatusActor};
use crate::api::Prefetch;
use crate::config::{ClusterTarget, Config};
use crate::error::{Error, api_status_code, describe_kube_error, describe_watch_error};
use crate::metrics::Metrics;
use crate::pull::podspec::{PREFETCH_UID_LABEL, managed_selector};
use crate::pull::targeting::NodeView;
use crate::pull::tracker::Budget;

/// What every PrefetchActor of one cluster shares.
pub struct ClusterContext {
    pub cluster: String,
    pub client: Client,
    pub config: Arc<Config>,
    pub status: Addr<StatusActor>,
    pub metrics: Metrics,
    /// Per-node and per-cluster pull pod slots, shared by all Prefetches.
    pub budget: Arc<Mutex<Budget>>,
    pub recorder: Recorder,
    pub cluster_actor: Addr<ClusterActor>,
}

impl ClusterContext {
    pub fn budget(&self) -> std::sync::MutexGuard<'_, Budget> {
        // A poisoned lock only means another actor panicked mid-update; the
        // counters are still the best information there is.
        self.budget
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

struct PrefetchEntry {
    addr: Addr<PrefetchActor>,
    namespace: String,
    name: String,
}

pub struct ClusterActor {
    target: ClusterTarget,
    config: Arc<Config>,
    status: Addr<StatusActor>,
    metrics: Metrics,
    span: tracing::Span,
    shared: Option<Arc<ClusterContext>>,
    connect_attempts: u32,
    prefetches: HashMap<String, PrefetchEntry>,
    /// Prefetches seen before nodes and pull pods were listed: planning
    /// earlier would see no nodes (and call that READY) or create pods that
    /// already exist instead of adopting them.
    waiting: BTreeMap<String, Prefetch>,
    prefetches_synced: bool,
    nodes_synced: bool,
    prefetch_init_seen: BTreeSet<String>,
    nodes: Arc<BTreeMap<String, NodeView>>,
    nodes_buffer: Option<BTreeMap<String, NodeView>>,
    pods: BTreeMap<(String, String), Pod>,
    pods_buffer: Option<BTreeMap<(String, String), Pod>>,
    pods_synced: bool,
    background: Vec<tokio::task::JoinHandle<()>>,
    last_health: Option<ClusterHealth>,
    version: String,
}

impl ClusterActor {
    pub fn new(
        target: ClusterTarget,
        config: Arc<Config>,
        status: Addr<StatusActor>,
        metrics: Metrics,
    ) -> Self {
        let span = info_span!("cluster", cluster = %target.name);
        ClusterActor {
            target,
            config,
            status,
            metrics,
            span,
            shared: None,
            connect_attempts: 0,
            prefetches: HashMap::new(),
            waiting: BTreeMap::new(),
            prefetches_synced: false,
            nodes_synced: false,
            prefetch_init_seen: BTreeSet::new(),
            nodes: Arc::new(BTreeMap::new()),
            nodes_buffer: None,
            pods: BTreeMap::new(),
            pods_buffer: None,
            pods_synced: false,
            background: Vec::new(),
            last_health: None,
            version: String::new(),
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
        let fut = async move { connect(&target, api_qps).await }.instrument(self.span.clone());
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
            budget: Arc::new(Mutex::new(Budget::new(
                defaults.max_parallel_per_node,
                defaults.max_parallel_per_cluster,
            ))),
            recorder: Recorder::new(client.clone(), reporter),
            cluster_actor: ctx.address(),
        });
        self.shared = Some(shared);
        self.version = version.clone();
        self.report(ClusterHealth::Connected { version });

        let addr = ctx.address();
        let prefetches: Api<Prefetch> = Api::all(client.clone());
        self.spawn_watch(
            prefetches,
            watcher::Config::default(),
            "prefetches",
            addr.clone(),
            PrefetchEvent,
        );
        let nodes: Api<Node> = Api::all(client.clone());
        self.spawn_watch(
            nodes,
            watcher::Config::default(),
            "nodes",
            addr.clone(),
            NodeEvent,
        );
        let pods: Api<Pod> = Api::all(client);
        self.spawn_watch(
            pods,
            watcher::Config::default().labels(&managed_selector()),
            "pull pods",
            addr,
            PodEvent,
        );
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

    fn start_prefetch(&mut self, prefetch: Prefetch) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let Some(uid) = prefetch.uid() else {
            return;
        };
        let existing_pods: Vec<Pod> = self
            .pods
            .values()
            .filter(|pod| pod.labels().get(PREFETCH_UID_LABEL) == Some(&uid))
            .cloned()
            .collect();
        let namespace = prefetch.namespace().unwrap_or_default();
        let name = prefetch.name_any();
        let actor = PrefetchActor::new(shared, prefetch, self.nodes.clone(), existing_pods);
        let addr = actor.start();
        info!(prefetch = %format!("{namespace}/{name}"), "watching Prefetch");
        self.prefetches.insert(
            uid,
            PrefetchEntry {
                addr,
                namespace,
                name,
            },
        );
    }

    fn apply_prefetch(&mut self, prefetch: Prefetch) {
        let Some(uid) = prefetch.uid() else {
            return;
        };
        if prefetch.metadata.deletion_timestamp.is_some() {
            // Finalizers of others may keep it around; its work stops now.
            self.stop_prefetch(&uid);
            return;
        }
        match self.prefetches.get(&uid) {
            Some(entry) => entry.addr.do_send(SpecChanged(Arc::new(prefetch))),
            None if self.nodes_synced && self.pods_synced => self.start_prefetch(prefetch),
            None => {
                self.waiting.insert(uid, prefetch);
            }
        }
    }

    fn start_waiting(&mut self) {
        if !(self.nodes_synced && self.pods_synced) {
            return;
        }
        for (_, prefetch) in std::mem::take(&mut self.waiting) {
            self.start_prefetch(prefetch);
        }
    }

    fn knows_prefetch(&self, uid: &str) -> bool {
        self.prefetches.contains_key(uid) || self.waiting.contains_key(uid)
    }

    fn stop_prefetch(&mut self, uid: &str) {
        self.waiting.remove(uid);
        if let Some(entry) = self.prefetches.remove(uid) {
            info!(prefetch = %format!("{}/{}", entry.namespace, entry.name), "Prefetch deleted; stopping its work");
            entry.addr.do_send(Shutdown);
        }
    }

    fn publish_nodes(&mut self, nodes: BTreeMap<String, NodeView>) {
        if *self.nodes == nodes {
            return;
        }
        self.nodes = Arc::new(nodes);
        for entry in self.prefetches.values() {
            entry.addr.do_send(NodesChanged(self.nodes.clone()));
        }
    }

    fn route_pod(&mut self, pod: Pod, deleted: bool) {
        let Some(uid) = pod.labels().get(PREFETCH_UID_LABEL).cloned() else {
            return;
        };
        match self.prefetches.get(&uid) {
            Some(entry) if deleted => entry.addr.do_send(PodDeleted(pod)),
            Some(entry) => entry.addr.do_send(PodChanged(pod)),
            None if !deleted && self.prefetches_synced && !self.knows_prefetch(&uid) => {
                self.delete_orphan(&pod)
            }
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
            async move {
                if let Err(error) = delete_pull_pod(shared.client.clone(), &namespace, &name).await
                {
                    warn!(pod = %name, %error, "could not delete orphaned pull pod");
                }
            }
            .instrument(self.span.clone()),
        );
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
                    .is_none_or(|uid| !self.knows_prefetch(uid))
            })
            .cloned()
            .collect();
        for pod in orphans {
            self.delete_orphan(&pod);
        }
    }
}

async fn connect(target: &ClusterTarget, api_qps: f64) -> Result<(Client, String), ClusterHealth> {
    let client =
        build_client(target, Some(api_qps))
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
/// requests per second when given. Must run on the Arbiter that will use the
/// client: its connection pool lives on that runtime.
pub async fn build_client(target: &ClusterTarget, api_qps: Option<f64>) -> Result<Client, Error> {
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
    let builder = ClientBuilder::try_from(config).map_err(|source| Error::BuildClient {
        cluster: target.name.clone(),
        source,
    })?;
    Ok(match api_qps.and_then(request_rate) {
        // Counts request starts; a long-running watch holds no slot.
        Some(rate) => builder
            .with_layer(&RateLimitLayer::new(rate.0, rate.1))
            .build(),
        None => builder.build(),
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
        _ => None,
    }
}

impl Actor for ClusterActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let _span = self.span.clone().entered();
        info!(context = %self.target.context, kubeconfig = %self.target.kubeconfig.display(), "starting");
        self.connect(ctx);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        for task in self.background.drain(..) {
            task.abort();
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
pub struct WatchFailed {
    pub what: &'static str,
    pub error: String,
    pub forbidden: bool,
}

/// A PrefetchActor gave pull slots back: others may now use them.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SlotsFreed {
    pub from_uid: String,
}

impl Handler<PrefetchEvent> for ClusterActor {
    type Result = ();
    fn handle(&mut self, PrefetchEvent(event): PrefetchEvent, _: &mut Self::Context) {
        let _span = self.span.clone().entered();
        self.mark_healthy();
        match event {
            watcher::Event::Init => self.prefetch_init_seen.clear(),
            watcher::Event::InitApply(prefetch) => {
                if let Some(uid) = prefetch.uid() {
                    self.prefetch_init_seen.insert(uid);
                }
                self.apply_prefetch(prefetch);
            }
            watcher::Event::InitDone => {
                // Anything not re-listed was deleted while the watch was down.
                let gone: Vec<String> = self
                    .prefetches
                    .keys()
                    .chain(self.waiting.keys())
                    .filter(|uid| !self.prefetch_init_seen.contains(*uid))
                    .cloned()
                    .collect();
                for uid in gone {
                    self.stop_prefetch(&uid);
                }
                self.prefetches_synced = true;
                self.sweep_orphans();
            }
            watcher::Event::Apply(prefetch) => self.apply_prefetch(prefetch),
            watcher::Event::Delete(prefetch) => {
                if let Some(uid) = prefetch.uid() {
                    self.stop_prefetch(&uid);
                }
            }
        }
    }
}

impl Handler<NodeEvent> for ClusterActor {
    type Result = ();
    fn handle(&mut self, NodeEvent(event): NodeEvent, _: &mut Self::Context) {
        let _span = self.span.clone().entered();
        self.mark_healthy();
        match event {
            watcher::Event::Init => self.nodes_buffer = Some(BTreeMap::new()),
            watcher::Event::InitApply(node) => {
                let view = NodeView::from_node(&node);
                self.nodes_buffer
                    .get_or_insert_with(BTreeMap::new)
                    .insert(view.name.clone(), view);
            }
            watcher::Event::InitDone => {
                let nodes = self.nodes_buffer.take().unwrap_or_default();
                self.publish_nodes(nodes);
                self.nodes_synced = true;
                self.start_waiting();
            }
            watcher::Event::Apply(node) => {
                let view = NodeView::from_node(&node);
                let mut nodes = (*self.nodes).clone();
                nodes.insert(view.name.clone(), view);
                self.publish_nodes(nodes);
            }
            watcher::Event::Delete(node) => {
                let mut nodes = (*self.nodes).clone();
                nodes.remove(&node.name_any());
                self.publish_nodes(nodes);
            }
        }
    }
}

impl Handler<PodEvent> for ClusterActor {
    type Result = ();
    fn handle(&mut self, PodEvent(event): PodEvent, _: &mut Self::Context) {
        let _span = self.span.clone().entered();
        self.mark_healthy();
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
                self.start_waiting();
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

impl ClusterActor {
    /// A watch delivered an event again after failing: the cluster is back.
    fn mark_healthy(&mut self) {
        let was_down = matches!(
            self.last_health,
            Some(ClusterHealth::Unreachable { .. } | ClusterHealth::Forbidden { .. })
        );
        if was_down && self.shared.is_some() {
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
        let detail = format!("watching {}: {}", msg.what, msg.error);
        self.report(if msg.forbidden {
            ClusterHealth::Forbidden { what: detail }
        } else {
            ClusterHealth::Unreachable { reason: detail }
        });
    }
}

impl Handler<SlotsFreed> for ClusterActor {
    type Result = ();
    fn handle(&mut self, msg: SlotsFreed, _: &mut Self::Context) {
        for (uid, entry) in &self.prefetches {
            if *uid != msg.from_uid {
                entry.addr.do_send(Kick);
            }
        }
    }
}
