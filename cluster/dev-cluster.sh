#!/usr/bin/env bash
# A multi-node Ray cluster on one machine, for development and the multi-node tests: a head and N worker
# nodes on 127.0.0.1, each its own raylet with its own ports, sockets and logical resources (these may
# exceed the physical cores). Jobs are submitted to it exactly as to a real cluster (Ray Jobs API).
#
#   bash cluster/dev-cluster.sh start [N]      # head + N workers (default 1); prints the dashboard address
#   bash cluster/dev-cluster.sh status
#   bash cluster/dev-cluster.sh kill-worker I  # SIGKILL worker node I (1..N) and its processes: a node failure
#   bash cluster/dev-cluster.sh add-worker I   # start worker node I (again)
#   bash cluster/dev-cluster.sh kill-head      # SIGKILL the head node: its GCS, raylet and what runs there (the
#                                              # drivers of jobs); the worker nodes lose the cluster (stop them)
#   bash cluster/dev-cluster.sh pids I         # node I's processes (0: the head's raylet and what it started)
#   bash cluster/dev-cluster.sh stop           # stops this cluster only (never `ray stop`, which would
#                                              # also stop every other Ray on the machine)
#
# Settings (environment): DEV_CLUSTER_PORT (GCS port, default 6390; the other ports derive from it),
# DEV_CLUSTER_CPUS (logical CPUs per node, default 2), DEV_CLUSTER_OBJECT_STORE_MB (per node, default 512).
# Node resources: the head has {"dev_head": 1}, every worker {"dev_worker": 1}.
set -euo pipefail

PORT="${DEV_CLUSTER_PORT:-6390}"
CPUS="${DEV_CLUSTER_CPUS:-2}"
STORE_BYTES=$(( ${DEV_CLUSTER_OBJECT_STORE_MB:-512} * 1024 * 1024 ))
DASHBOARD_PORT=$(( PORT + 1875 ))            # 8265 for the default 6390
STATE="${TMPDIR:-/tmp}/imgxlate-dev-cluster-$PORT"
# A dead node is noticed in ~3 s instead of ~30 s (health checks every second, 3 misses).
export RAY_health_check_period_ms="${RAY_health_check_period_ms:-1000}"
export RAY_health_check_failure_threshold="${RAY_health_check_failure_threshold:-3}"
export RAY_health_check_initial_delay_ms="${RAY_health_check_initial_delay_ms:-1000}"

RAY="$(command -v ray || true)"
if [[ -z "$RAY" ]]; then
  echo "dev-cluster: the 'ray' command is not on PATH (activate the project's environment: source jobs/env.sh)" >&2
  exit 2
fi

# Per-node port block: node k (0 = head, 1.. = workers) owns base + 10k .. base + 10k + 9, and worker
# processes ports 20000 + 500k .. + 499.
node_ports() {
  local k="$1" base=$(( PORT + 10 + 10 * $1 ))
  echo "--node-manager-port=$base --object-manager-port=$(( base + 1 )) \
--dashboard-agent-listen-port=$(( base + 2 )) --dashboard-agent-grpc-port=$(( base + 3 )) \
--metrics-export-port=$(( base + 4 )) --runtime-env-agent-port=$(( base + 5 )) \
--min-worker-port=$(( 20000 + 500 * k )) --max-worker-port=$(( 20000 + 500 * k + 499 ))"
}

start_head() {
  mkdir -p "$STATE"
  # shellcheck disable=SC2046
  "$RAY" start --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus="$CPUS" --num-gpus=0 \
    --resources='{"dev_head": 1}' --object-store-memory="$STORE_BYTES" --include-dashboard=true \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --ray-client-server-port=$(( PORT + 1 )) \
    --disable-usage-stats $(node_ports 0) >"$STATE/head.log" 2>&1 || { cat "$STATE/head.log" >&2; exit 1; }
}

start_worker() {
  local k="$1"
  # shellcheck disable=SC2046
  "$RAY" start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus="$CPUS" --num-gpus=0 \
    --resources='{"dev_worker": 1}' --object-store-memory="$STORE_BYTES" --disable-usage-stats \
    $(node_ports "$k") >"$STATE/worker$k.log" 2>&1 || { cat "$STATE/worker$k.log" >&2; exit 1; }
}

