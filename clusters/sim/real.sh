# Real nodes (a real kubelet, containerd and runc each) and local registries
# for clusters/sim. Sourced by build, up, down and push-image after lib.sh.
# Facts behind every choice here: shared/notes/real-node.md.
# shellcheck shell=bash

CONTAINERD_VERSION=v2.4.2
RUNC_VERSION=v1.5.2
CRANE_VERSION=v0.22.1
# github.com/distribution/distribution: the registry with htpasswd auth.
REGISTRY_VERSION=v3.1.2
CRICTL_VERSION=v1.37.0

# Keyed by every version, like SIM_BIN: a bump rebuilds, a fresh clone reuses.
REAL_BIN=$SIM_CACHE_ROOT/real-kubelet-$K8S_VERSION-containerd-$CONTAINERD_VERSION-runc-$RUNC_VERSION-crane-$CRANE_VERSION-registry-$REGISTRY_VERSION-crictl-$CRICTL_VERSION
# The test programs are rebuilt when their source changes.
images_key() { cat "$SIM_DIR"/go/images/go.mod "$SIM_DIR"/go/images/*/*.go | sha256sum | cut -c1-12; }
IMAGES_BIN=$SIM_CACHE_ROOT/images-$(images_key)

# Real nodes join cluster sim-1 only.
REAL_CLUSTER=1
REAL_MAX_NODES=9
REAL_RUN=$SIM_RUN/real-nodes
REGISTRY_RUN=$SIM_RUN/registries
# The CNI plugins Debian's containernetworking-plugins installs.
CNI_BIN_DIR=/usr/lib/cni
# Each node's own cgroup parent in every v1 hierarchy (this machine runs the
# hybrid layout), so `down` removes exactly ours.
REAL_CGROUP_TOP=kube-prefetch-sim-$SIM_PORT_OFFSET

# How long a node may go without a heartbeat before the node lifecycle
# controller marks it NotReady. Fake nodes beat every 20-40 s (stages.yaml), so
# less than 50 s would flap them; the real kubelet renews its lease every 10 s.
NODE_MONITOR_GRACE=${SIM_NODE_MONITOR_GRACE:-60s}

registry_port() { # plain | auth | slow
  case $1 in
    plain) echo $((5000 + SIM_PORT_OFFSET)) ;;
    auth) echo $((5001 + SIM_PORT_OFFSET)) ;;
    slow) echo $((5002 + SIM_PORT_OFFSET)) ;;
    *) die "unknown registry '$1' (plain, auth or slow)" ;;
  esac
}
registry_host() { echo "127.0.0.1:$(registry_port "$1")"; }
# The slow registry serves the plain one's content at this many bytes per second.
SLOW_REGISTRY_RATE=$((4 * 1024 * 1024))
REGISTRY_USER=sim

kubelet_port() { echo $((10350 + SIM_PORT_OFFSET + ($1 - 1) * 10)); }
kubelet_healthz_port() { echo $((10358 + SIM_PORT_OFFSET + ($1 - 1) * 10)); }

real_node_name() { # k (1-based)
  if [ "$1" -eq 1 ]; then echo "$(cluster_name "$REAL_CLUSTER")-real-worker"
  else echo "$(cluster_name "$REAL_CLUSTER")-real-worker$1"
  fi
}
real_node_dir() { echo "$REAL_RUN/$(real_node_name "$1")"; }
# Linux bridge names have at most 15 characters.
real_bridge() { echo "kp${SIM_PORT_OFFSET}br$1" | cut -c1-15; }
real_cni_network() { echo "kube-prefetch-sim-$SIM_PORT_OFFSET-$1"; }
real_subnet() { echo "10.250.$1.0/24"; }

# Indices of the real nodes that have a directory.
existing_real_nodes() {
  local d k
  for d in "$REAL_RUN"/*/; do
    [ -f "$d/index" ] || continue
    k=$(cat "$d/index")
    [[ $k =~ ^[0-9]+$ ]] && echo "$k"
  done | sort -n
}

# Every port a real node or registry may listen on, for check-ports.
real_ports() {
  local k
  registry_port plain; registry_port auth; registry_port slow
  for ((k = 1; k <= REAL_MAX_NODES; k++)); do kubelet_port "$k"; kubelet_healthz_port "$k"; done
}

