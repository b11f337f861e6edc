//! The per-cluster dispatch queue: owns the pull pod slots (per node, per
//! Prefetch, per cluster) and hands free ones to the Prefetches that asked,
//! round robin, so that no Prefetch waits for another to finish.
//!
//! Each Prefetch keeps one standing request: the pairs it could start now
//! (in its own preferred order) and its own cap. Whenever a slot frees up or
//! a request changes, [`DispatchQueue::grant`] serves the requests one slot
//! per Prefetch per turn, starting after the one served last.
//!
//! Pure data: the ClusterActor feeds it messages and sends the grants out.

use std::collections::{BTreeMap, VecDeque};

use crate::pull::plan::PairKey;

#[derive(Debug, Clone, Default)]
struct Owner {
    /// Pairs it would start now, best first; granted ones are removed.
    candidates: VecDeque<PairKey>,
    /// Its own cap on pods in flight.
    cap: usize,
    /// Slots it holds, by node.
    held: BTreeMap<String, usize>,
    in_flight: usize,
}

#[derive(Debug, Clone)]
pub struct DispatchQueue {
    per_node: usize,
    per_cluster: usize,
    by_node: BTreeMap<String, usize>,
    total: usize,
    owners: BTreeMap<String, Owner>,
    /// The owner served last; the next turn starts after it.
    cursor: Option<String>,
}

impl DispatchQueue {
    /// A limit of 0 admits nothing.
    pub fn new(per_node: usize, per_cluster: usize) -> Self {
        DispatchQueue {
            per_node,
            per_cluster,
            by_node: BTreeMap::new(),
            total: 0,
            owners: BTreeMap::new(),
            cursor: None,
        }
    }

    /// Replaces the standing request of `owner`: `candidates` in the order
    /// it prefers, at most `cap` pods of its own in flight. An empty list
    /// withdraws the request but keeps the slots it holds.
    pub fn request(&mut self, owner: &str, candidates: Vec<PairKey>, cap: usize) {
        if candidates.is_empty() && !self.owners.contains_key(owner) {
            return;
        }
        let entry = self.owners.entry(owner.to_string()).or_default();
        entry.candidates = candidates.into();
        entry.cap = cap;
    }

    /// Takes a slot regardless of the limits: for pods found after a
    /// restart, which exist whether or not they fit.
    pub fn force_acquire(&mut self, owner: &str, node: &str) {
        let entry = self.owners.entry(owner.to_string()).or_default();
        *entry.held.entry(node.to_string()).or_insert(0) += 1;
        entry.in_flight += 1;
        *self.by_node.entry(node.to_string()).or_insert(0) += 1;
        self.total += 1;
    }

