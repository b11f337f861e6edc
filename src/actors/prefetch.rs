//! One actor per Prefetch object. The ClusterActor hands it the nodes it
//! targets and the workloads it selects, then only the changes that concern
//! it; it plans (node, image) pairs with the pure planner (a node event
//! re-plans that node alone), fans out pull pods in the slots the cluster's
//! dispatch queue grants, judges them, and writes the status. All decisions
//! are made by `crate::pull`; this file only moves data.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::actors::cluster_link::{
    AdoptSlot, ClusterContext, PairsPlanned, ReleaseSlot, RequestSlots, WriteAllowed, WriteRefused,
};
use crate::actors::status::{PrefetchGone, PrefetchReported, PrefetchSummary};
use crate::actors::{delete_pull_pod, delete_pull_pod_until_gone};
use crate::api::{MAX_PULL_TIMEOUT_SECONDS, Phase, Prefetch, PrefetchStatus, VerifiedRecord};
use crate::error::{api_status_code, describe_kube_error, is_rbac_refusal, is_server_unavailable};
use crate::pull::dispatch::offer;
use crate::pull::grid::{GridQuery, GridSource, NodeGrid, node_rows};
use crate::pull::index::{NodeChange, WorkloadEntry, targeting_of};
use crate::pull::limits;
use crate::pull::outcome::classify;
use crate::pull::plan::{DesiredSet, ExtraImages, PairKey, Planner, TooManyPairs};
use crate::pull::podspec::{PullPodParams, build_pull_pod, check_own_pull_pod, pair_of_pod};
use crate::pull::status::{
    StatusFacts, WriteDecision, WritePacer, decide_status, settle_verified, status_write_delay,
};
use crate::pull::targeting::NodeView;
use crate::pull::tracker::{BackoffPolicy, Outcome, Tracker};
use crate::pull::verified;

/// The workloads a Prefetch selects, and why some kinds could not be listed.
#[derive(Debug, Clone, Default)]
pub struct Workloads {
    pub entries: Vec<Arc<WorkloadEntry>>,
    pub errors: Vec<String>,
}

pub struct PrefetchActor {
    shared: Arc<ClusterContext>,
    prefetch: Arc<Prefetch>,
    uid: String,
    span: tracing::Span,
    tracker: Tracker,
    desired: DesiredSet,
    /// The nodes this Prefetch targets, shared with the cluster's index.
    nodes: BTreeMap<String, Arc<NodeView>>,
    workloads: Workloads,
    planner: Planner,
    /// Nodes changed since the last plan; planned one by one.
    dirty_nodes: BTreeSet<String>,
    /// The planner changed (spec or workloads): every node is re-planned.
    replan_all: bool,
    /// Over `defaults.max_pairs_per_prefetch`: nothing is planned.
    too_many_pairs: Option<TooManyPairs>,
    /// Refused by the cluster's pair limit (this limit): nothing is planned.
    cluster_pair_limit: Option<usize>,
    /// The pairs this Prefetch would plan, as told to the cluster actor.
    claimed_pairs: usize,
    reported_pairs: Option<usize>,
    /// Whether the cluster answered a claim yet.
    pair_verdict: bool,
    /// Uids of pods we judged and asked to delete; their later events are
    /// noise, even once a new attempt reuses the name.
    judged: BTreeSet<String>,
    /// Names of judged pods whose uid was never learnt (no event before
    /// their deadline); forgotten when the name is used again.
    judged_names: BTreeSet<String>,
    /// Pull pods seen before the plan could say whether they are wanted.
    pending_pods: Vec<Pod>,
    /// Whether `desired` has been computed at least once.
    planned: bool,
    /// The verification record found in the status at start.
    restore_from: Option<VerifiedRecord>,
    /// Where each pair's pod was created, for deleting it once the pair is no
    /// longer desired.
    known_pod_namespaces: BTreeMap<PairKey, String>,
    /// When each in-flight pull must have been judged. The kubelet enforces
    /// `activeDeadlineSeconds`, but not when it is down or the node is gone;
    /// then this is what stops a pod from holding its slot for ever.
    deadlines: BTreeMap<PairKey, Instant>,
    replan_queued: bool,
    /// Whether the dispatch queue holds a non-empty request of ours.
    requested: bool,
    dispatch_queued: bool,
    wakeup: Option<SpawnHandle>,
    status_queued: bool,
    /// One status write at a time: two in flight could land out of order
    /// and leave an older status on the object.
    status_writing: bool,
    status_dirty: bool,
    /// Consecutive failed status writes, for backing off.
    status_failures: u32,
    last_status: Option<PrefetchStatus>,
    /// When `last_status` was sent, for pacing progress writes.
    status_written_at: Option<Instant>,
    status_pacer: WritePacer,
    /// A write of progress below a step, due at the heartbeat.
    status_recheck: Option<SpawnHandle>,
    last_phase: Option<Phase>,
    shutting_down: bool,
}

