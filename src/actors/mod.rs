//! Actors: supervisor, one per cluster, one per Prefetch, and the status view.
