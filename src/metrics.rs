//! Prometheus metrics. Counters are kept for the life of the process; gauges
//! are derived from the aggregated status at scrape time, so they can never
//! disagree with `/api/v1/status`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::actors::status::StatusView;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub cluster: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    pub cluster: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterStateLabels {
    cluster: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PairLabels {
    cluster: String,
    namespace: String,
    prefetch: String,
    state: String,
}

/// Process-wide counters, cheap to clone and safe to share across arbiters.
#[derive(Clone, Default)]
pub struct Metrics {
    pub pull_pods_created: Family<ClusterLabels, Counter>,
    pub pulls_finished: Family<OutcomeLabels, Counter>,
    pub status_writes: Family<ClusterLabels, Counter>,
    pub api_responses: Family<ResponseLabels, Counter>,
}

impl Metrics {
    pub fn pull_created(&self, cluster: &str) {
        self.pull_pods_created
            .get_or_create(&ClusterLabels {
                cluster: cluster.to_string(),
            })
            .inc();
    }

    pub fn pull_finished(&self, cluster: &str, outcome: &str) {
        self.pulls_finished
            .get_or_create(&OutcomeLabels {
                cluster: cluster.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn status_written(&self, cluster: &str) {
        self.status_writes
            .get_or_create(&ClusterLabels {
                cluster: cluster.to_string(),
            })
            .inc();
    }

    /// One answer of a cluster's API server, by HTTP status code (a 429 is
    /// API Priority and Fairness, or another limit, turning a request away).
    pub fn api_response(&self, cluster: &str, code: u16) {
        self.api_responses
            .get_or_create(&ResponseLabels {
                cluster: cluster.to_string(),
                code: code.to_string(),
            })
            .inc();
    }

    pub fn render(&self, view: &StatusView) -> Result<String, std::fmt::Error> {
        let mut registry = Registry::with_prefix("kube_prefetch");
        registry.register(
            "pull_pods_created",
            "Pull pods created",
            self.pull_pods_created.clone(),
        );
        registry.register(
            "pulls_finished",
            "Pulls judged, by outcome",
            self.pulls_finished.clone(),
        );
        registry.register(
            "status_writes",
            "Prefetch status subresource writes",
            self.status_writes.clone(),
        );
        registry.register(
            "api_responses",
            "Answers of each cluster's API server, by HTTP status code",
            self.api_responses.clone(),
        );

        let cluster_state = Family::<ClusterStateLabels, Gauge>::default();
        let pairs = Family::<PairLabels, Gauge>::default();
        for cluster in &view.clusters {
            cluster_state
                .get_or_create(&ClusterStateLabels {
                    cluster: cluster.name.clone(),
                    state: cluster.health.label().to_string(),
                })
                .set(1);
            for prefetch in &cluster.prefetches {
                let counts = [
                    ("ready", prefetch.pulls.ready),
                    ("reverifying", prefetch.pulls.reverifying),
                    ("in_flight", prefetch.pulls.in_flight),
                    ("failed", prefetch.pulls.failed),
                    ("total", prefetch.pulls.total),
                ];
                for (state, value) in counts {
                    pairs
                        .get_or_create(&PairLabels {
                            cluster: cluster.name.clone(),
                            namespace: prefetch.namespace.clone(),
                            prefetch: prefetch.name.clone(),
                            state: state.to_string(),
                        })
                        .set(i64::from(value));
                }
            }
        }
        registry.register(
            "cluster_state",
            "1 for the current state of each target cluster",
            cluster_state,
        );
        registry.register(
            "prefetch_pairs",
            "(node, image) pairs of each Prefetch, by state",
            pairs,
        );

        let mut body = String::new();
        encode(&mut body, &registry)?;
        Ok(body)
    }
}