impl PrefetchActor {
    pub fn new(
        shared: Arc<ClusterContext>,
        prefetch: Prefetch,
        nodes: Vec<Arc<NodeView>>,
        workloads: Workloads,
        existing_pods: Vec<Pod>,
    ) -> Self {
        let uid = prefetch.uid().unwrap_or_default();
        // Created inside the cluster's span, so the cluster name is inherited.
        let span = info_span!(
            "prefetch",
            prefetch = %format!("{}/{}", prefetch.namespace().unwrap_or_default(), prefetch.name_any())
        );
        let backoff = &shared.config.backoff;
        let policy = BackoffPolicy {
            initial: backoff.initial,
            max: backoff.max,
            multiplier: backoff.multiplier,
            max_attempts: backoff.max_attempts,
            jitter: true,
        };
        let last_status = prefetch.status.clone();
        let mut actor = PrefetchActor {
            shared,
            uid,
            span,
            tracker: Tracker::new(policy),
            desired: DesiredSet::default(),
            nodes: BTreeMap::new(),
            workloads: Workloads::default(),
            planner: Planner::new([], &ExtraImages::default(), Default::default(), true, false),
            dirty_nodes: BTreeSet::new(),
            replan_all: true,
            too_many_pairs: None,
            cluster_pair_limit: None,
            claimed_pairs: 0,
            reported_pairs: None,
            pair_verdict: false,
            judged: BTreeSet::new(),
            judged_names: BTreeSet::new(),
            pending_pods: existing_pods,
            planned: false,
            restore_from: last_status
                .as_ref()
                .and_then(|status| status.verified.clone()),
            known_pod_namespaces: BTreeMap::new(),
            deadlines: BTreeMap::new(),
            replan_queued: false,
            requested: false,
            dispatch_queued: false,
            wakeup: None,
            status_queued: false,
            status_writing: false,
            status_dirty: false,
            status_failures: 0,
            last_phase: last_status.as_ref().and_then(|status| status.phase),
            last_status,
            status_written_at: None,
            status_pacer: WritePacer::default(),
            status_recheck: None,
            shutting_down: false,
            prefetch: Arc::new(prefetch),
        };
        actor.set_inputs(nodes, workloads);
        actor
    }

    fn namespace(&self) -> String {
        self.prefetch.namespace().unwrap_or_default()
    }

    fn name(&self) -> String {
        self.prefetch.name_any()
    }

    fn retry_after(&self) -> Duration {
        self.prefetch
            .spec
            .retry_after_or(self.shared.config.defaults.retry_after)
    }

    fn pull_timeout_seconds(&self) -> i64 {
        match self.prefetch.spec.pull_timeout_seconds {
            Some(seconds) if seconds > 0 => seconds.min(MAX_PULL_TIMEOUT_SECONDS),
            _ => i64::try_from(self.shared.config.defaults.pull_timeout.as_secs()).unwrap_or(600),
        }
    }

    fn max_in_flight(&self) -> usize {
        match self.prefetch.spec.max_parallel {
            Some(cap) if cap > 0 => usize::try_from(cap).unwrap_or(usize::MAX),
            _ => self.shared.config.defaults.max_parallel_per_prefetch,
        }
    }

    /// Takes a new set of targeted nodes and workloads (at start and on a
    /// spec change): the planner is rebuilt and every node re-planned, but
    /// the tracker keeps the state of every pair still wanted.
    fn set_inputs(&mut self, nodes: Vec<Arc<NodeView>>, workloads: Workloads) {
        self.nodes = nodes
            .into_iter()
            .map(|node| (node.name.clone(), node))
            .collect();
        self.set_workloads(workloads);
    }

    fn set_workloads(&mut self, workloads: Workloads) {
        let spec = &self.prefetch.spec;
        let extra = ExtraImages {
            images: spec.images.clone(),
            namespace: self.namespace(),
            image_pull_secrets: spec.image_pull_secrets.clone(),
        };
        self.planner = Planner::new(
            workloads.entries.iter().map(|entry| &entry.workload),
            &extra,
            targeting_of(spec),
            spec.respects_workload_scheduling(),
            self.shared.config.policy.tolerate_all_taints,
        );
        self.workloads = workloads;
        self.replan_all = true;
    }

    fn queue_replan(&mut self, ctx: &mut Context<Self>) {
        if self.replan_queued || self.shutting_down {
            return;
        }
        self.replan_queued = true;
        // A short pause coalesces bursts of watch events into one plan.
        ctx.run_later(Duration::from_millis(30), |actor, ctx| {
            actor.replan_queued = false;
            actor.replan(ctx, false);
        });
    }

    /// Brings `desired` and the tracker up to date: the whole set after a
    /// planner change, else only the nodes that changed. Then dispatches and
    /// reports, unless node events changed nothing (the usual image list
    /// update of a node already served) and no timer is due (`wakeup`):
    /// that keeps a node event's cost to that node's pairs.
    fn replan(&mut self, ctx: &mut Context<Self>, wakeup: bool) {
        let _span = self.span.clone().entered();
        let now = Instant::now();
        let mut changed = wakeup || !self.planned || !self.pending_pods.is_empty();
        let limit = self.shared.config.defaults.max_pairs_per_prefetch;
        // Over the limit, any node change may bring it back under: the
        // whole plan is redone, which stops at the limit anyway.
        let refused = self.too_many_pairs.is_some() || self.cluster_pair_limit.is_some();
        let mut full =
            std::mem::take(&mut self.replan_all) || (refused && !self.dirty_nodes.is_empty());
        if !full {
            for name in std::mem::take(&mut self.dirty_nodes) {
                let plan = self
                    .nodes
                    .get(&name)
                    .and_then(|node| self.planner.plan_node(node));
                if self.desired.replace_node(&name, plan) {
                    changed = true;
                    self.tracker.set_node_desired(&name, &self.desired);
                }
                let keys: Vec<PairKey> = self.desired.node_keys(&name).collect();
                for key in &keys {
                    changed |= self.check_node_report(key, now);
                }
            }
            // Crossed the limit node by node.
            full = self.desired.len() > limit;
            self.claimed_pairs = self.desired.len();
        }
        if full {
            changed = true;
            self.dirty_nodes.clear();
            let (mut desired, too_many) = self
                .planner
                .plan_within(self.nodes.values().map(|node| &**node), limit);
            if too_many.is_some() && self.too_many_pairs.is_none() {
                warn!(limit, "over the pair limit: planning nothing");
            }
            self.too_many_pairs = too_many;
            // Counted before dropping them: the cluster needs the claim to
            // decide again when others change.
            self.claimed_pairs = desired.len();
            if self.cluster_pair_limit.is_some() {
                desired.clear_pairs();
            }
            self.desired = desired;
            self.tracker.set_desired(&self.desired);
            let keys: Vec<PairKey> = self.desired.keys().collect();
            for key in &keys {
                self.check_node_report(key, now);
            }
            self.restore_verified(now);
        }
        if self.reported_pairs != Some(self.claimed_pairs) {
            self.reported_pairs = Some(self.claimed_pairs);
            self.shared.to_cluster.pairs_planned.do_send(PairsPlanned {
                uid: self.uid.clone(),
                pairs: self.claimed_pairs,
            });
        }
        if !changed {
            return;
        }
        self.planned = true;

        // Pods that existed before this actor (a restart) are adopted, not
        // created again.
        for pod in std::mem::take(&mut self.pending_pods) {
            self.observe_pod(pod, ctx);
        }
        for (key, pod_name) in self.tracker.orphaned_in_flight() {
            self.release_slot(&key.node);
            self.delete_pod(&pod_name, &self.pod_namespace_of(&key), ctx);
        }
        self.dispatch(ctx);
        self.queue_status(ctx);
    }

