//! One actor per Prefetch object. It watches the Prefetch's workloads, turns
//! nodes × images into (node, image) pairs with the pure planner, fans out
//! pull pods within the shared budget, judges them, and writes the status.
//! All decisions are made by `crate::pull`; this file only moves data.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::actors::cluster::{ClusterContext, SlotsFreed};
use crate::actors::delete_pull_pod;
use crate::actors::status::{PrefetchGone, PrefetchReported, PrefetchSummary};
use crate::api::{
    Condition, MAX_PULL_TIMEOUT_SECONDS, MAX_RETRY_AFTER_SECONDS, Phase, Prefetch, PrefetchStatus,
    WorkloadKind,
};
use crate::error::{api_status_code, describe_kube_error, describe_watch_error};
use crate::pull::outcome::classify;
use crate::pull::plan::{DesiredSet, ExtraImages, PairKey, desired_pulls};
use crate::pull::podspec::{PullPodParams, build_pull_pod, pair_of_pod};
use crate::pull::targeting::{NodeTargeting, NodeView};
use crate::pull::tracker::{BackoffPolicy, Outcome, Tracker, select_dispatch};
use crate::pull::workload::{PodTemplated, WorkloadImages};

/// What the workload watches were started for; a change restarts them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WatchPlan {
    labels: String,
    kinds: Vec<WorkloadKind>,
    namespaces: Vec<String>,
}

#[derive(Default)]
struct WorkloadWatch {
    objects: BTreeMap<String, WorkloadImages>,
    buffer: Option<BTreeMap<String, WorkloadImages>>,
    synced: bool,
    /// The last error of a watch that has not listed its objects yet.
    error: Option<String>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub struct PrefetchActor {
    shared: Arc<ClusterContext>,
    prefetch: Arc<Prefetch>,
    uid: String,
    span: tracing::Span,
    tracker: Tracker,
    desired: DesiredSet,
    nodes: Arc<BTreeMap<String, NodeView>>,
    watch_plan: Option<WatchPlan>,
    watches: BTreeMap<(WorkloadKind, String), WorkloadWatch>,
    refused_namespaces: Vec<String>,
    /// Pods we judged and asked to delete; their later events are noise.
    judged: BTreeSet<String>,
    /// Pull pods seen before the plan could say whether they are wanted.
    pending_pods: Vec<Pod>,
    /// Whether `desired` has been computed at least once.
    planned: bool,
    /// Where each pair's pod was created, for deleting it once the pair is no
    /// longer desired.
    known_pod_namespaces: BTreeMap<PairKey, String>,
    /// When each in-flight pull must have been judged. The kubelet enforces
    /// `activeDeadlineSeconds`, but not when it is down or the node is gone;
    /// then this is what stops a pod from holding its slot for ever.
    deadlines: BTreeMap<PairKey, Instant>,
    replan_queued: bool,
    wakeup: Option<SpawnHandle>,
    status_queued: bool,
    /// One status write at a time: two in flight could land out of order
    /// and leave an older status on the object.
    status_writing: bool,
    status_dirty: bool,
    last_status: Option<PrefetchStatus>,
    last_phase: Option<Phase>,
    shutting_down: bool,
}

impl PrefetchActor {
    pub fn new(
        shared: Arc<ClusterContext>,
        prefetch: Prefetch,
        nodes: Arc<BTreeMap<String, NodeView>>,
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
        PrefetchActor {
            shared,
            uid,
            span,
            tracker: Tracker::new(policy),
            desired: DesiredSet::default(),
            nodes,
            watch_plan: None,
            watches: BTreeMap::new(),
            refused_namespaces: Vec::new(),
            judged: BTreeSet::new(),
            pending_pods: existing_pods,
            planned: false,
            known_pod_namespaces: BTreeMap::new(),
            deadlines: BTreeMap::new(),
            replan_queued: false,
            wakeup: None,
            status_queued: false,
            status_writing: false,
            status_dirty: false,
            last_phase: last_status.as_ref().and_then(|status| status.phase),
            last_status,
            shutting_down: false,
            prefetch: Arc::new(prefetch),
        }
    }

    fn namespace(&self) -> String {
        self.prefetch.namespace().unwrap_or_default()
    }

