#!/usr/bin/env bash
# What `make test` runs: static checks, the builds, and every test against
# fresh simulated clusters.
#
# Scheduled so that a cold run fits the 45-minute budget on 2 cores:
# - the Go control plane builds while cargo runs clippy and builds the tests;
# - two sets of simulated clusters then run side by side, since the tests
#   mostly wait on API servers and kubelets:
#     lane "main"   (the default clusters): the fake-node tests, then the
#                   real-node tests with the helper pull method;
#     lane "faults" (a second set, its own ports and run dir): the fault suite,
#                   then the real-node tests with the direct pull method;
#   meanwhile the real nodes' Go programs finish building, then the
#   Dockerfile's release build runs at the lowest priority;
# - last, the down tests and the port check.
# Each step's time is printed at the end; every lane's full output is in
# target/make-test/.
#
# Environment: SIM_CLUSTERS, SIM_NODES, SIM_REAL_NODES (set by the Makefile),
# CARGO, TEST_FEATURES, FAULTS_SKIP, and KUBE_PREFETCH_SIM_PORT_OFFSET /
# KUBE_PREFETCH_SIM_RUN for the main lane (the faults lane uses the offset
# plus 600 and the run dir with "-faults" appended).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO=${CARGO:-cargo}
read -r -a features <<<"${TEST_FEATURES:---features test-hooks}"
clusters=${SIM_CLUSTERS:-3}
nodes=${SIM_NODES:-4}
real_nodes=${SIM_REAL_NODES:-1}
# `up` would start real nodes with every cluster set otherwise: only the
# real-node steps ask for them.
unset SIM_REAL_NODES
main_offset=${KUBE_PREFETCH_SIM_PORT_OFFSET:-0}
main_run=${KUBE_PREFETCH_SIM_RUN:-$PWD/clusters/sim/run}
faults_offset=$((main_offset + 600))
faults_run=$main_run-faults
logs=$PWD/target/make-test
rm -rf "$logs"
mkdir -p "$logs"
exec 3>&1 # progress lines from the lanes go to the run's own output

started=$SECONDS

clock() { printf '%d:%02d' $(($1 / 60)) $(($1 % 60)); }

# Step times go to $logs/steps as "seconds<TAB>name", one line per step.
current="" current_start=0
step() { # name: ends this shell's previous step, starts the next one
  finish_step
  current=$1
  current_start=$SECONDS
  echo "== make test${lane:+ [$lane]}: $current ($(clock $((SECONDS - started))) in)" >&3
}
finish_step() {
  if [ -n "$current" ]; then
    printf '%s\t%s\n' $((SECONDS - current_start)) "${lane:+[$lane] }$current" >>"$logs/steps"
  fi
  current=""
}

summary() {
  finish_step
  echo "== make test: step times"
  local secs name
  while IFS=$'\t' read -r secs name; do
    printf '  %-66s %s\n' "$name" "$(clock "$secs")"
  done <"$logs/steps"
  printf '  %-66s %s\n' "total" "$(clock $((SECONDS - started)))"
}

# The Go builds and the Dockerfile build: one background chain in its own
# process group (so that a stop reaches its children) that leaves a marker
# file after each stage.
go_chain() {
  clusters/sim/build
  touch "$logs/go-core.done"
  clusters/sim/build --real-nodes
  touch "$logs/go-real.done"
  # Needed by no test: the lowest priority, for the group too, since a new
  # session is a new scheduler autogroup where the kernel has them and nice
  # counts only inside one.
  # Only a group of its own: with autogroups off, setsid makes none, and the
  # write would lower the caller's whole session.
  if [ "$(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null)" = 1 ] &&
    [ "$(cut -d' ' -f1 /proc/self/autogroup)" != "$caller_group" ]; then
    echo 19 >/proc/self/autogroup 2>/dev/null || true
  fi
  nice -n 19 deploy/lint.sh --build
}

await_marker() { # marker what: waits for the chain to get that far
  local marker=$1 what=$2
  until [ -e "$logs/$marker" ]; do
    if ! kill -0 "$chain_pid" 2>/dev/null; then
      echo "== make test: the builds stopped before $what; their log ($logs/builds.log):" >&2
      tail -n 60 "$logs/builds.log" >&2
      return 1
    fi
    sleep 2
  done
}

# Each lane runs in its own process group (job control on while it starts),
# so that stopping it stops everything it started, test binaries included.
declare -A lane_of=()
start_lane() { # name function
  local name=$1 fn=$2
  set -m
  (
    lane=$name
    current=""
    "$fn"
    finish_step
  ) >"$logs/lane-$name.log" 2>&1 &
  set +m
  lane_of[$!]=$name
}

stop_lanes() {
  local pid
  for pid in "${!lane_of[@]}"; do kill -- "-$pid" 2>/dev/null || true; done
  lane_of=()
}