    /// Once, on the first plan: pairs that the status' record proves
    /// verified within `retry_after` (by the process before a restart or a
    /// failover) are not pulled again.
    fn restore_verified(&mut self, now: Instant) {
        let Some(record) = self.restore_from.take() else {
            return;
        };
        let Some((pairs, at)) = verified::restorable(
            &record,
            &self.desired,
            self.retry_after(),
            now,
            Timestamp::now(),
        ) else {
            return;
        };
        let mut restored = 0usize;
        for key in &pairs {
            if self.tracker.restore_verified(key, at) {
                restored += 1;
            }
        }
        info!(
            restored,
            desired = self.desired.len(),
            "pairs verified before the restart are not pulled again"
        );
    }

    /// A pair the node lists is satisfied without a pull (an in-flight pull
    /// keeps waiting for its pod's verdict).
    /// Returns whether that satisfied a pair that was not.
    fn check_node_report(&mut self, key: &PairKey, now: Instant) -> bool {
        let reported = self
            .nodes
            .get(&*key.node)
            .is_some_and(|node| node.images.contains(&key.image));
        reported && self.tracker.node_reports_image(key, now)
    }

    /// The namespace a pair's pod lives in (the workload's, or the Prefetch's).
    fn pod_namespace_of(&self, key: &PairKey) -> String {
        self.desired
            .target(key)
            .map(|target| target.settings.namespace.clone())
            .or_else(|| self.known_pod_namespaces.get(key).cloned())
            .unwrap_or_else(|| self.namespace())
    }

