#!/usr/bin/env bash
# Syscalls per operation on a loaded leader: a fresh 3-node cluster under `keelctl bench`
# through gRPC to the leader, with `perf record` on the leader's syscall tracepoints for the
# whole run. Each write is attributed to its socket (the leader's sockets are listed with
# `ss -p` mid-run), so writes on client connections and on everything else (peer connections,
# the WAL) are counted apart, then divided by the operations the bench completed.
#
#   bench/syscalls.sh                release build of this checkout
#   CLIENTS=256 DURATION=10s OP="get --skip-fill"   (any `keelctl bench` op and its flags)
#   FILL="put --clients 64 --duration 3s"           run before, not counted
#   SKIP_BUILD=1                     use the binaries already built
#
# Needs `perf` (Debian: linux-perf) with access to the syscalls tracepoints (root). Tracing
# slows the servers, so the bench's own figures here are not benchmark figures; the counts per
# operation are what this is for.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
command -v perf >/dev/null || die "perf is required (Debian package linux-perf)"

CLIENTS=${CLIENTS:-256}
DURATION=${DURATION:-10s}
OP=${OP:-get --skip-fill}
FILL=${FILL:-put --clients 64 --duration 3s}
secs=${DURATION%s}
[[ $secs =~ ^[0-9]+$ ]] && ((secs >= 2)) || die "DURATION must be whole seconds, at least 2s: $DURATION"
OUT=$(mktemp -d "${TMPDIR:-/tmp}/keel-syscalls.XXXXXX")

build
start_cluster
leader=$(wait_for_leader 30 "${NODES[@]}")
pid=${NODE_PIDS[leader]}
endpoint=$(client_addr "$leader")
log "leader $leader (pid $pid); output in $OUT"
# shellcheck disable=SC2086 # FILL and OP are word lists on purpose
"$KEELCTL" --endpoints "$endpoint" --json bench $FILL --protocol grpc >/dev/null

events=()
for call in write writev sendto sendmsg read readv recvfrom recvmsg epoll_wait futex fdatasync; do
  events+=(-e "syscalls:sys_enter_$call")
done
perf record -q "${events[@]}" -p "$pid" -o "$OUT/sys.data" 2>/dev/null &
perf_pid=$!
BG_PIDS+=("$perf_pid")
# shellcheck disable=SC2086
"$KEELCTL" --endpoints "$endpoint" --json bench $OP --protocol grpc --clients "$CLIENTS" \
  --duration "$DURATION" >"$OUT/bench.json" &
bench_pid=$!
BG_PIDS+=("$bench_pid")
sleep $((secs / 2))
# The descriptors of the leader's connections from clients (local port = its client port), as
# perf prints them.
ss -tnpH state established | awk -v pid="pid=$pid," -v me="$endpoint" \
  'index($0, pid) && $3 == me { if (match($0, /fd=[0-9]+/)) print substr($0, RSTART + 3, RLENGTH - 3) }' |
  while read -r fd; do printf '0x%08x\n' "$fd"; done >"$OUT/client-fds"
wait "$bench_pid"
kill -INT "$perf_pid"
wait "$perf_pid" || true
BG_PIDS=()
ops=$(jq .ok "$OUT/bench.json")
((ops > 0)) || die "the bench completed no operation: $(cat "$OUT/bench.json")"
jq -c '{op, clients, ok, throughput_ops_s}' "$OUT/bench.json"

echo "| syscall | on | per op |"
echo "| --- | --- | ---: |"
perf script -i "$OUT/sys.data" -F event,trace 2>/dev/null | awk -v ops="$ops" -v fds="$OUT/client-fds" '
  BEGIN { while ((getline l < fds) > 0) client[l] = 1 }
  {
    call = $1; sub(/^syscalls:sys_enter_/, "", call); sub(/:$/, "", call)
    fd = ""
    if (match($0, /fd: 0x[0-9a-f]+/)) fd = substr($0, RSTART + 4, RLENGTH - 4)
    where = (fd in client) ? "client connections" : "other"
    if (call == "epoll_wait" || call == "futex" || call == "fdatasync") where = "-"
    n[call "|" where]++
  }
  END {
    for (k in n) { split(k, p, "|"); printf "| %s | %s | %.3f |\n", p[1], p[2], n[k] / ops }
  }' | sort
