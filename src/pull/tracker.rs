//! The per-Prefetch state machine of (node, image) pairs. The slots pulls
//! run in belong to the cluster's dispatch queue (`crate::pull::dispatch`).
//!
//! ```text
//!            dispatched/adopted               Succeeded / node reports image
//!   Idle ───────────────────────► InFlight ─────────────────────────► Satisfied
//!    ▲  ◄── pod vanished ───────────┘  │ Failed (transient)              │
//!    │                                 ├──────────► BackingOff ──┐       │ retry_after
//!    │                                 │ Failed (permanent, or   │ due   │ elapsed: due
//!    │                                 │ attempts exhausted)     ▼       ▼ (re-verify)
//!    │                                 └──────────► Failed ─── due after retry_after
//! ```
//!
//! Nothing here reads a clock: every call takes `now`, so tests are exact.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::Serialize;

use crate::api::{MAX_STATUS_FAILURES, Phase, PullCounts, PullFailure};
use crate::pull::plan::{DesiredSet, PairKey};

/// Exponential backoff between transient failures of one pair.
#[derive(Debug, Clone, PartialEq)]
pub struct BackoffPolicy {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Cap on the delay before jitter.
    pub max: Duration,
    pub multiplier: f32,
    /// Failures (counting the permanent one) after which a pair is Failed.
    pub max_attempts: u32,
    /// Adds up to 100% random extra delay, so pairs that failed together
    /// (a registry outage) do not retry together.
    pub jitter: bool,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_secs(2),
            max: Duration::from_secs(300),
            multiplier: 2.0,
            max_attempts: 5,
            jitter: true,
        }
    }
}

impl BackoffPolicy {
    /// The delay after the `failures`-th consecutive failure (1-based):
    /// `initial * multiplier^(failures-1)`, capped at `max`, plus jitter.
    pub fn delay_after(&self, failures: u32) -> Duration {
        let failures = failures.max(1);
        let mut builder = ExponentialBuilder::default()
            .with_min_delay(self.initial)
            .with_max_delay(self.max)
            .with_factor(self.multiplier)
            .with_max_times(usize::try_from(failures).unwrap_or(usize::MAX));
        if self.jitter {
            builder = builder.with_jitter();
        }
        // A fresh iterator per call keeps the tracker plain data; the cost is
        // at most `max_attempts` multiplications.
        builder.build().last().unwrap_or(self.max)
    }
}

/// How a pull pod ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded,
    Failed {
        reason: String,
        message: String,
        /// Retrying cannot help (not found, unauthorized, invalid name).
        permanent: bool,
    },
}

/// Where one pair stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairStatus {
    /// Needs a pull now: never pulled, or its pod vanished.
    Idle,
    InFlight {
        pod: String,
        /// `metadata.uid` of the pod, once known (from the create response
        /// or its first event): events of an earlier pod with the same name
        /// are not this attempt's.
        uid: Option<String>,
        since: Instant,
    },
    /// Failed transiently; due again at `until`.
    BackingOff { until: Instant },
    /// On the node since `at` (a pull succeeded or the node reported it).
    Satisfied { at: Instant },
    /// Permanently failed or out of attempts; retried from scratch after
    /// `retry_after`, in case the registry or credentials were fixed.
    Failed { at: Instant },
}

/// Where one pair stands, as the dashboard's drill-down shows it (see
/// `crate::pull::grid`): a [`PairStatus`] with its failure and its times
/// made relative to `now`, in whole seconds rounded up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PairView {
    /// Needs a pull and waits for a slot of the cluster's dispatch queue.
    Pending,
    /// A pull pod runs for it (a first pull, or a retry).
    InFlight { pod: String, for_seconds: u64 },
    /// On the node and being checked again (`retry_after` elapsed): still
    /// counts as ready until the check fails. `pod` once its pull pod runs.
    Reverifying {
        #[serde(skip_serializing_if = "Option::is_none")]
        pod: Option<String>,
    },
    /// On the node; checked again in `recheck_in_seconds`.
    Ready { recheck_in_seconds: u64 },
    /// Failed (or its pod could not be created) and waits to retry.
    BackingOff {
        retry_in_seconds: u64,
        attempts: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        last_error: Option<String>,
    },
    /// Permanently failed or out of attempts; a new round starts in
    /// `retry_in_seconds` (after `retry_after`).
    Failed {
        reason: String,
        attempts: u32,
        permanent: bool,
        last_error: String,
        retry_in_seconds: u64,
    },
}

/// Whole seconds from `now` to `at`, rounded up (0 once passed).
fn seconds_until(now: Instant, at: Option<Instant>) -> u64 {
    let left = at.map_or(Duration::ZERO, |at| at.saturating_duration_since(now));
    left.as_secs() + u64::from(left.subsec_nanos() > 0)
}

#[derive(Debug, Clone)]
struct LastFailure {
    reason: String,
    message: String,
    permanent: bool,
    attempts: u32,
    /// Increasing per tracker, to order failures newest first even when
    /// several share one `now`.
    sequence: u64,
}

/// The pod of an in-flight pair (see [`PairStatus::InFlight`]).
#[derive(Debug, Clone, PartialEq, Eq)]
struct InFlightPod {
    pod: String,
    uid: Option<String>,
    since: Instant,
}

/// [`PairStatus`] as the tracker keeps it: the in-flight pod is boxed, as
/// few pairs are in flight at once, so that every pair stays small.
#[derive(Debug, Clone)]
enum State {
    Idle,
    InFlight(Box<InFlightPod>),
    BackingOff { until: Instant },
    Satisfied { at: Instant },
    Failed { at: Instant },
}

impl State {
    fn public(&self) -> PairStatus {
        match self {
            State::Idle => PairStatus::Idle,
            State::InFlight(flight) => PairStatus::InFlight {
                pod: flight.pod.clone(),
                uid: flight.uid.clone(),
                since: flight.since,
            },
            State::BackingOff { until } => PairStatus::BackingOff { until: *until },
            State::Satisfied { at } => PairStatus::Satisfied { at: *at },
            State::Failed { at } => PairStatus::Failed { at: *at },
        }
    }
}

/// One pair: 40 bytes, with its failure (rare) boxed.
#[derive(Debug, Clone)]
struct Pair {
    state: State,
    /// Consecutive failures in the current round.
    attempts: u32,
    /// The pair was satisfied and is being checked again (`retry_after`
    /// elapsed): the image was on the node, so until the check fails it
    /// still counts as ready, and the phase stays READY.
    reverifying: bool,
    last_failure: Option<Box<LastFailure>>,
}

impl Pair {
    fn idle() -> Self {
        Pair {
            state: State::Idle,
            attempts: 0,
            reverifying: false,
            last_failure: None,
        }
    }

