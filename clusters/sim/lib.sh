# Shared settings for the clusters/sim scripts. Sourced, not run.
# shellcheck shell=bash

SIM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
K8S_VERSION=v1.36.3
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.8.0

# Built binaries live outside the work tree, keyed by the versions, so a fresh
# clone on the same machine reuses them and a version bump rebuilds.
SIM_CACHE_ROOT=${KUBE_PREFETCH_SIM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kube-prefetch-sim}
SIM_BIN=$SIM_CACHE_ROOT/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION
SIM_RUN=${KUBE_PREFETCH_SIM_RUN:-$SIM_DIR/run}

# Ports per cluster index i (1-based): loopback only.
etcd_client_port() { echo $((23790 + $1 * 10)); }
etcd_peer_port() { echo $((23791 + $1 * 10)); }
apiserver_port() { echo $((26440 + $1)); }

log() { printf '[sim] %s\n' "$*" >&2; }
die() { printf '[sim] error: %s\n' "$*" >&2; exit 1; }
