//! What a Prefetch's status says, and when it is written: pure decisions
//! from the tracker's counts, the plan and the spec. The Prefetch actor only
//! gathers these facts and sends the result.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::api::{Condition, Phase, PrefetchStatus, PullCounts, PullFailure, VerifiedRecord};
use crate::pull::status_size::{MAX_STATUS_BYTES, bound_status};

/// Everything the status is made of, gathered by the Prefetch actor.
#[derive(Debug, Clone)]
pub struct StatusFacts<'a> {
    /// The tracker's phase, before limits and spec problems overrule it.
    pub pulls_phase: Phase,
    pub counts: PullCounts,
    pub failures: Vec<PullFailure>,
    /// Refusals that plan nothing: over the pair limit per Prefetch or per
    /// cluster. Each makes the phase FAILED with its message.
    pub refusals: Vec<String>,
    pub spec_problems: Vec<String>,
    pub workload_errors: &'a [String],
    /// Unparseable image references, each described once.
    pub invalid_images: Vec<String>,
    pub suspended: bool,
    pub observed_generation: Option<i64>,
    /// Canonical images resolved from the workloads and extras.
    pub images: Vec<String>,
    pub targeted_nodes: usize,
    pub verified: Option<VerifiedRecord>,
    /// The status last written, for the Ready condition's transition time.
    pub previous: Option<&'a PrefetchStatus>,
    pub now: Timestamp,
}

/// The status for `facts`, bounded to what the API server accepts.
pub fn decide_status(facts: StatusFacts<'_>) -> PrefetchStatus {
    let mut messages: Vec<String> = Vec::new();
    let mut phase = facts.pulls_phase;
    let refused = !facts.refusals.is_empty()
        || !facts.spec_problems.is_empty()
        || !facts.workload_errors.is_empty()
        || !facts.invalid_images.is_empty();
    if refused {
        phase = Phase::Failed;
    }
    messages.extend(facts.refusals);
    messages.extend(facts.spec_problems);
    messages.extend(facts.workload_errors.iter().cloned());
    if !facts.invalid_images.is_empty() {
        messages.push(facts.invalid_images.join("; "));
    }
    let counts = facts.counts;
    // Failed pulls are the message only when nothing above explains the
    // phase: the first cause is the one a person must fix.
    if phase == Phase::Failed
        && messages.is_empty()
        && let Some(latest) = facts.failures.iter().find(|failure| failure.attempts > 0)
    {
        messages.push(format!(
            "{} of {} pulls failed; latest: {} on {}: {}: {}",
            counts.failed,
            counts.total,
            latest.image,
            latest.node,
            latest.reason,
            latest.last_error
        ));
    }
    if facts.suspended {
        messages.push("suspended: no new pulls are started".into());
    }
    if phase == Phase::Ready && counts.total == 0 {
        messages.push(nothing_to_prefetch(facts.images.is_empty(), facts.targeted_nodes).into());
    }
    let message = (!messages.is_empty()).then(|| messages.join("; "));
    let ready = phase == Phase::Ready;
    let condition_status = if ready { "True" } else { "False" };
    let previous_ready = facts
        .previous
        .and_then(|status| status.conditions.iter().find(|c| c.type_ == "Ready"));
    let now = facts.now.to_string();
    let last_transition_time = match previous_ready {
        Some(condition) if condition.status == condition_status => {
            condition.last_transition_time.clone()
        }
        _ => now.clone(),
    };
    let condition_message = message.clone().unwrap_or_else(|| {
        if ready {
            "every targeted node has every image".into()
        } else {
            "pulls are in progress".into()
        }
    });
    let status = PrefetchStatus {
        phase: Some(phase),
        observed_generation: facts.observed_generation,
        images: facts.images,
        nodes: u32::try_from(facts.targeted_nodes).unwrap_or(u32::MAX),
        pulls: counts,
        failures: facts.failures,
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: condition_status.into(),
            reason: condition_reason(phase).into(),
            message: condition_message,
            last_transition_time,
        }],
        last_sync_time: Some(now),
        message,
        verified: facts.verified,
    };
    // The API server refuses a status over its limits: it would then never
    // be written.
    bound_status(status, MAX_STATUS_BYTES)
}

