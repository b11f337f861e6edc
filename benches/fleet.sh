#!/usr/bin/env bash
# The fleet benchmarks of issue 7, end to end against sim clusters with many
# fake nodes and the sim's image reporter on, driven by the release build of
# kube-prefetch. Prints numbers; see BENCHMARKS.md, "fleet".
#
# usage: benches/fleet.sh STEP...   (steps run in order on one set of clusters)
#   ready     start kube-prefetch; time to every Prefetch READY, peak RSS
#             (VmHWM), CPU, pull pods created, status writes (benchmarks 1, 5)
#   churn     node image lists changing at each rate of FLEET_CHURN_RATES for
#             FLEET_CHURN_SECONDS: kube-prefetch CPU per update, above the
#             same window quiet (benchmark 2; needs ready first)
#   restart   stop kube-prefetch (TERM), start it again: pull pods created
#             until READY plus FLEET_SETTLE s (benchmark 3; needs ready first)
#   failover  two replicas with leader election, KILL the leader: pull pods
#             the standby creates (benchmark 3; runs its own first replica)
#   dispatch  one Prefetch of FLEET_IMAGES fresh images on every worker:
#             time to all pulls judged and deleted, then the bare loop
#             (benches/fleet_load.rs) doing the same with the same client,
#             concurrency and request rate (benchmark 4)
#
# The clusters (FLEET_CLUSTERS x FLEET_WORKERS workers, + a control plane
# each) are started with clusters/sim/up on KUBE_PREFETCH_SIM_PORT_OFFSET
# (required, > 0: never the shared clusters) and run dir FLEET_SIM_RUN
# (default /tmp/kp-fleet-run-<offset>), and stopped on every exit.
# Every worker starts listing FLEET_APP_IMAGES "app" images (600 MiB each)
# and 40 "filler" images (FLEET_FILLER_MIB each, default 1); Prefetch k of
# FLEET_PREFETCHES wants FLEET_IMAGES of the app images, except fleet-0 whose
# last image is "fresh" (on no node): so one Prefetch fans out over every
# worker and the others are satisfied by the nodes' lists. The reporter then
# lists the fresh image (it is larger than a filler), as a kubelet would;
# with FLEET_FILLER_MIB=600 it falls off the 50 largest, so the pairs stay
# satisfied by pulls only (what `restart` and `failover` are about).
# knobs: FLEET_CLUSTERS (1), FLEET_WORKERS (1000), FLEET_PREFETCHES (20),
#   FLEET_IMAGES (5), FLEET_APP_IMAGES (10), FLEET_FILLER_MIB (1),
#   FLEET_API_QPS (100), FLEET_PARALLEL (100: per Prefetch and per cluster),
#   FLEET_CHURN_RATES ("10 50"), FLEET_CHURN_SECONDS (30), FLEET_SETTLE (30),
#   FLEET_TIMEOUT (900 s for READY), FLEET_KEEP (set: keep the logs),
#   FLEET_BYSTANDERS (0: Prefetches of FLEET_IMAGES app images that target
#   only the control-plane node, so no worker the churn updates: its cost
#   per update must not grow with them).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
# shellcheck source=benches/lib.sh
source benches/lib.sh

log() { printf '[fleet] %s\n' "$*" >&2; }
die() { printf '[fleet] error: %s\n' "$*" >&2; exit 1; }

[ $# -gt 0 ] || die "usage: benches/fleet.sh STEP... (ready churn restart failover dispatch)"
for step in "$@"; do
  case $step in ready | churn | restart | failover | dispatch) ;; *) die "unknown step '$step'" ;; esac
done
clusters=${FLEET_CLUSTERS:-1}
workers=${FLEET_WORKERS:-1000}
prefetch_count=${FLEET_PREFETCHES:-20}
per_prefetch=${FLEET_IMAGES:-5}
app_images=${FLEET_APP_IMAGES:-10}
filler_mib=${FLEET_FILLER_MIB:-1}
api_qps=${FLEET_API_QPS:-100}
parallel=${FLEET_PARALLEL:-100}
churn_rates=${FLEET_CHURN_RATES:-10 50}
churn_seconds=${FLEET_CHURN_SECONDS:-30}
bystanders=${FLEET_BYSTANDERS:-0}
settle=${FLEET_SETTLE:-30}
timeout=${FLEET_TIMEOUT:-900}
offset=${KUBE_PREFETCH_SIM_PORT_OFFSET:-0}
[[ $offset =~ ^[1-9][0-9]*$ ]] || die "set KUBE_PREFETCH_SIM_PORT_OFFSET > 0 (0 is the shared sim clusters)"
run_dir=${FLEET_SIM_RUN:-/tmp/kp-fleet-run-$offset}
case $(realpath -m "$run_dir") in
  "$repo/clusters/sim/run" | "$repo/clusters/sim/run/"*) die "FLEET_SIM_RUN must not be the shared clusters/sim/run" ;;