need_real_debian_packages() {
  local absent=() pkg
  for pkg in containernetworking-plugins libseccomp-dev pkg-config apache2-utils iptables gcc libc6-dev; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || absent+=("$pkg")
  done
  [ ${#absent[@]} -gt 0 ] || return 0
  log "installing Debian packages for real nodes: ${absent[*]}"
  if [ "$(id -u)" -ne 0 ]; then die "need root to apt-get install ${absent[*]}"; fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${absent[@]}" >/dev/null
}

# go install of a pinned module version into REAL_BIN. Args: name cgo tags ldflags package@version
real_go_install() {
  local name=$1 cgo=$2 tags=$3 flags=$4 pkg=$5 start=$SECONDS tmp
  if [ -x "$REAL_BIN/$name" ]; then return 0; fi
  log "building $name ($pkg) ..."
  tmp=$(mktemp -d "$SIM_CACHE_ROOT/.gobin.XXXXXX")
  CGO_ENABLED=$cgo GOTOOLCHAIN=local GOBIN=$tmp go install -trimpath -tags "$tags" -ldflags "$flags" "$pkg"
  mv "$tmp/$name" "$REAL_BIN/$name"
  rm -rf "$tmp"
  log "built $name in $((SECONDS - start)) s"
}

# Everything but the kubelet, which `build` makes like kube-apiserver.
build_real() {
  need_real_debian_packages
  mkdir -p "$REAL_BIN" "$IMAGES_BIN"
  local cd_pkg=github.com/containerd/containerd/v2/cmd
  real_go_install containerd 0 "no_btrfs,no_devmapper,no_zfs" \
    "-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" "$cd_pkg/containerd@$CONTAINERD_VERSION"
  real_go_install containerd-shim-runc-v2 0 "" "-s -w" "$cd_pkg/containerd-shim-runc-v2@$CONTAINERD_VERSION"
  real_go_install ctr 0 "" "-s -w" "$cd_pkg/ctr@$CONTAINERD_VERSION"
  # runc needs cgo: its nsexec is C.
  real_go_install runc 1 seccomp "-X main.version=${RUNC_VERSION#v}" "github.com/opencontainers/runc@$RUNC_VERSION"
  real_go_install crane 0 "" "-s -w" "github.com/google/go-containerregistry/cmd/crane@$CRANE_VERSION"
  real_go_install registry 0 "" "-s -w" "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION"
  real_go_install crictl 0 "" "-s -w" "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
  local prog
  for prog in pause hello slowproxy; do
    [ -x "$IMAGES_BIN/$prog" ] && continue
    (cd "$SIM_DIR/go/images" && CGO_ENABLED=0 GOTOOLCHAIN=local go build -trimpath -ldflags "-s -w" -o "$IMAGES_BIN/$prog.tmp" "./$prog")
    mv "$IMAGES_BIN/$prog.tmp" "$IMAGES_BIN/$prog"
  done
  log "real-node binaries ready in $REAL_BIN"
}

# ---- registries ----

registry_dir() { echo "$REGISTRY_RUN/$1"; }

registry_ready() { # name
  local code
  code=$(curl -sS --max-time 2 -o /dev/null -w '%{http_code}' "http://$(registry_host "$1")/v2/" 2>/dev/null || true)
  [ "$code" = 200 ] || [ "$code" = 401 ]
}

# True once a daemon started by start_daemon_in has written its pid file and
# exited; false while it is still starting (no pid file yet) or running.
daemon_exited() { # pidfile
  [ -f "$1" ] && ! pid_running "$1"
}

# Starts a daemon like start_daemon, with the pid and log file in a given dir.
start_daemon_in() { # dir name binary args...
  local dir=$1 name=$2
  shift 2
  # shellcheck disable=SC2016 # $$ and $@ belong to the inner shell
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$dir/$name.pid" "$@" \
    </dev/null >>"$dir/$name.log" 2>&1 9>&- &
}

write_registry_config() { # name
  local name=$1 dir
  dir=$(registry_dir "$name")
  {
    cat <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: $(registry_host "$name")
EOF
    if [ "$name" = auth ]; then
      cat <<EOF
auth:
  htpasswd:
    realm: kube-prefetch-sim
    path: $dir/htpasswd
EOF
    fi
  } >"$dir/config.yml"
}

# The auth registry's password, and a docker config that holds it (for
# crane, for tests and for imagePullSecrets).
make_registry_credentials() {
  local dir password auth
  dir=$(registry_dir auth)
  password=$(openssl rand -hex 16)
  htpasswd -Bbn "$REGISTRY_USER" "$password" >"$dir/htpasswd"
  printf '%s\n' "$password" >"$dir/password"
  auth=$(printf '%s:%s' "$REGISTRY_USER" "$password" | base64 -w0)
  mkdir -p "$dir/docker-config"
  printf '{"auths":{"%s":{"username":"%s","password":"%s","auth":"%s"}}}\n' \
    "$(registry_host auth)" "$REGISTRY_USER" "$password" "$auth" >"$dir/docker-config/config.json"
  chmod 600 "$dir/htpasswd" "$dir/password" "$dir/docker-config/config.json"
}

start_registries() {
  local name dir deadline
  for name in plain auth slow; do
    dir=$(registry_dir "$name")
    pidfile_alive "$dir/registry.pid" && continue
    rm -rf "$dir"
    mkdir -p "$dir/data"
    if [ "$name" = slow ]; then
      start_daemon_in "$dir" registry "$IMAGES_BIN/slowproxy" "$(registry_host slow)" \
        "http://$(registry_host plain)" "$SLOW_REGISTRY_RATE"
      continue
    fi
    [ "$name" != auth ] || make_registry_credentials
    write_registry_config "$name"
    start_daemon_in "$dir" registry "$REAL_BIN/registry" serve "$dir/config.yml"
  done
  for name in plain auth slow; do
    dir=$(registry_dir "$name")
    deadline=$((SECONDS + 30))
    until registry_ready "$name"; do
      if daemon_exited "$dir/registry.pid"; then fail_with_log "$dir/registry.log" "registry $name exited during startup"; fi
      [ $SECONDS -lt "$deadline" ] || fail_with_log "$dir/registry.log" "registry $name not answering on $(registry_host "$name") after 30 s"
      sleep 0.2
    done
  done
}

stop_registries() {
  local name
  for name in slow auth plain; do stop_pidfile "$(registry_dir "$name")/registry.pid" 20; done
}

# The images every real-node test may use; see the README's table.
push_test_images() {
  local push=$SIM_DIR/push-image
  [ -f "$REGISTRY_RUN/images-pushed" ] && return 0
  log "pushing test images to $(registry_host plain) and $(registry_host auth)"
  "$push" --binary "$IMAGES_BIN/pause" pause:3.10 >/dev/null
  "$push" test/noshell:1 >/dev/null
  "$push" --user root test/rootuser:1 >/dev/null
  "$push" --arch amd64,arm64 test/multi:1 >/dev/null
  "$push" --size 48 test/big:1 >/dev/null
  "$push" --registry auth private/secret:1 >/dev/null
  touch "$REGISTRY_RUN/images-pushed"
}

# ---- real nodes ----

host_node_ip() {
  # The kubelet refuses a loopback node IP; any of this machine's own
  # addresses will do: nothing ever connects to it.
  ip -4 -o addr show scope global 2>/dev/null | awk '{split($4, a, "/"); print a[1]; exit}'
}

make_node_cert() { # k
  local k=$1 dir pki name
  dir=$(real_node_dir "$k")
  pki=$(cluster_dir "$REAL_CLUSTER")/pki
  name=$(real_node_name "$k")
  mkdir -p "$dir/pki"
  openssl req -newkey rsa:2048 -nodes -sha256 -keyout "$dir/pki/node.key" -out "$dir/pki/node.csr" \
    -subj "/O=system:nodes/CN=system:node:$name" 2>/dev/null
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' >"$dir/pki/node.ext"
  openssl x509 -req -sha256 -days 3650 -in "$dir/pki/node.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -extfile "$dir/pki/node.ext" -out "$dir/pki/node.crt" 2>/dev/null
  chmod 600 "$dir/pki/node.key"
  cat >"$dir/kubelet.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: $(cluster_name "$REAL_CLUSTER")
  cluster:
    server: $(api_url "$REAL_CLUSTER")
    certificate-authority: $pki/ca.crt
users:
- name: $name
  user:
    client-certificate: $dir/pki/node.crt
    client-key: $dir/pki/node.key
contexts:
- name: $name
  context:
    cluster: $(cluster_name "$REAL_CLUSTER")
    user: $name
current-context: $name
EOF
}

write_containerd_config() { # k
  local k=$1 dir reg
  dir=$(real_node_dir "$k")
  mkdir -p "$dir/containerd" "$dir/certs.d" "$dir/cni/conf"
  for reg in plain auth slow; do
    mkdir -p "$dir/certs.d/$(registry_host "$reg")"
    cat >"$dir/certs.d/$(registry_host "$reg")/hosts.toml" <<EOF
server = "http://$(registry_host "$reg")"
[host."http://$(registry_host "$reg")"]
  capabilities = ["pull", "resolve"]
EOF
  done
  cat >"$dir/containerd/config.toml" <<EOF
version = 3
root = "$dir/containerd/root"
state = "$dir/containerd/state"
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
[plugins."io.containerd.cri.v1.runtime"]
  # Root here lacks CAP_SYS_RESOURCE: runc must never lower oom_score_adj.
  restrict_oom_score_adj = true
  # Pod network namespaces under our state dir, not /run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "$REAL_BIN/runc"
        Root = "$dir/containerd/runc"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["$CNI_BIN_DIR"]
    conf_dir = "$dir/cni/conf"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$(registry_host plain)/pause:3.10"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "$dir/certs.d"
[plugins."io.containerd.nri.v1.nri"]
  # NRI's socket is a fixed host path: two containerds would share it.
  disable = true
EOF
  # L2 only (no gateway, no routes): pull pods never talk off the node, and
  # a gateway bridge would switch on net.ipv4.ip_forward for the whole host.
  cat >"$dir/cni/conf/10-kube-prefetch-sim.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$(real_cni_network "$k")",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$(real_bridge "$k")",
      "isGateway": false,
      "ipMasq": false,
      "hairpinMode": false,
      "ipam": {"type": "host-local", "dataDir": "$dir/cni/ipam", "ranges": [[{"subnet": "$(real_subnet "$k")"}]]}
    },
    {"type": "loopback"}
  ]
}
EOF
}