/// Why a Prefetch has no pair, naming what to look at.
fn nothing_to_prefetch(no_image: bool, targeted_nodes: usize) -> &'static str {
    if no_image {
        "nothing to prefetch: no image: the selected workloads have none and spec.images is empty"
    } else if targeted_nodes == 0 {
        "nothing to prefetch: no node is targeted; `kube-prefetch plan` or the dashboard's drill-down says why each node is skipped"
    } else {
        "nothing to prefetch: no targeted node can run a workload with an image"
    }
}

fn condition_reason(phase: Phase) -> &'static str {
    match phase {
        Phase::Pending => "Pending",
        Phase::Running => "Pulling",
        Phase::Ready => "AllImagesPresent",
        Phase::Failed => "PullsFailed",
    }
}

/// The verification record to write: `previous` when its digests are the
/// same and its time moved by rounding only, so that it causes no write.
pub fn settle_verified(
    fresh: Option<VerifiedRecord>,
    previous: Option<&VerifiedRecord>,
) -> Option<VerifiedRecord> {
    match (fresh, previous) {
        (Some(fresh), Some(previous)) if fresh.digests == previous.digests => {
            let close = match (
                fresh.at.parse::<Timestamp>(),
                previous.at.parse::<Timestamp>(),
            ) {
                (Ok(a), Ok(b)) => (a.as_second() - b.as_second()).abs() <= 2,
                _ => false,
            };
            Some(if close { previous.clone() } else { fresh })
        }
        (fresh, _) => fresh,
    }
}

/// A fan-out of N pulls writes its progress in this many steps, so its
/// status writes do not grow with its length or its size.
pub const PROGRESS_STEPS: u32 = 8;

/// The longest a changed count waits for its write when no step is reached.
pub const PROGRESS_HEARTBEAT: Duration = Duration::from_secs(60);

/// Whether to write a status now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteDecision {
    /// Nothing but the sync time changed.
    Skip,
    Now,
    /// Only progress changed, less than a step: ask again after this long.
    Later(Duration),
}

/// Paces status writes during a fan-out. A change a person acts on (phase,
/// message, Ready condition, images, nodes, generation) is written at once
/// (after the debounce, which the caller applies); counts, failures and the
/// verification record are written when a count moved by 1/[`PROGRESS_STEPS`]
/// of the fan-out since the last write, or after
/// [`PROGRESS_HEARTBEAT`]. So a 1,000-pull fan-out costs about ten writes
/// whether it takes 10 s or 10 min.
#[derive(Debug, Clone, Default)]
pub struct WritePacer {
    /// Pairs that were not ready when the current fan-out began.
    fan_out: u32,
}

impl WritePacer {
    pub fn decide(
        &mut self,
        written: Option<&PrefetchStatus>,
        next: &PrefetchStatus,
        since_written: Duration,
    ) -> WriteDecision {
        let Some(written) = written else {
            self.begin_if_running(None, next);
            return WriteDecision::Now;
        };
        if same_apart_from_time(written, next) {
            return WriteDecision::Skip;
        }
        self.begin_if_running(Some(written), next);
        if written.phase != next.phase
            || written.message != next.message
            || written.conditions != next.conditions
            || written.images != next.images
            || written.nodes != next.nodes
            || written.observed_generation != next.observed_generation
        {
            return WriteDecision::Now;
        }
        // Outside a fan-out (re-verifications of a READY Prefetch) the
        // steps are of all its pairs.
        let base = if next.phase == Some(Phase::Running) {
            self.fan_out
        } else {
            next.pulls.total
        };
        let step = base.div_ceil(PROGRESS_STEPS).max(1);
        if moved(&written.pulls, &next.pulls) >= step
            || next.pulls.total != written.pulls.total
            || since_written >= PROGRESS_HEARTBEAT
        {
            return WriteDecision::Now;
        }
        WriteDecision::Later(PROGRESS_HEARTBEAT - since_written)
    }

