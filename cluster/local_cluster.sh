#!/usr/bin/env bash
# A local multi-node Ray cluster on 127.0.0.1 (a head and worker processes), for tests and trying
# `ray job submit` without a real cluster.
#
#   cluster/local_cluster.sh start [WORKERS]   # default 1 worker; prints the address to submit to
#   cluster/local_cluster.sh stop
#
# Every node binds to its own loopback address (head 127.0.0.2, workers 127.0.0.3...: Ray would
# turn 127.0.0.1 into the machine's network address), keeps its files under
# $DNC_CLUSTER_DIR (so a plain `ray.init()` elsewhere does not join it), and runs in its own
# process group, which `stop` ends: `ray stop` would end every Ray on the machine.
set -euo pipefail

DIR=${DNC_CLUSTER_DIR:-/tmp/dnc-local-cluster}
PORT=${DNC_CLUSTER_PORT:-6389}
DASHBOARD_PORT=${DNC_DASHBOARD_PORT:-8265}
HEAD_CPUS=${DNC_HEAD_CPUS:-2}
WORKER_CPUS=${DNC_WORKER_CPUS:-2}
RAY=${RAY:-ray}
WAIT_S=${DNC_CLUSTER_WAIT_S:-300}  # for nodes, then for the job agent (minutes on a loaded 2-core machine)
export RAY_TMPDIR="$DIR/tmp" RAY_AUTH_MODE=token RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1

node() {  # node NAME ARGS...: start one node in its own session, in the background
  local name=$1; shift
  setsid "$RAY" start --block --disable-usage-stats "$@" >"$DIR/$name.log" 2>&1 &
  echo $! >"$DIR/$name.pid"
}

wait_for_nodes() {
  local want=$1 deadline=$((SECONDS + WAIT_S)) alive=0
  while ((SECONDS < deadline)); do
    alive=$("$RAY" list nodes --address "http://127.0.0.1:$DASHBOARD_PORT" --filter state=ALIVE 2>/dev/null | grep -c ALIVE || true)
    ((alive >= want)) && return 0
    sleep 1
  done
  echo "local cluster: $alive of $want nodes alive after $WAIT_S s; logs in $DIR" >&2
  return 1
}

wait_for_jobs() {  # the dashboard answers before its job agent: submit a no-op job until one is accepted and runs
  local deadline=$((SECONDS + WAIT_S)) out=""
  while ((SECONDS < deadline)); do
    if out=$("$RAY" job submit --address "http://127.0.0.1:$DASHBOARD_PORT" --submission-id "dnc-ready-$RANDOM$RANDOM" \
      -- true 2>&1); then
      return 0
    fi
    sleep 2  # each try is a `ray job submit`: seconds of CPU that the starting agent needs too
  done
  echo "local cluster: the head does not accept jobs after $WAIT_S s (last: ${out##*$'\n'}); logs in $DIR" >&2
  return 1
}

start() {
  local workers=${1:-1}
  mkdir -p "$DIR/tmp"
  [[ -e "$DIR/head.pid" ]] && { echo "local cluster: already started ($DIR/head.pid); stop it first" >&2; exit 1; }
  "$RAY" get-auth-token --generate >/dev/null 2>&1 || true
  node head --head --node-ip-address 127.0.0.2 --port "$PORT" --num-cpus "$HEAD_CPUS" \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --temp-dir "$DIR/tmp"
  sleep 2
  for i in $(seq 1 "$workers"); do
    node "worker$i" --address "127.0.0.2:$PORT" --node-ip-address "127.0.0.$((i + 2))" --num-cpus "$WORKER_CPUS"
  done
  wait_for_nodes $((workers + 1))
  wait_for_jobs
  echo "local cluster up: $((workers + 1)) nodes, accepting jobs"
  echo "  export RAY_AUTH_MODE=token"
  echo "  ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . -- python ..."
}

stop() {
  for pidfile in "$DIR"/*.pid; do
    [[ -e "$pidfile" ]] || continue
    kill -TERM -- "-$(cat "$pidfile")" 2>/dev/null || true
  done
  sleep 3
  for pidfile in "$DIR"/*.pid; do
    [[ -e "$pidfile" ]] || continue
    kill -KILL -- "-$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  done
  echo "local cluster stopped"
}

case "${1:-}" in
  start) start "${2:-1}" ;;
  stop) stop ;;
  *) echo "usage: $0 start [WORKERS] | stop" >&2; exit 2 ;;
esac
