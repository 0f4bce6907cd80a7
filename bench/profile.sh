#!/usr/bin/env bash
# Where the CPU of a loaded cluster goes: a fresh 3-node cluster under `keelctl bench`, with
# `perf record` sampling the leader and one follower for the middle of the run. Prints each
# one's hottest functions (self time, all threads) and writes the perf data next to them.
#
#   bench/profile.sh                 release build of this checkout
#   CLIENTS=256 DURATION=20s OP=put FREQ=499 TOP=40 OUT=DIR
#   SKIP_BUILD=1                     use the binaries already in target/release
#
# Needs `perf` (Debian: linux-perf). Sampling costs the cluster a few percent; figures taken
# while profiling are not benchmark figures.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
command -v perf >/dev/null || die "perf is required (Debian package linux-perf)"

CLIENTS=${CLIENTS:-256}
DURATION=${DURATION:-20s}
OP=${OP:-put}
FREQ=${FREQ:-499}
# fp needs a build with frame pointers; dwarf works on the release build (it has debug info).
CALLGRAPH=${CALLGRAPH:-dwarf,16384}
TOP=${TOP:-40}
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/keel-profile.XXXXXX")}
mkdir -p "$OUT"
secs=${DURATION%s}
[[ $secs =~ ^[0-9]+$ ]] && ((secs >= 4)) || die "DURATION must be whole seconds, at least 4s: $DURATION"
# Sample the middle half of the run: the first seconds fill the log and open connections.
record_for=$((secs / 2))

build
start_cluster
leader=$(wait_for_leader 30 "${NODES[@]}")
follower=$((leader % 3 + 1))
log "leader $leader, profiling it and follower $follower; output in $OUT"

"$KEELCTL" --endpoints "$(client_addr "$leader")" --json bench $OP --protocol grpc \
  --clients "$CLIENTS" --duration "$DURATION" >"$OUT/bench.json" &
bench_pid=$!
BG_PIDS+=("$bench_pid")
sleep $((secs / 4))
for who in leader follower; do
  id=${!who}
  perf record -q -F "$FREQ" --call-graph "$CALLGRAPH" -p "${NODE_PIDS[id]}" -o "$OUT/$who.data" \
    -- sleep "$record_for" 2>/dev/null &
  BG_PIDS+=("$!")
done
wait "$bench_pid"
# perf exits once its `sleep` does, which is before the bench ends.
for pid in "${BG_PIDS[@]:1}"; do wait "$pid" || true; done
BG_PIDS=()
jq -c '{throughput_ops_s, latency_ms}' "$OUT/bench.json"

for who in leader follower; do
  echo "## $who: self time by function"
  perf report -i "$OUT/$who.data" --no-children --sort sym --percent-limit 0.5 --stdio \
    -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -n "$TOP"
  echo "## $who: by thread"
  perf report -i "$OUT/$who.data" --no-children --sort comm --stdio -g none 2>/dev/null |
    grep -v '^#' | grep -v '^$' | head -n 12
done
stop_cluster
