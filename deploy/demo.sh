#!/usr/bin/env bash
# `make demo`: start simulated clusters, install the CRD and the examples in
# each, run kube-prefetch against all of them and show progress until every
# Prefetch is READY; then keep running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

clusters=${SIM_CLUSTERS:-3}
nodes=${SIM_NODES:-4}
listen=${DEMO_LISTEN:-127.0.0.1:8080}
kubectl=clusters/sim/kubectl
binary=target/debug/kube-prefetch

echo "==> building kube-prefetch"
cargo build --quiet --bins
echo "==> building and starting $clusters simulated clusters ($nodes nodes each)"
clusters/sim/build
clusters/sim/up --clusters "$clusters" --nodes "$nodes"

for index in $(seq 1 "$clusters"); do
  context="sim-$index"
  echo "==> $context: installing the CRD and the examples"
  "$binary" crd | "$kubectl" --context "$context" apply -f - >/dev/null
  "$kubectl" --context "$context" wait --for condition=established --timeout=60s \
    crd/prefetches.cache.techsquad.rocks >/dev/null
  "$kubectl" --context "$context" apply -f deploy/examples/ >/dev/null
done

echo "==> running kube-prefetch (dashboard: http://$listen/ , Ctrl-C to stop)"
KUBE_PREFETCH__SERVER__LISTEN=$listen "$binary" run --config config/kube-prefetch.toml &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; exit 0' INT TERM

# Show the aggregated table whenever it changes, until every Prefetch in
# every cluster is READY.
last=""
while kill -0 "$pid" 2>/dev/null; do
  sleep 1
  table=$("$binary" status --url "http://$listen" 2>/dev/null) || true
  [ -n "$table" ] || continue
  if [ "$table" != "$last" ]; then
    printf '\n%s\n' "$table"
    last=$table
  fi
  rows=$(tail -n +2 <<<"$table")
  if grep -q READY <<<"$rows" &&
    ! grep -qE 'PENDING|RUNNING|FAILED|Connecting|Unreachable|CrdMissing|Forbidden' <<<"$rows"; then
    echo
    echo "==> every Prefetch is READY. Try: $kubectl --context sim-1 get prefetches -A"
    echo "    kube-prefetch keeps running; Ctrl-C to stop (make sim-down stops the clusters)."
    break
  fi
done
wait "$pid"
