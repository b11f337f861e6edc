# Shared settings for the clusters/sim scripts. Sourced, not run.
# shellcheck shell=bash

SIM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
K8S_VERSION=v1.36.3
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.8.0

# Built binaries live outside the work tree, keyed by the versions, so a fresh
# clone on the same machine reuses them and a version bump rebuilds.
SIM_CACHE_ROOT=${KUBE_PREFETCH_SIM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kube-prefetch-sim}
# shellcheck disable=SC2034 # used by the scripts that source this
SIM_BIN=$SIM_CACHE_ROOT/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION
SIM_RUN=${KUBE_PREFETCH_SIM_RUN:-$SIM_DIR/run}
# The sim's own Go tools (the image reporter) are rebuilt when their source
# changes; the pinned modules they build against are part of the key.
sim_tools_key() {
  cat "$SIM_DIR"/go/k8s/go.mod "$SIM_DIR"/go/k8s/go.sum "$SIM_DIR"/go/k8s/imagereporter/*.go | sha256sum | cut -c1-12
}
# shellcheck disable=SC2034 # used by the scripts that source this
SIM_TOOLS_BIN=$SIM_CACHE_ROOT/sim-tools-$(sim_tools_key)
# Beside the run dir, not in it: `down` removes the run dir while holding it.
SIM_LOCK=$SIM_RUN.lock

# Ports per cluster index i (1-based): loopback only. An offset lets a second
# checkout (say a CI clone) run its own clusters beside the usual ones, with
# KUBE_PREFETCH_SIM_RUN pointing elsewhere too.
SIM_PORT_OFFSET=${KUBE_PREFETCH_SIM_PORT_OFFSET:-0}
if ! [[ $SIM_PORT_OFFSET =~ ^[0-9]+$ ]] || [ "$SIM_PORT_OFFSET" -gt 30000 ]; then
  printf '[sim] error: KUBE_PREFETCH_SIM_PORT_OFFSET must be 0..30000\n' >&2
  exit 1
fi
etcd_client_port() { echo $((23790 + SIM_PORT_OFFSET + $1 * 10)); }
etcd_peer_port() { echo $((23791 + SIM_PORT_OFFSET + $1 * 10)); }
apiserver_port() { echo $((26440 + SIM_PORT_OFFSET + $1)); }
# The cluster index is part of every port, so it is bounded.
# shellcheck disable=SC2034 # used by up
SIM_MAX_CLUSTERS=9
# Fake nodes per cluster: node IPs and pod CIDRs are derived from the node
# index (see up), which keeps them unique up to this many.
# shellcheck disable=SC2034 # used by up
SIM_MAX_NODES=2500

# The processes of one cluster, in start order.
# image-reporter writes node.status.images of fake nodes as a kubelet would.
SIM_COMPONENTS=(etcd kube-apiserver kwok image-reporter)

log() { printf '[sim] %s\n' "$*" >&2; }
die() { printf '[sim] error: %s\n' "$*" >&2; exit 1; }

cluster_name() { echo "sim-$1"; }
cluster_dir() { echo "$SIM_RUN/sim-$1"; }

# Serializes up and down (also across test binaries that call `up`). Daemons
# must not inherit the descriptor, or they would hold the lock forever: every
# start closes fd 9.
take_lock() {
  mkdir -p "$(dirname "$SIM_LOCK")"
  exec 9>"$SIM_LOCK"
  if ! flock -w 900 9; then die "another clusters/sim up/down still holds $SIM_LOCK after 15 min"; fi
}

# True if the pid names a live (not zombie) process that runs one of our cached
# binaries (control plane, real nodes, registries). The executable check guards against a recycled pid: we never signal
# a process only because a stale pid file names it.
pid_is_ours() {
  local pid=$1 exe state
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [ -d "/proc/$pid" ] || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ "$state" != Z ] || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  exe=${exe% (deleted)}
  [[ $exe == "$SIM_CACHE_ROOT"/* ]]
}

# Process exists and is not a zombie (it may still be exec'ing into its binary).
pid_running() {
  local pid state
  pid=$(cat "$1" 2>/dev/null) || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ "$state" != Z ]
}

pidfile_alive() { # pidfile
  [ -f "$1" ] && pid_is_ours "$(cat "$1")"
}

# Sends TERM to the process in the pid file, waits up to $2 seconds for it to
# exit, then KILLs it. A zombie counts as gone: it holds no port or file, and
# in a container without a reaping init it may never be reaped.
stop_pidfile() { # pidfile timeout_seconds
  local file=$1 timeout=$2 pid waited=0
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if ! pid_is_ours "$pid"; then rm -f "$file"; return 0; fi
  kill -TERM "$pid" 2>/dev/null || true
  # One stopped by a fault test (SIGSTOP) must run again to see the TERM.
  kill -CONT "$pid" 2>/dev/null || true
  while pid_is_ours "$pid"; do
    if [ "$waited" -ge $((timeout * 10)) ]; then
      log "$(basename "$file" .pid) (pid $pid) did not stop after ${timeout}s: sending KILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  if pid_is_ours "$pid"; then die "could not stop pid $pid from $file"; fi
  rm -f "$file"
}

# Stops one cluster's processes, last started first.
stop_cluster() { # index
  local dir i
  dir=$(cluster_dir "$1")
  for ((i = ${#SIM_COMPONENTS[@]} - 1; i >= 0; i--)); do
    stop_pidfile "$dir/${SIM_COMPONENTS[i]}.pid" 20
  done
}

# Starts a daemon in its own session (so the caller's Ctrl-C or the end of a
# test run does not reach it) with stdio on its log file, and lets it write its
# own pid file before exec, so the pid is the daemon's own.
start_daemon() { # index component binary args...
  local dir name=$2
  dir=$(cluster_dir "$1")
  shift 2
  # shellcheck disable=SC2016 # $$ and $@ belong to the inner shell
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$dir/$name.pid" "$@" \
    </dev/null >>"$dir/$name.log" 2>&1 9>&- &
}

api_url() { echo "https://127.0.0.1:$(apiserver_port "$1")"; }
token_of() { awk -F, -v u="$2" '$2 == u {print $1}' "$(cluster_dir "$1")/tokens.csv"; }

apiserver_ready() { # index
  local dir
  dir=$(cluster_dir "$1")
  [ -f "$dir/tokens.csv" ] || return 1
  curl -fsS --max-time 3 --cacert "$dir/pki/ca.crt" \
    -H "Authorization: Bearer $(token_of "$1" admin)" \
    "$(api_url "$1")/readyz" >/dev/null 2>&1
}

# Indices of the clusters that have a directory under the run dir.
existing_clusters() {
  local d
  for d in "$SIM_RUN"/sim-*; do
    [ -d "$d" ] || continue
    d=${d##*/sim-}
    [[ $d =~ ^[0-9]+$ ]] && echo "$d"
  done | sort -n
}