    fn name(&self) -> String {
        self.prefetch.name_any()
    }

    fn retry_after(&self) -> Duration {
        match self.prefetch.spec.retry_after {
            Some(seconds) if seconds > 0 => {
                Duration::from_secs(seconds.min(MAX_RETRY_AFTER_SECONDS).unsigned_abs())
            }
            _ => self.shared.config.defaults.retry_after,
        }
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

    /// Starts or restarts workload watches when the selector, kinds or
    /// namespaces changed. Namespaces the policy refuses are not watched.
    fn ensure_watches(&mut self, ctx: &mut Context<Self>) {
        let spec = &self.prefetch.spec;
        let (namespaces, refused) =
            spec.workload_namespaces(&self.namespace(), self.shared.config.policy.cross_namespace);
        self.refused_namespaces = refused;
        // An invalid label key builds no selector (spec_problems reports it).
        let (kinds, labels) = match spec.label_selector() {
            Ok(labels) => (spec.selected_workload_kinds(), labels),
            Err(_) => (Vec::new(), String::new()),
        };
        let plan = WatchPlan {
            labels,
            kinds,
            namespaces,
        };
        if self.watch_plan.as_ref() == Some(&plan) {
            return;
        }
        for watch in self.watches.values_mut() {
            if let Some(task) = watch.task.take() {
                task.abort();
            }
        }
        self.watches.clear();
        for kind in &plan.kinds {
            for namespace in &plan.namespaces {
                let task = self.spawn_workload_watch(*kind, namespace, &plan.labels, ctx.address());
                self.watches.insert(
                    (*kind, namespace.clone()),
                    WorkloadWatch {
                        task: Some(task),
                        ..WorkloadWatch::default()
                    },
                );
            }
        }
        debug!(?plan, "workload watches (re)started");
        self.watch_plan = Some(plan);
    }

    fn spawn_workload_watch(
        &self,
        kind: WorkloadKind,
        namespace: &str,
        labels: &str,
        addr: Addr<Self>,
    ) -> tokio::task::JoinHandle<()> {
        let client = self.shared.client.clone();
        let config = watcher::Config::default().labels(labels);
        let span = self.span.clone();
        let namespace = namespace.to_string();
        let task = async move {
            match kind {
                WorkloadKind::Deployment => {
                    watch_workloads::<Deployment>(client, namespace, config, addr).await
                }
                WorkloadKind::StatefulSet => {
                    watch_workloads::<StatefulSet>(client, namespace, config, addr).await
                }
                WorkloadKind::DaemonSet => {
                    watch_workloads::<DaemonSet>(client, namespace, config, addr).await
                }
                WorkloadKind::Job => watch_workloads::<Job>(client, namespace, config, addr).await,
                WorkloadKind::CronJob => {
                    watch_workloads::<CronJob>(client, namespace, config, addr).await
                }
            }
        };
        actix::spawn(task.instrument(span))
    }

    fn workloads_synced(&self) -> bool {
        self.watches.values().all(|watch| watch.synced)
    }

    fn queue_replan(&mut self, ctx: &mut Context<Self>) {
        if self.replan_queued || self.shutting_down {
            return;
        }
        self.replan_queued = true;
        // A short pause coalesces bursts of watch events into one plan.
        ctx.run_later(Duration::from_millis(30), |actor, ctx| {
            actor.replan_queued = false;
            actor.replan(ctx);
        });
    }

    fn replan(&mut self, ctx: &mut Context<Self>) {
        let _span = self.span.clone().entered();
        let spec = &self.prefetch.spec;
        let nodes: Vec<NodeView> = self.nodes.values().cloned().collect();
        let workloads: Vec<WorkloadImages> = self
            .watches
            .values()
            .flat_map(|watch| watch.objects.values().cloned())
            .collect();
        let extra = ExtraImages {
            images: spec.images.clone(),
            namespace: self.namespace(),
            image_pull_secrets: spec.image_pull_secrets.clone(),
        };
        let targeting = NodeTargeting::from_spec(spec);
        let desired = desired_pulls(
            &nodes,
            &workloads,
            &extra,
            &targeting,
            spec.respects_workload_scheduling(),
            self.shared.config.policy.tolerate_all_taints,
        );
        self.tracker.set_desired(&desired);
        let now = Instant::now();
        let in_flight: BTreeSet<PairKey> = self
            .tracker
            .in_flight()
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        for key in desired.pairs.keys() {
            let reported = self
                .nodes
                .get(&key.node)
                .is_some_and(|node| node.images.contains(&key.image));
            if reported && !in_flight.contains(key) {
                self.tracker.node_reports_image(key, now);
            }
        }
        self.desired = desired;
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

    /// The namespace a pair's pod lives in (the workload's, or the Prefetch's).
    fn pod_namespace_of(&self, key: &PairKey) -> String {
        self.desired
            .pairs
            .get(key)
            .map(|target| target.namespace.clone())
            .or_else(|| self.known_pod_namespaces.get(key).cloned())
            .unwrap_or_else(|| self.namespace())
    }

    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        if self.shutting_down || self.prefetch.spec.is_suspended() || !self.workloads_synced() {
            self.schedule_wakeup(ctx);
            return;
        }
        let now = Instant::now();
        let due = self.tracker.due(now, self.retry_after());
        if due.is_empty() {
            self.schedule_wakeup(ctx);
            return;
        }
        let free = self
            .max_in_flight()
            .saturating_sub(self.tracker.in_flight_count());
        let chosen = {
            let mut budget = self.shared.budget();
            select_dispatch(&due, free, &mut budget)
        };
        let helper_image = self.shared.config.policy.helper_image.clone();
        let priority_class = self.shared.config.policy.priority_class.clone();
        let timeout = self.pull_timeout_seconds();
        let prefetch_namespace = self.namespace();
        let prefetch_name = self.name();
        for key in chosen {
            let Some(target) = self.desired.pairs.get(&key).cloned() else {
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
            self.judged.remove(&pod_name);
            self.tracker.on_dispatched(&key, &pod_name, now);
            self.deadlines
                .insert(key.clone(), now + self.judging_deadline());
            self.known_pod_namespaces
                .insert(key.clone(), target.namespace.clone());
            debug!(node = %key.node, image = %key.image, pod = %pod_name, "creating pull pod");
            let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), &target.namespace);
            let create = async move { api.create(&PostParams::default(), &pod).await };
            ctx.spawn(create.into_actor(self).map(move |result, actor, ctx| {
                let _span = actor.span.clone().entered();
                match result {
                    Ok(_) => actor.shared.metrics.pull_created(&actor.shared.cluster),
                    // Same name, same pair: created before a restart. The pod
                    // watch reports its state like any other.
                    Err(error) if api_status_code(&error) == Some(409) => {
                        debug!(pod = %pod_name, "pull pod already exists; adopting it")
                    }
                    Err(error) => {
                        let message = describe_kube_error(&error);
                        warn!(node = %key.node, image = %key.image, error = %message, "could not create pull pod");
                        actor.release_slot(&key.node);
                        actor.record_outcome(
                            &key,
                            Outcome::Failed {
                                reason: "PodCreateFailed".into(),
                                message: format!("creating pull pod in namespace {}: {message}", target.namespace),
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
            actor.replan(ctx);
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
            self.judged.insert(pod_name.clone());
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

    fn release_slot(&self, node: &str) {
        self.shared.budget().release(node);
        self.shared.cluster_actor.do_send(SlotsFreed {
            from_uid: self.uid.clone(),
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
        self.dispatch(ctx);
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

    fn delete_pod(&self, name: &str, namespace: &str, ctx: &mut Context<Self>) {
        let client = self.shared.client.clone();
        let (name, namespace) = (name.to_string(), namespace.to_string());
        let delete = async move {
            delete_pull_pod(client, &namespace, &name)
                .await
                .map_err(|error| (name, error))
        };
        ctx.spawn(delete.into_actor(self).map(|result, actor, _| {
            if let Err((name, error)) = result {
                let _span = actor.span.clone().entered();
                warn!(pod = %name, %error, "could not delete pull pod");
            }
        }));
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
        let namespace = pod.namespace().unwrap_or_default();
        if self.judged.contains(&pod_name) || pod.metadata.deletion_timestamp.is_some() {
            return;
        }
        let tracked = self
            .tracker
            .in_flight()
            .into_iter()
            .any(|(k, name)| k == key && name == pod_name);
        if !tracked {
            if !(self.planned && self.workloads_synced()) {
                // Not known yet whether it is wanted: a pod found by the
                // watch before the first plan (after a restart) must not be
                // taken for a leftover and deleted.
                self.pending_pods.push(pod);
                self.queue_replan(ctx);
                return;
            }
            if !self.desired.pairs.contains_key(&key) {
                // Left over from an older plan (or before a restart).
                info!(pod = %pod_name, node = %key.node, image = %key.image, "deleting a pull pod no longer wanted");
                self.judged.insert(pod_name.clone());
                self.delete_pod(&pod_name, &namespace, ctx);
                return;
            }
            // Found after a restart: take it over instead of creating another.
            self.shared.budget().force_acquire(&key.node);
            self.tracker.on_adopted(&key, &pod_name, Instant::now());
            self.deadlines
                .insert(key.clone(), adopted_deadline(&pod, self.judging_deadline()));
            self.known_pod_namespaces
                .insert(key.clone(), namespace.clone());
            info!(pod = %pod_name, node = %key.node, image = %key.image, "adopted existing pull pod");
        }
        if let Some(outcome) = classify(&pod) {
            self.judged.insert(pod_name.clone());
            self.release_slot(&key.node);
            self.delete_pod(&pod_name, &namespace, ctx);
            self.record_outcome(&key, outcome, ctx);
            self.queue_status(ctx);
        }
    }

    fn queue_status(&mut self, ctx: &mut Context<Self>) {
        if self.status_queued || self.shutting_down {
            return;
        }
        self.status_queued = true;
        let debounce = self.shared.config.defaults.status_debounce;
        ctx.run_later(debounce, |actor, ctx| {
            actor.status_queued = false;
            actor.write_status(ctx);
        });
    }

    fn compute_status(&self) -> PrefetchStatus {
        let spec = &self.prefetch.spec;
        let mut messages = Vec::new();
        let mut phase = self.tracker.phase();
        if !self.refused_namespaces.is_empty() {
            phase = Phase::Failed;
            messages.push(format!(
                "namespaces {} refused: cross-namespace prefetching is disabled by policy (policy.cross_namespace = false)",
                self.refused_namespaces.join(", ")
            ));
        }
        let problems = spec.spec_problems();
        if !problems.is_empty() {
            phase = Phase::Failed;
            messages.extend(problems);
        }
        let watch_errors: Vec<String> =
            self.watches
                .iter()
                .filter_map(|((kind, namespace), watch)| {
                    watch.error.as_ref().map(|error| {
                        format!("cannot watch {kind}s in namespace {namespace}: {error}")
                    })
                })
                .collect();
        if !watch_errors.is_empty() {
            phase = Phase::Failed;
            messages.extend(watch_errors);
        }
        if !self.desired.invalid_images.is_empty() {
            phase = Phase::Failed;
            let invalid: Vec<String> = self
                .desired
                .invalid_images
                .iter()
                .map(|error| error.to_string())
                .collect();
            messages.push(invalid.join("; "));
        }
        if !self.workloads_synced() && phase != Phase::Failed {
            phase = Phase::Pending;
        }
        let counts = self.tracker.counts();
        let failures = self.tracker.failures();
        if phase == Phase::Failed
            && let Some(first) = failures.iter().find(|failure| failure.attempts > 0)
            && messages.is_empty()
        {
            messages.push(format!(
                "{} of {} pulls failed; latest: {} on {}: {}: {}",
                counts.failed,
                counts.total,
                first.image,
                first.node,
                first.reason,
                first.last_error
            ));
        }
        if spec.is_suspended() {
            messages.push("suspended: no new pulls are started".into());
        }
        if phase == Phase::Ready && counts.total == 0 {
            messages.push("nothing to prefetch: no targeted node or no image".into());
        }
        let message = (!messages.is_empty()).then(|| messages.join("; "));
        let ready = phase == Phase::Ready;
        let condition_status = if ready { "True" } else { "False" };
        let previous = self
            .last_status
            .as_ref()
            .and_then(|status| status.conditions.iter().find(|c| c.type_ == "Ready"));
        let last_transition_time = match previous {
            Some(condition) if condition.status == condition_status => {
                condition.last_transition_time.clone()
            }
            _ => Timestamp::now().to_string(),
        };
        PrefetchStatus {
            phase: Some(phase),
            observed_generation: self.prefetch.metadata.generation,
            images: self.desired.images.iter().cloned().collect(),
            nodes: u32::try_from(self.desired.nodes.len()).unwrap_or(u32::MAX),
            pulls: counts,
            failures,
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: condition_status.into(),
                reason: if ready {
                    "AllImagesPresent".into()
                } else {
                    phase_reason(phase).into()
                },
                message: message.clone().unwrap_or_else(|| {
                    if ready {
                        "every targeted node has every image".into()
                    } else {
                        "pulls are in progress".into()
                    }
                }),
                last_transition_time,
            }],
            last_sync_time: Some(Timestamp::now().to_string()),
            message,
        }
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
        if self
            .last_status
            .as_ref()
            .is_some_and(|last| same_apart_from_time(last, &status))
        {
            return;
        }
        if self.status_writing {
            // Written again, with what is current then, once this one lands.
            self.status_dirty = true;
            return;
        }
        self.status_writing = true;
        self.last_status = Some(status.clone());
        let api: Api<Prefetch> = Api::namespaced(self.shared.client.clone(), &self.namespace());
        let name = self.name();
        let patch = json!({ "status": status });
        let write = async move {
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
        };
        ctx.spawn(write.into_actor(self).map(|result, actor, ctx| {
            actor.status_writing = false;
            match result {
                Ok(_) => actor.shared.metrics.status_written(&actor.shared.cluster),
                Err(error) if api_status_code(&error) == Some(404) => {}
                Err(error) => {
                    let _span = actor.span.clone().entered();
                    warn!(error = %describe_kube_error(&error), "could not write status; retrying");
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

fn phase_reason(phase: Phase) -> &'static str {
    match phase {
        Phase::Pending => "Pending",
        Phase::Running => "Pulling",
        Phase::Ready => "AllImagesPresent",
        Phase::Failed => "PullsFailed",
    }
}

fn same_apart_from_time(a: &PrefetchStatus, b: &PrefetchStatus) -> bool {
    let mut a = a.clone();
    a.last_sync_time = b.last_sync_time.clone();
    a == *b
}

/// Watches one workload kind in one namespace, forwarding each object's
/// images and scheduling constraints to the PrefetchActor.
async fn watch_workloads<K>(
    client: kube::Client,
    namespace: String,
    config: watcher::Config,
    addr: Addr<PrefetchActor>,
) where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + PodTemplated
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    let kind = K::KIND;
    let api: Api<K> = Api::namespaced(client, &namespace);
    let describe = |object: &K| {
        object
            .pod_spec()
            .map(|spec| WorkloadImages::from_pod_spec(kind, &namespace, &object.name_any(), spec))
    };
    let mut stream = watcher(api, config).default_backoff().boxed();
    while let Some(item) = stream.next().await {
        let update = match item {
            Ok(watcher::Event::Init) => WorkloadUpdate::Init,
            Ok(watcher::Event::InitApply(object)) => {
                WorkloadUpdate::InitApply(object.name_any(), describe(&object))
            }
            Ok(watcher::Event::InitDone) => WorkloadUpdate::InitDone,
            Ok(watcher::Event::Apply(object)) => {
                WorkloadUpdate::Apply(object.name_any(), describe(&object))
            }
            Ok(watcher::Event::Delete(object)) => WorkloadUpdate::Delete(object.name_any()),
            Err(error) => {
                let message = describe_watch_error(&error);
                warn!(%kind, %namespace, error = %message, "workload watch failed; retrying");
                WorkloadUpdate::Failed(message)
            }
        };
        addr.do_send(WorkloadEvent {
            kind,
            namespace: namespace.clone(),
            update,
        });
    }
}

pub enum WorkloadUpdate {
    Init,
    InitApply(String, Option<WorkloadImages>),
    InitDone,
    Apply(String, Option<WorkloadImages>),
    Delete(String),
    Failed(String),
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct WorkloadEvent {
    pub kind: WorkloadKind,
    pub namespace: String,
    pub update: WorkloadUpdate,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct SpecChanged(pub Arc<Prefetch>);

#[derive(Message)]
#[rtype(result = "()")]
pub struct NodesChanged(pub Arc<BTreeMap<String, NodeView>>);

#[derive(Message)]
#[rtype(result = "()")]
pub struct PodChanged(pub Pod);

#[derive(Message)]
#[rtype(result = "()")]
pub struct PodDeleted(pub Pod);

/// Pull slots may have been freed elsewhere in the cluster.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Kick;

/// The Prefetch was deleted: stop and remove in-flight pods.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Actor for PrefetchActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.ensure_watches(ctx);
        self.queue_replan(ctx);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        for watch in self.watches.values_mut() {
            if let Some(task) = watch.task.take() {
                task.abort();
            }
        }
    }
}

impl Handler<SpecChanged> for PrefetchActor {
    type Result = ();
    fn handle(&mut self, SpecChanged(prefetch): SpecChanged, ctx: &mut Self::Context) {
        let spec_changed = prefetch.spec != self.prefetch.spec;
        self.prefetch = prefetch;
        if spec_changed {
            let _span = self.span.clone().entered();
            info!("spec changed; re-planning");
            self.ensure_watches(ctx);
            self.queue_replan(ctx);
        }
    }
}

impl Handler<NodesChanged> for PrefetchActor {
    type Result = ();
    fn handle(&mut self, NodesChanged(nodes): NodesChanged, ctx: &mut Self::Context) {
        self.nodes = nodes;
        self.queue_replan(ctx);
    }
}

impl Handler<WorkloadEvent> for PrefetchActor {
    type Result = ();
    fn handle(&mut self, msg: WorkloadEvent, ctx: &mut Self::Context) {
        let Some(watch) = self.watches.get_mut(&(msg.kind, msg.namespace)) else {
            return;
        };
        match msg.update {
            WorkloadUpdate::Init => watch.buffer = Some(BTreeMap::new()),
            WorkloadUpdate::InitApply(name, images) => {
                if let Some(images) = images {
                    watch
                        .buffer
                        .get_or_insert_with(BTreeMap::new)
                        .insert(name, images);
                }
            }
            WorkloadUpdate::InitDone => {
                watch.objects = watch.buffer.take().unwrap_or_default();
                watch.synced = true;
                watch.error = None;
                self.queue_replan(ctx);
            }
            WorkloadUpdate::Failed(error) => {
                if !watch.synced {
                    watch.error = Some(error);
                    self.queue_status(ctx);
                }
            }
            WorkloadUpdate::Apply(name, images) => {
                match images {
                    Some(images) => watch.objects.insert(name, images),
                    None => watch.objects.remove(&name),
                };
                self.queue_replan(ctx);
            }
            WorkloadUpdate::Delete(name) => {
                watch.objects.remove(&name);
                self.queue_replan(ctx);
            }
        }
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
        if self.judged.remove(&pod_name) || self.shutting_down {
            return;
        }
        let Some((_, key)) = pair_of_pod(&pod) else {
            return;
        };
        let was_in_flight = self
            .tracker
            .in_flight()
            .into_iter()
            .any(|(k, name)| k == key && name == pod_name);
        if was_in_flight {
            // Someone else deleted it before it was judged: try again.
            let _span = self.span.clone().entered();
            info!(pod = %pod_name, "pull pod deleted before it finished; retrying");
            self.release_slot(&key.node);
            self.tracker.on_pod_vanished(&key, Instant::now());
            self.dispatch(ctx);
        }
    }
}

impl Handler<Kick> for PrefetchActor {
    type Result = ();
    fn handle(&mut self, _: Kick, ctx: &mut Self::Context) {
        self.dispatch(ctx);
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
        let cleanup = async move {
            for (namespace, name) in pods {
                if let Err(error) = delete_pull_pod(client.clone(), &namespace, &name).await {
                    warn!(pod = %name, %error, "could not delete pull pod");
                }
            }
        };
        ctx.wait(cleanup.into_actor(self).map(|_, _, ctx| ctx.stop()));
    }
}
