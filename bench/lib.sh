# shellcheck shell=bash
# Helpers shared by the scripts in bench/: build, start a local
# 3-node cluster on 127.0.0.1, query it, and stop everything on exit. Sourced, not run.
#
# Environment understood here:
#   BASE_PORT   first port tried when looking for 6 free ports (default 20000)
#   SKIP_BUILD  1 = use the binaries already built instead of running cargo build
#   KEEP_DATA   1 = keep the temporary data dirs and logs even when the run succeeds

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)

for tool in cargo curl jq ss; do
  command -v "$tool" >/dev/null || { echo "error: $tool is required" >&2; exit 1; }
done

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
now_ns() { date +%s%N; }

NODES=(1 2 3)
NODE_FLAGS=()      # extra flags for every node, set by the calling script
NODE_PIDS=()       # indexed by node id
BG_PIDS=()         # other background processes to stop on exit
WORK=""

build() {
  if [[ ${SKIP_BUILD:-0} == 1 ]]; then
    log "SKIP_BUILD=1: not building"
  else
    log "cargo build --release -p keel"
    (cd "$ROOT" && cargo build --release -p keel) >&2
  fi
  local target
  target=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
  KEEL=$target/release/keel
  KEELCTL=$target/release/keelctl
  [[ -x $KEEL && -x $KEELCTL ]] || die "keel/keelctl not found in $target/release"
}

# Prints $1 TCP ports, from BASE_PORT upward, that nothing listens on.
pick_ports() {
  local want=$1 base=${BASE_PORT:-20000} p used picked=()
  used=$(ss -Htln | awk '{ sub(/.*:/, "", $4); print $4 }' | sort -u)
  for ((p = base; p < base + 1000 && ${#picked[@]} < want; p++)); do
    grep -qx "$p" <<<"$used" || picked+=("$p")
  done
  ((${#picked[@]} == want)) || die "no $want free ports in $base..$((base + 999))"
  echo "${picked[@]}"
}

client_addr() { echo "127.0.0.1:${CLIENT_PORTS[$1 - 1]}"; }

# Creates the work dir and starts all three nodes of a fresh cluster.
start_cluster() {
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/keel-bench.XXXXXX")
  local ports
  read -r -a ports <<<"$(pick_ports 6)"
  PEER_PORTS=("${ports[@]:0:3}")
  CLIENT_PORTS=("${ports[@]:3:3}")
  CLUSTER="http://127.0.0.1:${PEER_PORTS[0]},http://127.0.0.1:${PEER_PORTS[1]},http://127.0.0.1:${PEER_PORTS[2]}"
  log "cluster: peers $CLUSTER, client ports ${CLIENT_PORTS[*]}, data and logs in $WORK"
  local i
  for i in "${NODES[@]}"; do start_node "$i"; done
}

# Starts (or restarts, with the same flags and data dir) node $1.
start_node() {
  local i=$1
  "$KEEL" --id "$i" --cluster "$CLUSTER" --host 127.0.0.1 --port "${CLIENT_PORTS[i - 1]}" \
    --data-dir "$WORK/node$i" ${NODE_FLAGS[@]+"${NODE_FLAGS[@]}"} \
    >>"$WORK/node$i.log" 2>&1 &
  NODE_PIDS[i]=$!
  disown "$!" # no "Killed" line from bash when a script kills it; cleanup still stops it
}

# True while process $1 exists and is not a zombie.
running() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat%% *} != Z ]]
}

# Fails (showing its log) if node $1 has exited.
check_node() {
  running "${NODE_PIDS[$1]}" && return 0
  tail -n 20 "$WORK/node$1.log" >&2
  die "node $1 (pid ${NODE_PIDS[$1]}) exited; log above, full log in $WORK/node$1.log"
}

# GET /v1/status of node $1 (fails if it does not answer within a second).
node_status() { curl -fsS --max-time 1 "http://$(client_addr "$1")/v1/status"; }

# Once every listed node reports the same non-zero leader, prints its id.
# Usage: wait_for_leader TIMEOUT_S NODE...
wait_for_leader() {
  local timeout=$1 i ids
  shift
  local deadline=$(($(date +%s) + timeout))
  while (($(date +%s) < deadline)); do
    for i in "$@"; do check_node "$i"; done
    ids=$(for i in "$@"; do node_status "$i" 2>/dev/null | jq -r .leader || echo 0; done | sort -u)
    if [[ $ids != 0 && $ids != *$'\n'* ]]; then
      echo "$ids"
      return 0
    fi
    sleep 0.1
  done
  die "no leader agreed on by nodes $* within ${timeout}s"
}

# Stops the running cluster (SIGTERM, up to 10 s, then SIGKILL) and removes its data (unless
# KEEP_DATA=1), for scripts that start one cluster after another.
stop_cluster() {
  local i deadline
  for i in "${NODES[@]}"; do kill -TERM "${NODE_PIDS[i]}" 2>/dev/null || true; done
  deadline=$(($(date +%s) + 10))
  for i in "${NODES[@]}"; do
    while running "${NODE_PIDS[i]}" && (($(date +%s) < deadline)); do sleep 0.1; done
    kill -KILL "${NODE_PIDS[i]}" 2>/dev/null || true
  done
  NODE_PIDS=()
  [[ ${KEEP_DATA:-0} == 1 ]] || rm -rf "$WORK"
  WORK=""
}

# Stops what was started: SIGTERM, up to 10 s to exit, then SIGKILL.
cleanup() {
  local rc=$? pid deadline
  trap - EXIT
  for pid in ${BG_PIDS[@]+"${BG_PIDS[@]}"} ${NODE_PIDS[@]+"${NODE_PIDS[@]}"}; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  deadline=$(($(date +%s) + 10))
  for pid in ${BG_PIDS[@]+"${BG_PIDS[@]}"} ${NODE_PIDS[@]+"${NODE_PIDS[@]}"}; do
    while running "$pid" && (($(date +%s) < deadline)); do sleep 0.1; done
    if running "$pid"; then
      log "pid $pid ignored SIGTERM, killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    { wait "$pid"; } 2>/dev/null || true
  done
  if [[ -n $WORK ]]; then
    if [[ $rc == 0 && ${KEEP_DATA:-0} != 1 ]]; then
      rm -rf "$WORK"
    else
      log "data dirs and node logs kept in $WORK"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