    fn satisfy(&mut self, now: Instant) {
        self.state = State::Satisfied { at: now };
        self.attempts = 0;
        self.last_failure = None;
        self.reverifying = false;
    }

    fn in_flight(&self) -> Option<&InFlightPod> {
        match &self.state {
            State::InFlight(flight) => Some(flight),
            _ => None,
        }
    }

    /// Counts as on its node: satisfied, or its re-verification has not
    /// failed (yet).
    fn is_ready(&self) -> bool {
        match self.state {
            State::Satisfied { .. } => true,
            State::InFlight(_) | State::Idle => self.reverifying,
            State::BackingOff { .. } | State::Failed { .. } => false,
        }
    }

    /// When a waiting pair becomes due again; `None` for Idle (due already)
    /// and InFlight (waits for its pod, not for time).
    fn due_at(&self, retry_after: Duration) -> Option<Instant> {
        match &self.state {
            State::Idle | State::InFlight(_) => None,
            State::BackingOff { until } => Some(*until),
            State::Satisfied { at } | State::Failed { at } => at.checked_add(retry_after),
        }
    }

    fn is_due(&self, now: Instant, retry_after: Duration) -> bool {
        matches!(self.state, State::Idle) || self.due_at(retry_after).is_some_and(|at| at <= now)
    }
}

/// One pair under its node.
#[derive(Debug, Clone)]
struct Tracked {
    image: Arc<str>,
    pair: Pair,
}

/// All pairs of one Prefetch.
#[derive(Debug, Clone)]
pub struct Tracker {
    policy: BackoffPolicy,
    /// By node, each node's pairs sorted by image (never empty). Node and
    /// image names are the desired set's `Arc`s: a pair owns no string.
    pairs: BTreeMap<Arc<str>, Box<[Tracked]>>,
    /// Pairs over all nodes.
    len: usize,
    /// In-flight pods whose pair is no longer desired, waiting to be
    /// deleted.
    orphans: BTreeMap<PairKey, InFlightPod>,
    desired_ever_set: bool,
    failure_sequence: u64,
}

impl Tracker {
    pub fn new(policy: BackoffPolicy) -> Self {
        Tracker {
            policy,
            pairs: BTreeMap::new(),
            len: 0,
            orphans: BTreeMap::new(),
            desired_ever_set: false,
            failure_sequence: 0,
        }
    }

    pub fn policy(&self) -> &BackoffPolicy {
        &self.policy
    }

    /// Replaces the desired pairs. New pairs start Idle, kept pairs keep
    /// their state, dropped pairs are forgotten; a dropped pair's in-flight
    /// pod is reported once by [`Tracker::orphaned_in_flight`]. A pair that
    /// comes back before its orphan was collected takes its pod back.
    pub fn set_desired(&mut self, desired: &DesiredSet) {
        self.desired_ever_set = true;
        let gone: Vec<Arc<str>> = self
            .pairs
            .keys()
            .filter(|node| !desired.targets_node(node))
            .cloned()
            .collect();
        for node in gone {
            self.update_node(&node, desired);
        }
        for node in desired.nodes() {
            self.update_node(node, desired);
        }
    }

    /// Like [`Tracker::set_desired`] for the pairs of one node only: what a
    /// node event costs is that node's pairs, not the whole set.
    pub fn set_node_desired(&mut self, node: &str, desired: &DesiredSet) {
        self.desired_ever_set = true;
        self.update_node(node, desired);
    }

    /// Brings the pairs of `node` in line with `desired`'s.
    fn update_node(&mut self, node: &str, desired: &DesiredSet) {
        let wanted = desired.node_images(node);
        let unchanged = match self.pairs.get(node) {
            Some(old) => old.iter().map(|tracked| &tracked.image).eq(wanted.clone()),
            None => wanted.len() == 0,
        };
        if unchanged {
            // The usual replan: nothing to allocate or move.
            return;
        }
        let (old_name, old) = match self.pairs.remove_entry(node) {
            Some((name, old)) => {
                self.len -= old.len();
                (Some(name), Vec::from(old))
            }
            None => (None, Vec::new()),
        };
        let mut old = old.into_iter().peekable();
        let mut pairs: Vec<Tracked> = Vec::with_capacity(wanted.len());
        // Both sides are sorted by image: one merge keeps, starts and
        // forgets pairs.
        if let Some(name) = desired.node_name(node) {
            for image in wanted {
                while let Some(stale) = old.next_if(|tracked| tracked.image < *image) {
                    self.forget(old_name.as_ref(), stale);
                }
                match old.next_if(|tracked| tracked.image == *image) {
                    Some(kept) => pairs.push(kept),
                    None => pairs.push(self.start(name, image)),
                }
            }
            if !pairs.is_empty() {
                self.len += pairs.len();
                self.pairs.insert(name.clone(), pairs.into_boxed_slice());
            }
        }
        for stale in old {
            self.forget(old_name.as_ref(), stale);
        }
    }

    /// A pair no longer desired: its in-flight pod becomes an orphan.
    fn forget(&mut self, node: Option<&Arc<str>>, tracked: Tracked) {
        if let (Some(node), State::InFlight(flight)) = (node, tracked.pair.state) {
            let key = PairKey {
                node: node.clone(),
                image: tracked.image,
            };
            self.orphans.insert(key, *flight);
        }
    }

    /// A new pair starts Idle, or takes back its orphaned pod: that pod
    /// still pulls what we want again.
    fn start(&mut self, node: &Arc<str>, image: &Arc<str>) -> Tracked {
        let key = PairKey {
            node: node.clone(),
            image: image.clone(),
        };
        let mut pair = Pair::idle();
        if let Some(flight) = self.orphans.remove(&key) {
            pair.state = State::InFlight(Box::new(flight));
        }
        Tracked {
            image: key.image,
            pair,
        }
    }

    fn get(&self, key: &PairKey) -> Option<&Pair> {
        let pairs = self.pairs.get(&*key.node)?;
        let at = pairs
            .binary_search_by(|tracked| tracked.image.cmp(&key.image))
            .ok()?;
        pairs.get(at).map(|tracked| &tracked.pair)
    }

    fn get_mut(&mut self, key: &PairKey) -> Option<&mut Pair> {
        let pairs = self.pairs.get_mut(&*key.node)?;
        let at = pairs
            .binary_search_by(|tracked| tracked.image.cmp(&key.image))
            .ok()?;
        pairs.get_mut(at).map(|tracked| &mut tracked.pair)
    }