await_lanes() { # the first lane to fail stops the others; its log is shown
  local pid name rc
  while [ ${#lane_of[@]} -gt 0 ]; do
    rc=0
    wait -n -p pid "${!lane_of[@]}" || rc=$?
    name=${lane_of[$pid]}
    unset "lane_of[$pid]"
    grep -E '^test result:|^     Running ' "$logs/lane-$name.log" || true
    if [ "$rc" -ne 0 ]; then
      echo "== make test: lane $name failed (exit $rc); the others are stopped. The end of its log ($logs/lane-$name.log):" >&2
      tail -n 150 "$logs/lane-$name.log" >&2
      stop_lanes
      return "$rc"
    fi
  done
}

sim() { # run dir, port offset, then a command with the clusters' settings
  KUBE_PREFETCH_SIM_RUN=$1 KUBE_PREFETCH_SIM_PORT_OFFSET=$2 "${@:3}"
}

main_lane() {
  step "clusters/sim/up --clusters $clusters --nodes $nodes"
  sim "$main_run" "$main_offset" clusters/sim/up --clusters "$clusters" --nodes "$nodes"
  step "cargo test (fake nodes)"
  sim "$main_run" "$main_offset" "$CARGO" test "${features[@]}"
  real_node_tests "$main_run" "$main_offset" helper
}

faults_lane() {
  step "clusters/sim/up --clusters $clusters --nodes $nodes"
  sim "$faults_run" "$faults_offset" clusters/sim/up --clusters "$clusters" --nodes "$nodes"
  step "make test-faults"
  sim "$faults_run" "$faults_offset" make --no-print-directory test-faults
  real_node_tests "$faults_run" "$faults_offset" direct
  step "clusters/sim/down, check-ports"
  sim "$faults_run" "$faults_offset" clusters/sim/down
  sim "$faults_run" "$faults_offset" clusters/sim/check-ports
}

real_node_tests() { # run dir, port offset, pull method
  step "waiting for the real nodes' Go builds"
  await_marker go-real.done "the real nodes' programs were built"
  step "clusters/sim/up --real-nodes $real_nodes"
  sim "$1" "$2" clusters/sim/up --clusters "$clusters" --nodes "$nodes" --real-nodes "$real_nodes"
  step "real-node tests, $3 pull method"
  REAL_NODE_METHOD=$3 sim "$1" "$2" "$CARGO" test "${features[@]}" --test real_nodes -- \
    --ignored --test-threads 1 --nocapture
}

on_exit() {
  local rc=$?
  stop_lanes
  if [ -n "${chain_pid:-}" ]; then kill -- "-$chain_pid" 2>/dev/null || true; fi
  sim "$faults_run" "$faults_offset" clusters/sim/down >/dev/null 2>&1 ||
    echo "make test: clusters/sim/down (faults lane) failed" >&2
  sim "$main_run" "$main_offset" clusters/sim/down >/dev/null 2>&1 ||
    echo "make test: clusters/sim/down failed" >&2
  summary
  exit "$rc"
}
trap on_exit EXIT
trap "exit 143" TERM INT

step "cargo fmt --check"
"$CARGO" fmt --all -- --check

# Everything that may apt-get runs first and alone (dpkg takes one lock).
step "static lint (shellcheck, hadolint)"
deploy/lint.sh --static
step "browser for tests/browser.rs"
deploy/install-browser.sh

# The control plane and the Rust test build each use both cores part of the
# time only (linking, the long tail of one crate): side by side they finish
# sooner than one after the other.
echo "== make test: Go builds started in the background (log: $logs/builds.log)"
caller_group=$(cut -d' ' -f1 /proc/$$/autogroup 2>/dev/null || true)
setsid bash -c "set -euo pipefail; $(declare -f go_chain); logs=$logs; caller_group=$caller_group; go_chain" >"$logs/builds.log" 2>&1 &
chain_pid=$!
step "cargo clippy (Go control plane building alongside)"
"$CARGO" clippy --all-targets "${features[@]}" -- -D warnings
step "cargo test --no-run (Go control plane building alongside)"
"$CARGO" test "${features[@]}" --no-run
step "waiting for the Go control plane"
await_marker go-core.done "the control plane was built"

step "two lanes of clusters side by side (see their steps below)"
start_lane main main_lane
start_lane faults faults_lane
await_lanes

step "down tests"
sim "$main_run" "$main_offset" "$CARGO" test "${features[@]}" --test sim_down -- --ignored --test-threads 1
step "check-ports"
sim "$main_run" "$main_offset" clusters/sim/check-ports
step "waiting for the Dockerfile's release build"
wait "$chain_pid" || {
  rc=$?
  echo "== make test: the Go or Dockerfile builds failed; their log ($logs/builds.log):" >&2
  tail -n 60 "$logs/builds.log" >&2
  exit "$rc"
}
chain_pid=""
tail -n 2 "$logs/builds.log"
