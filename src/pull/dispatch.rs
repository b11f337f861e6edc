//! The per-cluster dispatch queue: owns the pull pod slots (per node, per
//! Prefetch, per cluster) and hands free ones to the Prefetches that asked,
//! fairly, so that no Prefetch waits for another to finish and no tenant
//! holds up another by having more or bigger Prefetches.
//!
//! Each Prefetch (an owner) keeps one standing request: the pairs it could
//! start now (in its own preferred order) and its own cap. Whenever a slot
//! frees up or a request changes, [`DispatchQueue::grant`] hands out free
//! slots one at a time: first to the tenant (the Prefetch's namespace) that
//! was granted the fewest slots, then within it to the owner granted the
//! fewest; ties go to the one served longest ago. Only owners that can use a
//! free slot now (a candidate on a node with room, below their own cap)
//! take part, so a slot nobody else can use still goes to whoever can: the
//! queue never idles a slot for fairness' sake, and no owner's cap (however
//! big its `max_parallel`) takes a slot another waiting owner could use
//! while it is ahead of that owner.
//!
//! Counting grants rather than pods in flight matters: a tenant whose pods
//! all finish at once has none in flight for a moment, yet it was served
//! all along. The counts only compare owners waiting at the same time, so
//! one that starts waiting (new, or back after a pause) has its count set
//! to the least of its peers' counts less the slots those peers hold: it may
//! catch up with what they hold now, not with everything they were granted
//! while it was away, and what it was granted before they came (a team's
//! earlier Prefetch, say) does not count against it.
//!
//! Pulls already running when a tenant starts waiting may be preempted
//! ([`DispatchQueue::preempt`]): with one slot per node, a tenant that
//! fanned out over every node just before another team arrived would
//! otherwise make that team wait a whole pull on each node, however fair
//! the queue is from then on. A waiting owner takes back a slot on a full
//! node it wants when the slot was granted before it started waiting, to
//! another tenant that was granted more: exactly the slot the queue would
//! not have given that tenant had the newcomer been there. A slot granted
//! while the newcomer waited was the queue's fair choice and is never taken
//! back, so two tenants never preempt each other back and forth.
//!
//! Pure data: the ClusterActor feeds it messages and sends the grants out.

use std::collections::{BTreeMap, VecDeque};

use crate::pull::plan::PairKey;

/// What one owner or tenant was granted, for choosing who goes next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Account {
    /// Slots granted (or adopted) so far.
    served: u64,
    /// When it was last served, in grants of this queue; 0 is never.
    last_served: u64,
}

#[derive(Debug, Clone, Default)]
struct Owner {
    tenant: String,
    /// Pairs it would start now, best first; granted ones are removed.
    candidates: VecDeque<PairKey>,
    /// Its own cap on pods in flight.
    cap: usize,
    /// Slots it holds, by node: when each was granted (the queue's clock),
    /// oldest first.
    held: BTreeMap<String, Vec<u64>>,
    in_flight: usize,
    account: Account,
    /// The queue's clock when it last started waiting or holding.
    active_since: u64,
}

impl Owner {
    /// Waiting for slots or holding some: it competes with the others.
    fn is_active(&self) -> bool {
        !self.candidates.is_empty() || self.in_flight > 0
    }
}

#[derive(Debug, Clone, Default)]
struct Tenant {
    /// Its owners that are active.
    active_owners: usize,
    /// Owners of any state, so that the tenant goes when the last one does.
    owners: usize,
    in_flight: usize,
    account: Account,
}

/// A slot to take back: `holder` stops its youngest pull on `node`, which
/// `for_owner` is waiting for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preemption {
    pub holder: String,
    pub node: String,
    pub for_owner: String,
}

#[derive(Debug, Clone)]
pub struct DispatchQueue {
    per_node: usize,
    per_cluster: usize,
    by_node: BTreeMap<String, usize>,
    total: usize,
    owners: BTreeMap<String, Owner>,
    tenants: BTreeMap<String, Tenant>,
    /// Grants so far: the clock of [`Account::last_served`].
    clock: u64,
    /// Preemptions asked for whose slot was not released yet.
    preempting: Vec<Preemption>,
}

/// Who goes first: fewest granted, then fewest pairs waiting (so one
/// asking for a few pairs is not held up by one asking for thousands), then
/// served longest ago, then by name (for a stable order).
type Rank<'a> = (u64, usize, u64, &'a str);