    /// Every pair with its key's parts, by node then image.
    fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<str>, &Pair)> + '_ {
        self.pairs.iter().flat_map(|(node, pairs)| {
            pairs
                .iter()
                .map(move |tracked| (node, &tracked.image, &tracked.pair))
        })
    }

    fn values(&self) -> impl Iterator<Item = &Pair> + '_ {
        self.pairs
            .values()
            .flat_map(|pairs| pairs.iter().map(|tracked| &tracked.pair))
    }

    /// Whether `key` is desired.
    pub fn contains(&self, key: &PairKey) -> bool {
        self.get(key).is_some()
    }

    pub fn status(&self, key: &PairKey) -> Option<PairStatus> {
        self.get(key).map(|pair| pair.state.public())
    }

    /// When `key` was last satisfied, if it is now.
    pub fn satisfied_at(&self, key: &PairKey) -> Option<Instant> {
        match self.get(key)?.state {
            State::Satisfied { at } => Some(at),
            _ => None,
        }
    }

    /// What the drill-down shows of `key` at `now` (`None`: not desired).
    pub fn view(&self, key: &PairKey, now: Instant, retry_after: Duration) -> Option<PairView> {
        let pair = self.get(key)?;
        let due_in = seconds_until(now, pair.due_at(retry_after));
        let failure = pair.last_failure.as_deref();
        Some(match &pair.state {
            State::Idle | State::InFlight(_) if pair.reverifying => PairView::Reverifying {
                pod: pair.in_flight().map(|flight| flight.pod.clone()),
            },
            State::Idle => PairView::Pending,
            State::InFlight(flight) => PairView::InFlight {
                pod: flight.pod.clone(),
                for_seconds: now.saturating_duration_since(flight.since).as_secs(),
            },
            State::Satisfied { .. } => PairView::Ready {
                recheck_in_seconds: due_in,
            },
            State::BackingOff { .. } => PairView::BackingOff {
                retry_in_seconds: due_in,
                attempts: pair.attempts,
                reason: failure.map(|failure| failure.reason.clone()),
                last_error: failure.map(|failure| failure.message.clone()),
            },
            State::Failed { .. } => PairView::Failed {
                reason: failure.map_or_else(String::new, |failure| failure.reason.clone()),
                attempts: pair.attempts,
                permanent: failure.is_some_and(|failure| failure.permanent),
                last_error: failure.map_or_else(String::new, |failure| failure.message.clone()),
                retry_in_seconds: due_in,
            },
        })
    }

    /// Consecutive failures of the current round (0 when unknown).
    pub fn attempts(&self, key: &PairKey) -> u32 {
        self.get(key).map_or(0, |pair| pair.attempts)
    }

    /// The node lists the image: satisfied without a pull. An in-flight
    /// pair keeps waiting for its pod, whose outcome will follow.
    /// Returns whether the pair was not satisfied before (a change anyone
    /// cares about; refreshing a satisfied pair only moves its next check).
    pub fn node_reports_image(&mut self, key: &PairKey, now: Instant) -> bool {
        match self.get_mut(key) {
            Some(pair) if !matches!(pair.state, State::InFlight(_)) => {
                let newly = !matches!(pair.state, State::Satisfied { .. });
                pair.satisfy(now);
                newly
            }
            _ => false,
        }
    }

    /// A pair not started yet was verified at `at` by an earlier process
    /// (see `crate::pull::verified`). Returns whether it was taken.
    pub fn restore_verified(&mut self, key: &PairKey, at: Instant) -> bool {
        match self.get_mut(key) {
            Some(pair) if matches!(pair.state, State::Idle) => {
                pair.satisfy(at);
                true
            }
            _ => false,
        }
    }

    /// A pull pod was created (or already existed) for `key`. Starting from
    /// Failed begins a new round at attempt 0. A pod for an undesired pair
    /// is recorded as an orphan, so that it gets deleted.
    pub fn on_dispatched(&mut self, key: &PairKey, pod_name: &str, now: Instant) {
        let flight = InFlightPod {
            pod: pod_name.to_string(),
            uid: None,
            since: now,
        };
        match self.get_mut(key) {
            Some(pair) => {
                if matches!(pair.state, State::Failed { .. }) {
                    pair.attempts = 0;
                }
                if matches!(pair.state, State::Satisfied { .. }) {
                    pair.reverifying = true;
                }
                pair.state = State::InFlight(Box::new(flight));
            }
            None => {
                self.orphans.insert(key.clone(), flight);
            }
        }
    }

    /// A pull pod found after a restart (or on a create conflict): treated
    /// like a dispatch whose pod is known.
    pub fn on_adopted(&mut self, key: &PairKey, pod_name: &str, uid: &str, now: Instant) {
        self.on_dispatched(key, pod_name, now);
        self.bind_uid(key, pod_name, uid);
    }

    /// Learns the uid of the in-flight pod `pod_name` of `key`, if not
    /// known yet; a different pod of that name is not bound.
    pub fn bind_uid(&mut self, key: &PairKey, pod_name: &str, pod_uid: &str) {
        if let Some(pair) = self.get_mut(key)
            && let State::InFlight(flight) = &mut pair.state
            && flight.pod == pod_name
            && flight.uid.is_none()
        {
            flight.uid = Some(pod_uid.to_string());
        }
    }

    /// Whether the pod `pod_name` with `pod_uid` is the current attempt of
    /// `key`. Until its uid is known, any pod of that name is (the caller
    /// skips pods it already judged); then only that one.
    pub fn is_current_pod(&self, key: &PairKey, pod_name: &str, pod_uid: &str) -> bool {
        self.get(key)
            .and_then(Pair::in_flight)
            .is_some_and(|flight| {
                flight.pod == pod_name && flight.uid.as_deref().is_none_or(|uid| uid == pod_uid)
            })
    }

    /// Whether `key` needs a pull now (see [`Tracker::due`]).
    pub fn is_due(&self, key: &PairKey, now: Instant, retry_after: Duration) -> bool {
        self.get(key)
            .is_some_and(|pair| pair.is_due(now, retry_after))
    }

    /// The uid of the in-flight pod of `key`, once known.
    pub fn in_flight_uid(&self, key: &PairKey) -> Option<&str> {
        self.get(key)?.in_flight()?.uid.as_deref()
    }

    /// Creating the pod failed for a reason that says nothing about the
    /// pull: one of that name still exists (an earlier attempt being
    /// deleted), or the API server was unavailable. Try again after `delay`,
    /// without counting an attempt.
    pub fn on_create_conflict(&mut self, key: &PairKey, now: Instant, delay: Duration) {
        if let Some(pair) = self.get_mut(key)
            && matches!(pair.state, State::InFlight(_))
        {
            pair.state = State::BackingOff {
                until: now.checked_add(delay).unwrap_or(now),
            };
        }
    }

    /// The pull pod of `key` was judged. Succeeded always counts. A failure
    /// counts only while the pair is in flight, so that repeated watch events
    /// for one failed pod are not counted as several attempts.
    pub fn on_outcome(&mut self, key: &PairKey, outcome: Outcome, now: Instant) {
        self.orphans.remove(key);
        let policy = self.policy.clone();
        let sequence = self.failure_sequence + 1;
        let Some(pair) = self.get_mut(key) else {
            return;
        };
        match outcome {
            Outcome::Succeeded => pair.satisfy(now),
            Outcome::Failed {
                reason,
                message,
                permanent,
            } => {
                if !matches!(pair.state, State::InFlight(_)) {
                    return;
                }
                // A failed re-verification is a failure like any other.
                pair.reverifying = false;
                pair.attempts = pair.attempts.saturating_add(1);
                let exhausted = permanent || pair.attempts >= policy.max_attempts;
                pair.state = if exhausted {
                    State::Failed { at: now }
                } else {
                    let delay = policy.delay_after(pair.attempts);
                    State::BackingOff {
                        until: now.checked_add(delay).unwrap_or(now),
                    }
                };
                pair.last_failure = Some(Box::new(LastFailure {
                    reason,
                    message,
                    permanent,
                    attempts: pair.attempts,
                    sequence,
                }));
                self.failure_sequence = sequence;
            }
        }
    }

    /// The in-flight pod was deleted by someone else: pull again at once,
    /// without counting an attempt (nothing was learnt about the image).
    pub fn on_pod_vanished(&mut self, key: &PairKey, _now: Instant) {
        self.orphans.remove(key);
        if let Some(pair) = self.get_mut(key)
            && matches!(pair.state, State::InFlight(_))
        {
            pair.state = State::Idle;
        }
    }

    /// Pairs that need a pull now: Idle, backoff elapsed, Satisfied longer
    /// than `retry_after` ago (re-verification), Failed longer than
    /// `retry_after` ago (new round).
    ///
    /// Order: round-robin over nodes sorted by name, each node's pairs by
    /// image: (n1,i1), (n2,i1), (n1,i2), (n2,i2), ... so a dispatch cap
    /// spreads pulls across nodes instead of serving one node entirely first.
    pub fn due(&self, now: Instant, retry_after: Duration) -> Vec<PairKey> {
        let mut queues: Vec<(&Arc<str>, Vec<&Arc<str>>)> = Vec::new();
        for (node, pairs) in &self.pairs {
            let due: Vec<&Arc<str>> = pairs
                .iter()
                .filter(|tracked| tracked.pair.is_due(now, retry_after))
                .map(|tracked| &tracked.image)
                .collect();
            if !due.is_empty() {
                queues.push((node, due));
            }
        }
        let mut due = Vec::new();
        for round in 0.. {
            let before = due.len();
            for (node, images) in &queues {
                if let Some(image) = images.get(round) {
                    due.push(PairKey {
                        node: Arc::clone(node),
                        image: Arc::clone(image),
                    });
                }
            }
            if due.len() == before {
                break;
            }
        }
        due
    }

    /// The earliest instant at which a BackingOff, Satisfied or Failed pair
    /// becomes due. Idle pairs are due already and not included; the result
    /// may lie in the past when pairs are due but were not dispatched (for
    /// that case see [`Tracker::next_wakeup_after`]).
    pub fn next_wakeup(&self, retry_after: Duration) -> Option<Instant> {
        self.values()
            .filter_map(|pair| pair.due_at(retry_after))
            .min()
    }

    /// Like [`Tracker::next_wakeup`], but only instants strictly after
    /// `now`: what a timer should wait for once everything due now was
    /// handled (or waits for a slot of the dispatch queue, which grants it).
    pub fn next_wakeup_after(&self, now: Instant, retry_after: Duration) -> Option<Instant> {
        self.values()
            .filter_map(|pair| pair.due_at(retry_after))
            .filter(|at| *at > now)
            .min()
    }

    /// Desired pairs with a pull pod in flight, by key.
    pub fn in_flight(&self) -> Vec<(PairKey, String)> {
        self.iter()
            .filter_map(|(node, image, pair)| {
                let flight = pair.in_flight()?;
                let key = PairKey {
                    node: node.clone(),
                    image: image.clone(),
                };
                Some((key, flight.pod.clone()))
            })
            .collect()
    }

    pub fn in_flight_count(&self) -> usize {
        self.values()
            .filter(|pair| matches!(pair.state, State::InFlight(_)))
            .count()
    }

    /// In-flight pods of pairs no longer desired; the caller deletes them
    /// (and releases their slots). Each is returned once.
    pub fn orphaned_in_flight(&mut self) -> Vec<(PairKey, String)> {
        std::mem::take(&mut self.orphans)
            .into_iter()
            .map(|(key, flight)| (key, flight.pod))
            .collect()
    }

    pub fn counts(&self) -> PullCounts {
        let mut counts = PullCounts {
            total: saturating_u32(self.len),
            ..PullCounts::default()
        };
        for pair in self.values() {
            if pair.is_ready() {
                counts.ready += 1;
                if pair.reverifying {
                    counts.reverifying += 1;
                }
                continue;
            }
            match pair.state {
                State::InFlight(_) => counts.in_flight += 1,
                State::Failed { .. } => counts.failed += 1,
                State::Satisfied { .. } | State::Idle | State::BackingOff { .. } => {}
            }
        }
        counts
    }

    /// Pairs that failed at least once and are not satisfied, including
    /// those still backing off (their attempts grow visibly), newest first,
    /// at most [`MAX_STATUS_FAILURES`].
    pub fn failures(&self) -> Vec<PullFailure> {
        let mut failed: Vec<(&Arc<str>, &Arc<str>, &LastFailure)> = self
            .iter()
            .filter(|(_, _, pair)| !matches!(pair.state, State::Satisfied { .. }))
            .filter_map(|(node, image, pair)| {
                pair.last_failure
                    .as_deref()
                    .map(|failure| (node, image, failure))
            })
            .collect();
        failed.sort_by_key(|(_, _, failure)| std::cmp::Reverse(failure.sequence));
        failed
            .into_iter()
            .take(MAX_STATUS_FAILURES)
            .map(|(node, image, failure)| PullFailure {
                node: node.to_string(),
                image: image.to_string(),
                reason: failure.reason.clone(),
                attempts: failure.attempts,
                last_error: failure.message.clone(),
                permanent: failure.permanent,
            })
            .collect()
    }

    /// PENDING before the first desired set, FAILED if any pair is Failed,
    /// READY when every pair is ready (satisfied, or being re-verified
    /// without a failure; or there is nothing to do), RUNNING otherwise.
    pub fn phase(&self) -> Phase {
        if !self.desired_ever_set {
            return Phase::Pending;
        }
        let mut all_satisfied = true;
        for pair in self.values() {
            if matches!(pair.state, State::Failed { .. }) {
                return Phase::Failed;
            }
            all_satisfied &= pair.is_ready();
        }
        if all_satisfied {
            Phase::Ready
        } else {
            Phase::Running
        }
    }
}

fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pull::dispatch::DispatchQueue;
    use crate::pull::plan::{PullSettings, PullTarget};

    const RETRY: Duration = Duration::from_secs(300);

    fn policy() -> BackoffPolicy {
        BackoffPolicy {
            initial: Duration::from_secs(2),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            max_attempts: 4,
            jitter: false,
        }
    }

    fn key(node: &str, image: &str) -> PairKey {
        PairKey::new(node, image)
    }

    fn desired(pairs: &[(&str, &str)]) -> DesiredSet {
        let settings = Arc::new(PullSettings {
            namespace: "ns".into(),
            ..PullSettings::default()
        });
        let mut set = DesiredSet::default();
        for (node, image) in pairs {
            set.images.insert(image.to_string());
            set.insert(PullTarget::new(*node, *image, settings.clone()));
        }
        set
    }

    fn transient(message: &str) -> Outcome {
        Outcome::Failed {
            reason: "ErrImagePull".into(),
            message: message.into(),
            permanent: false,
        }
    }

    fn permanent(message: &str) -> Outcome {
        Outcome::Failed {
            reason: "ErrImagePull".into(),
            message: message.into(),
            permanent: true,
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn default_policy() {
        let policy = BackoffPolicy::default();
        assert_eq!(policy.initial, secs(2));
        assert_eq!(policy.max, secs(300));
        assert_eq!(policy.multiplier, 2.0);
        assert_eq!(policy.max_attempts, 5);
        assert!(policy.jitter);
    }

    #[test]
    fn backoff_delays_grow_then_cap() {
        let policy = policy();
        let delays: Vec<Duration> = (1..=8).map(|n| policy.delay_after(n)).collect();
        assert_eq!(
            delays,
            vec![
                secs(2),
                secs(4),
                secs(8),
                secs(16),
                secs(32),
                secs(60),
                secs(60),
                secs(60)
            ]
        );
        assert_eq!(policy.delay_after(0), secs(2), "0 is treated as the first");
    }

    #[test]
    fn backoff_jitter_stays_within_bounds() {
        let jittered = BackoffPolicy {
            jitter: true,
            ..policy()
        };
        for failures in 1..=6 {
            let base = policy().delay_after(failures);
            for _ in 0..20 {
                let delay = jittered.delay_after(failures);
                assert!(delay >= base && delay <= base * 2, "{delay:?} vs {base:?}");
            }
        }
    }

    #[test]
    fn new_pairs_are_due_and_pending_before_set() {
        let now = Instant::now();
        let mut tracker = Tracker::new(policy());
        assert_eq!(tracker.phase(), Phase::Pending);
        assert!(tracker.due(now, RETRY).is_empty());

        tracker.set_desired(&desired(&[("n1", "a"), ("n1", "b")]));
        assert_eq!(tracker.phase(), Phase::Running);
        assert_eq!(
            tracker.due(now, RETRY),
            vec![key("n1", "a"), key("n1", "b")]
        );
        assert_eq!(
            tracker.counts(),
            PullCounts {
                ready: 0,
                reverifying: 0,
                in_flight: 0,
                failed: 0,
                total: 2
            }
        );
        assert_eq!(
            tracker.next_wakeup(RETRY),
            None,
            "idle pairs are already due"
        );
    }

    #[test]
    fn empty_desired_set_is_ready() {
        let mut tracker = Tracker::new(policy());
        tracker.set_desired(&DesiredSet::default());
        assert_eq!(tracker.phase(), Phase::Ready);
        assert_eq!(tracker.counts(), PullCounts::default());
    }

    #[test]
    fn due_round_robins_across_nodes() {
        let now = Instant::now();
        let mut tracker = Tracker::new(policy());
        tracker.set_desired(&desired(&[
            ("n2", "a"),
            ("n1", "c"),
            ("n1", "a"),
            ("n1", "b"),
            ("n3", "b"),
            ("n2", "b"),
        ]));
        assert_eq!(
            tracker.due(now, RETRY),
            vec![
                key("n1", "a"),
                key("n2", "a"),
                key("n3", "b"),
                key("n1", "b"),
                key("n2", "b"),
                key("n1", "c"),
            ]
        );
    }

    #[test]
    fn dispatch_success_and_reverification() {
        let t0 = Instant::now();
        let k = key("n1", "a");
        let mut tracker = Tracker::new(policy());
        tracker.set_desired(&desired(&[("n1", "a")]));

        tracker.on_dispatched(&k, "pod-1", t0);
        assert!(tracker.due(t0, RETRY).is_empty());
        assert_eq!(tracker.in_flight(), vec![(k.clone(), "pod-1".to_string())]);
        assert_eq!(tracker.in_flight_count(), 1);
        assert_eq!(tracker.counts().in_flight, 1);
        assert_eq!(tracker.next_wakeup(RETRY), None);

        let t1 = t0 + secs(5);
        tracker.on_outcome(&k, Outcome::Succeeded, t1);
        assert_eq!(tracker.status(&k), Some(PairStatus::Satisfied { at: t1 }));
        assert_eq!(tracker.phase(), Phase::Ready);
        assert_eq!(tracker.counts().ready, 1);
        assert_eq!(tracker.in_flight_count(), 0);
        assert_eq!(tracker.next_wakeup(RETRY), Some(t1 + RETRY));

        assert!(tracker.due(t1 + RETRY - secs(1), RETRY).is_empty());
        assert_eq!(tracker.due(t1 + RETRY, RETRY), vec![k.clone()]);
        // Still READY while re-verification is pending: the image was there.
        assert_eq!(tracker.phase(), Phase::Ready);
    }

    /// A READY Prefetch stays READY while its pairs are re-verified, shows
    /// them as `reverifying`, and leaves READY only when a check fails.
    #[test]
    fn reverification_keeps_ready_until_a_check_fails() {
        let t0 = Instant::now();
        let (a, b) = (key("n1", "a"), key("n2", "a"));
        let mut tracker = Tracker::new(policy());
        tracker.set_desired(&desired(&[("n1", "a"), ("n2", "a")]));
        for k in [&a, &b] {
            tracker.on_dispatched(k, "pod", t0);
            tracker.on_outcome(k, Outcome::Succeeded, t0);
        }
        assert_eq!(tracker.phase(), Phase::Ready);

        let t1 = t0 + RETRY;
        tracker.on_dispatched(&a, "pod-a2", t1);
        tracker.on_dispatched(&b, "pod-b2", t1);
        assert_eq!(tracker.phase(), Phase::Ready);
        let counts = tracker.counts();
        assert_eq!(
            (counts.ready, counts.reverifying, counts.in_flight),
            (2, 2, 0)
        );

        // A check whose pod vanished is still a check, not a first pull.
        tracker.on_pod_vanished(&a, t1);
        assert_eq!(tracker.phase(), Phase::Ready);
        tracker.on_dispatched(&a, "pod-a3", t1);

        // One check succeeds: that pair is plainly satisfied again.
        tracker.on_outcome(&b, Outcome::Succeeded, t1 + secs(1));
        let counts = tracker.counts();
        assert_eq!((counts.ready, counts.reverifying), (2, 1));

        // The other fails transiently: RUNNING, and it counts as not ready.
        tracker.on_outcome(
            &a,
            Outcome::Failed {
                reason: "ErrImagePull".into(),
                message: "registry down".into(),
                permanent: false,
            },
            t1 + secs(2),
        );
        assert_eq!(tracker.phase(), Phase::Running);
        let counts = tracker.counts();
        assert_eq!(
            (counts.ready, counts.reverifying, counts.in_flight),
            (1, 0, 0)
        );

        // Its retry is a pull like any other (RUNNING), and a permanent
        // failure makes the Prefetch FAILED.
        tracker.on_dispatched(&a, "pod-a4", t1 + secs(60));
        assert_eq!(tracker.phase(), Phase::Running);
        assert_eq!(tracker.counts().in_flight, 1);
        tracker.on_outcome(
            &a,
            Outcome::Failed {
                reason: "ErrImagePull".into(),
                message: "not found".into(),
                permanent: true,
            },
            t1 + secs(61),
        );
        assert_eq!(tracker.phase(), Phase::Failed);
    }

    #[test]
    fn node_report_satisfies_and_refreshes() {
        let t0 = Instant::now();
        let k = key("n1", "a");
        let mut tracker = Tracker::new(policy());
        tracker.set_desired(&desired(&[("n1", "a")]));
        tracker.node_reports_image(&k, t0);
        assert_eq!(tracker.phase(), Phase::Ready);
        assert!(tracker.due(t0, RETRY).is_empty());

        // Still reported later: the satisfaction is refreshed.
        let t1 = t0 + RETRY;
        tracker.node_reports_image(&k, t1);
        assert!(tracker.due(t1, RETRY).is_empty());
        assert_eq!(tracker.next_wakeup(RETRY), Some(t1 + RETRY));

        // Unknown pairs are ignored.
        tracker.node_reports_image(&key("n9", "a"), t1);
        assert_eq!(tracker.counts().total, 1);
    }

    #[test]
    fn node_report_does_not_interrupt_in_flight_pull() {
        let t0 = Instant::now();
        let k = key("n1", "a");
        let mut tracker = Tracker::new(policy());
        tracker.set_desired(&desired(&[("n1", "a")]));
        tracker.on_dispatched(&k, "pod", t0);
        tracker.node_reports_image(&k, t0);
        assert_eq!(tracker.in_flight_count(), 1);
    }

    #[test]
    fn transient_failures_back_off_with_growing_delays_then_exhaust() {
        let mut now = Instant::now();
        let k = key("n1", "a");
        let mut tracker = Tracker::new(policy());
        tracker.set_desired(&desired(&[("n1", "a")]));

        let mut previous_delay = Duration::ZERO;
        for attempt in 1..=3u32 {
            tracker.on_dispatched(&k, "pod", now);
            tracker.on_outcome(&k, transient("no such host"), now);
            assert_eq!(tracker.attempts(&k), attempt);
            let Some(PairStatus::BackingOff { until }) = tracker.status(&k) else {
                panic!("expected backoff, got {:?}", tracker.status(&k));
            };
            let delay = until - now;
            assert!(delay > previous_delay, "delays must grow: {delay:?}");
            previous_delay = delay;
            assert_eq!(tracker.next_wakeup(RETRY), Some(until));
            assert!(
                tracker
                    .due(until - Duration::from_millis(1), RETRY)
                    .is_empty()
            );
            assert_eq!(tracker.due(until, RETRY), vec![k.clone()]);
            assert_eq!(tracker.phase(), Phase::Running);
            assert_eq!(tracker.counts().failed, 0);
            let failures = tracker.failures();
            assert_eq!(failures.len(), 1);
            assert_eq!(failures[0].attempts, attempt);
            assert!(!failures[0].permanent);
            now = until;
        }
        assert_eq!(previous_delay, secs(8));

        tracker.on_dispatched(&k, "pod", now);
        tracker.on_outcome(&k, transient("timeout"), now);
        assert_eq!(tracker.status(&k), Some(PairStatus::Failed { at: now }));
        assert_eq!(tracker.phase(), Phase::Failed);
        assert_eq!(tracker.counts().failed, 1);
        let failures = tracker.failures();
        assert_eq!(failures[0].attempts, 4);
        assert_eq!(failures[0].last_error, "timeout");
        assert_eq!(failures[0].reason, "ErrImagePull");

        // Retried from attempt 0 after retry_after.
        assert!(tracker.due(now + RETRY - secs(1), RETRY).is_empty());
        assert_eq!(tracker.next_wakeup(RETRY), Some(now + RETRY));
        let later = now + RETRY;
        assert_eq!(tracker.due(later, RETRY), vec![k.clone()]);
        tracker.on_dispatched(&k, "pod", later);
        assert_eq!(tracker.attempts(&k), 0);
        assert_eq!(tracker.phase(), Phase::Running);
        tracker.on_outcome(&k, transient("again"), later);
        assert_eq!(tracker.attempts(&k), 1);
        assert!(matches!(
            tracker.status(&k),
            Some(PairStatus::BackingOff { .. })
        ));
    }

    #[test]
    fn permanent_failure_fails_at_once() {
        let now = Instant::now();
        let k = key("n1", "a");
        let mut tracker = Tracker::new(policy());
        tracker.set_desired(&desired(&[("n1", "a"), ("n2", "a")]));
        tracker.on_dispatched(&k, "pod", now);
        tracker.on_outcome(&k, permanent("manifest unknown"), now);
        assert_eq!(tracker.status(&k), Some(PairStatus::Failed { at: now }));
        assert_eq!(tracker.attempts(&k), 1);
        assert_eq!(tracker.phase(), Phase::Failed);
        let failures = tracker.failures();
        assert_eq!(failures.len(), 1);
        assert!(failures[0].permanent);
        assert_eq!(failures[0].attempts, 1);
        assert_eq!(failures[0].node, "n1");
        assert_eq!(failures[0].image, "a");
    }

    #[test]
    fn repeated_failure_events_count_once() {
        let now = Instant::now();
        let k = key("n1", "a");
        let mut tracker = Tracker::new(policy());
        tracker.set_desired(&desired(&[("n1", "a")]));
        tracker.on_dispatched(&k, "pod", now);
        tracker.on_outcome(&k, transient("x"), now);
        tracker.on_outcome(&k, transient("x"), now);
        assert_eq!(tracker.attempts(&k), 1);
    }

    #[test]
    fn success_clears_failures() {
        let now = Instant::now();
        let k = key("n1", "a");
        let mut tracker = Tracker::new(policy());
        tracker.set_desired(&desired(&[("n1", "a")]));
        tracker.on_dispatched(&k, "pod", now);
        tracker.on_outcome(&k, transient("x"), now);
        assert_eq!(tracker.failures().len(), 1);
        tracker.on_dispatched(&k, "pod", now + secs(2));
        tracker.on_outcome(&k, Outcome::Succeeded, now + secs(3));
        assert!(tracker.failures().is_empty());
        assert_eq!(tracker.attempts(&k), 0);
        assert_eq!(tracker.phase(), Phase::Ready);
    }

    #[test]
    fn vanished_pod_retries_immediately_without_attempt() {
        let now = Instant::now();
        let k = key("n1", "a");
        let mut tracker = Tracker::new(policy());
        tracker.set_desired(&desired(&[("n1", "a")]));
        tracker.on_dispatched(&k, "pod", now);
        tracker.on_pod_vanished(&k, now);
        assert_eq!(tracker.status(&k), Some(PairStatus::Idle));
        assert_eq!(tracker.attempts(&k), 0);
        assert_eq!(tracker.due(now, RETRY), vec![k.clone()]);

        // A vanish while not in flight changes nothing.
        tracker.node_reports_image(&k, now);
        tracker.on_pod_vanished(&k, now);
        assert!(matches!(
            tracker.status(&k),
            Some(PairStatus::Satisfied { .. })
        ));
    }

    #[test]
    fn adopted_pods_are_in_flight() {
        let now = Instant::now();
        let mut tracker = Tracker::new(policy());
        tracker.set_desired(&desired(&[("n1", "a")]));
        tracker.on_adopted(&key("n1", "a"), "pod-a", "uid-1", now);
        assert_eq!(
            tracker.in_flight(),
            vec![(key("n1", "a"), "pod-a".to_string())]
        );
        assert!(tracker.is_current_pod(&key("n1", "a"), "pod-a", "uid-1"));
        assert!(!tracker.is_current_pod(&key("n1", "a"), "pod-a", "uid-0"));
        // An adopted pod of a pair we no longer want is an orphan.
        tracker.on_adopted(&key("n1", "old"), "pod-old", "uid-2", now);
        assert_eq!(
            tracker.orphaned_in_flight(),
            vec![(key("n1", "old"), "pod-old".to_string())]
        );
        assert_eq!(tracker.counts().total, 1);
    }

    #[test]
    fn dropped_pairs_are_forgotten_and_orphans_reported_once() {
        let now = Instant::now();
        let mut tracker = Tracker::new(policy());
        tracker.set_desired(&desired(&[("n1", "a"), ("n1", "b"), ("n2", "a")]));
        tracker.on_dispatched(&key("n1", "a"), "pod-1a", now);
        tracker.on_dispatched(&key("n2", "a"), "pod-2a", now);
        tracker.node_reports_image(&key("n1", "b"), now);

        tracker.set_desired(&desired(&[("n2", "a"), ("n3", "c")]));
        assert_eq!(tracker.counts().total, 2);
        assert!(!tracker.contains(&key("n1", "b")));
        assert_eq!(
            tracker.in_flight(),
            vec![(key("n2", "a"), "pod-2a".to_string())]
        );
        assert_eq!(
            tracker.orphaned_in_flight(),
            vec![(key("n1", "a"), "pod-1a".to_string())]
        );
        assert!(tracker.orphaned_in_flight().is_empty());
        assert_eq!(tracker.due(now, RETRY), vec![key("n3", "c")]);
    }

    #[test]
    fn pair_readded_before_orphan_collection_keeps_its_pod() {
        let now = Instant::now();
        let k = key("n1", "a");
        let mut tracker = Tracker::new(policy());
        tracker.set_desired(&desired(&[("n1", "a")]));
        tracker.on_dispatched(&k, "pod", now);
        tracker.set_desired(&DesiredSet::default());
        tracker.set_desired(&desired(&[("n1", "a")]));
        assert!(tracker.orphaned_in_flight().is_empty());
        assert_eq!(tracker.in_flight(), vec![(k, "pod".to_string())]);
    }

    #[test]
    fn outcome_of_orphan_removes_it() {
        let now = Instant::now();
        let k = key("n1", "a");
        let mut tracker = Tracker::new(policy());
        tracker.set_desired(&desired(&[("n1", "a")]));
        tracker.on_dispatched(&k, "pod", now);
        tracker.set_desired(&DesiredSet::default());
        tracker.on_outcome(&k, Outcome::Succeeded, now);
        assert!(tracker.orphaned_in_flight().is_empty());
        assert_eq!(tracker.phase(), Phase::Ready);
    }

    #[test]
    fn next_wakeup_is_the_earliest_event() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(policy());
        tracker.set_desired(&desired(&[
            ("n1", "a"),
            ("n1", "b"),
            ("n2", "a"),
            ("n2", "b"),
        ]));
        tracker.node_reports_image(&key("n1", "a"), t0);
        tracker.on_dispatched(&key("n1", "b"), "p", t0);
        tracker.on_outcome(&key("n1", "b"), transient("x"), t0 + secs(10));
        tracker.on_dispatched(&key("n2", "a"), "p", t0);
        tracker.on_outcome(&key("n2", "a"), permanent("denied"), t0 + secs(1));
        // n2/b stays idle (due now) and does not count.
        assert_eq!(tracker.next_wakeup(RETRY), Some(t0 + secs(12)));
        assert_eq!(tracker.next_wakeup(secs(5)), Some(t0 + secs(5)));
        assert_eq!(
            tracker.next_wakeup_after(t0 + secs(5), secs(5)),
            Some(t0 + secs(6))
        );
        assert_eq!(
            tracker.next_wakeup_after(t0 + secs(12), secs(5)),
            None,
            "everything is due at or before now"
        );
    }

    #[test]
    fn failures_newest_first_and_capped() {
        let now = Instant::now();
        let mut tracker = Tracker::new(policy());
        let names: Vec<String> = (0..30).map(|i| format!("img{i:02}")).collect();
        let pairs: Vec<(&str, &str)> = names.iter().map(|name| ("n1", name.as_str())).collect();
        tracker.set_desired(&desired(&pairs));
        for name in &names {
            let k = key("n1", name);
            tracker.on_dispatched(&k, "p", now);
            tracker.on_outcome(&k, transient(name), now);
        }
        let failures = tracker.failures();
        assert_eq!(failures.len(), MAX_STATUS_FAILURES);
        assert_eq!(failures[0].image, "img29");
        assert_eq!(failures[1].image, "img28");
        assert_eq!(failures[MAX_STATUS_FAILURES - 1].image, "img10");
    }

    #[test]
    fn tracker_flow_with_dispatch_queue() {
        let now = Instant::now();
        let mut tracker = Tracker::new(policy());
        tracker.set_desired(&desired(&[("n1", "a"), ("n1", "b"), ("n2", "a")]));
        let mut queue = DispatchQueue::new(1, 10);
        queue.request("pf", "ns", tracker.due(now, RETRY), 10);
        let picked = queue.grant().remove("pf").unwrap_or_default();
        assert_eq!(picked, vec![key("n1", "a"), key("n2", "a")]);
        for k in &picked {
            tracker.on_dispatched(k, "p", now);
        }
        assert_eq!(tracker.due(now, RETRY), vec![key("n1", "b")]);
        queue.request("pf", "ns", tracker.due(now, RETRY), 10);
        assert!(queue.grant().is_empty());
        tracker.on_outcome(&key("n1", "a"), Outcome::Succeeded, now);
        queue.release("pf", "n1");
        assert_eq!(queue.grant().remove("pf"), Some(vec![key("n1", "b")]));
    }

    /// A node event updates that node's pairs only; other nodes' pairs and
    /// kept pairs keep their state, a dropped in-flight pair's pod becomes an
    /// orphan to delete.
    #[test]
    fn node_update_touches_only_that_node() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(policy());
        tracker.set_desired(&desired(&[("n1", "a"), ("n1", "b"), ("n2", "a")]));
        tracker.on_dispatched(&key("n1", "a"), "pod-n1-a", t0);
        tracker.on_outcome(&key("n1", "a"), Outcome::Succeeded, t0);
        tracker.on_dispatched(&key("n1", "b"), "pod-n1-b", t0);
        tracker.on_dispatched(&key("n2", "a"), "pod-n2-a", t0);

        // n1 now wants a and c (b dropped while in flight).
        let next = desired(&[("n1", "a"), ("n1", "c"), ("n2", "a")]);
        tracker.set_node_desired("n1", &next);
        assert!(matches!(
            tracker.status(&key("n1", "a")),
            Some(PairStatus::Satisfied { .. })
        ));
        assert_eq!(tracker.status(&key("n1", "c")), Some(PairStatus::Idle));
        assert_eq!(tracker.status(&key("n1", "b")), None);
        assert!(matches!(
            tracker.status(&key("n2", "a")),
            Some(PairStatus::InFlight { .. })
        ));
        assert_eq!(
            tracker.orphaned_in_flight(),
            vec![(key("n1", "b"), "pod-n1-b".to_string())]
        );

        // n2 deleted.
        let without_n2 = desired(&[("n1", "a"), ("n1", "c")]);
        tracker.set_node_desired("n2", &without_n2);
        assert_eq!(tracker.status(&key("n2", "a")), None);
        assert_eq!(tracker.counts().total, 2);
        assert_eq!(
            tracker.orphaned_in_flight(),
            vec![(key("n2", "a"), "pod-n2-a".to_string())]
        );
    }

    /// A fleet holds hundreds of thousands of pairs: keep a tracked pair
    /// at 56 bytes (see BENCHMARKS.md, "Compact per-pair state").
    #[test]
    fn a_tracked_pair_stays_small() {
        assert_eq!(std::mem::size_of::<Pair>(), 40);
        assert_eq!(std::mem::size_of::<Tracked>(), 56);
    }

    /// A replan that changes a node's images both ways at once keeps what
    /// stays, starts what is new and orphans what left in flight; an
    /// unchanged replan keeps everything.
    #[test]
    fn node_images_replaced_both_ways() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(policy());
        tracker.set_desired(&desired(&[("n1", "b"), ("n1", "d"), ("n1", "f")]));
        tracker.node_reports_image(&key("n1", "b"), t0);
        tracker.on_dispatched(&key("n1", "d"), "pod-d", t0);
        tracker.on_dispatched(&key("n1", "f"), "pod-f", t0);
        tracker.set_desired(&desired(&[("n1", "b"), ("n1", "d"), ("n1", "f")]));
        assert_eq!(tracker.in_flight_count(), 2);

        tracker.set_desired(&desired(&[
            ("n1", "a"),
            ("n1", "b"),
            ("n1", "e"),
            ("n1", "f"),
        ]));
        assert_eq!(tracker.status(&key("n1", "a")), Some(PairStatus::Idle));
        assert_eq!(
            tracker.status(&key("n1", "b")),
            Some(PairStatus::Satisfied { at: t0 })
        );
        assert_eq!(tracker.status(&key("n1", "e")), Some(PairStatus::Idle));
        assert_eq!(
            tracker.in_flight(),
            vec![(key("n1", "f"), "pod-f".to_string())]
        );
        assert_eq!(
            tracker.orphaned_in_flight(),
            vec![(key("n1", "d"), "pod-d".to_string())]
        );
        assert_eq!(tracker.counts().total, 4);
        assert_eq!(tracker.satisfied_at(&key("n1", "b")), Some(t0));
        assert_eq!(tracker.satisfied_at(&key("n1", "a")), None);
    }

    /// Events of an earlier pod with the same name do not belong to a new
    /// attempt once the new pod's uid is known.
    #[test]
    fn pods_are_told_apart_by_uid() {
        let now = Instant::now();
        let mut tracker = Tracker::new(policy());
        let k = key("n1", "a");
        tracker.set_desired(&desired(&[("n1", "a")]));
        tracker.on_dispatched(&k, "pod-a", now);
        // Before the uid is known, the name decides.
        assert!(tracker.is_current_pod(&k, "pod-a", "new"));
        assert!(!tracker.is_current_pod(&k, "pod-b", "new"));
        tracker.bind_uid(&k, "pod-a", "new");
        // Bound once: another uid does not replace it.
        tracker.bind_uid(&k, "pod-a", "old");
        assert!(tracker.is_current_pod(&k, "pod-a", "new"));
        assert!(!tracker.is_current_pod(&k, "pod-a", "old"));

        // A create conflict waits without counting an attempt.
        tracker.on_create_conflict(&k, now, secs(1));
        assert_eq!(tracker.attempts(&k), 0);
        assert!(tracker.due(now, RETRY).is_empty());
        assert_eq!(tracker.due(now + secs(1), RETRY), vec![k.clone()]);
        assert!(!tracker.is_current_pod(&k, "pod-a", "new"));
    }

    #[test]
    fn node_report_says_whether_it_changed_anything() {
        let now = Instant::now();
        let mut tracker = Tracker::new(policy());
        let k = key("n1", "a");
        tracker.set_desired(&desired(&[("n1", "a")]));
        assert!(tracker.node_reports_image(&k, now));
        assert!(!tracker.node_reports_image(&k, now + secs(1)), "a refresh");
        tracker.on_dispatched(&k, "pod", now);
        assert!(!tracker.node_reports_image(&k, now), "in flight: untouched");
        assert!(
            !tracker.node_reports_image(&key("n9", "a"), now),
            "not desired"
        );
    }
}