    /// Tells the cluster's dispatch queue which pairs this Prefetch could
    /// start now; the queue answers with [`SlotsGranted`] when slots are
    /// free, fairly across Prefetches.
    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        // Nothing starts before the cluster's pair limit has answered the
        // first claim: a Prefetch it refuses must not cost a pod first.
        let candidates =
            if self.shutting_down || self.prefetch.spec.is_suspended() || !self.pair_verdict {
                Vec::new()
            } else {
                let due = self.tracker.due(Instant::now(), self.retry_after());
                let mut own: BTreeMap<Arc<str>, usize> = BTreeMap::new();
                for (key, _) in self.tracker.in_flight() {
                    *own.entry(key.node).or_default() += 1;
                }
                // The queue needs a choice of nodes, not every due pair: due()
                // spreads them over nodes, so the first ones span many.
                let defaults = &self.shared.config.defaults;
                let limit = MAX_CANDIDATES.max(
                    self.max_in_flight()
                        .saturating_add(defaults.max_parallel_per_cluster),
                );
                offer(due, &own, defaults.max_parallel_per_node, limit)
            };
        // Nothing asked and nothing to ask: spare the message.
        if !candidates.is_empty() || self.requested {
            self.requested = !candidates.is_empty();
            self.shared.to_cluster.request_slots.do_send(RequestSlots {
                uid: self.uid.clone(),
                candidates,
                cap: self.max_in_flight(),
            });
        }
        self.schedule_wakeup(ctx);
    }

    /// Starts the pulls the dispatch queue granted slots for; a slot whose
    /// pair is no longer due (the node reported the image meanwhile, say)
    /// goes straight back.
    fn start_pulls(&mut self, chosen: Vec<PairKey>, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let retry_after = self.retry_after();
        let chosen: Vec<PairKey> = chosen
            .into_iter()
            .filter(|key| {
                let startable = !self.shutting_down
                    && !self.prefetch.spec.is_suspended()
                    && self.tracker.is_due(key, now, retry_after);
                if !startable {
                    self.release_slot(&key.node);
                }
                startable
            })
            .collect();
        let helper_image = self.shared.config.policy.helper_image.clone();
        let priority_class = self.shared.config.policy.priority_class.clone();
        let timeout = self.pull_timeout_seconds();
        let prefetch_namespace = self.namespace();
        let prefetch_name = self.name();
        for key in chosen {
            let Some(target) = self.desired.target(&key) else {
                self.release_slot(&key.node);
                continue;
            };
            let pod = build_pull_pod(&PullPodParams {
                prefetch_namespace: &prefetch_namespace,
                prefetch_name: &prefetch_name,
                prefetch_uid: &self.uid,
                target: &target,
                method: self.shared.config.policy.pull_method,
                helper_image: &helper_image,
                timeout_seconds: timeout,
                priority_class: priority_class.as_deref(),
            });
            let pod_name = pod.name_any();
            self.judged_names.remove(&pod_name);
            self.tracker.on_dispatched(&key, &pod_name, now);
            self.deadlines
                .insert(key.clone(), now + self.judging_deadline());
            self.known_pod_namespaces
                .insert(key.clone(), target.settings.namespace.clone());
            debug!(node = %key.node, image = %key.image, pod = %pod_name, "creating pull pod");
            let api: Api<Pod> =
                Api::namespaced(self.shared.client.clone(), &target.settings.namespace);
            let create = async move { api.create(&PostParams::default(), &pod).await };
            ctx.spawn(create.into_actor(self).map(move |result, actor, ctx| {
                let _span = actor.span.clone().entered();
                match result {
                    Ok(created) => {
                        actor.shared.metrics.pull_created(&actor.shared.cluster);
                        actor.shared.to_cluster.write_allowed.do_send(WriteAllowed);
                        if let Some(uid) = created.uid() {
                            actor.tracker.bind_uid(&key, &pod_name, &uid);
                        }
                    }
                    // A pod of that name exists: an earlier attempt still
                    // being deleted, or one created before a restart. Look
                    // it up rather than wait for an event that may not come.
                    Err(error) if api_status_code(&error) == Some(409) => {
                        debug!(pod = %pod_name, "pull pod already exists; looking it up");
                        actor.look_up_existing(key, pod_name, target.settings.namespace.clone(), ctx);
                    }
                    // The API server is down or overloaded, or RBAC
                    // refuses us: that is the cluster's state (its health
                    // says so), not a failed pull, so no attempt is
                    // counted; try again later.
                    Err(error) if is_server_unavailable(&error) || is_rbac_refusal(&error) => {
                        let delay = actor.tracker.policy().delay_after(1);
                        let message = describe_kube_error(&error);
                        warn!(node = %key.node, image = %key.image, error = %message, ?delay, "cluster refused or could not create the pull pod; not counted as an attempt, retrying");
                        if is_rbac_refusal(&error) {
                            actor.shared.to_cluster.write_refused.do_send(WriteRefused { what: message });
                        }
                        actor.release_slot(&key.node);
                        actor.tracker.on_create_conflict(&key, Instant::now(), delay);
                        actor.schedule_wakeup(ctx);
                    }
                    Err(error) => {
                        let message = describe_kube_error(&error);
                        warn!(node = %key.node, image = %key.image, error = %message, "could not create pull pod");
                        actor.release_slot(&key.node);
                        actor.record_outcome(
                            &key,
                            Outcome::Failed {
                                reason: "PodCreateFailed".into(),
                                message: format!("creating pull pod in namespace {}: {message}", target.settings.namespace),
                                permanent: false,
                            },
                            ctx,
                        );
                    }
                }
            }));
        }
        self.schedule_wakeup(ctx);
        self.queue_status(ctx);
    }

    fn schedule_wakeup(&mut self, ctx: &mut Context<Self>) {
        if let Some(handle) = self.wakeup.take() {
            ctx.cancel_future(handle);
        }
        if self.shutting_down {
            return;
        }
        let next_retry = self
            .tracker
            .next_wakeup_after(Instant::now(), self.retry_after());
        let next_deadline = self.deadlines.values().min().copied();
        let Some(at) = next_retry.into_iter().chain(next_deadline).min() else {
            return;
        };
        let delay = at.saturating_duration_since(Instant::now()) + Duration::from_millis(5);
        self.wakeup = Some(ctx.run_later(delay, |actor, ctx| {
            actor.wakeup = None;
            actor.expire_overdue_pulls(ctx);
            actor.replan(ctx, true);
        }));
    }

    /// How long a pull pod may stay in flight: its own deadline, plus time
    /// for the kubelet to report that it enforced it.
    fn judging_deadline(&self) -> Duration {
        Duration::from_secs(self.pull_timeout_seconds().unsigned_abs()) + DEADLINE_SLACK
    }

    /// Judges pull pods that outlived their deadline as failed (transient),
    /// deletes them and frees their slots.
    fn expire_overdue_pulls(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let in_flight: BTreeMap<PairKey, String> = self.tracker.in_flight().into_iter().collect();
        self.deadlines.retain(|key, _| in_flight.contains_key(key));
        let overdue: Vec<PairKey> = self
            .deadlines
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(key, _)| key.clone())
            .collect();
        for key in overdue {
            self.deadlines.remove(&key);
            let Some(pod_name) = in_flight.get(&key) else {
                continue;
            };
            let _span = self.span.clone().entered();
            warn!(pod = %pod_name, node = %key.node, image = %key.image, "pull pod outlived its deadline; judging it failed");
            match self.tracker.in_flight_uid(&key) {
                Some(uid) => self.judged.insert(uid.to_string()),
                None => self.judged_names.insert(pod_name.clone()),
            };
            self.release_slot(&key.node);
            self.delete_pod(pod_name, &self.pod_namespace_of(&key), ctx);
            let timeout = self.pull_timeout_seconds();
            self.record_outcome(
                &key,
                Outcome::Failed {
                    reason: "DeadlineExceeded".into(),
                    message: format!(
                        "pull pod {pod_name} was not done within {timeout}s (is the node's kubelet working?)"
                    ),
                    permanent: false,
                },
                ctx,
            );
        }
    }

    /// Stops the youngest pull on the node (the queue gives its slot to
    /// the waiting Prefetch); its pair is due again, with no failure
    /// counted: nothing was learnt about the image.
    fn preempt(&mut self, msg: Preempt, ctx: &mut Context<Self>) {
        if self.shutting_down {
            return;
        }
        // The youngest has the latest deadline. None: judged meanwhile, and
        // its release is on its way to the queue.
        let in_flight: BTreeMap<PairKey, String> = self.tracker.in_flight().into_iter().collect();
        let Some((key, pod_name)) = self
            .deadlines
            .iter()
            .filter(|(key, _)| *key.node == *msg.node)
            .filter_map(|(key, at)| Some((at, key, in_flight.get(key)?)))
            .max()
            .map(|(_, key, pod)| (key.clone(), pod.clone()))
        else {
            return;
        };
        let Some(uid) = self.tracker.in_flight_uid(&key).map(str::to_string) else {
            // The create was not answered yet: a delete now could come
            // before the pod exists and leave it behind.
            ctx.run_later(Duration::from_millis(200), move |actor, ctx| {
                let _span = actor.span.clone().entered();
                actor.preempt(msg, ctx);
            });
            return;
        };
        info!(pod = %pod_name, node = %key.node, image = %key.image, waiting = %msg.waiting,
            "pull preempted: another namespace waits for this node's slot; pulled again later, no failure counted");
        self.publish_event(
            EventType::Normal,
            "Preempted",
            format!(
                "pull of {} on node {} stopped so that Prefetch {} of another namespace, waiting for that node's slot, goes first; it is pulled again later (not a failure)",
                key.image, key.node, msg.waiting
            ),
        );
        self.judged.insert(uid);
        self.deadlines.remove(&key);
        self.release_slot(&key.node);
        self.delete_pod(&pod_name, &self.pod_namespace_of(&key), ctx);
        self.tracker.on_pod_vanished(&key, Instant::now());
        self.queue_dispatch(ctx);
        self.queue_status(ctx);
    }

    fn release_slot(&self, node: &str) {
        self.shared.to_cluster.release_slot.do_send(ReleaseSlot {
            uid: self.uid.clone(),
            node: node.to_string(),
        });
    }

    fn record_outcome(&mut self, key: &PairKey, outcome: Outcome, ctx: &mut Context<Self>) {
        let now = Instant::now();
        match &outcome {
            Outcome::Succeeded => {
                info!(node = %key.node, image = %key.image, "image is on the node");
                self.shared
                    .metrics
                    .pull_finished(&self.shared.cluster, "succeeded");
            }
            Outcome::Failed {
                reason,
                message,
                permanent,
            } => {
                warn!(node = %key.node, image = %key.image, %reason, %message, permanent, "pull failed");
                self.shared.metrics.pull_finished(
                    &self.shared.cluster,
                    if *permanent {
                        "failed_permanent"
                    } else {
                        "failed"
                    },
                );
                self.publish_event(
                    EventType::Warning,
                    "PullFailed",
                    format!(
                        "pulling {} on node {}: {reason}: {message}",
                        key.image, key.node
                    ),
                );
            }
        }
        self.tracker.on_outcome(key, outcome, now);
        self.queue_dispatch(ctx);
    }

    /// Dispatches shortly: outcomes come in bursts during a fan-out, and
    /// each dispatch scans every pair for the due ones.
    fn queue_dispatch(&mut self, ctx: &mut Context<Self>) {
        if self.dispatch_queued || self.shutting_down {
            return;
        }
        self.dispatch_queued = true;
        ctx.run_later(Duration::from_millis(10), |actor, ctx| {
            actor.dispatch_queued = false;
            actor.dispatch(ctx);
        });
    }

    fn publish_event(&self, type_: EventType, reason: &str, note: String) {
        let recorder = self.shared.recorder.clone();
        let reference = self.prefetch.object_ref(&());
        let event = KubeEvent {
            type_,
            reason: reason.to_string(),
            // The events API caps notes at 1 kB.
            note: Some(note.chars().take(1000).collect()),
            action: "Prefetch".into(),
            secondary: None,
        };
        actix::spawn(
            async move {
                if let Err(error) = recorder.publish(&event, &reference).await {
                    warn!(error = %describe_kube_error(&error), "could not record event");
                }
            }
            .instrument(self.span.clone()),
        );
    }

    /// Deletes a judged or unwanted pod in the background, retrying until
    /// it is gone (even after this actor stopped).
    fn delete_pod(&self, name: &str, namespace: &str, _ctx: &mut Context<Self>) {
        actix::spawn(
            delete_pull_pod_until_gone(
                self.shared.client.clone(),
                namespace.to_string(),
                name.to_string(),
            )
            .instrument(self.span.clone()),
        );
    }

    /// Handles the current state of one of our pull pods.
    fn observe_pod(&mut self, pod: Pod, ctx: &mut Context<Self>) {
        let Some((uid, key)) = pair_of_pod(&pod) else {
            return;
        };
        if uid != self.uid {
            return;
        }
        let pod_name = pod.name_any();
        let pod_uid = pod.uid().unwrap_or_default();
        let namespace = pod.namespace().unwrap_or_default();
        if self.judged.contains(&pod_uid)
            || self.judged_names.contains(&pod_name)
            || pod.metadata.deletion_timestamp.is_some()
        {
            return;
        }
        // Labels are anyone's to set: only the pod we would create counts.
        let wanted_in = self
            .desired
            .contains(&key)
            .then(|| self.pod_namespace_of(&key));
        if let Err(why) = check_own_pull_pod(&pod, &self.uid, &key, wanted_in.as_deref()) {
            warn!(pod = %format!("{namespace}/{pod_name}"), "not adopting a pod labelled as our pull pod: {why}");
            // Once per pod: its later events need no second look.
            self.judged.insert(pod_uid);
            return;
        }
        let tracked = self.tracker.is_current_pod(&key, &pod_name, &pod_uid);
        if tracked {
            self.tracker.bind_uid(&key, &pod_name, &pod_uid);
        } else {
            if !self.planned {
                // Not known yet whether it is wanted: a pod found by the
                // watch before the first plan (after a restart) must not be
                // taken for a leftover and deleted.
                self.pending_pods.push(pod);
                self.queue_replan(ctx);
                return;
            }
            if !self.desired.contains(&key) || self.tracker.in_flight_uid(&key).is_some() {
                // Left over from an older plan (or before a restart), or a
                // stray pod of a pair whose current attempt is another pod.
                info!(pod = %pod_name, node = %key.node, image = %key.image, "deleting a pull pod no longer wanted");
                self.judged.insert(pod_uid);
                self.delete_pod(&pod_name, &namespace, ctx);
                return;
            }
            // Found after a restart: take it over instead of creating another.
            self.shared.to_cluster.adopt_slot.do_send(AdoptSlot {
                uid: self.uid.clone(),
                node: key.node.to_string(),
            });
            self.tracker
                .on_adopted(&key, &pod_name, &pod_uid, Instant::now());
            self.deadlines
                .insert(key.clone(), adopted_deadline(&pod, self.judging_deadline()));
            self.known_pod_namespaces
                .insert(key.clone(), namespace.clone());
            info!(pod = %pod_name, node = %key.node, image = %key.image, "adopted existing pull pod");
        }
        if let Some(outcome) = classify(&pod) {
            self.judged.insert(pod_uid);
            self.release_slot(&key.node);
            self.delete_pod(&pod_name, &namespace, ctx);
            self.record_outcome(&key, outcome, ctx);
            self.queue_status(ctx);
        }
    }

    /// After a 409 on create: adopts the existing pod if it is a live one we
    /// have not judged; else (an earlier attempt on its way out) makes sure
    /// it goes and tries again shortly, without counting an attempt.
    fn look_up_existing(
        &mut self,
        key: PairKey,
        pod_name: String,
        namespace: String,
        ctx: &mut Context<Self>,
    ) {
        let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), &namespace);
        let name = pod_name.clone();
        let get = async move { api.get_opt(&name).await };
        ctx.spawn(get.into_actor(self).map(move |result, actor, ctx| {
            let _span = actor.span.clone().entered();
            if actor.shutting_down {
                return;
            }
            let retry_in = match result {
                Ok(Some(pod)) => {
                    let uid = pod.uid().unwrap_or_default();
                    let live = pod.metadata.deletion_timestamp.is_none()
                        && !actor.judged.contains(&uid);
                    if live {
                        info!(pod = %pod_name, "adopted existing pull pod");
                        actor.tracker.bind_uid(&key, &pod_name, &uid);
                        actor.observe_pod(pod, ctx);
                        return;
                    }
                    actor.delete_pod(&pod_name, &namespace, ctx);
                    Duration::from_secs(1)
                }
                // Gone meanwhile: the name is free again.
                Ok(None) => Duration::from_millis(200),
                Err(error) => {
                    warn!(pod = %pod_name, error = %describe_kube_error(&error), "could not look up existing pull pod");
                    Duration::from_secs(2)
                }
            };
            if actor.tracker.is_current_pod(&key, &pod_name, "") {
                actor.release_slot(&key.node);
                actor
                    .tracker
                    .on_create_conflict(&key, Instant::now(), retry_in);
                actor.schedule_wakeup(ctx);
            }
        }));
    }

    fn queue_status(&mut self, ctx: &mut Context<Self>) {
        if self.status_queued || self.shutting_down {
            return;
        }
        self.status_queued = true;
        let debounce = self.shared.config.defaults.status_debounce;
        let delay = status_write_delay(debounce, self.status_failures);
        ctx.run_later(delay, |actor, ctx| {
            actor.status_queued = false;
            actor.write_status(ctx);
        });
    }

    fn compute_status(&self) -> PrefetchStatus {
        let spec = &self.prefetch.spec;
        let mut refusals = Vec::new();
        if let Some(too_many) = &self.too_many_pairs {
            refusals.push(too_many.to_string());
        }
        if let Some(limit) = self.cluster_pair_limit {
            refusals.push(limits::refusal(self.claimed_pairs, limit));
        }
        let fresh_record = verified::record(
            &self.desired,
            &self.tracker,
            Instant::now(),
            Timestamp::now(),
        );
        let previous = self.last_status.as_ref();
        decide_status(StatusFacts {
            pulls_phase: self.tracker.phase(),
            counts: self.tracker.counts(),
            failures: self.tracker.failures(),
            refusals,
            spec_problems: spec.spec_problems(),
            workload_errors: &self.workloads.errors,
            invalid_images: self
                .desired
                .invalid_images
                .iter()
                .map(ToString::to_string)
                .collect(),
            suspended: spec.is_suspended(),
            observed_generation: self.prefetch.metadata.generation,
            images: self.desired.images.iter().cloned().collect(),
            targeted_nodes: self.desired.node_count(),
            verified: settle_verified(
                fresh_record,
                previous.and_then(|status| status.verified.as_ref()),
            ),
            previous,
            now: Timestamp::now(),
        })
    }

    fn write_status(&mut self, ctx: &mut Context<Self>) {
        if self.shutting_down {
            return;
        }
        let _span = self.span.clone().entered();
        let status = self.compute_status();
        let phase = status.phase.unwrap_or(Phase::Pending);
        self.shared.status.do_send(PrefetchReported {
            cluster: self.shared.cluster.clone(),
            summary: PrefetchSummary {
                namespace: self.namespace(),
                name: self.name(),
                phase,
                images: status.images.clone(),
                nodes: status.nodes,
                pulls: status.pulls.clone(),
                message: status.message.clone(),
                failures: status.failures.clone(),
            },
        });
        if self.last_phase != Some(phase) {
            info!(%phase, "phase changed");
            if phase == Phase::Ready || phase == Phase::Failed {
                let (type_, reason) = if phase == Phase::Ready {
                    (EventType::Normal, "Ready")
                } else {
                    (EventType::Warning, "Failed")
                };
                self.publish_event(
                    type_,
                    reason,
                    status
                        .message
                        .clone()
                        .unwrap_or_else(|| format!("phase is {phase}")),
                );
            }
            self.last_phase = Some(phase);
        }
        let since_written = self
            .status_written_at
            .map_or(Duration::MAX, |at| at.elapsed());
        match self
            .status_pacer
            .decide(self.last_status.as_ref(), &status, since_written)
        {
            WriteDecision::Skip => return,
            WriteDecision::Later(wait) => {
                // Progress below a step: written by the next step or by
                // this timer, whichever comes first.
                if self.status_recheck.is_none() {
                    self.status_recheck = Some(ctx.run_later(wait, |actor, ctx| {
                        actor.status_recheck = None;
                        actor.write_status(ctx);
                    }));
                }
                return;
            }
            WriteDecision::Now => {}
        }
        if let Some(recheck) = self.status_recheck.take() {
            ctx.cancel_future(recheck);
        }
        if self.status_writing {
            // Written again, with what is current then, once this one lands.
            self.status_dirty = true;
            return;
        }
        self.status_writing = true;
        self.status_written_at = Some(Instant::now());
        self.last_status = Some(status.clone());
        let api: Api<Prefetch> = Api::namespaced(self.shared.client.clone(), &self.namespace());
        let name = self.name();
        // Server-side apply of the whole status: a field we no longer set
        // (the failure `message` once READY) is removed, which a merge patch
        // of the present fields never does.
        let patch = json!({
            "apiVersion": "cache.techsquad.rocks/v1",
            "kind": "Prefetch",
            "status": status,
        });
        let write = async move {
            api.patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        };
        ctx.spawn(write.into_actor(self).map(|result, actor, ctx| {
            actor.status_writing = false;
            match result {
                Ok(_) => {
                    actor.status_failures = 0;
                    actor.shared.metrics.status_written(&actor.shared.cluster)
                }
                Err(error) if api_status_code(&error) == Some(404) => {}
                Err(error) => {
                    let _span = actor.span.clone().entered();
                    actor.status_failures = actor.status_failures.saturating_add(1);
                    warn!(
                        error = %describe_kube_error(&error),
                        failures = actor.status_failures,
                        "could not write status; retrying with backoff"
                    );
                    actor.last_status = None;
                    actor.status_dirty = true;
                }
            }
            if std::mem::take(&mut actor.status_dirty) {
                actor.queue_status(ctx);
            }
        }));
    }
}

