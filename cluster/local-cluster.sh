#!/usr/bin/env bash
# A real 2-node Ray cluster on loopback (one head + one worker node, both on this
# machine), for trying `ray job submit -- pseudobox <stage> ...` end to end without a
# cloud account.
#
#   bash cluster/local-cluster.sh start    # start both nodes; prints the job-submit address
#   bash cluster/local-cluster.sh status   # the processes this script started
#   bash cluster/local-cluster.sh stop     # stop exactly those processes (never `ray stop`)
#
# Then, from the repository root:
#   export RAY_AUTH_MODE=token
# No per-node metrics exporter: it would listen on all interfaces and answer /metrics
# without the token (docs/operations.md, section 7). torch.distributed's Gloo traffic
# between Train workers stays on the loopback interface.
export RAY_enable_metrics_collection=${RAY_enable_metrics_collection:-0}
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
#   .venv/bin/ray job submit --address http://127.0.0.1:8299 --working-dir . -- \
#       pseudobox mine --config configs/demo/mine.yaml \
#       corpus=$PWD/pseudobox-demo/corpus checkpoint=$PWD/pseudobox-demo/classifier \
#       output=$PWD/pseudobox-demo/boxes-cluster
#
# (after `pseudobox demo` has made ./pseudobox-demo). Data paths in a job must be
# absolute or s3://: the job runs inside an uploaded copy of the working directory, so
# pseudobox refuses a relative data path there. Your shell expands $PWD before submitting;
# on loopback every node sees the same files. `--config` stays relative: the configs are
# uploaded with the working directory.
#
# Why it is built this way:
#   * Token auth (RAY_AUTH_MODE=token): `ray start` then requires a token (kept in
#     ~/.ray/auth_token) from every client; `ray job submit` needs the same variable.
#   * Loopback node address: every node advertises NODE_IP (default 127.0.0.2), so all
#     traffic between the nodes, the drivers and the dashboard stays on loopback.
#     environment-notes.md says --node-ip-address=127.0.0.1; on Ray 2.60 that value is
#     rewritten to the machine's routable address (ray._private.services.
#     resolve_ip_for_localhost: "localhost", 127.0.0.1 and ::1 are replaced), as the
#     "Local node IP" line in head.log shows. 127.0.0.2 is loopback on Linux too and Ray
#     keeps it verbatim. The worker joins the GCS at NODE_IP too, because an --address
#     of 127.0.0.1 is rewritten the same way. NODE_IP=127.0.0.1 reproduces the notes.
#     Whatever the node address, Ray's gRPC servers (GCS, raylets, workers) listen on
#     all interfaces, and token auth is what guards them. The dashboard (job API)
#     listens on 127.0.0.1 only.
#   * Fixed ports outside Ray's worker port range 10002-19999 (the head refuses to start
#     otherwise) and away from Ray's defaults (6379, 8265, 10001, 52365), so that another
#     Ray instance on this machine (a plain `ray.init()`, a test suite) is not disturbed.
#   * Its own --temp-dir: `ray start` writes <temp-dir>/ray_current_cluster, and a plain
#     `ray.init()` anywhere on this machine connects to the cluster named in
#     /tmp/ray/ray_current_cluster. Keeping ours elsewhere means other users' local
#     `ray.init()` calls keep starting their own instances.
#   * `ray stop` kills every Ray process on the machine by name, including other people's.
#     `stop` here kills only processes whose command line names this cluster's temp dir
#     (gcs_server, raylet, dashboard, agents, monitors) plus their descendants (workers,
#     actors, job drivers), first with SIGTERM, then SIGKILL after a grace period.
#
# Settings (environment variables): RAY (the ray CLI; default .venv/bin/ray),
# PSEUDOBOX_LOCAL_CLUSTER_DIR (state, logs and Ray temp dir; default /tmp/pbx-local-cluster),
# GCS_PORT (6390), DASHBOARD_PORT (8299), CLIENT_PORT (23001), HEAD_AGENT_PORT (23011),
# WORKER_AGENT_PORT (23012), NODE_IP (127.0.0.2), CPUS_PER_NODE (1),
# OBJECT_STORE_BYTES (200000000), GRACE_SECONDS (15).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RAY=${RAY:-$REPO/.venv/bin/ray}
STATE=${PSEUDOBOX_LOCAL_CLUSTER_DIR:-/tmp/pbx-local-cluster}
# Unix socket paths under the temp dir must stay short (< 108 bytes), so keep STATE short.
TEMP_DIR=$STATE/ray
PIDFILE=$STATE/pids
GCS_PORT=${GCS_PORT:-6390}
DASHBOARD_PORT=${DASHBOARD_PORT:-8299}
CLIENT_PORT=${CLIENT_PORT:-23001}
HEAD_AGENT_PORT=${HEAD_AGENT_PORT:-23011}
WORKER_AGENT_PORT=${WORKER_AGENT_PORT:-23012}
CPUS_PER_NODE=${CPUS_PER_NODE:-1}
OBJECT_STORE_BYTES=${OBJECT_STORE_BYTES:-200000000}
GRACE_SECONDS=${GRACE_SECONDS:-15}
NODE_IP=${NODE_IP:-127.0.0.2}

