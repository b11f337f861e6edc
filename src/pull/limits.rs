//! The pair limit per cluster: all Prefetches of one cluster together may
//! plan at most `defaults.max_pairs_per_cluster` (node, image) pairs, so
//! that many tenants' Prefetches, each under its own limit, cannot add up
//! to more memory than the process has.

use std::collections::BTreeSet;

/// One Prefetch's claim: its order (oldest first) and its pair count.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Claim {
    /// Creation time (RFC 3339 sorts by time), then uid: older Prefetches
    /// keep what they have when a new one would not fit.
    pub created: String,
    pub uid: String,
    pub pairs: usize,
}

/// The uids refused: claims are granted oldest first; one that would take
/// the total past `limit` is refused whole (its pairs are not counted, so a
/// later, smaller one may still fit).
pub fn refused(claims: &[Claim], limit: usize) -> BTreeSet<String> {
    let mut ordered: Vec<&Claim> = claims.iter().collect();
    ordered.sort();
    let mut total = 0usize;
    let mut refused = BTreeSet::new();
    for claim in ordered {
        match total.checked_add(claim.pairs) {
            Some(sum) if sum <= limit => total = sum,
            _ => {
                refused.insert(claim.uid.clone());
            }
        }
    }
    refused
}

/// The status message of a Prefetch refused by [`refused`].
pub fn refusal(pairs: usize, limit: usize) -> String {
    format!(
        "too many (node, image) pairs in this cluster: this Prefetch's {pairs} would take all Prefetches past {limit}, the limit per cluster (defaults.max_pairs_per_cluster); older Prefetches keep theirs"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(created: &str, uid: &str, pairs: usize) -> Claim {
        Claim {
            created: created.into(),
            uid: uid.into(),
            pairs,
        }
    }

    #[test]
    fn oldest_first_and_a_smaller_later_one_may_fit() {
        let claims = [
            claim("2026-01-03T00:00:00Z", "c", 3),
            claim("2026-01-01T00:00:00Z", "a", 6),
            claim("2026-01-02T00:00:00Z", "b", 5),
            claim("2026-01-02T00:00:00Z", "b2", usize::MAX),
        ];
        assert_eq!(
            refused(&claims, 10),
            BTreeSet::from(["b".to_string(), "b2".to_string()])
        );
        assert!(refused(&claims[..1], 3).is_empty());
        assert_eq!(
            refusal(5, 10),
            "too many (node, image) pairs in this cluster: this Prefetch's 5 would take all Prefetches past 10, the limit per cluster (defaults.max_pairs_per_cluster); older Prefetches keep theirs"
        );
    }
}