/// Pairs offered to the dispatch queue at once (at least; more when the
/// Prefetch's cap plus the cluster's slots is more, see `dispatch::offer`).
const MAX_CANDIDATES: usize = 64;

/// Owner of the status fields for server-side apply.
const FIELD_MANAGER: &str = "kube-prefetch";

/// Time for the kubelet to report a pod it stopped at its deadline.
const DEADLINE_SLACK: Duration = Duration::from_secs(10);

/// The judging deadline of a pod found after a restart, from its age.
fn adopted_deadline(pod: &Pod, allowed: Duration) -> Instant {
    let now = Instant::now();
    let Some(created) = pod.metadata.creation_timestamp.as_ref() else {
        return now + allowed;
    };
    let age = Timestamp::now().duration_since(created.0);
    let age = Duration::try_from(age).unwrap_or_default();
    now + allowed.saturating_sub(age)
}

/// The Prefetch's spec changed: its targeted nodes and selected workloads
/// as of now. Only sent once the workload kinds it selects were listed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SpecChanged {
    pub prefetch: Arc<Prefetch>,
    pub nodes: Vec<Arc<NodeView>>,
    pub workloads: Workloads,
}

/// One node this Prefetch targets (before or after) changed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct NodeChanged(pub NodeChange);

/// A workload this Prefetch selects (before or after) changed: the new
/// selection.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WorkloadsChanged(pub Workloads);