impl DispatchQueue {
    /// A limit of 0 admits nothing.
    pub fn new(per_node: usize, per_cluster: usize) -> Self {
        DispatchQueue {
            per_node,
            per_cluster,
            by_node: BTreeMap::new(),
            total: 0,
            owners: BTreeMap::new(),
            tenants: BTreeMap::new(),
            clock: 0,
            preempting: Vec::new(),
        }
    }

    /// Replaces the standing request of `owner` (of `tenant`, its
    /// namespace): `candidates` in the order it prefers, at most `cap` pods
    /// of its own in flight. An empty list withdraws the request but keeps
    /// the slots it holds.
    pub fn request(&mut self, owner: &str, tenant: &str, candidates: Vec<PairKey>, cap: usize) {
        if candidates.is_empty() && !self.owners.contains_key(owner) {
            return;
        }
        self.ensure_owner(owner, tenant);
        let Some(entry) = self.owners.get(owner) else {
            return;
        };
        let was_active = entry.is_active();
        let will_be_active = !candidates.is_empty() || entry.in_flight > 0;
        self.set_active(owner, was_active, will_be_active);
        if let Some(entry) = self.owners.get_mut(owner) {
            entry.candidates = candidates.into();
            entry.cap = cap;
        }
    }

    /// Takes a slot regardless of the limits: for pods found after a
    /// restart, which exist whether or not they fit. It counts as granted.
    pub fn force_acquire(&mut self, owner: &str, tenant: &str, node: &str) {
        self.ensure_owner(owner, tenant);
        let was_active = self.owners.get(owner).is_some_and(Owner::is_active);
        self.set_active(owner, was_active, true);
        self.acquire(owner, node);
    }

    /// Gives back one slot of `owner` on `node`; releasing a slot it does
    /// not hold is a no-op (a duplicate release must not free another's).
    pub fn release(&mut self, owner: &str, node: &str) {
        let Some(entry) = self.owners.get_mut(owner) else {
            return;
        };
        let Some(grants) = entry.held.get_mut(node) else {
            return;
        };
        // Which pull ended is not said; pulls mostly end oldest first.
        grants.remove(0);
        if grants.is_empty() {
            entry.held.remove(node);
        }
        entry.in_flight -= 1;
        let still_active = entry.is_active();
        if let Some(tenant) = self.tenants.get_mut(&entry.tenant) {
            tenant.in_flight -= 1;
        }
        self.set_active(owner, true, still_active);
        self.free_node_slot(node);
        if let Some(done) = self
            .preempting
            .iter()
            .position(|p| p.holder == owner && p.node == node)
        {
            self.preempting.remove(done);
        }
    }