esac
for knob in clusters workers prefetch_count per_prefetch app_images filler_mib parallel churn_seconds settle timeout; do
  [[ ${!knob} =~ ^[1-9][0-9]*$ ]] || die "$knob must be a positive integer, got '${!knob}'"
done
[[ $bystanders =~ ^[0-9]+$ ]] || die "FLEET_BYSTANDERS must be a whole number, got '$bystanders'"
[ "$per_prefetch" -le "$app_images" ] || die "FLEET_IMAGES must be at most FLEET_APP_IMAGES"
[ $((app_images + 40)) -le 50 ] || die "FLEET_APP_IMAGES must be at most 10 (with 40 fillers, the kubelet lists 50)"

renice -n 19 -p $$ >/dev/null
export KUBE_PREFETCH_SIM_PORT_OFFSET=$offset KUBE_PREFETCH_SIM_RUN=$run_dir
exec 8>"$run_dir.fleet.lock"
flock -n 8 || die "another benches/fleet.sh uses $run_dir"

work=$(mktemp -d /tmp/kp-fleet.XXXXXX)
kp_pids=()
sim_started=false
stop_pid() { # pid
  kill -0 "$1" 2>/dev/null || return 0
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
cleanup() {
  local code=$? pid
  trap - EXIT INT TERM
  for pid in "${kp_pids[@]}"; do stop_pid "$pid"; done
  if $sim_started; then
    log "stopping the benchmark clusters"
    clusters/sim/down || { log "down failed: run KUBE_PREFETCH_SIM_PORT_OFFSET=$offset KUBE_PREFETCH_SIM_RUN=$run_dir clusters/sim/down"; code=1; }
  fi
  if [ "$code" -eq 0 ] && [ -z "${FLEET_KEEP:-}" ]; then rm -rf "$work"; else log "exit $code; logs kept in $work"; fi
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "building kube-prefetch (release) and the load driver (a no-op when up to date)"
cargo build --release --quiet --bin kube-prefetch
# The driver's path, so that no cargo runs (and waits on the build
# directory's lock) in the middle of a measurement.
load_binary=$(cargo bench --no-run --bench fleet_load --message-format=json 2>/dev/null |
  jq -r 'select(.reason == "compiler-artifact" and .target.name == "fleet_load") | .executable // empty' | tail -n 1)
[ -x "$load_binary" ] || die "could not build benches/fleet_load.rs"
binary=$repo/target/release/kube-prefetch
# Its errors (say, a failed patch) go to the log, and the first ones are shown.
load() {
  "$load_binary" "$@" 2>"$work/load.err" || { tail -n 20 "$work/load.err" >&2; return 1; }
  if [ -s "$work/load.err" ]; then log "load driver errors ($(grep -c . "$work/load.err") lines), first:"; head -n 3 "$work/load.err" >&2; fi
}

# What every worker lists at start: the app images (largest, so they stay
# listed) and the fillers the churn renames.
images_file=$work/node-images.txt
app() { echo "registry.example/fleet/app-$1:1"; }
{
  for ((a = 0; a < app_images; a++)); do echo "$((600 * 1024 * 1024 + a)) $(app "$a")"; done
  for ((f = 0; f < 40; f++)); do echo "$((filler_mib * 1024 * 1024 + f)) registry.example/fleet/filler-$f:1"; done
} >"$images_file"

if [ -e "$run_dir" ]; then log "removing clusters left by an earlier run"; clusters/sim/down; fi
sim_started=true
log "starting $clusters cluster(s) x $((workers + 1)) nodes (offset $offset, $run_dir)"
up_start=$(now_ms)
clusters/sim/up --clusters "$clusters" --nodes $((workers + 1)) --report-images all \
  --node-images "$images_file" >"$work/up.txt"
cat "$work/up.txt" >&2
log "clusters up in $((($(now_ms) - up_start) / 1000)) s"
kubeconfig=$run_dir/kubeconfig
cluster_names=()
for ((i = 1; i <= clusters; i++)); do cluster_names+=("sim-$i"); done
kubectl() { clusters/sim/kubectl --kubeconfig "$kubeconfig" "$@"; }
namespace=fleet-bench

prefetch_yaml() { # name images...
  local name=$1
  shift
  printf 'apiVersion: cache.techsquad.rocks/v1\nkind: Prefetch\nmetadata:\n  name: %s\n  namespace: %s\nspec:\n  node_filter: %s\n  retry_after: 86400\n  images:\n' "$name" "$namespace" "${node_filter:-worker}"
  printf '  - %s\n' "$@"
}
for c in "${cluster_names[@]}"; do
  "$binary" crd | kubectl --context "$c" apply -f - >/dev/null
  kubectl --context "$c" wait --for condition=established --timeout=60s crd/prefetches.cache.techsquad.rocks >/dev/null
  kubectl --context "$c" create namespace "$namespace" >/dev/null
  kubectl --context "$c" create namespace kube-prefetch >/dev/null
done

# kube-prefetch config; $1 names the instance, the rest is appended.
write_config() { # name port [extra toml]
  cat >"$work/$1.toml" <<EOF
[server]
listen = "127.0.0.1:$2"

[defaults]
max_parallel_per_prefetch = $parallel
max_parallel_per_cluster = $parallel
api_qps = $api_qps

${3:-}

[[kubeconfig]]
path = "$kubeconfig"
EOF
}
kp_pid=""
kp_url=""
start_kp() { # name [extra toml]
  local port
  port=$(free_port 18380) || die "no free port in 18380..18480"
  write_config "$1" "$port" "${2:-}"
  KUBECONFIG=$kubeconfig RUST_LOG=${RUST_LOG:-info,kube_client=warn,kube_runtime=warn,actix_server=warn} \
    "$binary" run --config "$work/$1.toml" >"$work/$1.log" 2>&1 &
  kp_pid=$!
  kp_pids+=("$kp_pid")
  kp_url=http://127.0.0.1:$port
}

# Waits until every fleet-k Prefetch of every cluster is READY in the in-process view
# with all its pulls ready; prints the milliseconds since $2.
wait_ready() { # pid start_ms
  local summary
  while :; do
    kill -0 "$1" 2>/dev/null || { tail -n 30 "$work"/*.log >&2; die "kube-prefetch exited"; }
    [ $(($(now_ms) - $2)) -lt $((timeout * 1000)) ] || die "not READY after ${timeout}s: ${summary:-no status}"
    if summary=$(curl -fsS --max-time 5 "$kp_url/api/v1/status" 2>/dev/null |
      jq -c '[.clusters[].prefetches[] | select(.name | startswith("fleet-"))] | {n: length, ready: map(select(.phase == "READY" and .pulls.ready == .pulls.total)) | length, pulls: (map(.pulls.ready) | add), total: (map(.pulls.total) | add)}'); then
      if jq -e --argjson n $((prefetch_count * clusters)) '.n == $n and .ready == $n' <<<"$summary" >/dev/null; then
        echo $(($(now_ms) - $2))
        return 0
      fi
    fi
    sleep 0.5
  done
}

pull_pods_left() {
  local c total=0 n
  for c in "${cluster_names[@]}"; do
    n=$(kubectl --context "$c" get pods -A -l app.kubernetes.io/managed-by=kube-prefetch -o name | grep -c . || true)
    total=$((total + n))
  done
  echo "$total"
}

pairs=$((clusters * prefetch_count * per_prefetch * workers))
fresh=registry.example/fleet/fresh:1
create_prefetches() {
  local c k j imgs
  for c in "${cluster_names[@]}"; do
    for ((k = 0; k < prefetch_count; k++)); do
      imgs=()
      for ((j = 0; j < per_prefetch; j++)); do imgs+=("$(app $(((k + j) % app_images)))"); done
      [ "$k" -ne 0 ] || imgs[per_prefetch - 1]=$fresh
      prefetch_yaml "fleet-$k" "${imgs[@]}"
      echo ---
    done | kubectl --context "$c" apply -f - >/dev/null
    [ "$bystanders" -gt 0 ] || continue
    for ((k = 0; k < bystanders; k++)); do
      imgs=()
      for ((j = 0; j < per_prefetch; j++)); do imgs+=("$(app $(((k + j) % app_images)))"); done
      node_filter=control-plane prefetch_yaml "bystander-$k" "${imgs[@]}"
      echo ---
    done | kubectl --context "$c" apply -f - >/dev/null
  done
}

step_ready() {
  create_prefetches
  # Every status write of fleet-0 (the one that fans out) in sim-1 is one
  # change of the object (a write that changes nothing makes none): a line
  # of this watch after the first, which is the object as it was.
  kubectl --context sim-1 -n "$namespace" get prefetch fleet-0 -w -o name \
    >"$work/fleet-0.watch" 2>/dev/null &
  local watch_pid=$! start ready_ms ticks rss created writes left
  kp_pids+=("$watch_pid")
  start=$(now_ms)
  start_kp ready
  ready_ms=$(wait_ready "$kp_pid" "$start")
  ticks=$(cpu_ticks "$kp_pid")
  rss=$(peak_rss_kb "$kp_pid")
  sleep 3 # the last debounced status write
  created=$(metric "$kp_url" kube_prefetch_pull_pods_created_total)
  writes=$(metric "$kp_url" kube_prefetch_status_writes_total)
  left=$(pull_pods_left)
  stop_pid "$watch_pid"
  printf '\n## ready: %s cluster(s) x %s workers, %s Prefetches x %s images (%s pairs), api_qps %s, parallel %s\n' \
    "$clusters" "$workers" "$prefetch_count" "$per_prefetch" "$pairs" "$api_qps" "$parallel"
  printf '(%s, %s, load %s)\n\n' "$(git rev-parse --short HEAD)" "$(date -u +%Y-%m-%dT%H:%MZ)" "$(cut -d' ' -f1-3 /proc/loadavg)"
  printf '| measure | value |\n| --- | ---: |\n'
  printf '| time to all READY (kube-prefetch view, from process start) | %.1f s |\n' "$(awk -v t="$ready_ms" 'BEGIN {print t / 1000}')"
  printf '| kube-prefetch peak RSS (VmHWM) | %s MiB |\n' "$(mib "$rss")"
  printf '| kube-prefetch CPU to READY | %s s |\n' "$(seconds "$ticks")"
  printf '| pull pods created | %s |\n' "$created"
  printf '| status writes, all Prefetches | %s |\n' "$writes"
  printf '| status writes of fleet-0 in sim-1 (its fan-out: %s pulls) | %s |\n' "$workers" "$(($(grep -c . "$work/fleet-0.watch" || true) - 1))"
  printf '| pull pods left at READY + 3 s | %s |\n' "$left"
}

step_churn() {
  [ -n "$kp_pid" ] || die "churn needs ready first"
  sleep "$settle"
  local before after idle rate out updates busy
  before=$(cpu_ticks "$kp_pid")
  sleep "$churn_seconds"
  after=$(cpu_ticks "$kp_pid")
  idle=$((after - before))
  printf '\n## churn: %s cluster(s) x %s workers, %s Prefetches (+ %s targeting no worker); quiet: %s s CPU in %s s\n\n' \
    "$clusters" "$workers" "$prefetch_count" "$bystanders" "$(seconds "$idle")" "$churn_seconds"
  printf '| updates per second | updates done | kube-prefetch CPU | above quiet | per update |\n| ---: | ---: | ---: | ---: | ---: |\n'
  for rate in $churn_rates; do
    before=$(cpu_ticks "$kp_pid")
    out=$(load churn "$kubeconfig" sim-1 "$rate" "$churn_seconds")
    after=$(cpu_ticks "$kp_pid")
    log "$out"
    updates=$(sed -n 's/^churn: \([0-9]*\) node status updates.*/\1/p' <<<"$out")
    busy=$((after - before))
    printf '| %s | %s | %s s | %s s | %s ms |\n' "$rate" "$updates" "$(seconds "$busy")" \
      "$(seconds $((busy - idle)))" \
      "$(awk -v b="$busy" -v i="$idle" -v u="$updates" -v hz="$clk_tck" 'BEGIN {printf "%.3f", (b - i) * 1000 / hz / u}')"
    sleep 5
  done
}

step_restart() {
  [ -n "$kp_pid" ] || die "restart needs ready first"
  sleep "$settle"
  stop_pid "$kp_pid"
  local start ready_ms created
  start=$(now_ms)
  start_kp restarted
  ready_ms=$(wait_ready "$kp_pid" "$start")
  sleep "$settle"
  created=$(metric "$kp_url" kube_prefetch_pull_pods_created_total)
  printf '\n## restart of a READY fleet (%s pairs, filler %s MiB)\n\n' "$pairs" "$filler_mib"
  printf '| measure | value |\n| --- | ---: |\n'
  printf '| time to all READY after the restart | %.1f s |\n' "$(awk -v t="$ready_ms" 'BEGIN {print t / 1000}')"
  printf '| pull pods created by the restarted process (READY + %s s) | %s (%s %% of pairs) |\n' "$settle" "$created" \
    "$(awk -v c="$created" -v p="$pairs" 'BEGIN {printf "%.3f", c * 100 / p}')"
  printf '| kube-prefetch CPU, restart to READY + %s s | %s s |\n' "$settle" "$(seconds "$(cpu_ticks "$kp_pid")")"
}

step_failover() {
  local election first second start created
  election=$'[leader_election]\nenabled = true\nnamespace = "kube-prefetch"\nlease_name = "kube-prefetch-fleet"'
  if [ -z "$kp_pid" ]; then create_prefetches; fi
  if [ -n "$kp_pid" ]; then stop_pid "$kp_pid"; fi
  start_kp leader "$election"
  first=$kp_pid
  local first_url=$kp_url
  until grep -q "became the leader" "$work/leader.log"; do kill -0 "$first" || die "leader exited"; sleep 0.5; done
  wait_ready "$first" "$(now_ms)" >/dev/null
  start_kp standby "$election"
  second=$kp_pid
  sleep "$settle"
  kill -KILL "$first"
  start=$(now_ms)
  until grep -q "became the leader" "$work/standby.log"; do kill -0 "$second" || die "standby exited"; sleep 0.5; done
  local took=$(($(now_ms) - start))
  wait_ready "$second" "$start" >/dev/null
  sleep "$settle"
  created=$(metric "$kp_url" kube_prefetch_pull_pods_created_total)
  printf '\n## failover of a READY fleet (%s pairs, filler %s MiB)\n\n' "$pairs" "$filler_mib"
  printf '| measure | value |\n| --- | ---: |\n'
  printf '| standby became the leader after the KILL | %.1f s |\n' "$(awk -v t="$took" 'BEGIN {print t / 1000}')"
  printf '| pull pods created by the new leader (READY + %s s) | %s (%s %% of pairs) |\n' "$settle" "$created" \
    "$(awk -v c="$created" -v p="$pairs" 'BEGIN {printf "%.3f", c * 100 / p}')"
  : "$first_url"
}

step_dispatch() {
  local start ready_ms done_ms left created out images
  images=()
  for ((j = 1; j <= per_prefetch; j++)); do images+=("registry.example/fleet/dispatch-$j:1"); done
  prefetch_yaml dispatch "${images[@]}" | kubectl --context sim-1 apply -f - >/dev/null
  start=$(now_ms)
  start_kp dispatch
  # READY is judged; then wait until every pull pod is gone (deleted).
  until curl -fsS --max-time 5 "$kp_url/api/v1/status" 2>/dev/null |
    jq -e '[.clusters[].prefetches[] | select(.name == "dispatch")][0] | .phase == "READY" and .pulls.ready == .pulls.total' >/dev/null; do
    kill -0 "$kp_pid" 2>/dev/null || die "kube-prefetch exited"
    [ $(($(now_ms) - start)) -lt $((timeout * 1000)) ] || die "dispatch not READY after ${timeout}s"
    sleep 0.5
  done
  ready_ms=$(($(now_ms) - start))
  until [ "$(kubectl --context sim-1 -n "$namespace" get pods -o name | grep -c . || true)" -eq 0 ]; do sleep 0.5; done
  done_ms=$(($(now_ms) - start))
  created=$(metric "$kp_url" kube_prefetch_pull_pods_created_total)
  local ticks
  ticks=$(cpu_ticks "$kp_pid")
  stop_pid "$kp_pid"
  kp_pid=""
  # The same pulls with other image names, so no node lists them yet.
  local bare_images
  bare_images=$(printf 'registry.example/fleet/bare-%s:1,' $(seq 1 "$per_prefetch"))
  out=$(load bare "$kubeconfig" sim-1 "$namespace" "${bare_images%,}" "$parallel" "$api_qps")
  log "$out"
  local bare_s
  bare_s=$(sed -n 's/.*judged and deleted in \([0-9.]*\) s.*/\1/p' <<<"$out")
  printf '\n## dispatch: 1 Prefetch, %s workers x %s images, parallel %s, api_qps %s\n\n' "$workers" "$per_prefetch" "$parallel" "$api_qps"
  printf '| measure | value |\n| --- | ---: |\n'
  printf '| kube-prefetch: process start to READY | %.1f s |\n' "$(awk -v t="$ready_ms" 'BEGIN {print t / 1000}')"
  printf '| kube-prefetch: process start to all judged and deleted | %.1f s |\n' "$(awk -v t="$done_ms" 'BEGIN {print t / 1000}')"
  printf '| kube-prefetch: pull pods created / CPU | %s / %s s |\n' "$created" "$(seconds "$ticks")"
  printf '| bare loop: first create to all judged and deleted | %s s |\n' "$bare_s"
  printf '| ratio kube-prefetch / bare loop | %s |\n' "$(awk -v k="$done_ms" -v b="$bare_s" 'BEGIN {printf "%.2f", k / 1000 / b}')"
}

for step in "$@"; do
  log "step $step"
  "step_$step"
done
