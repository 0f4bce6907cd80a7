#!/usr/bin/env bash
# Throughput, latency and CPU cost of a local 3-node Keel cluster.
#
# Builds the release binaries, starts a fresh cluster on 127.0.0.1 (free ports, data dirs in a
# temporary dir, fsync on as by default), waits for a leader, then runs `keelctl bench` for:
#   put, 1/16/256 clients, leader only      put, 16/256 clients, spread over all 3 members
#   get (linearizable), 16/256 clients, all 3 members
#   get --serializable,  16/256 clients, all 3 members
# with 100000 keys and 256-byte values, and prints a markdown table. "node CPU" is the
# utime+stime of the three server processes during the measured window divided by its wall
# time (cores used); keelctl's own CPU is not included. A get run first writes every key
# (keelctl does so before measuring); that fill is outside the measured window.
#
# Run from anywhere:   bench/cluster-bench.sh
#   DURATION=10s   length of each run (keelctl duration syntax)
#   SUITE=api      instead: puts to the leader through the HTTP API and through etcd's gRPC API,
#                  at 1, 16 and 256 clients, interleaved A B A B A B (3 repetitions each), on
#                  one cluster, to show what each API layer costs on top of a put
#   BASE_PORT, SKIP_BUILD=1, KEEP_DATA=1: see bench/lib.sh
# The load generator runs on the same machine as the three nodes, so the figures include
# its competition for CPU.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION=${DURATION:-10s}
KEYS=100000
VALUE_SIZE=256
HZ=$(getconf CLK_TCK)

# Microseconds since the epoch, without forking.
now_us() { echo "${EPOCHREALTIME//[!0-9]/}"; }

# Every 100 ms: "<time us> <sum of utime+stime ticks of the node processes>".
cpu_sampler() {
  local i stat f sum
  while :; do
    sum=0
    for i in "${NODES[@]}"; do
      read -r stat <"/proc/${NODE_PIDS[i]}/stat" || exit 0
      read -r -a f <<<"${stat##*) }" # f[0] is field 3 (state): utime, stime are 14, 15
      sum=$((sum + f[11] + f[12]))
    done
    echo "${EPOCHREALTIME//[!0-9]/} $sum"
    sleep 0.1
  done
}

# Cores used by the nodes between END_US - DURATION_S and END_US, from the samples.
cores_used() {
  awk -v end="$1" -v dur="$2" -v hz="$HZ" '
    $1 >= end - dur * 1e6 && !seen { seen = 1; t0 = $1; c0 = $2 }
    $1 <= end { t1 = $1; c1 = $2 }
    END { if (seen && t1 > t0) printf "%.2f", (c1 - c0) / hz / ((t1 - t0) / 1e6); else print "n/a" }
  ' "$WORK/cpu.samples"
}

ROWS=()
NOTES=()
FAILED=0
RUN=0

# Usage: bench_run WORKLOAD CLIENTS leader|all KEELCTL-BENCH-ARGS...
bench_run() {
  local workload=$1 clients=$2 where=$3
  shift 3
  local i leader endpoints eplabel out before after end_us
  RUN=$((RUN + 1))
  leader=$(wait_for_leader 30 "${NODES[@]}")
  if [[ $where == leader ]]; then
    endpoints=$(client_addr "$leader")
    eplabel="leader (node $leader)"
  else
    endpoints="$(client_addr 1),$(client_addr 2),$(client_addr 3)"
    eplabel="all 3"
  fi
  before=$(node_status "$leader" | jq -r '"\(.leader) \(.term)"')
  out=$WORK/run$RUN.json
  log "run $RUN: $workload, $clients clients, $eplabel, $DURATION"
  if ! "$KEELCTL" --endpoints "$endpoints" --json bench "$@" --clients "$clients" \
    --duration "$DURATION" --keys "$KEYS" --value-size "$VALUE_SIZE" >"$out" 2>"$out.err"; then
    end_us=$(now_us)
    FAILED=1
    NOTES+=("run $RUN ($workload, $clients clients, $eplabel) failed: $(cat "$out.err" "$out" | tr '\n' ' ')")
    ROWS+=("| $workload | $clients | $eplabel | failed | | | | | |")
    return 0
  fi
  end_us=$(now_us)
  for i in "${NODES[@]}"; do check_node "$i"; done
  after=$(wait_for_leader 30 "${NODES[@]}")
  after=$(node_status "$after" | jq -r '"\(.leader) \(.term)"')

  local ops p50 p99 max errors first_error cores per_k
  read -r ops p50 p99 max errors <<<"$(jq -r '[.throughput_ops_s, .latency_ms.p50,
    .latency_ms.p99, .latency_ms.max, .errors] | @tsv' "$out")"
  first_error=$(jq -r '.first_error // ""' "$out")
  cores=$(cores_used "$end_us" "$(jq -r .duration_s "$out")")
  per_k=$(awk -v c="$cores" -v o="$ops" 'BEGIN { if (o > 0 && c != "n/a") printf "%.3f", c / (o / 1000); else print "n/a" }')
  ROWS+=("$(printf '| %s | %s | %s | %.0f | %.2f | %.2f | %.2f | %s | %s |' \
    "$workload" "$clients" "$eplabel" "$ops" "$p50" "$p99" "$max" "$cores" "$per_k")")
  if [[ $errors != 0 ]]; then
    NOTES+=("run $RUN ($workload, $clients clients): $errors failed requests, first: $first_error")
  fi
  if [[ $before != "$after" ]]; then
    NOTES+=("run $RUN ($workload, $clients clients): leader/term went from '$before' to '$after'")
  fi
}

build
start_cluster
wait_for_leader 30 "${NODES[@]}" >/dev/null
cpu_sampler >"$WORK/cpu.samples" &
BG_PIDS+=($!)

if [[ ${SUITE:-all} == api ]]; then
  for clients in 1 16 256; do
    for rep in 1 2 3; do
      bench_run "put over HTTP (rep $rep)" "$clients" leader put --protocol http
      bench_run "put over gRPC (rep $rep)" "$clients" leader put --protocol grpc
    done
  done
else
  bench_run put 1 leader put
  bench_run put 16 leader put
  bench_run put 256 leader put
  bench_run put 16 all put
  bench_run put 256 all put
  bench_run "get (linearizable)" 16 all get
  bench_run "get (linearizable)" 256 all get
  bench_run "get (serializable)" 16 all get --serializable
  bench_run "get (serializable)" 256 all get --serializable
fi

commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$ROOT" status --porcelain 2>/dev/null) ]]; then commit="$commit (dirty)"; fi
echo "Keel 3-node cluster on 127.0.0.1, commit $commit, $(nproc) CPUs, fsync on;" \
  "$DURATION per run, $KEYS keys, $VALUE_SIZE-byte values"
echo
echo "| workload | clients | endpoints | ops/s | p50 ms | p99 ms | max ms | node CPU (cores, sum of 3) | cores per 1000 ops/s |"
echo "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
printf '%s\n' "${ROWS[@]}"
if ((${#NOTES[@]})); then
  echo
  printf -- '- %s\n' "${NOTES[@]}"
fi
exit "$FAILED"