#[derive(Message)]
#[rtype(result = "()")]
pub struct PodChanged(pub Pod);

#[derive(Message)]
#[rtype(result = "()")]
pub struct PodDeleted(pub Pod);

/// The dispatch queue gave this Prefetch slots for these pairs.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SlotsGranted(pub Vec<PairKey>);

/// The dispatch queue takes back this Prefetch's slot on `node` for
/// `waiting`, another namespace's Prefetch (see `pull::dispatch`).
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Preempt {
    pub node: String,
    /// `namespace/name` of the Prefetch waiting for the slot.
    pub waiting: String,
}

/// The Prefetch was deleted: stop and remove in-flight pods.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Actor for PrefetchActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.queue_replan(ctx);
    }
}

/// The cluster's pair limit refuses this Prefetch (`Some(limit)`), or no
/// longer does.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ClusterPairLimit(pub Option<usize>);

impl Handler<ClusterPairLimit> for PrefetchActor {
    type Result = ();
    fn handle(&mut self, ClusterPairLimit(limit): ClusterPairLimit, ctx: &mut Self::Context) {
        let first = !std::mem::replace(&mut self.pair_verdict, true);
        if self.cluster_pair_limit == limit {
            if first {
                self.dispatch(ctx);
            }
            return;
        }
        let _span = self.span.clone().entered();
        match limit {
            Some(limit) => warn!(limit, "over the cluster's pair limit: planning nothing"),
            None => info!("within the cluster's pair limit again"),
        }
        self.cluster_pair_limit = limit;
        self.replan_all = true;
        self.queue_replan(ctx);
    }
}

