//! Actors: thin shells that move watch events into the pure logic of
//! `crate::pull` and its decisions out to the API server.
//!
//! Supervisor ─► ClusterActor (one per context, own Arbiter) ─► PrefetchActor
//! (one per Prefetch); everyone reports to the StatusActor.

pub mod cluster;
pub mod prefetch;
pub mod status;
pub mod supervisor;