    /// Gives back one slot of `owner` on `node`; releasing a slot it does
    /// not hold is a no-op (a duplicate release must not free another's).
    pub fn release(&mut self, owner: &str, node: &str) {
        let Some(entry) = self.owners.get_mut(owner) else {
            return;
        };
        let Some(count) = entry.held.get_mut(node) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            entry.held.remove(node);
        }
        entry.in_flight -= 1;
        self.free_node_slot(node);
    }

    /// The owner is gone (its Prefetch was deleted or its actor stopped):
    /// every slot it held is freed.
    pub fn remove_owner(&mut self, owner: &str) {
        let Some(entry) = self.owners.remove(owner) else {
            return;
        };
        for (node, count) in entry.held {
            for _ in 0..count {
                self.free_node_slot(&node);
            }
        }
    }

    fn free_node_slot(&mut self, node: &str) {
        if let Some(count) = self.by_node.get_mut(node) {
            *count -= 1;
            if *count == 0 {
                self.by_node.remove(node);
            }
            self.total -= 1;
        }
    }

    pub fn in_flight(&self) -> usize {
        self.total
    }

    pub fn node_in_flight(&self, node: &str) -> usize {
        self.by_node.get(node).copied().unwrap_or(0)
    }

    pub fn owner_in_flight(&self, owner: &str) -> usize {
        self.owners.get(owner).map_or(0, |entry| entry.in_flight)
    }

    /// Hands out free slots: one per owner per turn, round robin from the
    /// owner after the one served last, each owner getting its first
    /// candidate whose node has room. Returns the grants by owner.
    pub fn grant(&mut self) -> BTreeMap<String, Vec<PairKey>> {
        let mut grants: BTreeMap<String, Vec<PairKey>> = BTreeMap::new();
        loop {
            let order = self.turn_order();
            let mut served_any = false;
            for owner in order {
                if self.total >= self.per_cluster {
                    return grants;
                }
                if let Some(key) = self.take_candidate(&owner) {
                    *self.by_node.entry(key.node.clone()).or_insert(0) += 1;
                    self.total += 1;
                    if let Some(entry) = self.owners.get_mut(&owner) {
                        *entry.held.entry(key.node.clone()).or_insert(0) += 1;
                        entry.in_flight += 1;
                    }
                    self.cursor = Some(owner.clone());
                    grants.entry(owner).or_default().push(key);
                    served_any = true;
                }
            }
            if !served_any {
                return grants;
            }
        }
    }

    /// Owners in turn order: those after the cursor, then the rest.
    fn turn_order(&self) -> Vec<String> {
        let wanting = |(name, owner): (&String, &Owner)| {
            (!owner.candidates.is_empty() && owner.in_flight < owner.cap).then(|| name.clone())
        };
        match &self.cursor {
            Some(cursor) => {
                let after = self
                    .owners
                    .range::<String, _>((
                        std::ops::Bound::Excluded(cursor),
                        std::ops::Bound::Unbounded,
                    ))
                    .filter_map(wanting);
                let before = self
                    .owners
                    .range::<String, _>(..=cursor)
                    .filter_map(wanting);
                after.chain(before).collect()
            }
            None => self.owners.iter().filter_map(wanting).collect(),
        }
    }

    /// The owner's first candidate on a node with room, removed from its
    /// list. Candidates on full nodes stay for later turns.
    fn take_candidate(&mut self, owner: &str) -> Option<PairKey> {
        let per_node = self.per_node;
        let by_node = &self.by_node;
        let entry = self.owners.get_mut(owner)?;
        if entry.in_flight >= entry.cap {
            return None;
        }
        let position = entry
            .candidates
            .iter()
            .position(|key| by_node.get(&key.node).copied().unwrap_or(0) < per_node)?;
        entry.candidates.remove(position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(node: &str, image: &str) -> PairKey {
        PairKey::new(node, image)
    }

    fn keys(pairs: &[(&str, &str)]) -> Vec<PairKey> {
        pairs.iter().map(|(node, image)| key(node, image)).collect()
    }

    #[test]
    fn per_node_per_owner_and_per_cluster_limits() {
        let mut queue = DispatchQueue::new(1, 3);
        queue.request(
            "a",
            keys(&[
                ("n1", "x"),
                ("n1", "y"),
                ("n2", "x"),
                ("n3", "x"),
                ("n4", "x"),
            ]),
            2,
        );
        let grants = queue.grant();
        // n1 once (per node), two in all (the owner's cap).
        assert_eq!(grants["a"], keys(&[("n1", "x"), ("n2", "x")]));
        assert_eq!(queue.owner_in_flight("a"), 2);

        queue.request("b", keys(&[("n3", "x"), ("n4", "x")]), 10);
        let grants = queue.grant();
        // Only one more fits in the cluster.
        assert_eq!(grants["b"], keys(&[("n3", "x")]));
        assert_eq!(queue.in_flight(), 3);
        assert!(queue.grant().is_empty());

        // A freed slot goes to someone waiting; a's n1 candidate "y" fits now.
        queue.release("a", "n1");
        let grants = queue.grant();
        assert_eq!(grants.len(), 1);
        assert_eq!(queue.in_flight(), 3);
    }

    #[test]
    fn freed_slots_go_round_robin() {
        // One node, one slot: three Prefetches take turns.
        let mut queue = DispatchQueue::new(1, 100);
        for owner in ["a", "b", "c"] {
            queue.request(owner, keys(&[("n1", "1"), ("n1", "2"), ("n1", "3")]), 10);
        }
        let mut served = Vec::new();
        for _ in 0..6 {
            let grants = queue.grant();
            assert_eq!(grants.len(), 1, "one slot: {grants:?}");
            let (owner, _) = grants.into_iter().next().expect("a grant");
            queue.release(&owner, "n1");
            served.push(owner);
        }
        assert_eq!(served, vec!["a", "b", "c", "a", "b", "c"]);
    }

    #[test]
    fn one_slot_per_owner_per_turn() {
        let mut queue = DispatchQueue::new(10, 4);
        queue.request("a", keys(&[("n1", "1"), ("n2", "1"), ("n3", "1")]), 10);
        queue.request("b", keys(&[("n1", "2"), ("n2", "2"), ("n3", "2")]), 10);
        let grants = queue.grant();
        assert_eq!(grants["a"].len(), 2);
        assert_eq!(grants["b"].len(), 2);
    }

    #[test]
    fn releases_are_per_owner_and_removal_frees_everything() {
        let mut queue = DispatchQueue::new(1, 10);
        queue.force_acquire("a", "n1");
        // b holds nothing on n1: its release must not free a's slot.
        queue.release("b", "n1");
        assert_eq!(queue.node_in_flight("n1"), 1);
        queue.request("b", keys(&[("n1", "x")]), 1);
        assert!(queue.grant().is_empty());
        queue.remove_owner("a");
        assert_eq!(queue.node_in_flight("n1"), 0);
        assert_eq!(queue.grant()["b"], keys(&[("n1", "x")]));
        // A double release is a no-op.
        queue.release("b", "n1");
        queue.release("b", "n1");
        assert_eq!(queue.in_flight(), 0);
    }

    #[test]
    fn zero_limits_admit_nothing_and_empty_request_withdraws() {
        let mut queue = DispatchQueue::new(0, 10);
        queue.request("a", keys(&[("n1", "x")]), 1);
        assert!(queue.grant().is_empty());
        let mut queue = DispatchQueue::new(1, 10);
        queue.request("a", keys(&[("n1", "x")]), 1);
        queue.request("a", Vec::new(), 1);
        assert!(queue.grant().is_empty());
    }
}