    /// The owner is gone (its Prefetch was deleted or its actor stopped):
    /// every slot it held is freed.
    pub fn remove_owner(&mut self, owner: &str) {
        let Some(entry) = self.owners.get(owner) else {
            return;
        };
        let was_active = entry.is_active();
        self.set_active(owner, was_active, false);
        let Some(entry) = self.owners.remove(owner) else {
            return;
        };
        self.preempting
            .retain(|p| p.holder != owner && p.for_owner != owner);
        if let Some(tenant) = self.tenants.get_mut(&entry.tenant) {
            tenant.in_flight -= entry.in_flight;
            tenant.owners -= 1;
            if tenant.owners == 0 {
                self.tenants.remove(&entry.tenant);
            }
        }
        for (node, grants) in entry.held {
            for _ in grants {
                self.free_node_slot(&node);
            }
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

    /// Hands out free slots one at a time, each to the owner that goes
    /// first (see the module's note) among those that can use one now, and
    /// within its candidates to the first whose node has room. Returns the
    /// grants by owner.
    pub fn grant(&mut self) -> BTreeMap<String, Vec<PairKey>> {
        let mut grants: BTreeMap<String, Vec<PairKey>> = BTreeMap::new();
        while self.total < self.per_cluster {
            let Some(owner) = self.next_owner() else {
                break;
            };
            let Some(key) = self.take_candidate(&owner) else {
                break;
            };
            self.acquire(&owner, &key.node);
            grants.entry(owner).or_default().push(key);
        }
        grants
    }

    /// Slots to take back for owners waiting for full nodes (see the
    /// module's note): for each waiting owner, the tenant that goes first
    /// first, and each of its candidates on a full node that its tenant
    /// does not use already, the slot there granted before the owner
    /// started waiting, to a tenant granted more than the waiting one
    /// (counting the preemptions already asked for it), the most served
    /// first. At most one preemption per node at a time, and no more for
    /// an owner than its cap leaves room for. Each is asked once: the
    /// queue waits for the holder's release, which the next
    /// [`DispatchQueue::grant`] gives to the waiting owner, as it goes first.
    pub fn preempt(&mut self) -> Vec<Preemption> {
        let mut issued = Vec::new();
        let active_tenants = self
            .tenants
            .values()
            .filter(|tenant| tenant.active_owners > 0)
            .count();
        if active_tenants < 2 {
            return issued;
        }
        let mut waiting: Vec<(&String, &Owner)> = self
            .owners
            .iter()
            .filter(|(_, entry)| !entry.candidates.is_empty() && entry.in_flight < entry.cap)
            .collect();
        waiting
            .sort_by_key(|(name, entry)| (self.tenant_served(&entry.tenant), entry.account, *name));
        for (name, entry) in waiting {
            // Cheap way out for the usual case: no other tenant holding
            // slots was granted more, so none of its candidates can preempt.
            let most_served_holder = self
                .tenants
                .iter()
                .filter(|(tenant, state)| **tenant != entry.tenant && state.in_flight > 0)
                .map(|(_, state)| state.account.served)
                .max();
            if most_served_holder.is_none_or(|most| most <= self.tenant_served(&entry.tenant)) {
                continue;
            }
            let mut room = entry.cap - entry.in_flight;
            room = room.saturating_sub(self.pending(|p| p.for_owner == **name));
            for key in &entry.candidates {
                if room == 0 {
                    break;
                }
                let node = &*key.node;
                let busy = self.has_room(node)
                    || self.pending(|p| p.node == node) > 0
                    || issued.iter().any(|p: &Preemption| p.node == node)
                    || self
                        .owners
                        .values()
                        .any(|other| other.tenant == entry.tenant && other.held.contains_key(node));
                if busy {
                    continue;
                }
                let served = self.tenant_served(&entry.tenant)
                    + u64::try_from(
                        self.pending(|p| self.tenant_of(&p.for_owner) == Some(&entry.tenant))
                            + issued
                                .iter()
                                .filter(|p| self.tenant_of(&p.for_owner) == Some(&entry.tenant))
                                .count(),
                    )
                    .unwrap_or(u64::MAX);
                let holder = self
                    .owners
                    .iter()
                    .filter(|(_, other)| other.tenant != entry.tenant)
                    .filter_map(|(holder, other)| {
                        let youngest = *other.held.get(node)?.last()?;
                        let holder_served = self.tenant_served(&other.tenant);
                        (youngest <= entry.active_since && holder_served > served).then_some((
                            holder_served,
                            youngest,
                            holder,
                        ))
                    })
                    .max();
                if let Some((_, _, holder)) = holder {
                    issued.push(Preemption {
                        holder: holder.clone(),
                        node: node.to_string(),
                        for_owner: name.clone(),
                    });
                    room -= 1;
                }
            }
        }
        self.preempting.extend(issued.iter().cloned());
        issued
    }

    fn tenant_served(&self, tenant: &str) -> u64 {
        self.tenants
            .get(tenant)
            .map_or(0, |tenant| tenant.account.served)
    }

    fn tenant_of(&self, owner: &str) -> Option<&String> {
        self.owners.get(owner).map(|entry| &entry.tenant)
    }

    fn pending(&self, which: impl Fn(&Preemption) -> bool) -> usize {
        self.preempting.iter().filter(|p| which(p)).count()
    }

    fn ensure_owner(&mut self, owner: &str, tenant: &str) {
        if self.owners.contains_key(owner) {
            return;
        }
        self.owners.insert(
            owner.to_string(),
            Owner {
                tenant: tenant.to_string(),
                ..Owner::default()
            },
        );
        self.tenants.entry(tenant.to_string()).or_default().owners += 1;
    }

    /// Keeps the tenants' active counts; an owner (or tenant) that starts
    /// competing catches up with what its peers hold now, no more, no less.
    fn set_active(&mut self, owner: &str, was: bool, now: bool) {
        if was == now {
            return;
        }
        let Some(tenant_name) = self.owners.get(owner).map(|entry| entry.tenant.clone()) else {
            return;
        };
        if !now {
            if let Some(tenant) = self.tenants.get_mut(&tenant_name) {
                tenant.active_owners -= 1;
            }
            return;
        }
        let clock = self.clock;
        if let Some(entry) = self.owners.get_mut(owner) {
            entry.active_since = clock;
        }
        let tenant_floor = self
            .tenants
            .iter()
            .filter(|(name, tenant)| **name != tenant_name && tenant.active_owners > 0)
            .map(|(_, tenant)| floor(tenant.account, tenant.in_flight))
            .min();
        let owner_floor = self
            .owners
            .iter()
            .filter(|(name, entry)| {
                name.as_str() != owner && entry.tenant == tenant_name && entry.is_active()
            })
            .map(|(_, entry)| floor(entry.account, entry.in_flight))
            .min();
        if let Some(tenant) = self.tenants.get_mut(&tenant_name) {
            if tenant.active_owners == 0
                && let Some(floor) = tenant_floor
            {
                tenant.account.served = floor;
            }
            tenant.active_owners += 1;
        }
        if let (Some(entry), Some(floor)) = (self.owners.get_mut(owner), owner_floor) {
            entry.account.served = floor;
        }
    }

    /// Takes a slot on `node` for `owner` and counts it as served.
    fn acquire(&mut self, owner: &str, node: &str) {
        self.clock += 1;
        let clock = self.clock;
        let Some(entry) = self.owners.get_mut(owner) else {
            return;
        };
        entry.held.entry(node.to_string()).or_default().push(clock);
        entry.in_flight += 1;
        entry.account.served += 1;
        entry.account.last_served = clock;
        if let Some(tenant) = self.tenants.get_mut(&entry.tenant) {
            tenant.in_flight += 1;
            tenant.account.served += 1;
            tenant.account.last_served = clock;
        }
        *self.by_node.entry(node.to_string()).or_insert(0) += 1;
        self.total += 1;
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

    fn has_room(&self, node: &str) -> bool {
        self.node_in_flight(node) < self.per_node
    }

    /// The owner served next: of the tenant that goes first, the owner
    /// that goes first, among those that can use a free slot now.
    fn next_owner(&self) -> Option<String> {
        let mut waiting: BTreeMap<&str, Vec<(&String, &Owner)>> = BTreeMap::new();
        for (name, entry) in &self.owners {
            let can_start = entry.in_flight < entry.cap
                && entry.candidates.iter().any(|key| self.has_room(&key.node));
            if can_start {
                waiting
                    .entry(entry.tenant.as_str())
                    .or_default()
                    .push((name, entry));
            }
        }
        let (_, owners) = waiting.into_iter().min_by_key(|(tenant, owners)| {
            let account = self
                .tenants
                .get(*tenant)
                .map(|tenant| tenant.account)
                .unwrap_or_default();
            let pairs = owners.iter().map(|(_, entry)| entry.candidates.len()).sum();
            rank(account, pairs, tenant)
        })?;
        owners
            .into_iter()
            .min_by_key(|(name, entry)| rank(entry.account, entry.candidates.len(), name))
            .map(|(name, _)| name.clone())
    }

    /// The owner's first candidate on a node with room, removed from its
    /// list. Candidates on full nodes stay for later.
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
            .position(|key| by_node.get(&*key.node).copied().unwrap_or(0) < per_node)?;
        entry.candidates.remove(position)
    }
}

/// What a Prefetch offers the queue out of its due pairs (in `due`'s
/// order, which spreads them over nodes): none on a node its own pulls
/// fill already (`own_in_flight` by node, `per_node` slots each), which
/// the queue could not grant, and at most `limit`. With `limit` at least
/// its cap plus the cluster's slots, the slots other Prefetches hold cannot
/// fill the offer either: whenever one of its due pairs is on a free node,
/// enough such pairs are offered to fill its cap.
pub fn offer(
    due: Vec<PairKey>,
    own_in_flight: &BTreeMap<std::sync::Arc<str>, usize>,
    per_node: usize,
    limit: usize,
) -> Vec<PairKey> {
    due.into_iter()
        .filter(|key| own_in_flight.get(&*key.node).copied().unwrap_or(0) < per_node)
        .take(limit)
        .collect()
}

fn rank<'a>(account: Account, pairs: usize, name: &'a str) -> Rank<'a> {
    (account.served, pairs, account.last_served, name)
}

