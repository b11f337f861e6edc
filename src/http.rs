//! HTTP endpoints: status API, metrics, health.