export RAY_AUTH_MODE=token
# Job entrypoints run `python`/`pseudobox` from the nodes' PATH: put the venv first.
export PATH="$(cd "$(dirname "$RAY")" && pwd):$PATH"

# Is this command line one of ours? Ray's own processes name our temp dir; the Ray
# client server names no temp dir, so it is recognised by our two ports.
is_our_cmdline() {
  case "$1" in
    *"$TEMP_DIR"*) return 0 ;;
    *ray.util.client.server*"--port=$CLIENT_PORT "*) case "$1" in *":$GCS_PORT "*) return 0 ;; esac ;;
  esac
  return 1
}

# Current processes with one of our command lines (this shell excluded).
matching_pids() {
  local p cmd
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [ "$p" = "$$" ] && continue
    cmd=$(tr '\0' ' ' 2>/dev/null < "/proc/$p/cmdline") || continue
    is_our_cmdline "$cmd" && echo "$p"
  done
  return 0
}

# The given pids plus all their descendants (still alive).
with_descendants() {
  local roots=" $* " changed=1 pid ppid
  local table
  table=$(ps -eo pid=,ppid=)
  while [ $changed = 1 ]; do
    changed=0
    while read -r pid ppid; do
      case "$roots" in *" $ppid "*) case "$roots" in *" $pid "*) ;; *) roots="$roots$pid "; changed=1 ;; esac ;; esac
    done <<< "$table"
  done
  for pid in $roots; do
    [ -d "/proc/$pid" ] && echo "$pid"
  done
}

# Recorded pids that still belong to this cluster (the command line is checked again,
# against pid reuse), plus any current process of ours, plus all their descendants.
our_pids() {
  local roots="" p cmd
  if [ -f "$PIDFILE" ]; then
    for p in $(cat "$PIDFILE"); do
      cmd=$(tr '\0' ' ' 2>/dev/null < "/proc/$p/cmdline") || continue
      is_our_cmdline "$cmd" && roots="$roots $p"
    done
  fi
  roots="$roots $(matching_pids | tr '\n' ' ')"
  # shellcheck disable=SC2086
  [ -n "${roots// /}" ] && with_descendants $roots | sort -un
  return 0
}

port_in_use() {  # 0 when something accepts connections on 127.0.0.1:$1
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

record_pids() {
  our_pids > "$PIDFILE.tmp"
  mv "$PIDFILE.tmp" "$PIDFILE"
}

alive() {  # the given pids that still exist (zombies count as gone)
  local p
  for p in "$@"; do
    [ -d "/proc/$p" ] && [ "$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" != Z ] && echo "$p"
  done
  return 0
}

term_and_wait() {  # SIGTERM the given pids, wait up to GRACE_SECONDS for them to exit
  local i
  [ $# = 0 ] && return 0
  kill -TERM "$@" 2>/dev/null || true
  for ((i = 0; i < GRACE_SECONDS * 4; i++)); do
    [ -z "$(alive "$@")" ] && return 0
    sleep 0.25
  done
}

do_stop() {
  local pids gcs="" rest="" p cmd survivors left
  pids=$(our_pids | tr '\n' ' ')
  if [ -z "${pids// /}" ]; then
    echo "local cluster: nothing of ours is running (state in $STATE)"
    rm -f "$PIDFILE"
    return 0
  fi
  echo "local cluster: stopping $(echo $pids | wc -w) process(es): $pids"
  # Like `ray stop`, but only ours: everything but the GCS first (raylets take their
  # workers down with them), then the GCS, then SIGKILL whatever is left.
  for p in $pids; do
    cmd=$(tr '\0' ' ' 2>/dev/null < "/proc/$p/cmdline") || continue
    case "$cmd" in *gcs_server*) gcs="$gcs $p" ;; *) rest="$rest $p" ;; esac
  done
  # shellcheck disable=SC2086
  term_and_wait $rest
  # shellcheck disable=SC2086
  term_and_wait $gcs
  # Workers started after the first scan, or processes that ignored SIGTERM.
  survivors=$(our_pids | tr '\n' ' ')
  if [ -n "${survivors// /}" ]; then
    echo "local cluster: SIGKILL to $survivors"
    # shellcheck disable=SC2086
    kill -KILL $survivors 2>/dev/null || true
    sleep 1
  fi
  rm -f "$PIDFILE" "$TEMP_DIR/ray_current_cluster"
  left=$(our_pids | tr '\n' ' ')
  if [ -n "${left// /}" ]; then
    echo "local cluster: still running: $left" >&2
    return 1
  fi
  echo "local cluster: stopped (logs kept under $TEMP_DIR)"
}