/// The drill-down of this Prefetch over `nodes`, every node of its cluster
/// (it holds only those it targets).
#[derive(Message)]
#[rtype(result = "NodeGrid")]
pub struct GetNodeGrid {
    pub nodes: Vec<Arc<NodeView>>,
    pub query: GridQuery,
}

impl Handler<GetNodeGrid> for PrefetchActor {
    type Result = MessageResult<GetNodeGrid>;
    fn handle(&mut self, msg: GetNodeGrid, _: &mut Self::Context) -> Self::Result {
        let source = GridSource {
            planner: &self.planner,
            desired: &self.desired,
            tracker: &self.tracker,
            retry_after: self.retry_after(),
            now: Instant::now(),
        };
        let rows = node_rows(&source, msg.nodes.iter().map(|node| &**node), &msg.query);
        MessageResult(NodeGrid {
            cluster: self.shared.cluster.clone(),
            namespace: self.namespace(),
            name: self.name(),
            phase: self.last_phase.unwrap_or(Phase::Pending),
            message: self
                .last_status
                .as_ref()
                .and_then(|status| status.message.clone()),
            images: self.desired.images.iter().cloned().collect(),
            rows,
        })
    }
}

impl Handler<SpecChanged> for PrefetchActor {
    type Result = ();
    fn handle(&mut self, msg: SpecChanged, ctx: &mut Self::Context) {
        let _span = self.span.clone().entered();
        info!("spec changed; re-planning");
        self.prefetch = msg.prefetch;
        self.set_inputs(msg.nodes, msg.workloads);
        self.queue_replan(ctx);
    }
}

