//! kube-prefetch keeps container images warm on the nodes of many Kubernetes clusters.

pub mod actors;
pub mod api;
pub mod config;
pub mod http;
pub mod pull;