write_kubelet_config() { # k
  local k=$1 dir
  dir=$(real_node_dir "$k")
  cat >"$dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: $(kubelet_port "$k")
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $(kubelet_healthz_port "$k")
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
cgroupDriver: cgroupfs
cgroupRoot: /$REAL_CGROUP_TOP/$(real_node_name "$k")
# This machine has the hybrid cgroup layout (v1 controllers).
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://$dir/containerd.sock
imageServiceEndpoint: unix://$dir/containerd.sock
serializeImagePulls: true
registerNode: true
nodeStatusUpdateFrequency: 10s
nodeStatusReportFrequency: 10s
syncFrequency: 10s
# Never garbage-collect images by disk use: tests check what was pulled.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
resolvConf: /etc/resolv.conf
# Leave the host's iptables alone.
makeIPTablesUtilChains: false
podLogsDir: $dir/pod-logs
volumePluginDir: $dir/volume-plugins
EOF
}

make_node_cgroups() { # k
  local h top name
  name=$(real_node_name "$1")
  for h in /sys/fs/cgroup/*/; do
    [ -d "$h" ] || continue
    top=$h$REAL_CGROUP_TOP
    mkdir -p "$top/$name"
    if [ -f "${h}cpuset.cpus" ]; then
      # A new cpuset has no cpus or mems: copy the parent's, top down.
      grep -q . "$top/cpuset.cpus" || cat "${h}cpuset.cpus" >"$top/cpuset.cpus"
      grep -q . "$top/cpuset.mems" || cat "${h}cpuset.mems" >"$top/cpuset.mems"
      grep -q . "$top/$name/cpuset.cpus" || cat "$top/cpuset.cpus" >"$top/$name/cpuset.cpus"
      grep -q . "$top/$name/cpuset.mems" || cat "$top/cpuset.mems" >"$top/$name/cpuset.mems"
    fi
  done
}

real_node_healthy() { # k
  local dir
  dir=$(real_node_dir "$1")
  pidfile_alive "$dir/containerd.pid" && pidfile_alive "$dir/kubelet.pid"
}

start_containerd() { # k
  local dir deadline
  dir=$(real_node_dir "$1")
  [ ${#dir} -lt 90 ] || die "run dir too deep for containerd's unix socket ($dir/containerd.sock, ${#dir} characters); set KUBE_PREFETCH_SIM_RUN to a shorter path"
  # PATH first: containerd finds its shim (and the shim runc) through PATH.
  start_daemon_in "$dir" containerd env "PATH=$REAL_BIN:$PATH" "$REAL_BIN/containerd" --config "$dir/containerd/config.toml"
  deadline=$((SECONDS + 30))
  until [ -S "$dir/containerd.sock" ] && "$REAL_BIN/ctr" -a "$dir/containerd.sock" version >/dev/null 2>&1; do
    if daemon_exited "$dir/containerd.pid"; then fail_with_log "$dir/containerd.log" "containerd of $(real_node_name "$1") exited during startup"; fi
    [ $SECONDS -lt "$deadline" ] || fail_with_log "$dir/containerd.log" "containerd of $(real_node_name "$1") not answering after 30 s"
    sleep 0.2
  done
}

start_kubelet() { # k
  local k=$1 dir ip
  dir=$(real_node_dir "$k")
  ip=$(host_node_ip)
  [ -n "$ip" ] || die "no non-loopback IPv4 address on this machine: the kubelet refuses a loopback node IP"
  mkdir -p "$dir/kubelet" "$dir/pod-logs" "$dir/volume-plugins"
  start_daemon_in "$dir" kubelet "$REAL_BIN/kubelet" \
    --config "$dir/kubelet.yaml" --kubeconfig "$dir/kubelet.kubeconfig" \
    --root-dir "$dir/kubelet" --cert-dir "$dir/kubelet/pki" \
    --hostname-override "$(real_node_name "$k")" --node-ip "$ip" \
    --node-labels kube-prefetch.sim/real-node=true --v=1
}

# Starts real node k of sim-1 (no-op if it runs).
start_real_node() { # k
  local k=$1 dir
  dir=$(real_node_dir "$k")
  if real_node_healthy "$k"; then return 0; fi
  # A stopped kubelet (say by a test) comes back on the same containerd,
  # with the images it had.
  if pidfile_alive "$dir/containerd.pid" && [ -f "$dir/kubelet.yaml" ]; then
    start_kubelet "$k"
    return 0
  fi
  stop_real_node "$k"
  mkdir -p "$dir"
  echo "$k" >"$dir/index"
  make_node_cert "$k"
  write_containerd_config "$k"
  write_kubelet_config "$k"
  make_node_cgroups "$k"
  start_containerd "$k"
  start_kubelet "$k"
}

# kube-controller-manager with only the node lifecycle controller: what marks
# a node whose kubelet stopped NotReady (Ready=Unknown) and taints it
# unreachable in a real cluster. No port (--secure-port 0), no leader election.
start_node_lifecycle_controller() {
  if pidfile_alive "$REAL_RUN/kube-controller-manager.pid"; then return 0; fi
  mkdir -p "$REAL_RUN"
  start_daemon_in "$REAL_RUN" kube-controller-manager "$REAL_BIN/kube-controller-manager" \
    --kubeconfig "$(cluster_dir "$REAL_CLUSTER")/admin.kubeconfig" \
    --controllers node-lifecycle-controller \
    --node-monitor-grace-period "$NODE_MONITOR_GRACE" \
    --secure-port 0 --leader-elect=false --use-service-account-credentials=false \
    --profiling=false
}

# The kubelet runs with system:node rights (RBAC here has no Node authorizer).
bind_node_role() {
  kubectl_admin "$REAL_CLUSTER" get clusterrolebinding kube-prefetch-sim-nodes >/dev/null 2>&1 ||
    kubectl_admin "$REAL_CLUSTER" create clusterrolebinding kube-prefetch-sim-nodes \
      --clusterrole system:node --group system:nodes >/dev/null
}

wait_real_nodes_ready() { # count
  local k name deadline=$((SECONDS + 120)) status
  for ((k = 1; k <= $1; k++)); do
    name=$(real_node_name "$k")
    while :; do
      status=$(kubectl_admin "$REAL_CLUSTER" get node "$name" -o \
        jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null || true)
      [ "$status" != True ] || break
      if daemon_exited "$(real_node_dir "$k")/kubelet.pid"; then
        fail_with_log "$(real_node_dir "$k")/kubelet.log" "kubelet of $name exited during startup"
      fi
      [ $SECONDS -lt "$deadline" ] ||
        fail_with_log "$(real_node_dir "$k")/kubelet.log" "real node $name not Ready after 120 s (Ready=$status)"
      sleep 0.5
    done
  done
}

# Processes started from our binaries whose command line names this dir
# (containerd's shims), not zombies.
pids_of_dir() { # dir
  local p exe state
  for p in /proc/[0-9]*; do
    exe=$(readlink "$p/exe" 2>/dev/null) || continue
    [[ ${exe% (deleted)} == "$REAL_BIN"/* ]] || continue
    state=$(awk '{print $3}' "$p/stat" 2>/dev/null) || continue
    [ "$state" != Z ] || continue
    tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF "$1" && echo "${p#/proc/}"
  done
}

# Mount points at or under a dir, deepest first.
mounts_under() { # dir
  awk -v d="$1" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo | sort -r | uniq
}

cgroup_dirs_of() { # node name
  local h
  for h in /sys/fs/cgroup/*/; do
    [ -d "$h$REAL_CGROUP_TOP/$1" ] && echo "$h$REAL_CGROUP_TOP/$1"
  done
}

