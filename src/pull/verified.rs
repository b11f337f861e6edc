//! What survives a restart or a leader failover: a compact record, in the
//! Prefetch's status, of the pairs verified and since when, so that a new
//! process does not pull again what was verified within `retry_after`.
//!
//! Why this shape: the status is the one place we may write (RBAC grants
//! `prefetches/status` only) and is written anyway, debounced; a list of
//! pairs would grow with nodes x images (250,000 at 5,000 x 50). Instead,
//! nodes are hashed into at most [`MAX_BUCKETS`] buckets, and each bucket
//! keeps one order-independent digest of its verified (node, image) pairs.
//! After a restart, a bucket whose digest equals the digest of the pairs now
//! desired in it was fully verified: its pairs count as verified at the
//! record's time. A bucket that changed meanwhile (a node added, an image
//! changed) does not match and its pairs are pulled again, as before — a
//! node changing while we are down costs its bucket's share of the pairs
//! (1/128 of them at most), not all of them. The record is at most 128 x 16
//! hex digits (2 KiB) whatever the cluster size, and changes only when the
//! verified set or its oldest verification changes, so it adds no writes of
//! its own.
//!
//! Digests are FNV-1a (stable across builds and Rust versions, unlike
//! std's hasher); a false match needs a 64-bit collision.

use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;

use crate::api::VerifiedRecord;
use crate::pull::plan::{DesiredSet, PairKey};
use crate::pull::tracker::Tracker;

pub const MAX_BUCKETS: usize = 128;

