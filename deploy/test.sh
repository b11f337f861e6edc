#!/usr/bin/env bash
# What `make test` runs: static checks, the builds, and every test against
# fresh simulated clusters (fake nodes, then the fault suite, then real nodes).
#
# The builds are scheduled around the tests so that a cold run fits the
# 45-minute budget on 2 cores: the Go control plane builds while cargo builds
# the tests, and what only later steps need (the real nodes' Go programs and
# the Dockerfile's release build) builds at low priority while the fake-node
# tests, which mostly wait on the API servers, run. Each step's time is
# printed at the end.
#
# Environment: SIM_CLUSTERS, SIM_NODES, SIM_REAL_NODES (set by the Makefile),
# CARGO, TEST_FEATURES, FAULTS_SKIP.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO=${CARGO:-cargo}
read -r -a features <<<"${TEST_FEATURES:---features test-hooks}"
clusters=${SIM_CLUSTERS:-3}
nodes=${SIM_NODES:-4}
real_nodes=${SIM_REAL_NODES:-1}
logs=target/make-test
mkdir -p "$logs"

started=$SECONDS
step_names=()
step_secs=()
current=""
current_start=0

clock() { printf '%d:%02d' $(($1 / 60)) $(($1 % 60)); }

step() { # name: ends the previous step, starts this one
  finish_step
  current=$1
  current_start=$SECONDS
  echo "== make test: $current ($(clock $((SECONDS - started))) in)"
}

finish_step() {
  if [ -n "$current" ]; then
    step_names+=("$current")
    step_secs+=($((SECONDS - current_start)))
  fi
  current=""
}

summary() {
  finish_step
  echo "== make test: step times"
  local i
  for i in "${!step_names[@]}"; do
    printf '  %-58s %s\n' "${step_names[$i]}" "$(clock "${step_secs[$i]}")"
  done
  printf '  %-58s %s\n' "total" "$(clock $((SECONDS - started)))"
}

# Background jobs: name -> pid; their output goes to $logs/<name>.log and is
# shown when they are waited for.
declare -A job_pids=()
declare -A job_starts=()

background() { # name niceness command...
  local name=$1 niceness=$2
  shift 2
  echo "== make test: $name started in the background (log: $logs/$name.log)"
  job_starts[$name]=$SECONDS
  # Its own process group, so that stopping the run stops its children too.
  setsid nice -n "$niceness" "$@" >"$logs/$name.log" 2>&1 &
  job_pids[$name]=$!
  # A new session is a new scheduler autogroup where the kernel has them
  # (sched_autogroup_enabled), and nice counts only inside one: lower the
  # group's own priority too.
  if [ -w "/proc/$!/autogroup" ]; then echo "$niceness" >"/proc/$!/autogroup" 2>/dev/null || true; fi
}

await() { # name: waits for a background job; its failure is the run's failure
  local name=$1 rc=0
  wait "${job_pids[$name]}" || rc=$?
  unset "job_pids[$name]"
  step_names+=("$name (background, overlapped)")
  step_secs+=($((SECONDS - job_starts[$name])))
  if [ "$rc" -ne 0 ]; then
    echo "== make test: $name failed (exit $rc); its log:" >&2
    cat "$logs/$name.log" >&2
    exit "$rc"
  fi
  tail -n 3 "$logs/$name.log"
}

on_exit() {
  local rc=$?
  local pid
  for pid in "${job_pids[@]}"; do
    kill -- "-$pid" 2>/dev/null || true
  done
  clusters/sim/down >/dev/null 2>&1 || echo "make test: clusters/sim/down failed" >&2
  summary
  exit "$rc"
}
trap on_exit EXIT

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
background sim-build 0 clusters/sim/build
step "cargo clippy (Go control plane building alongside)"
"$CARGO" clippy --all-targets "${features[@]}" -- -D warnings
step "cargo test --no-run (Go control plane building alongside)"
"$CARGO" test "${features[@]}" --no-run
await sim-build

# Lowest priority: the tests that run meanwhile must not be slowed.
background later-builds 19 bash -c 'clusters/sim/build --real-nodes && deploy/lint.sh --build'

step "clusters/sim/up --clusters $clusters --nodes $nodes"
clusters/sim/up --clusters "$clusters" --nodes "$nodes"
step "cargo test (fake nodes)"
"$CARGO" test "${features[@]}"
step "make test-faults"
make --no-print-directory test-faults

step "waiting for the background builds"
await later-builds

step "clusters/sim/up --real-nodes $real_nodes"
clusters/sim/up --clusters "$clusters" --nodes "$nodes" --real-nodes "$real_nodes"
step "real-node tests"
"$CARGO" test "${features[@]}" --test real_nodes -- --ignored --test-threads 1 --nocapture
step "down tests"
"$CARGO" test "${features[@]}" --test sim_down -- --ignored --test-threads 1
step "check-ports"
clusters/sim/check-ports
