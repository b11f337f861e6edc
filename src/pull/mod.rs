//! Pure logic: no I/O, no clients. Everything here takes plain data and is
//! unit-tested without a cluster.

pub mod dispatch;
pub mod explain;
pub mod grid;
pub mod image;
pub mod index;
pub mod limits;
pub mod namespaces;
pub mod outcome;
pub mod plan;
pub mod podspec;
pub mod status;
pub mod status_size;
pub mod targeting;
pub mod tracker;
pub mod verified;
pub mod workload;