# Stops real node k and removes everything it made: pods (sandboxes, their
# network namespaces and veths), containers, shims, mounts, cgroups, the
# bridge, the CNI result cache and its kubelet's log links; by pid and path.
stop_real_node() { # k
  local k=$1 dir name sock pid m c
  dir=$(real_node_dir "$k")
  name=$(real_node_name "$k")
  [ -d "$dir" ] || return 0
  sock=$dir/containerd.sock
  stop_pidfile "$dir/kubelet.pid" 20
  if pidfile_alive "$dir/containerd.pid"; then
    # Through CRI, so each sandbox's network is torn down too.
    "$REAL_BIN/crictl" --runtime-endpoint "unix://$sock" --timeout 20s rmp -fa >/dev/null 2>&1 || true
    for c in $("$REAL_BIN/ctr" -a "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
      "$REAL_BIN/ctr" -a "$sock" -n k8s.io tasks kill -s SIGKILL "$c" >/dev/null 2>&1 || true
      "$REAL_BIN/ctr" -a "$sock" -n k8s.io tasks rm -f "$c" >/dev/null 2>&1 || true
    done
  fi
  stop_pidfile "$dir/containerd.pid" 20
  # Shims outlive containerd by design; ours name our socket.
  for _ in 1 2 3; do
    pid=$(pids_of_dir "$dir")
    [ -n "$pid" ] || break
    # shellcheck disable=SC2086 # a list of pids
    kill -KILL $pid 2>/dev/null || true
    sleep 0.3
  done
  # Anything left in the node's cgroups (container processes) goes too.
  for c in $(cgroup_dirs_of "$name"); do
    while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done < <(find "$c" -name cgroup.procs -exec cat {} + 2>/dev/null)
  done
  for _ in $(seq 1 20); do
    [ -z "$(pids_of_dir "$dir")" ] && break
    sleep 0.2
  done
  while read -r m; do
    [ -n "$m" ] && { umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; }
  done < <(mounts_under "$dir")
  for c in $(cgroup_dirs_of "$name"); do find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null || true; done
  ip link del "$(real_bridge "$k")" 2>/dev/null || true
  rm -f /var/lib/cni/results/"$(real_cni_network "$k")"-* 2>/dev/null || true
  find /var/log/containers -maxdepth 1 -type l -lname "$dir/*" -delete 2>/dev/null || true
  if [ -n "$(mounts_under "$dir")" ]; then die "mounts left under $dir: $(mounts_under "$dir" | tr '\n' ' ')"; fi
  rm -rf "$dir"
}

stop_real_nodes() {
  local k h
  stop_pidfile "$REAL_RUN/kube-controller-manager.pid" 20
  rm -f "$REAL_RUN/kube-controller-manager.pid" "$REAL_RUN/kube-controller-manager.log"
  for k in $(existing_real_nodes); do
    log "stopping real node $(real_node_name "$k")"
    stop_real_node "$k"
  done
  for h in /sys/fs/cgroup/*/; do [ -d "$h$REAL_CGROUP_TOP" ] && rmdir "$h$REAL_CGROUP_TOP" 2>/dev/null; done
  rmdir "$REAL_RUN" 2>/dev/null || true
}

# What tests and people need to use the real nodes, as JSON.
write_real_info() { # count
  local k nodes="" sep=""
  for ((k = 1; k <= $1; k++)); do
    nodes+="$sep{\"name\":\"$(real_node_name "$k")\",\"dir\":\"$(real_node_dir "$k")\",\"containerd_socket\":\"$(real_node_dir "$k")/containerd.sock\"}"
    sep=,
  done
  cat >"$SIM_RUN/real-nodes.json" <<EOF
{
  "cluster": "$(cluster_name "$REAL_CLUSTER")",
  "registries": {"plain": "$(registry_host plain)", "auth": "$(registry_host auth)", "slow": "$(registry_host slow)"},
  "slow_registry_bytes_per_second": $SLOW_REGISTRY_RATE,
  "auth": {"username": "$REGISTRY_USER", "password": "$(cat "$(registry_dir auth)/password")"},
  "bin": {"ctr": "$REAL_BIN/ctr", "crictl": "$REAL_BIN/crictl", "crane": "$REAL_BIN/crane"},
  "nodes": [$nodes]
}
EOF
}