impl Handler<NodeChanged> for PrefetchActor {
    type Result = ();
    fn handle(&mut self, NodeChanged(change): NodeChanged, ctx: &mut Self::Context) {
        let targeting = targeting_of(&self.prefetch.spec);
        match change.new.filter(|node| targeting.targets(node)) {
            Some(node) => self.nodes.insert(change.key.clone(), node),
            None => self.nodes.remove(&change.key),
        };
        self.dirty_nodes.insert(change.key);
        self.queue_replan(ctx);
    }
}

impl Handler<WorkloadsChanged> for PrefetchActor {
    type Result = ();
    fn handle(&mut self, WorkloadsChanged(workloads): WorkloadsChanged, ctx: &mut Self::Context) {
        self.set_workloads(workloads);
        self.queue_replan(ctx);
    }
}

impl Handler<PodChanged> for PrefetchActor {
    type Result = ();
    fn handle(&mut self, PodChanged(pod): PodChanged, ctx: &mut Self::Context) {
        if self.shutting_down {
            return;
        }
        let _span = self.span.clone().entered();
        self.observe_pod(pod, ctx);
    }
}

impl Handler<PodDeleted> for PrefetchActor {
    type Result = ();
    fn handle(&mut self, PodDeleted(pod): PodDeleted, ctx: &mut Self::Context) {
        let pod_name = pod.name_any();
        let pod_uid = pod.uid().unwrap_or_default();
        if self.judged.remove(&pod_uid) || self.shutting_down {
            return;
        }
        let Some((_, key)) = pair_of_pod(&pod) else {
            return;
        };
        // Only the current attempt's pod counts, and only once its uid is
        // known: the delete of an earlier pod with the same name is not it.
        if self.tracker.in_flight_uid(&key) == Some(pod_uid.as_str()) {
            // Someone else deleted it before it was judged: try again.
            let _span = self.span.clone().entered();
            info!(pod = %pod_name, "pull pod deleted before it finished; retrying");
            self.release_slot(&key.node);
            self.tracker.on_pod_vanished(&key, Instant::now());
            self.dispatch(ctx);
        }
    }
}

impl Handler<SlotsGranted> for PrefetchActor {
    type Result = ();
    fn handle(&mut self, SlotsGranted(keys): SlotsGranted, ctx: &mut Self::Context) {
        let _span = self.span.clone().entered();
        self.start_pulls(keys, ctx);
    }
}

impl Handler<Preempt> for PrefetchActor {
    type Result = ();
    fn handle(&mut self, msg: Preempt, ctx: &mut Self::Context) {
        let _span = self.span.clone().entered();
        self.preempt(msg, ctx);
    }
}

impl Handler<Shutdown> for PrefetchActor {
    type Result = ();
    fn handle(&mut self, _: Shutdown, ctx: &mut Self::Context) {
        let _span = self.span.clone().entered();
        self.shutting_down = true;
        let in_flight = self.tracker.in_flight();
        info!(
            in_flight = in_flight.len(),
            "stopping; removing in-flight pull pods"
        );
        let client = self.shared.client.clone();
        let pods: Vec<(String, String)> = in_flight
            .into_iter()
            .map(|(key, name)| {
                self.release_slot(&key.node);
                (self.pod_namespace_of(&key), name)
            })
            .collect();
        self.shared.status.do_send(PrefetchGone {
            cluster: self.shared.cluster.clone(),
            namespace: self.namespace(),
            name: self.name(),
        });
        let span = self.span.clone();
        let cleanup = async move {
            for (namespace, name) in pods {
                if let Err(error) = delete_pull_pod(client.clone(), &namespace, &name).await {
                    warn!(pod = %name, %error, "could not delete pull pod; retrying in the background");
                    actix::spawn(
                        delete_pull_pod_until_gone(client.clone(), namespace, name)
                            .instrument(span.clone()),
                    );
                }
            }
        };
        ctx.wait(cleanup.into_actor(self).map(|_, _, ctx| ctx.stop()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_created_at(at: Timestamp) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at));
        pod
    }

    /// Issue 9, case 9: an adopted pod's deadline comes from its creation
    /// timestamp, which the API server's clock wrote.
    #[test]
    fn adopted_deadline_with_a_server_clock_a_minute_ahead_is_not_shortened() {
        let allowed = Duration::from_secs(40);
        let minute = k8s_openapi::jiff::SignedDuration::from_secs(60);
        // Created "in the future": not older than zero, so the whole deadline.
        let ahead = pod_created_at(Timestamp::now() + minute);
        let deadline = adopted_deadline(&ahead, allowed);
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            left > Duration::from_secs(39) && left <= allowed,
            "{left:?}"
        );
        // A pod really 20 s old has 20 s left.
        let older =
            pod_created_at(Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(20));
        let left = adopted_deadline(&older, allowed).saturating_duration_since(Instant::now());
        assert!(
            left > Duration::from_secs(19) && left <= Duration::from_secs(20),
            "{left:?}"
        );
    }
}
