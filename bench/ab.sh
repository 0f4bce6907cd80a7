#!/usr/bin/env bash
# Before/after on one workload: two builds of keel, each on a fresh 3-node cluster, alternating
# A B A B ... so that slow drifts of the machine fall on both. The same load generator (B's
# keelctl) drives both. For each run it prints ops/s, p50, p99 and max latency, the snapshots
# the members took during the run, each member's RSS at its end, and the CPU time and context
# switches of the three members (all their threads) per operation.
#
#   A=DIR B=DIR bench/ab.sh          DIR holds a release build's keel and keelctl
#                                    (e.g. target/release of a checkout of the older commit)
#   REPS=3  DURATION=10s  CLIENTS=256  OP="put"  (any `keelctl bench` op and its flags)
#   NODE_ARGS="--snapshot-count 10000"  extra flags for every node of both builds
#   A_ARGS=... B_ARGS=...  extra flags for the nodes of one side only: with A=B, this compares
#                          two settings of one build
# Prints a markdown table on stdout; progress on stderr.
set -euo pipefail
SKIP_BUILD=1
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

: "${A:?A=DIR of the first build}" "${B:?B=DIR of the second build}"
REPS=${REPS:-3}
DURATION=${DURATION:-10s}
CLIENTS=${CLIENTS:-256}
OP=${OP:-put}
KEELCTL=$B/keelctl


snapshots_of() { curl -fsS --max-time 1 "http://$(client_addr "$1")/metrics" |
  awk '$1 == "keel_snapshots_total" { s += $2 } END { print s + 0 }'; }
# Context switches of every thread of node $1 so far, voluntary and not.
switches_of() { cat /proc/"${NODE_PIDS[$1]}"/task/*/status 2>/dev/null |
  awk '/ctxt_switches/ { s += $2 } END { print s + 0 }'; }
# CPU time of node $1 so far, in clock ticks (user + system, all threads).
ticks_of() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/${NODE_PIDS[$1]}/stat"; }
cluster_sum() { local f=$1 i s=0; for i in "${NODES[@]}"; do s=$((s + $($f "$i"))); done; echo "$s"; }
rss_mib() { awk '/^VmRSS/ { printf "%d\n", $2 / 1024 }' "/proc/${NODE_PIDS[$1]}/status"; }

echo "| build | ops/s | p50 ms | p99 ms | max ms | snapshots | RSS MiB (3 members) | cluster CPU us/op | context switches/op |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"
for ((rep = 1; rep <= REPS; rep++)); do
  for which in A B; do
    KEEL=${!which}/keel
    side_args=${which}_ARGS
    read -r -a NODE_FLAGS <<<"${NODE_ARGS:-} ${!side_args:-}"
    [[ -x $KEEL ]] || die "$KEEL is not an executable"
    start_cluster
    leader=$(wait_for_leader 30 "${NODES[@]}")
    before=$(cluster_sum snapshots_of)
    out="$WORK/bench.json"
    sw0=$(cluster_sum switches_of) cpu0=$(cluster_sum ticks_of)
    "$KEELCTL" --endpoints "$(client_addr "$leader")" --json bench $OP --protocol grpc \
      --clients "$CLIENTS" --duration "$DURATION" >"$out"
    sw1=$(cluster_sum switches_of) cpu1=$(cluster_sum ticks_of)
    after=$(cluster_sum snapshots_of)
    rss=$(for i in "${NODES[@]}"; do rss_mib "$i"; done | paste -sd/)
    read -r ops p50 p99 max <<<"$(jq -r '[.throughput_ops_s, .latency_ms.p50, .latency_ms.p99,
      .latency_ms.max] | map(. * 100 | round / 100) | @tsv' "$out")"
    log "rep $rep $which: $ops ops/s, p99 $p99 ms"
    done_ops=$(jq -r '.ok + .errors' "$out")
    per_op=$(awk -v c=$((cpu1 - cpu0)) -v s=$((sw1 - sw0)) -v n="$done_ops" -v hz="$(getconf CLK_TCK)" \
      'BEGIN { printf "%.0f | %.1f", c / hz * 1e6 / n, s / n }')
    echo "| $which | $ops | $p50 | $p99 | $max | $((after - before)) | $rss | $per_op |"
    stop_cluster
  done
done