/// What a newcomer catches up to: a peer's grants less the slots it holds.
fn floor(account: Account, in_flight: usize) -> u64 {
    account
        .served
        .saturating_sub(u64::try_from(in_flight).unwrap_or(u64::MAX))
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

    /// One image on each of `nodes` nodes: n1, n2, ...
    fn spread(image: &str, nodes: usize) -> Vec<PairKey> {
        (1..=nodes).map(|n| key(&format!("n{n}"), image)).collect()
    }

    /// The one owner granted a slot in this round.
    fn only_grant(queue: &mut DispatchQueue) -> (String, PairKey) {
        let grants = queue.grant();
        assert_eq!(
            grants.values().map(Vec::len).sum::<usize>(),
            1,
            "{grants:?}"
        );
        let (owner, mut keys) = grants.into_iter().next().expect("a grant");
        (owner, keys.remove(0))
    }

    #[test]
    fn per_node_per_owner_and_per_cluster_limits() {
        let mut queue = DispatchQueue::new(1, 3);
        queue.request(
            "a",
            "ns-a",
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

        queue.request("b", "ns-b", keys(&[("n3", "x"), ("n4", "x")]), 10);
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
    fn two_owners_competing_for_one_node_alternate() {
        let mut queue = DispatchQueue::new(1, 100);
        // b asks for fewer pairs: fewer waiting goes first on a tie.
        queue.request(
            "a",
            "ns-a",
            keys(&[("n1", "1"), ("n1", "2"), ("n1", "3")]),
            10,
        );
        queue.request("b", "ns-b", keys(&[("n1", "1"), ("n1", "2")]), 10);
        let mut served = Vec::new();
        for _ in 0..5 {
            let (owner, key) = only_grant(&mut queue);
            queue.release(&owner, &key.node);
            served.push(owner);
        }
        assert_eq!(served, vec!["b", "a", "b", "a", "a"]);
        assert!(queue.grant().is_empty());
    }

    #[test]
    fn three_owners_of_one_node_take_turns() {
        let mut queue = DispatchQueue::new(1, 100);
        for owner in ["a", "b", "c"] {
            queue.request(
                owner,
                owner,
                keys(&[("n1", "1"), ("n1", "2"), ("n1", "3")]),
                10,
            );
        }
        let mut served = Vec::new();
        for _ in 0..6 {
            let (owner, key) = only_grant(&mut queue);
            queue.release(&owner, &key.node);
            served.push(owner);
        }
        assert_eq!(served, vec!["a", "b", "c", "a", "b", "c"]);
    }

    #[test]
    fn an_owner_of_one_pair_goes_before_the_second_slot_of_a_big_one() {
        // The big one was first and took the only slot.
        let mut queue = DispatchQueue::new(1, 1);
        let big: Vec<PairKey> = (0..10_000).map(|i| key(&format!("n{i}"), "x")).collect();
        queue.request("big", "ns-big", big, 10_000);
        assert_eq!(queue.grant()["big"], keys(&[("n0", "x")]));
        queue.request("small", "ns-small", keys(&[("n0", "y")]), 1);
        assert!(queue.grant().is_empty());
        // The freed slot is on n0, the one the small one wants; the big
        // one could use it as well.
        queue.release("big", "n0");
        assert_eq!(
            only_grant(&mut queue),
            ("small".to_string(), key("n0", "y"))
        );
        queue.release("small", "n0");
        assert_eq!(only_grant(&mut queue).0, "big");

        // Both asking at once, with room for two: one each, the small first.
        let mut queue = DispatchQueue::new(1, 2);
        let big: Vec<PairKey> = (0..10_000).map(|i| key(&format!("n{i}"), "x")).collect();
        queue.request("big", "ns-big", big, 10_000);
        queue.request("small", "ns-small", keys(&[("n5", "y")]), 1);
        let grants = queue.grant();
        assert_eq!(grants["small"], keys(&[("n5", "y")]));
        assert_eq!(grants["big"], keys(&[("n0", "x")]));
    }

    #[test]
    fn freed_slots_go_to_the_waiting_owner_not_back_to_the_one_releasing() {
        let mut queue = DispatchQueue::new(1, 100);
        queue.request("a", "ns-a", spread("x", 2), 10);
        assert_eq!(queue.grant()["a"].len(), 2);
        // a still has more to do on both nodes; b waits for them.
        queue.request("a", "ns-a", spread("y", 2), 10);
        queue.request("b", "ns-b", spread("z", 2), 10);
        queue.release("a", "n2");
        assert_eq!(only_grant(&mut queue), ("b".to_string(), key("n2", "z")));
        queue.release("a", "n1");
        assert_eq!(only_grant(&mut queue), ("b".to_string(), key("n1", "z")));
        queue.release("b", "n1");
        assert_eq!(only_grant(&mut queue), ("a".to_string(), key("n1", "y")));
    }

    #[test]
    fn a_big_max_parallel_takes_only_what_nobody_waiting_can_use() {
        let mut queue = DispatchQueue::new(1, 4);
        queue.request("greedy", "ns-g", spread("x", 8), 10_000);
        queue.request("plain", "ns-p", spread("y", 8), 10);
        let grants = queue.grant();
        assert_eq!(grants["greedy"].len(), 2);
        assert_eq!(grants["plain"].len(), 2);
        // The plain one is done; the greedy one may have the rest.
        queue.request("plain", "ns-p", Vec::new(), 10);
        for key in grants["plain"].clone() {
            queue.release("plain", &key.node);
        }
        assert_eq!(queue.grant()["greedy"].len(), 2);
        assert_eq!(queue.owner_in_flight("greedy"), 4);
    }

    /// The hostile-tenant case: one namespace's Prefetch holds every node's
    /// only slot; another Prefetch of that namespace and one of another
    /// team arrive. As the slots free, the other team gets one on each
    /// node before the busy namespace gets any more: tenants share first,
    /// then Prefetches within a tenant.
    #[test]
    fn a_tenant_holding_every_node_lets_another_team_through_first() {
        let mut queue = DispatchQueue::new(1, 50);
        queue.request("every-node", "hostile", spread("wide-0", 3), 10);
        assert_eq!(queue.grant()["every-node"].len(), 3);
        let mut more = spread("wide-1", 3);
        more.extend(spread("wide-2", 3));
        queue.request("every-node", "hostile", more, 10);
        queue.request("huge-parallel", "hostile", spread("parallel", 3), 10_000);
        queue.request("ordinary", "victim", spread("ordinary", 3), 10);
        for node in ["n2", "n1", "n3"] {
            queue.release("every-node", node);
            let (owner, key) = only_grant(&mut queue);
            assert_eq!((owner.as_str(), &*key.node), ("ordinary", node));
        }
        // Done: the hostile namespace's two share what frees up next.
        queue.request("ordinary", "victim", Vec::new(), 10);
        for node in ["n1", "n2", "n3"] {
            queue.release("ordinary", node);
        }
        // huge-parallel arrived while every-node held 3: it catches up.
        assert_eq!(queue.grant()["huge-parallel"].len(), 3);
    }

    #[test]
    fn a_newcomer_catches_up_with_what_others_hold_not_with_their_past() {
        let mut queue = DispatchQueue::new(1, 100);
        // a was served 100 times while alone, and holds both nodes now.
        for _ in 0..49 {
            queue.request("a", "ns-a", spread("x", 2), 10);
            queue.grant();
            queue.release("a", "n1");
            queue.release("a", "n2");
        }
        queue.request("a", "ns-a", spread("x", 2), 10);
        assert_eq!(queue.grant()["a"].len(), 2);
        let work = |image: &str| {
            let mut pairs = Vec::new();
            for round in 0..4 {
                pairs.extend(spread(&format!("{image}{round}"), 2));
            }
            pairs
        };
        queue.request("a", "ns-a", work("y"), 10);
        queue.request("b", "ns-b", work("z"), 10);
        let mut holders = BTreeMap::from([("n1", "a".to_string()), ("n2", "a".to_string())]);
        let mut served = Vec::new();
        for node in ["n1", "n2", "n1", "n2", "n1", "n2"] {
            queue.release(&holders[node], node);
            let (owner, key) = only_grant(&mut queue);
            assert_eq!(&*key.node, node);
            holders.insert(node, owner.clone());
            served.push(owner);
        }
        // b catches up by the 2 slots a held (not by a's 100), then they
        // share evenly.
        assert_eq!(served[..2], ["b", "b"]);
        assert_eq!(served[2..].iter().filter(|owner| *owner == "a").count(), 2);
    }

    /// A team's earlier Prefetch, done before the busy tenant came, does not
    /// count against its next one.
    #[test]
    fn what_a_tenant_was_granted_before_the_others_came_does_not_count() {
        let mut queue = DispatchQueue::new(1, 50);
        queue.request("alone", "victim", spread("a", 3), 10);
        assert_eq!(queue.grant()["alone"].len(), 3);
        queue.request("alone", "victim", Vec::new(), 10);
        for node in ["n1", "n2", "n3"] {
            queue.release("alone", node);
        }
        let mut wide = spread("wide-0", 3);
        wide.extend(spread("wide-1", 3));
        queue.request("every-node", "hostile", wide, 10);
        assert_eq!(queue.grant()["every-node"].len(), 3);
        queue.request("loaded", "victim", spread("b", 3), 10);
        for node in ["n1", "n2", "n3"] {
            queue.release("every-node", node);
            assert_eq!(only_grant(&mut queue).0, "loaded");
        }
    }

    fn preemption(holder: &str, node: &str, for_owner: &str) -> Preemption {
        Preemption {
            holder: holder.into(),
            node: node.into(),
            for_owner: for_owner.into(),
        }
    }

    /// Issue 8's hostile tenant: its pulls on every node, started just
    /// before another team came, are taken back one per node for that
    /// team, which then gets each freed slot; the hostile tenant, waiting
    /// again, does not take them back in turn.
    #[test]
    fn a_newcomer_takes_back_the_slots_granted_before_it_came() {
        let mut queue = DispatchQueue::new(1, 50);
        let mut wide = spread("wide-0", 3);
        wide.extend(spread("wide-1", 3));
        queue.request("every-node", "hostile", wide, 10);
        assert_eq!(queue.grant()["every-node"].len(), 3);
        queue.request("ordinary", "victim", spread("ordinary", 3), 10);
        assert!(queue.grant().is_empty());
        assert_eq!(
            queue.preempt(),
            ["n1", "n2", "n3"].map(|node| preemption("every-node", node, "ordinary"))
        );
        // Asked once: nothing more until the holder gives the slots back.
        assert!(queue.preempt().is_empty());
        for node in ["n2", "n1", "n3"] {
            queue.release("every-node", node);
            assert_eq!(
                only_grant(&mut queue),
                ("ordinary".to_string(), key(node, "ordinary"))
            );
            // The preempted pair is due again, but its pull was the
            // queue's to give back, not the newcomer's: no preempting back.
            queue.request("every-node", "hostile", spread("wide-0", 3), 10);
            assert!(queue.preempt().is_empty());
        }
        assert_eq!(queue.owner_in_flight("ordinary"), 3);
    }

    /// A slot granted while an owner waited was the queue's fair choice.
    #[test]
    fn slots_granted_while_waiting_are_not_taken_back() {
        let mut queue = DispatchQueue::new(1, 100);
        queue.request("a", "ns-a", keys(&[("n1", "1"), ("n1", "2")]), 10);
        queue.request(
            "b",
            "ns-b",
            keys(&[("n1", "1"), ("n1", "2"), ("n1", "3")]),
            10,
        );
        for _ in 0..4 {
            let (owner, key) = only_grant(&mut queue);
            assert!(queue.preempt().is_empty());
            queue.release(&owner, &key.node);
        }
    }

    #[test]
    fn no_preemption_within_a_tenant_or_of_a_tenant_granted_less() {
        // Two Prefetches of one namespace share as the queue decides.
        let mut queue = DispatchQueue::new(1, 100);
        queue.request("first", "team", spread("x", 2), 10);
        assert_eq!(queue.grant()["first"].len(), 2);
        queue.request("second", "team", spread("y", 2), 10);
        assert!(queue.preempt().is_empty());

        // The holder's tenant was granted no more than the waiting one:
        // its slot is its fair share.
        let mut queue = DispatchQueue::new(1, 100);
        queue.request("a", "ns-a", spread("x", 2), 10);
        queue.grant();
        queue.request("a", "ns-a", Vec::new(), 10);
        queue.release("a", "n1");
        queue.request("b", "ns-b", keys(&[("n1", "y")]), 10);
        assert_eq!(queue.grant()["b"], keys(&[("n1", "y")]));
        // a holds n2 (granted 2), b holds n1 (granted 2 with its catch-up
        // from a's holdings when it came, and 1): b wants n2 too.
        queue.request("b", "ns-b", keys(&[("n2", "y")]), 10);
        assert!(queue.preempt().is_empty());
    }

    #[test]
    fn preemptions_stay_within_the_waiting_owners_cap() {
        let mut queue = DispatchQueue::new(1, 50);
        queue.request("every-node", "hostile", spread("wide", 3), 10);
        assert_eq!(queue.grant()["every-node"].len(), 3);
        queue.request("capped", "victim", spread("ordinary", 3), 1);
        assert_eq!(queue.preempt(), [preemption("every-node", "n1", "capped")]);
        // Its owner gone, the preemption is forgotten with it.
        queue.remove_owner("capped");
        assert!(queue.preempting.is_empty());
        assert!(queue.preempt().is_empty());
    }

    #[test]
    fn one_tenant_alone_never_preempts() {
        let mut queue = DispatchQueue::new(1, 2);
        queue.request("a", "ns", spread("x", 2), 10);
        assert_eq!(queue.grant()["a"].len(), 2);
        queue.request("b", "ns", spread("y", 2), 10);
        assert!(queue.preempt().is_empty());
    }

    /// Benchmark 4's case: the offer leaves out pairs whose node the
    /// Prefetch's own pull (of the sibling image) fills.
    #[test]
    fn the_offer_leaves_out_nodes_its_own_pulls_fill() {
        let mut due = spread("second", 3);
        due.extend(spread("third", 3));
        let own = BTreeMap::from([("n1".into(), 1), ("n3".into(), 1)]);
        assert_eq!(
            offer(due.clone(), &own, 1, 10),
            keys(&[("n2", "second"), ("n2", "third")])
        );
        assert_eq!(
            offer(due.clone(), &own, 2, 2),
            keys(&[("n1", "second"), ("n2", "second")])
        );
        assert!(offer(due, &own, 1, 0).is_empty());
    }

    /// Others hold the first nodes of its list: an offer of its cap plus the
    /// cluster's slots still reaches free nodes, where one cut to a fixed
    /// size left the Prefetch idle beside free nodes.
    #[test]
    fn an_offer_of_cap_plus_cluster_slots_reaches_free_nodes() {
        let (per_cluster, cap) = (100, 10);
        let mut queue = DispatchQueue::new(1, per_cluster);
        let nodes = |from: usize, to: usize| -> Vec<PairKey> {
            (from..to).map(|n| key(&format!("n{n:03}"), "x")).collect()
        };
        queue.request("other", "ns-other", nodes(0, 64), 64);
        assert_eq!(queue.grant()["other"].len(), 64);
        let due: Vec<PairKey> = (0..500).map(|n| key(&format!("n{n:03}"), "y")).collect();
        let none = BTreeMap::new();
        queue.request("a", "ns-a", offer(due.clone(), &none, 1, 64), cap);
        assert!(queue.grant().is_empty());
        queue.request("a", "ns-a", offer(due, &none, 1, cap + per_cluster), cap);
        assert_eq!(
            queue.grant()["a"],
            nodes(64, 74)
                .into_iter()
                .map(|k| key(&k.node, "y"))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn releases_are_per_owner_and_removal_frees_everything() {
        let mut queue = DispatchQueue::new(1, 10);
        queue.force_acquire("a", "ns-a", "n1");
        // b holds nothing on n1: its release must not free a's slot.
        queue.release("b", "n1");
        assert_eq!(queue.node_in_flight("n1"), 1);
        queue.request("b", "ns-b", keys(&[("n1", "x")]), 1);
        assert!(queue.grant().is_empty());
        queue.remove_owner("a");
        assert_eq!(queue.node_in_flight("n1"), 0);
        assert_eq!(queue.grant()["b"], keys(&[("n1", "x")]));
        // A double release is a no-op.
        queue.release("b", "n1");
        queue.release("b", "n1");
        assert_eq!(queue.in_flight(), 0);
        queue.remove_owner("b");
        assert!(queue.tenants.is_empty() && queue.owners.is_empty());
    }

    #[test]
    fn zero_limits_admit_nothing_and_empty_request_withdraws() {
        let mut queue = DispatchQueue::new(0, 10);
        queue.request("a", "ns", keys(&[("n1", "x")]), 1);
        assert!(queue.grant().is_empty());
        let mut queue = DispatchQueue::new(1, 10);
        queue.request("a", "ns", keys(&[("n1", "x")]), 1);
        queue.request("a", "ns", Vec::new(), 1);
        assert!(queue.grant().is_empty());
    }
}