do_start() {
  local running port
  running=$(our_pids | tr '\n' ' ')
  if [ -n "${running// /}" ]; then
    echo "local cluster: already running (pids $running); run '$0 stop' first" >&2
    return 1
  fi
  for port in "$GCS_PORT" "$DASHBOARD_PORT" "$CLIENT_PORT" "$HEAD_AGENT_PORT" "$WORKER_AGENT_PORT"; do
    if port_in_use "$port"; then
      echo "local cluster: port $port on 127.0.0.1 is taken; pick others (see the header of $0)" >&2
      return 1
    fi
  done
  [ -x "$RAY" ] || { echo "local cluster: no ray CLI at $RAY (set RAY=...; needs ray[default])" >&2; return 1; }
  mkdir -p "$STATE"
  echo "local cluster: starting the head node (logs: $STATE/head.log)"
  if ! "$RAY" start --head --node-ip-address="$NODE_IP" --port="$GCS_PORT" --num-cpus="$CPUS_PER_NODE" \
      --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --ray-client-server-port="$CLIENT_PORT" \
      --dashboard-agent-listen-port="$HEAD_AGENT_PORT" --temp-dir="$TEMP_DIR" \
      --object-store-memory="$OBJECT_STORE_BYTES" --disable-usage-stats > "$STATE/head.log" 2>&1; then
    tail -n 30 "$STATE/head.log" >&2
    record_pids; do_stop >&2 || true
    return 1
  fi
  record_pids
  echo "local cluster: starting the worker node (logs: $STATE/worker.log)"
  if ! "$RAY" start --address="$NODE_IP:$GCS_PORT" --node-ip-address="$NODE_IP" --num-cpus="$CPUS_PER_NODE" \
      --dashboard-agent-listen-port="$WORKER_AGENT_PORT" --temp-dir="$TEMP_DIR" \
      --object-store-memory="$OBJECT_STORE_BYTES" --disable-usage-stats > "$STATE/worker.log" 2>&1; then
    tail -n 30 "$STATE/worker.log" >&2
    record_pids; do_stop >&2 || true
    return 1
  fi
  record_pids
  cat <<EOF
local cluster: 2 nodes, node address $NODE_IP ($(wc -l < "$PIDFILE") processes recorded in $PIDFILE)
  GCS address:        $NODE_IP:$GCS_PORT
  job submit address: http://127.0.0.1:$DASHBOARD_PORT
  submit a job:       RAY_AUTH_MODE=token $RAY job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . -- pseudobox <stage> --config configs/demo/<stage>.yaml corpus=\$PWD/... output=\$PWD/...
                      (data paths absolute or s3://; see the header of $0)
  stop:               bash $0 stop
EOF
}

do_status() {
  local pids
  pids=$(our_pids | tr '\n' ' ')
  if [ -z "${pids// /}" ]; then
    echo "local cluster: not running"
    return 0
  fi
  echo "local cluster: job submit address http://127.0.0.1:$DASHBOARD_PORT (GCS $NODE_IP:$GCS_PORT)"
  # shellcheck disable=SC2086
  ps -o pid=,ppid=,comm= -p "$(echo $pids | tr ' ' ',')"
}

case "${1:-}" in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  *) echo "usage: $0 {start|stop|status}" >&2; exit 2 ;;
esac
