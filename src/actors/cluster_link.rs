//! What a Prefetch actor shares with its cluster and may ask of the cluster
//! actor. Kept apart from both actors: the Prefetch actor depends on these
//! messages only, and the cluster actor, which starts Prefetch actors,
//! handles them.

use std::sync::Arc;

use actix::prelude::*;
use kube::Client;
use kube::runtime::events::Recorder;

use crate::actors::status::StatusActor;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::pull::plan::PairKey;

/// What every PrefetchActor of one cluster shares.
pub struct ClusterContext {
    pub cluster: String,
    pub client: Client,
    pub config: Arc<Config>,
    pub status: Addr<StatusActor>,
    pub metrics: Metrics,
    pub recorder: Recorder,
    /// The cluster actor, which owns the dispatch queue (the pull pod
    /// slots) and the shared watches.
    pub to_cluster: ClusterLink,
}

/// Where a Prefetch actor's requests to its cluster actor go.
#[derive(Clone)]
pub struct ClusterLink {
    pub request_slots: Recipient<RequestSlots>,
    pub release_slot: Recipient<ReleaseSlot>,
    pub adopt_slot: Recipient<AdoptSlot>,
    pub pairs_planned: Recipient<PairsPlanned>,
    pub write_allowed: Recipient<WriteAllowed>,
    pub write_refused: Recipient<WriteRefused>,
}

impl ClusterLink {
    pub fn new<A>(cluster: &Addr<A>) -> Self
    where
        A: Actor<Context = Context<A>>
            + Handler<RequestSlots>
            + Handler<ReleaseSlot>
            + Handler<AdoptSlot>
            + Handler<PairsPlanned>
            + Handler<WriteAllowed>
            + Handler<WriteRefused>,
    {
        ClusterLink {
            request_slots: cluster.clone().recipient(),
            release_slot: cluster.clone().recipient(),
            adopt_slot: cluster.clone().recipient(),
            pairs_planned: cluster.clone().recipient(),
            write_allowed: cluster.clone().recipient(),
            write_refused: cluster.clone().recipient(),
        }
    }
}

/// A Prefetch's standing request for pull slots (replaces its previous one).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RequestSlots {
    pub uid: String,
    /// Pairs it could start now, best first.
    pub candidates: Vec<PairKey>,
    /// Its own cap on pods in flight.
    pub cap: usize,
}

/// A Prefetch is done with a slot (its pod was judged, vanished or never
/// created).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReleaseSlot {
    pub uid: String,
    pub node: String,
}

/// How many (node, image) pairs a Prefetch would plan (for the cluster's
/// pair limit).
#[derive(Message)]
#[rtype(result = "()")]
pub struct PairsPlanned {
    pub uid: String,
    pub pairs: usize,
}

/// A Prefetch took over a pod found after a restart: it holds a slot.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AdoptSlot {
    pub uid: String,
    pub node: String,
}

/// RBAC refused a pull pod create; `what` is the API server's message.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WriteRefused {
    pub what: String,
}

/// A pull pod create went through.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WriteAllowed;