fn fnv1a(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    // A NUL between parts, which no node name or image reference contains.
    let bytes = parts
        .iter()
        .enumerate()
        .flat_map(|(index, part)| (index > 0).then_some(0u8).into_iter().chain(part.bytes()));
    for byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn bucket_count(nodes: usize) -> usize {
    nodes.clamp(1, MAX_BUCKETS)
}

fn bucket_of(node: &str, buckets: usize) -> usize {
    // Lossless enough: only the remainder matters and buckets <= 128.
    (fnv1a(&[node]) % buckets as u64) as usize
}

fn pair_digest(key: &PairKey) -> u64 {
    fnv1a(&[&key.node, &key.image])
}

/// Per-bucket digests of `pairs` (a wrapping sum: the order does not matter).
fn digests(pairs: impl Iterator<Item = PairKey>, buckets: usize) -> Vec<u64> {
    let mut sums = vec![0u64; buckets];
    for key in pairs {
        if let Some(sum) = sums.get_mut(bucket_of(&key.node, buckets)) {
            *sum = sum.wrapping_add(pair_digest(&key));
        }
    }
    sums
}

fn encode(digests: &[u64]) -> String {
    digests
        .iter()
        .map(|digest| format!("{digest:016x}"))
        .collect()
}

fn decode(text: &str) -> Option<Vec<u64>> {
    if text.is_empty() || !text.len().is_multiple_of(16) || !text.is_ascii() {
        return None;
    }
    (0..text.len() / 16)
        .map(|index| u64::from_str_radix(text.get(index * 16..index * 16 + 16)?, 16).ok())
        .collect()
}

/// The record of what is verified now: the pairs Satisfied in `tracker`,
/// at the oldest of their verification times. `None` when nothing is.
/// Buckets with a pair not verified are recorded too; their digest simply
/// will not match the desired pairs after a restart.
pub fn record(
    desired: &DesiredSet,
    tracker: &Tracker,
    now: Instant,
    now_wall: Timestamp,
) -> Option<VerifiedRecord> {
    let mut oldest: Option<Instant> = None;
    let verified: Vec<PairKey> = desired
        .keys()
        .filter(|key| match tracker.satisfied_at(key) {
            Some(at) => {
                oldest = Some(oldest.map_or(at, |old| old.min(at)));
                true
            }
            None => false,
        })
        .collect();
    let oldest = oldest?;
    let age = now.saturating_duration_since(oldest);
    let at = now_wall.checked_sub(age).ok()?;
    let buckets = bucket_count(desired.node_count());
    Some(VerifiedRecord {
        // Whole seconds, rounded down: never later than the truth.
        at: Timestamp::from_second(at.as_second()).ok()?.to_string(),
        digests: encode(&digests(verified.into_iter(), buckets)),
    })
}

/// The pairs of `desired` that `record` proves verified within
/// `retry_after`, with the instant to count their verification from.
pub fn restorable(
    record: &VerifiedRecord,
    desired: &DesiredSet,
    retry_after: Duration,
    now: Instant,
    now_wall: Timestamp,
) -> Option<(Vec<PairKey>, Instant)> {
    let at: Timestamp = record.at.parse().ok()?;
    let age = Duration::try_from(now_wall.duration_since(at)).ok()?;
    if age >= retry_after {
        return None;
    }
    let verified_at = now.checked_sub(age)?;
    let recorded = decode(&record.digests)?;
    let buckets = recorded.len();
    let current = digests(desired.keys(), buckets);
    let matching: Vec<bool> = recorded
        .iter()
        .zip(&current)
        .map(|(recorded, current)| recorded == current)
        .collect();
    let pairs: Vec<PairKey> = desired
        .keys()
        .filter(|key| matching.get(bucket_of(&key.node, buckets)) == Some(&true))
        .collect();
    Some((pairs, verified_at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pull::plan::{PullSettings, PullTarget};
    use crate::pull::tracker::{BackoffPolicy, Outcome};

    const RETRY: Duration = Duration::from_secs(300);

    fn desired(nodes: usize, images: usize) -> DesiredSet {
        let settings = std::sync::Arc::new(PullSettings {
            namespace: "ns".into(),
            ..PullSettings::default()
        });
        let mut set = DesiredSet::default();
        for node in 0..nodes {
            for image in 0..images {
                set.insert(PullTarget::new(
                    format!("node-{node}"),
                    format!("img-{image}"),
                    settings.clone(),
                ));
            }
        }
        set
    }

    fn satisfied_tracker(desired: &DesiredSet, at: Instant) -> Tracker {
        let mut tracker = Tracker::new(BackoffPolicy::default());
        tracker.set_desired(desired);
        for key in desired.keys() {
            tracker.on_dispatched(&key, "pod", at);
            tracker.on_outcome(&key, Outcome::Succeeded, at);
        }
        tracker
    }

    fn wall(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).expect("a valid time")
    }

    #[test]
    fn a_restart_with_nothing_changed_restores_every_pair() {
        let set = desired(300, 5);
        let t0 = Instant::now();
        let tracker = satisfied_tracker(&set, t0);
        let record =
            record(&set, &tracker, t0 + Duration::from_secs(10), wall(10)).expect("a record");
        assert_eq!(record.digests.len(), 16 * MAX_BUCKETS, "bounded size");
        assert_eq!(record.at, wall(0).to_string());

        // A new process, 60 s later.
        let now = Instant::now() + Duration::from_secs(1000);
        let (pairs, at) = restorable(&record, &set, RETRY, now, wall(60)).expect("fresh");
        assert_eq!(pairs.len(), set.len());
        assert_eq!(now.duration_since(at), Duration::from_secs(60));
    }

    #[test]
    fn a_changed_node_costs_only_its_bucket() {
        let set = desired(1000, 5);
        let t0 = Instant::now();
        let tracker = satisfied_tracker(&set, t0);
        let record = record(&set, &tracker, t0, wall(0)).expect("a record");
        let mut changed = set.clone();
        // node-7 got another image while we were down.
        let extra = PullTarget {
            image: "img-new".into(),
            ..set
                .targets()
                .find(|t| &*t.node == "node-7")
                .expect("node-7")
        };
        changed.insert(extra);
        let (pairs, _) =
            restorable(&record, &changed, RETRY, Instant::now(), wall(5)).expect("fresh");
        assert!(!pairs.iter().any(|key| &*key.node == "node-7"));
        let lost = changed.len() - pairs.len();
        assert!(lost * 100 <= changed.len() * 2, "lost {lost} pairs");
        assert!(lost >= 6, "node-7's pairs at least");
    }

    #[test]
    fn an_unverified_pair_keeps_its_bucket_unverified() {
        let set = desired(4, 2);
        let t0 = Instant::now();
        let mut tracker = Tracker::new(BackoffPolicy::default());
        tracker.set_desired(&set);
        for key in set.keys().filter(|key| &*key.node != "node-2") {
            tracker.on_dispatched(&key, "pod", t0);
            tracker.on_outcome(&key, Outcome::Succeeded, t0);
        }
        let record = record(&set, &tracker, t0, wall(0)).expect("a record");
        let (pairs, _) = restorable(&record, &set, RETRY, Instant::now(), wall(1)).expect("fresh");
        assert!(!pairs.iter().any(|key| &*key.node == "node-2"));
        assert_eq!(pairs.len(), 6);
    }

    #[test]
    fn an_old_or_broken_record_restores_nothing() {
        let set = desired(4, 2);
        let t0 = Instant::now();
        let tracker = satisfied_tracker(&set, t0);
        let record = record(&set, &tracker, t0, wall(0)).expect("a record");
        assert!(restorable(&record, &set, RETRY, Instant::now(), wall(300)).is_none());
        for digests in ["", "xyz", "0123", "é".repeat(16).as_str()] {
            let broken = VerifiedRecord {
                digests: digests.to_string(),
                ..record.clone()
            };
            assert!(restorable(&broken, &set, RETRY, Instant::now(), wall(1)).is_none());
        }
        let bad_time = VerifiedRecord {
            at: "yesterday".into(),
            ..record
        };
        assert!(restorable(&bad_time, &set, RETRY, Instant::now(), wall(1)).is_none());
        // Nothing verified: no record.
        let mut idle = Tracker::new(BackoffPolicy::default());
        idle.set_desired(&set);
        assert!(super::record(&set, &idle, t0, wall(0)).is_none());
    }
}