    fn begin_if_running(&mut self, written: Option<&PrefetchStatus>, next: &PrefetchStatus) {
        let was_running = written.is_some_and(|w| w.phase == Some(Phase::Running));
        if next.phase == Some(Phase::Running) && !was_running {
            self.fan_out = next.pulls.total.saturating_sub(next.pulls.ready);
        }
    }
}

/// How far the counts moved: the largest change of one of them.
fn moved(a: &PullCounts, b: &PullCounts) -> u32 {
    [
        a.ready.abs_diff(b.ready),
        a.reverifying.abs_diff(b.reverifying),
        a.in_flight.abs_diff(b.in_flight),
        a.failed.abs_diff(b.failed),
    ]
    .into_iter()
    .max()
    .unwrap_or(0)
}

/// Equal apart from `last_sync_time`.
pub fn same_apart_from_time(a: &PrefetchStatus, b: &PrefetchStatus) -> bool {
    let mut a = a.clone();
    a.last_sync_time.clone_from(&b.last_sync_time);
    a == *b
}

/// When to write the status next: after the debounce, or after failed
/// writes 2x, 4x, ... the debounce (at least 100 ms), at most a minute, so
/// an overloaded or refusing API server is not hammered.
pub fn status_write_delay(debounce: Duration, failures: u32) -> Duration {
    if failures == 0 {
        return debounce;
    }
    (debounce.max(Duration::from_millis(100)) * (1u32 << failures.min(10)))
        .min(Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(phase: Phase, counts: PullCounts) -> StatusFacts<'static> {
        StatusFacts {
            pulls_phase: phase,
            counts,
            failures: Vec::new(),
            refusals: Vec::new(),
            spec_problems: Vec::new(),
            workload_errors: &[],
            invalid_images: Vec::new(),
            suspended: false,
            observed_generation: Some(1),
            images: vec!["docker.io/library/busybox:1.36".into()],
            targeted_nodes: 2,
            verified: None,
            previous: None,
            now: Timestamp::UNIX_EPOCH,
        }
    }

    fn counts(ready: u32, in_flight: u32, failed: u32, total: u32) -> PullCounts {
        PullCounts {
            ready,
            reverifying: 0,
            in_flight,
            failed,
            total,
        }
    }

    fn failure() -> PullFailure {
        PullFailure {
            node: "worker-1".into(),
            image: "docker.io/library/nope:1".into(),
            reason: "ErrImagePull".into(),
            attempts: 3,
            permanent: false,
            last_error: "not found".into(),
        }
    }

    #[test]
    fn ready_after_failed_has_no_failure_message() {
        let mut failing = facts(Phase::Failed, counts(1, 0, 1, 2));
        failing.failures = vec![failure()];
        let failed = decide_status(failing);
        assert_eq!(
            failed.message.as_deref(),
            Some(
                "1 of 2 pulls failed; latest: docker.io/library/nope:1 on worker-1: ErrImagePull: not found"
            )
        );
        assert_eq!(failed.conditions[0].reason, "PullsFailed");

        let mut recovered = facts(Phase::Ready, counts(2, 0, 0, 2));
        recovered.previous = Some(&failed);
        recovered.now = Timestamp::from_second(60).unwrap_or(Timestamp::UNIX_EPOCH);
        let ready = decide_status(recovered);
        assert_eq!(ready.message, None);
        assert_eq!(ready.conditions[0].status, "True");
        assert_eq!(
            ready.conditions[0].message,
            "every targeted node has every image"
        );
        assert_eq!(
            ready.conditions[0].last_transition_time,
            "1970-01-01T00:01:00Z"
        );
    }

    #[test]
    fn the_transition_time_is_kept_while_the_condition_holds() {
        let first = decide_status(facts(Phase::Ready, counts(2, 0, 0, 2)));
        let mut later = facts(Phase::Ready, counts(2, 0, 0, 2));
        later.previous = Some(&first);
        later.now = Timestamp::from_second(600).unwrap_or(Timestamp::UNIX_EPOCH);
        let second = decide_status(later);
        assert_eq!(
            second.conditions[0].last_transition_time,
            "1970-01-01T00:00:00Z"
        );
        assert_eq!(
            second.last_sync_time.as_deref(),
            Some("1970-01-01T00:10:00Z")
        );
    }

    #[test]
    fn a_refusal_fails_the_prefetch_and_comes_before_failed_pulls() {
        let mut refused = facts(Phase::Running, counts(0, 1, 1, 2));
        refused.refusals = vec!["too many (node, image) pairs".into()];
        refused.failures = vec![failure()];
        refused.suspended = true;
        let status = decide_status(refused);
        assert_eq!(status.phase, Some(Phase::Failed));
        assert_eq!(
            status.message.as_deref(),
            Some("too many (node, image) pairs; suspended: no new pulls are started")
        );
    }

    #[test]
    fn invalid_images_and_workload_errors_are_listed_in_order() {
        let errors = ["cannot list CronJobs: forbidden".to_string()];
        let mut broken = facts(Phase::Ready, counts(2, 0, 0, 2));
        broken.workload_errors = &errors;
        broken.invalid_images = vec!["a: bad".into(), "b: bad".into()];
        broken.spec_problems = vec!["namespaces: empty".into()];
        let status = decide_status(broken);
        assert_eq!(status.phase, Some(Phase::Failed));
        assert_eq!(
            status.message.as_deref(),
            Some("namespaces: empty; cannot list CronJobs: forbidden; a: bad; b: bad")
        );
        assert_eq!(status.conditions[0].status, "False");
    }

    #[test]
    fn nothing_to_prefetch_says_whether_images_or_nodes_are_missing() {
        let mut no_node = facts(Phase::Ready, counts(0, 0, 0, 0));
        no_node.targeted_nodes = 0;
        assert_eq!(
            decide_status(no_node).message.as_deref(),
            Some(
                "nothing to prefetch: no node is targeted; `kube-prefetch plan` or the dashboard's drill-down says why each node is skipped"
            )
        );
        let mut no_image = facts(Phase::Ready, counts(0, 0, 0, 0));
        no_image.images.clear();
        assert_eq!(
            decide_status(no_image).message.as_deref(),
            Some(
                "nothing to prefetch: no image: the selected workloads have none and spec.images is empty"
            )
        );
        let unschedulable = facts(Phase::Ready, counts(0, 0, 0, 0));
        assert_eq!(
            decide_status(unschedulable).message.as_deref(),
            Some("nothing to prefetch: no targeted node can run a workload with an image")
        );
    }

    #[test]
    fn a_verified_record_moved_by_rounding_only_is_kept() {
        let previous = VerifiedRecord {
            at: "2026-11-27T10:00:00Z".into(),
            digests: "00ff".into(),
        };
        let rounded = VerifiedRecord {
            at: "2026-11-27T10:00:02Z".into(),
            ..previous.clone()
        };
        assert_eq!(
            settle_verified(Some(rounded), Some(&previous)),
            Some(previous.clone())
        );
        let later = VerifiedRecord {
            at: "2026-11-27T10:00:03Z".into(),
            ..previous.clone()
        };
        assert_eq!(
            settle_verified(Some(later.clone()), Some(&previous)),
            Some(later)
        );
        let other = VerifiedRecord {
            digests: "0100".into(),
            ..previous.clone()
        };
        assert_eq!(
            settle_verified(Some(other.clone()), Some(&previous)),
            Some(other)
        );
        assert_eq!(settle_verified(None, Some(&previous)), None);
    }

    fn running(ready: u32, in_flight: u32, total: u32) -> PrefetchStatus {
        decide_status(facts(Phase::Running, counts(ready, in_flight, 0, total)))
    }

    /// Writes of a fan-out where pulls finish one by one, `apart` from each
    /// other, with a status computed after each.
    fn writes_of_fan_out(pulls: u32, already_ready: u32, apart: Duration) -> u32 {
        let total = pulls + already_ready;
        let mut pacer = WritePacer::default();
        let mut written: Option<PrefetchStatus> = None;
        let mut since = Duration::ZERO;
        let mut writes = 0;
        for done in 0..=pulls {
            let next = if done == pulls {
                decide_status(facts(Phase::Ready, counts(total, 0, 0, total)))
            } else {
                running(already_ready + done, (pulls - done).min(100), total)
            };
            match pacer.decide(written.as_ref(), &next, since) {
                WriteDecision::Now => {
                    writes += 1;
                    written = Some(next);
                    since = Duration::ZERO;
                }
                WriteDecision::Skip | WriteDecision::Later(_) => {}
            }
            since += apart;
        }
        writes
    }

    #[test]
    fn a_large_fan_out_is_written_in_nine_steps() {
        // The start, 7 steps of 1/8, READY: 200 s or 100 s long.
        let fifth = Duration::from_millis(200);
        assert_eq!(writes_of_fan_out(1_000, 4_000, fifth), 9);
        assert_eq!(writes_of_fan_out(100_000, 0, Duration::from_millis(1)), 9);
    }

    #[test]
    fn a_long_fan_out_is_written_at_least_once_a_minute() {
        // 1,000 pulls in 1,000 s: a step takes 125 s, so the heartbeat
        // writes: at least 1,000 / 60, and not much more.
        let writes = writes_of_fan_out(1_000, 0, Duration::from_secs(1));
        assert!((17..=19).contains(&writes), "{writes} writes");
    }

    #[test]
    fn a_small_fan_out_writes_every_change() {
        assert_eq!(writes_of_fan_out(3, 0, Duration::from_secs(1)), 4);
    }

    #[test]
    fn a_re_verification_of_a_small_ready_prefetch_is_written() {
        let mut pacer = WritePacer::default();
        let ready = decide_status(facts(Phase::Ready, counts(3, 0, 0, 3)));
        pacer.decide(None, &ready, Duration::ZERO);
        let mut checking = counts(3, 0, 0, 3);
        checking.reverifying = 1;
        let reverifying = decide_status(facts(Phase::Ready, checking));
        assert_eq!(
            pacer.decide(Some(&ready), &reverifying, Duration::from_secs(1)),
            WriteDecision::Now
        );
    }

    #[test]
    fn phase_and_message_changes_are_written_at_once() {
        let mut pacer = WritePacer::default();
        let first = running(0, 10, 1_000);
        assert_eq!(
            pacer.decide(None, &first, Duration::ZERO),
            WriteDecision::Now
        );
        let mut failing = facts(Phase::Running, counts(1, 10, 0, 1_000));
        failing.suspended = true;
        let suspended = decide_status(failing);
        assert_eq!(
            pacer.decide(Some(&first), &suspended, Duration::from_millis(1)),
            WriteDecision::Now
        );
    }

    #[test]
    fn progress_below_a_step_waits_for_the_heartbeat() {
        let mut pacer = WritePacer::default();
        let first = running(0, 10, 1_000);
        pacer.decide(None, &first, Duration::ZERO);
        let one_more = running(1, 10, 1_000);
        assert_eq!(
            pacer.decide(Some(&first), &one_more, Duration::from_secs(10)),
            WriteDecision::Later(Duration::from_secs(50))
        );
        assert_eq!(
            pacer.decide(Some(&first), &one_more, PROGRESS_HEARTBEAT),
            WriteDecision::Now
        );
        let mut later = first.clone();
        later.last_sync_time = Some("2026-11-27T10:00:00Z".into());
        assert_eq!(
            pacer.decide(Some(&first), &later, PROGRESS_HEARTBEAT),
            WriteDecision::Skip
        );
    }

    #[test]
    fn failed_status_writes_back_off_up_to_a_minute() {
        let debounce = Duration::from_millis(500);
        assert_eq!(status_write_delay(debounce, 0), debounce);
        assert_eq!(status_write_delay(debounce, 1), Duration::from_secs(1));
        assert_eq!(status_write_delay(debounce, 2), Duration::from_secs(2));
        assert_eq!(status_write_delay(debounce, 7), Duration::from_secs(60));
        assert_eq!(
            status_write_delay(debounce, u32::MAX),
            Duration::from_secs(60)
        );
        // A zero debounce still backs off.
        assert_eq!(
            status_write_delay(Duration::ZERO, 1),
            Duration::from_millis(200)
        );
    }
}