# PIDs of this cluster's processes: those that name its GCS port (GCS, raylets, dashboard, monitors,
# workers) or its dashboard port, with all their descendants (dashboard modules, agents, workers).
# Other Ray instances on the machine are left alone.
with_descendants() {
  local all="$*" level="$*" next p
  while [[ -n "$level" ]]; do
    next=""
    for p in $level; do next="$next $(pgrep -P "$p" || true)"; done
    level="$(echo $next)"
    all="$all $level"
  done
  echo $all
}
cluster_pids() {
  with_descendants $(pgrep -f -- "[0-9]:$PORT([^0-9]|$)|gcs_server_port=$PORT([^0-9]|$)|--port=$DASHBOARD_PORT([^0-9]|$)" || true)
}
node_pids() {   # worker node k: its raylet and everything the raylet started
  with_descendants $(pgrep -f -- "node.manager.port[= ]$(( PORT + 10 + 10 * $1 ))([^0-9]|$)" || true)
}

wait_nodes() {
  local want="$1"
  for _ in $(seq 1 120); do
    local n
    n=$(RAY_ADDRESS="127.0.0.1:$PORT" python - <<'EOF' 2>/dev/null || echo 0
import ray
ray.init(logging_level="ERROR")
print(sum(1 for n in ray.nodes() if n["Alive"]))
EOF
)
    [[ "$n" == "$want" ]] && return 0
    sleep 0.5
  done
  echo "dev-cluster: expected $want alive nodes" >&2
  return 1
}

case "${1:-}" in
  start)
    n="${2:-1}"
    if [[ -n "$(cluster_pids)" ]]; then
      echo "dev-cluster: already running on port $PORT (stop it first)" >&2
      exit 1
    fi
    start_head
    for k in $(seq 1 "$n"); do start_worker "$k"; done
    wait_nodes $(( n + 1 ))
    echo "dev-cluster: head + $n worker node(s) on 127.0.0.1, $CPUS logical CPUs each"
    echo "  Ray address:   127.0.0.1:$PORT"
    echo "  dashboard/Jobs API: http://127.0.0.1:$DASHBOARD_PORT"
    ;;
  add-worker)
    start_worker "${2:?worker index}"
    ;;
  kill-worker)
    k="${2:?worker index}"
    pids=$(node_pids "$k")
    [[ -n "$pids" ]] || { echo "dev-cluster: worker $k is not running" >&2; exit 1; }
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    echo "dev-cluster: killed worker node $k (pids: $(echo $pids | tr '\n' ' '))"
    ;;
  kill-head)
    # Everything of this cluster but the worker nodes (their raylets and what they started).
    workers=" $(for k in $(seq 1 32); do node_pids "$k"; done | tr '\n' ' ') "
    pids=""
    for p in $(cluster_pids); do [[ "$workers" == *" $p "* ]] || pids="$pids $p"; done
    [[ -n "$pids" ]] || { echo "dev-cluster: the head is not running" >&2; exit 1; }
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    echo "dev-cluster: killed the head node (pids:$pids)"
    ;;
  pids)
    node_pids "${2:?node index (0: head)}"
    ;;
  status)
    RAY_ADDRESS="127.0.0.1:$PORT" "$RAY" status 2>/dev/null || { echo "dev-cluster: not running"; exit 1; }
    ;;
  stop)
    pids=$(cluster_pids)
    if [[ -n "$pids" ]]; then
      # shellcheck disable=SC2086
      kill $pids 2>/dev/null || true
      for _ in $(seq 1 50); do [[ -z "$(cluster_pids)" ]] && break; sleep 0.2; done
      pids=$(cluster_pids)
      # shellcheck disable=SC2086
      [[ -z "$pids" ]] || kill -9 $pids 2>/dev/null || true
    fi
    rm -rf "$STATE"
    echo "dev-cluster: stopped"
    ;;
  *)
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
