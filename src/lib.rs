//! kube-prefetch keeps container images warm on the nodes of many Kubernetes clusters.

pub mod actors;
pub mod api;
pub mod cli;
pub mod config;
pub mod error;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod pull;
