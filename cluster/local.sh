#!/usr/bin/env bash
# A two-node Ray cluster on one machine: a head and a second worker node, each with bounded
# memory and object store, token authentication on. For trying `ray job submit` and multi-node
# Ray Data / Ray Train placement without a cloud account (the test in tests/cluster uses it).
#
#   cluster/local.sh start      # head + 1 worker node; prints the RAY_ADDRESS to submit to
#   cluster/local.sh status     # `ray status` against this cluster
#   cluster/local.sh address    # prints the job-submission address (http://127.0.0.1:PORT)
#   cluster/local.sh stop       # stops both nodes (only this cluster's processes)
#
# Everything lives under $RAYMIM_LOCAL_DIR (default /tmp/raymim-local): one Ray temp dir per node,
# so `stop` finds exactly this cluster's processes and never touches another Ray on the machine.
# Settings (environment variables, defaults in brackets):
#   RAYMIM_LOCAL_DIR [/tmp/raymim-local]  keep it short: Ray's unix sockets live under it
#   RAYMIM_LOCAL_PORT [6390]              GCS port; dashboard = +1, client server = +2,
#                                         dashboard agents = +3 (head) and +4 (worker)
#   RAYMIM_LOCAL_WORKERS [1]              worker nodes besides the head
#   RAYMIM_NODE_CPUS [2]                  logical CPUs per node (head and each worker)
#   RAYMIM_NODE_MEMORY_MB [3072]          Ray `memory` resource per node
#   RAYMIM_NODE_OBJECT_STORE_MB [256]     object store per node
#   RAY_AUTH_TOKEN_PATH                   token file (default ~/.ray/auth_token; created if missing)
# Nodes are started with RAY_AUTH_MODE=token; clients need the same variable and the same token.
set -euo pipefail

DIR="${RAYMIM_LOCAL_DIR:-/tmp/raymim-local}"
PORT="${RAYMIM_LOCAL_PORT:-6390}"
WORKERS="${RAYMIM_LOCAL_WORKERS:-1}"
CPUS="${RAYMIM_NODE_CPUS:-2}"
MEM_MB="${RAYMIM_NODE_MEMORY_MB:-3072}"
OBJ_MB="${RAYMIM_NODE_OBJECT_STORE_MB:-256}"
RAY="${RAY_BIN:-$(command -v ray || true)}"
if [[ -z "$RAY" ]]; then
  echo "local.sh: no \`ray\` on PATH (activate the raymim environment or set RAY_BIN)" >&2
  exit 2
fi

DASH_PORT=$((PORT + 1))
CLIENT_PORT=$((PORT + 2))
export RAY_AUTH_MODE=token

ensure_token() {
  local path="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
  if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
    return
  fi
  if [[ ! -s "$path" ]]; then
    if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
      mkdir -p "$(dirname "$path")"
      (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32), end="")' >"$path")
    else
      "$RAY" get-auth-token --generate >/dev/null
    fi
  fi
}

node_dir() { echo "$DIR/n$1"; }  # n0 = head, n1.. = workers

start_node() {  # start_node INDEX
  local i="$1" tmp
  tmp="$(node_dir "$i")"
  mkdir -p "$tmp"
  local common=(
    --temp-dir="$tmp"
    --num-cpus="$CPUS" --num-gpus=0
    --memory=$((MEM_MB * 1024 * 1024))
    --object-store-memory=$((OBJ_MB * 1024 * 1024))
    --dashboard-agent-listen-port=$((PORT + 3 + i))
    --disable-usage-stats
    --resources="{\"raymim_node_$i\": 1}"
  )
  if [[ "$i" == 0 ]]; then
    "$RAY" start --head --node-ip-address=127.0.0.1 --port="$PORT" \
      --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" --include-dashboard=true \
      --ray-client-server-port="$CLIENT_PORT" "${common[@]}"
  else
    "$RAY" start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 "${common[@]}"
  fi
}

tree() {  # tree PID...: the PIDs and all their descendants
  local p
  for p in "$@"; do
    echo "$p"
    # shellcheck disable=SC2046
    tree $(pgrep -P "$p" || true)
  done
}

node_pids() {  # node_pids INDEX: processes naming this node's temp dir, and their children
  local pat
  pat="$(node_dir "$1")(/|[[:space:]]|\$)"
  # Ray workers rename themselves (ray::IDLE, ray::RayTrainWorker), so their command lines no
  # longer name the temp dir: they are found as children of the raylet instead.
  # shellcheck disable=SC2046
  tree $(pgrep -f -- "$pat" || true) | sort -u
}

stop_node() {  # stop_node INDEX: stop the processes of one node's session only
  [[ -d "$(node_dir "$1")" ]] || return 0
  # `ray stop` kills every Ray process of the user on the machine (other clusters included);
  # instead stop the processes whose command line names this node's temp dir (gcs, raylet,
  # dashboard, agents, log monitor) and their descendants (workers). Repeat until none is left:
  # a raylet that is shutting down may still start a worker.
  local pids round
  for round in 1 2 3 4 5; do
    pids="$(node_pids "$1")"
    [[ -z "$pids" ]] && return 0
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 40); do
      pids="$(echo "$pids" | while read -r p; do kill -0 "$p" 2>/dev/null && echo "$p"; done || true)"
      [[ -z "$pids" ]] && break
      sleep 0.25
    done
    # shellcheck disable=SC2086
    [[ -n "$pids" ]] && kill -KILL $pids 2>/dev/null || true
    sleep 0.5
  done
  pids="$(node_pids "$1")"
  if [[ -n "$pids" ]]; then
    echo "local.sh: processes of node $1 still running: $pids" >&2
    return 1
  fi
}

case "${1:-}" in
  start)
    ensure_token
    mkdir -p "$DIR"
    start_node 0
    for i in $(seq 1 "$WORKERS"); do start_node "$i"; done
    echo "RAY_ADDRESS=http://127.0.0.1:$DASH_PORT"
    echo "submit with: RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:$DASH_PORT --working-dir . --runtime-env jobs/runtime_env.yaml -- raymim ..."
    ;;
  stop)
    rc=0
    for i in $(seq "$WORKERS" -1 0); do stop_node "$i" || rc=1; done
    exit "$rc"
    ;;
  status)
    "$RAY" status --address="127.0.0.1:$PORT"
    ;;
  address)
    echo "http://127.0.0.1:$DASH_PORT"
    ;;
  *)
    echo "usage: $0 start|stop|status|address" >&2
    exit 2
    ;;
esac
