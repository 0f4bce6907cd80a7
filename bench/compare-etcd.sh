#!/usr/bin/env bash
# Keel against etcd on this machine, with one load generator speaking etcd's v3 gRPC API to
# both (`keelctl bench --protocol grpc`), one 3-member cluster at a time, fsync on for both.
#
# Each repetition starts a fresh etcd cluster, runs every workload, stops it, then does the
# same with a fresh Keel cluster (A B A B ...), so slow drifts of the machine fall on both.
# Timing settings match: etcd --heartbeat-interval 100 --election-timeout 1000, Keel
# --tick-ms 100 --heartbeat-ticks 1 --election-ticks 10 (both randomize the election timeout up
# to twice that). Failover is measured a third time, on Keel at its own defaults (50 ms ticks,
# election after 6).
#
# Workloads (100,000 keys, 256-byte values): put at 1, 16, 256 clients to the leader; put at
# 16, 256 clients spread over the members; linearizable and serializable get at 16 and 256
# clients over the members; txn compare-and-set at 16 clients over the members (a serializable
# read of the key's mod revision, then a txn putting only if it is unchanged; every attempt is
# an op); watch fan-out: 1 writer putting as fast as it can to the leader while WATCHERS (1000)
# watches of the key prefix, on one Watch stream per gRPC connection spread over the members,
# receive every put (`keelctl bench watch`: writes/s, events/s over all watchers, the lag from a
# put's send to each event's receipt, events missed). The key space is filled once per cluster,
# before the runs. Per run it records ops/s, p50 and p99, and the servers' CPU (utime+stime of
# the 3 processes over the run's wall time), and after the last run each server's RSS.
#
# Then LARGE_KEYS (1M) keys, once per system on a fresh cluster (see large_keys): the fill's
# rate, each member's RSS once every member has it all, and the restart of a follower (SIGTERM,
# then started again on its data dir) until it serves a serializable get of a key written
# before the stop.
#
# Then failover: KILLS (10) kills of the leader, for each system (see failover_rounds).
# bench/failover.sh measures Keel's failover alone.
#
# Run from anywhere:   bench/compare-etcd.sh > table.md
#   REPS=3  DURATION=10s  SKIP_BUILD=1  BASE_PORT=20000  KEEP_DATA=1
#   ONLY=REGEX  runs only the workloads whose name matches (ONLY=none: none of them)
#   WATCHERS=1000  watchers of the watch fan-out workload
#   LARGE_KEYS=1000000  keys of the large phase; LARGE=0 skips it
#   RSS_SETTLE_S=10     idle seconds before the large phase's second RSS reading
#   KILLS=10    failover rounds per system (0: none); Keel gets them twice, at etcd's timing
#               and at its own defaults
#   SNAPSHOT_COUNT=N  gives both systems --snapshot-count N (default: each its own default,
#                     both 100,000 since Keel took etcd's default)
# Needs etcd and etcdctl (Debian: etcd-server, etcd-client; installed if missing with
# apt-get, which needs root), jq, curl and ss.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REPS=${REPS:-3}
DURATION=${DURATION:-10s}
KEYS=100000
VALUE_SIZE=256
WATCHERS=${WATCHERS:-1000}
LARGE=${LARGE:-1}
LARGE_KEYS=${LARGE_KEYS:-1000000}
RSS_SETTLE_S=${RSS_SETTLE_S:-10}
HZ=$(getconf CLK_TCK)

if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
  log "installing Debian's etcd-server and etcd-client"
  apt-get update >&2
  apt-get install -y etcd-server etcd-client >&2
fi

# Every workload: name, clients, where (leader|all|leader+all), keelctl bench arguments.
# leader+all lists the leader first, then the others: keelctl's connection 0, which the one
# writer uses, goes to the leader, and the watchers' streams spread over all three.
WORKLOADS=(
  "put|1|leader|put"
  "put|16|leader|put"
  "put|256|leader|put"
  "put|16|all|put"
  "put|256|all|put"
  "get (linearizable)|16|all|get --skip-fill"
  "get (linearizable)|256|all|get --skip-fill"
  "get (serializable)|16|all|get --skip-fill --serializable"
  "get (serializable)|256|all|get --skip-fill --serializable"
  "txn compare-and-set|16|all|cas --skip-fill"
  "watch fan-out|1|leader+all|watch --watchers $WATCHERS"
)
# ONLY=REGEX keeps the workloads whose name matches (e.g. ONLY=txn).
if [[ -n ${ONLY:-} ]]; then
  kept=()
  for w in "${WORKLOADS[@]}"; do [[ ${w%%|*} =~ $ONLY ]] && kept+=("$w"); done
  WORKLOADS=("${kept[@]}")
fi

start_etcd() {
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/keel-vs-etcd.XXXXXX")
  local ports i
  read -r -a ports <<<"$(pick_ports 6)"
  PEER_PORTS=("${ports[@]:0:3}")
  CLIENT_PORTS=("${ports[@]:3:3}")
  ETCD_INITIAL=""
  for i in 1 2 3; do
    ETCD_INITIAL+="${ETCD_INITIAL:+,}node-$i=http://127.0.0.1:${PEER_PORTS[i - 1]}"
  done
  for i in 1 2 3; do start_etcd_node "$i"; done
}

# Starts (or restarts, on its data dir) etcd member $1.
start_etcd_node() {
  local i=$1
  etcd --name "node-$i" --data-dir "$WORK/node$i" \
    --listen-peer-urls "http://127.0.0.1:${PEER_PORTS[i - 1]}" \
    --initial-advertise-peer-urls "http://127.0.0.1:${PEER_PORTS[i - 1]}" \
    --listen-client-urls "http://127.0.0.1:${CLIENT_PORTS[i - 1]}" \
    --advertise-client-urls "http://127.0.0.1:${CLIENT_PORTS[i - 1]}" \
    --initial-cluster "$ETCD_INITIAL" --initial-cluster-state new \
    --heartbeat-interval 100 --election-timeout 1000 \
    ${SNAPSHOT_COUNT:+--snapshot-count "$SNAPSHOT_COUNT"} \
    >>"$WORK/node$i.log" 2>&1 &
  NODE_PIDS[i]=$!
  disown "$!"
}

# etcd's timing, unless KEEL_TIMING=defaults.
start_keel() {
  NODE_FLAGS=(${SNAPSHOT_COUNT:+--snapshot-count "$SNAPSHOT_COUNT"})
  [[ ${KEEL_TIMING:-etcd} == defaults ]] ||
    NODE_FLAGS+=(--tick-ms 100 --heartbeat-ticks 1 --election-ticks 10)
  start_cluster
}


endpoints_all() { echo "$(client_addr 1),$(client_addr 2),$(client_addr 3)"; }

# The leader's client address, then the others'.
endpoints_leader_first() {
  local lead n out
  lead=$(leader_endpoint)
  out=$lead
  for n in "${NODES[@]}"; do [[ $(client_addr "$n") == "$lead" ]] || out+=",$(client_addr "$n")"; done
  echo "$out"
}

# The client address of the leader, asked over etcd's Maintenance.Status, which both serve;
# waits up to 30 s for every member to agree on one.
leader_endpoint() {
  local deadline=$(($(date +%s) + 30)) st leaders lead
  while (($(date +%s) < deadline)); do
    if st=$(ETCDCTL_API=3 etcdctl --endpoints "$(endpoints_all)" --dial-timeout 1s \
      --command-timeout 2s endpoint status -w json 2>/dev/null); then
      leaders=$(jq -r '[.[].Status.leader] | unique | length' <<<"$st")
      lead=$(jq -r '.[] | select(.Status.header.member_id == .Status.leader) | .Endpoint' <<<"$st")
      if [[ $leaders == 1 && -n $lead ]]; then
        echo "${lead#http://}"
        return 0
      fi
    fi
    sleep 0.2
  done
  die "no leader agreed on within 30 s"
}

# utime+stime ticks of the three servers.
server_ticks() {
  local i stat f sum=0
  for i in "${NODES[@]}"; do
    read -r stat <"/proc/${NODE_PIDS[i]}/stat"
    read -r -a f <<<"${stat##*) }"
    sum=$((sum + f[11] + f[12]))
  done
  echo "$sum"
}

# Per-run results: "system|workload|clients|where|rep|ops|p50|p99|cores", then for watch
# fan-out (0 for the others) "|events/s|lag p50|lag p99|lag max|missed".
RESULTS=$(mktemp)
RSS=$(mktemp)
# The large phase: "system|metric|value".
LARGES=$(mktemp)
# lib.sh's cleanup stops the servers and exits with the script's status, which `(exit $rc)`
# hands it past the rm; set +e first, or a failing status would end the trap right there and
# leave the servers running.
trap 'rc=$?; rm -f "$RESULTS" "$RSS" "$LARGES" "${FAILOVERS:-}"; set +e; (exit $rc); cleanup' EXIT

run_workloads() {
  local system=$1 rep=$2 w name clients where args ep out t0 t1 ticks0 ticks1 cores
  log "$system, repetition $rep: filling $KEYS keys"
  "$KEELCTL" --endpoints "$(endpoints_all)" --json bench get --protocol grpc --clients 64 \
    --duration 1s --keys "$KEYS" --value-size "$VALUE_SIZE" >/dev/null
  for w in "${WORKLOADS[@]}"; do
    IFS='|' read -r name clients where args <<<"$w"
    case $where in
      leader) ep=$(leader_endpoint) ;;
      leader+all) ep=$(endpoints_leader_first) ;;
      *) ep=$(endpoints_all) ;;
    esac
    log "$system, repetition $rep: $name, $clients clients, $where"
    out=$WORK/run.json
    ticks0=$(server_ticks)
    t0=$(date +%s%N)
    # shellcheck disable=SC2086 # args holds several words on purpose
    "$KEELCTL" --endpoints "$ep" --json bench $args --protocol grpc --clients "$clients" \
      --duration "$DURATION" --keys "$KEYS" --value-size "$VALUE_SIZE" >"$out" ||
      die "$system: keelctl bench $args failed: $(cat "$out")"
    t1=$(date +%s%N)
    ticks1=$(server_ticks)
    cores=$(awk -v d="$((ticks1 - ticks0))" -v hz="$HZ" -v ns="$((t1 - t0))" \
      'BEGIN { printf "%.2f", d / hz / (ns / 1e9) }')
    jq -r --arg s "$system" --arg n "$name" --arg c "$clients" --arg w "$where" \
      --arg r "$rep" --arg cores "$cores" \
      '"\($s)|\($n)|\($c)|\($w)|\($r)|\(.throughput_ops_s)|\(.latency_ms.p50)|\(.latency_ms.p99)|\($cores)|\(.events_per_sec // 0)|\(.lag_p50_ms // 0)|\(.lag_p99_ms // 0)|\(.lag_max_ms // 0)|\(.missed // 0)"' \
      "$out" >>"$RESULTS"
    if [[ $(jq -r '.missed // 0' "$out") != 0 ]]; then
      log "$system: $name missed $(jq -r .missed "$out") events ($(jq -r '.first_watch_error // "no watch error"' "$out"))"
    fi
  done
  local i kb
  for i in "${NODES[@]}"; do
    kb=$(awk '/^VmRSS/ { print $2 }' "/proc/${NODE_PIDS[i]}/status")
    echo "$system|$rep|$i|$kb" >>"$RSS"
  done
}

# Failover, as bench/failover.sh measures it for Keel alone, with one client for both: kill -9
# the leader, then `etcdctl put` (200 ms command timeout, so that a put held by a
# server waiting for its election costs at most that much resolution) round-robin through the survivors until
# one succeeds; the figure is the kill to that success. The member is restarted on its data dir
# and the cluster waits for one leader and every member healthy before the next kill.
# Prints "system ms" per kill.
failover_rounds() {
  local system=$1 kills=$2 k lead idx t0 t1 n ok
  for ((k = 1; k <= kills; k++)); do
    lead=$(leader_endpoint)
    idx=0
    for n in "${NODES[@]}"; do [[ $(client_addr "$n") == "$lead" ]] && idx=$n; done
    ((idx)) || die "$system: leader $lead is not one of ours"
    kill -KILL "${NODE_PIDS[idx]}"
    t0=$(date +%s%N)
    ok=""
    while [[ -z $ok ]]; do
      for n in "${NODES[@]}"; do
        ((n == idx)) && continue
        if ETCDCTL_API=3 etcdctl --endpoints "$(client_addr "$n")" --dial-timeout 1s \
          --command-timeout 200ms put "failover-$k" "v" >/dev/null 2>&1; then
          ok=$n
          break
        fi
        (($(date +%s%N) - t0 < 20000000000)) || die "$system: no write within 20 s of kill $k"
      done
    done
    t1=$(date +%s%N)
    echo "$system $(((t1 - t0) / 1000000))"
    log "$system: kill $k of the leader (node $idx): first write after $(((t1 - t0) / 1000000)) ms"
    if [[ $system == etcd ]]; then start_etcd_node "$idx"; else start_node "$idx"; fi
    leader_endpoint >/dev/null
    local deadline=$(($(date +%s) + 60))
    until ETCDCTL_API=3 etcdctl --endpoints "$(endpoints_all)" --dial-timeout 1s \
      --command-timeout 2s endpoint health >/dev/null 2>&1; do
      (($(date +%s) < deadline)) || die "$system: member $idx not healthy again within 60 s"
      sleep 0.2
    done
  done
}

# A serializable get of $2 from member $1 through etcd's API (which both serve): its value, or
# nothing while the member cannot answer.
serializable_get() {
  ETCDCTL_API=3 etcdctl --endpoints "$(client_addr "$1")" --dial-timeout 1s \
    --command-timeout 1s get --consistency=s --print-value-only "$2" 2>/dev/null || true
}

# Waits until member $1 serves a serializable get of key $2 with value $3: up to $4 seconds,
# failing if the member exits. Every 20 ms a bash connect checks that the port listens before
# etcdctl asks: an etcdctl against a closed port costs its whole dial timeout, which would
# hide when the port opens by up to that much.
wait_serves() {
  local i=$1 key=$2 want=$3 deadline=$(($(date +%s) + $4)) port=${CLIENT_PORTS[$1 - 1]}
  until (: <"/dev/tcp/127.0.0.1/$port") 2>/dev/null &&
    [[ $(serializable_get "$i" "$key") == "$want" ]]; do
    running "${NODE_PIDS[i]}" || { tail -n 20 "$WORK/node$i.log" >&2; die "member $i exited"; }
    (($(date +%s) < deadline)) || die "member $i did not serve $key within $4 s"
    sleep 0.02
  done
}

# The large phase, on the running fresh cluster of $1: LARGE_KEYS keys of VALUE_SIZE bytes,
# each written exactly once by 256 clients (keelctl bench get's fill, then 1 s of serializable
# gets); then a marker key that every member must serve before its RSS is read, so that each
# member holds everything; then the lowest-numbered follower is stopped (SIGTERM, up to 60 s)
# and started again on its data dir, and its restart is the time from its start to its first
# serializable get of the marker (a local read: no entry was written while it was down, so
# this is its recovery from its own disk). Prints "system|metric|value" lines.
large_keys() {
  local system=$1 i lead idx=0 t0 t1 out=$WORK/large.json marker
  log "$system: filling $LARGE_KEYS keys with 256 clients"
  "$KEELCTL" --endpoints "$(endpoints_all)" --json --timeout 30s bench get --protocol grpc \
    --clients 256 --duration 1s --serializable --keys "$LARGE_KEYS" \
    --value-size "$VALUE_SIZE" >"$out" || die "$system: filling $LARGE_KEYS keys failed: $(cat "$out")"
  echo "$system|fill_keys_per_s|$(jq -r --argjson n "$LARGE_KEYS" '$n / .fill_s' "$out")"
  marker="written before the stop $(date +%s%N)"
  ETCDCTL_API=3 etcdctl --endpoints "$(endpoints_all)" --command-timeout 10s \
    put large-marker "$marker" >/dev/null || die "$system: putting the marker failed"
  for i in "${NODES[@]}"; do
    wait_serves "$i" large-marker "$marker" 60
    echo "$system|rss_kb|$(awk '/^VmRSS/ { print $2 }' "/proc/${NODE_PIDS[i]}/status")"
  done
  # Both systems snapshot every 100,000 entries, so a member may be writing one of the whole
  # 1M keys when the fill ends, and its RSS then holds the snapshot's working memory too. A
  # second reading after RSS_SETTLE_S idle seconds is the steady state.
  sleep "$RSS_SETTLE_S"
  for i in "${NODES[@]}"; do
    echo "$system|settled_rss_kb|$(awk '/^VmRSS/ { print $2 }' "/proc/${NODE_PIDS[i]}/status")"
  done
  lead=$(leader_endpoint)
  for i in "${NODES[@]}"; do
    if [[ $(client_addr "$i") != "$lead" ]]; then idx=$i; break; fi
  done
  log "$system: stopping follower $idx (SIGTERM), then restarting it on its data dir"
  t0=$(now_ns)
  kill -TERM "${NODE_PIDS[idx]}"
  local deadline=$(($(date +%s) + 60))
  while running "${NODE_PIDS[idx]}"; do
    if (($(date +%s) >= deadline)); then
      log "$system: member $idx still running 60 s after SIGTERM, killing it"
      kill -KILL "${NODE_PIDS[idx]}"
    fi
    sleep 0.02
  done
  t1=$(now_ns)
  echo "$system|stop_ms|$(((t1 - t0) / 1000000))"
  t0=$(now_ns)
  if [[ $system == etcd ]]; then start_etcd_node "$idx"; else start_node "$idx"; fi
  wait_serves "$idx" large-marker "$marker" 300
  t1=$(now_ns)
  echo "$system|restart_ms|$(((t1 - t0) / 1000000))"
  echo "$system|restart_rss_kb|$(awk '/^VmRSS/ { print $2 }' "/proc/${NODE_PIDS[idx]}/status")"
  log "$system: follower $idx served a serializable get $(((t1 - t0) / 1000000)) ms after its restart"
}

build
etcd_version=$(etcd --version | sed -n 's/^etcd Version: //p')
keel_commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$ROOT" status --porcelain 2>/dev/null) ]]; then keel_commit="$keel_commit (dirty)"; fi

if ((${#WORKLOADS[@]})); then
  for rep in $(seq 1 "$REPS"); do
    start_etcd
    leader_endpoint >/dev/null
    run_workloads etcd "$rep"
    stop_cluster
    start_keel
    leader_endpoint >/dev/null
    run_workloads keel "$rep"
    stop_cluster
  done
fi

if [[ $LARGE != 0 ]]; then
  start_etcd
  leader_endpoint >/dev/null
  large_keys etcd >>"$LARGES"
  stop_cluster
  start_keel
  leader_endpoint >/dev/null
  large_keys keel >>"$LARGES"
  stop_cluster
fi

FAILOVERS=$(mktemp)
KILLS=${KILLS:-10}
if ((KILLS > 0)); then
  start_etcd
  leader_endpoint >/dev/null
  failover_rounds etcd "$KILLS" >>"$FAILOVERS"
  stop_cluster
  start_keel
  leader_endpoint >/dev/null
  failover_rounds keel "$KILLS" >>"$FAILOVERS"
  stop_cluster
  KEEL_TIMING=defaults start_keel
  leader_endpoint >/dev/null
  failover_rounds keel-defaults "$KILLS" >>"$FAILOVERS"
  stop_cluster
fi

# Median and range of one column over the repetitions of (system, workload, clients, where).
stat_of() {
  local system=$1 name=$2 clients=$3 where=$4 col=$5
  awk -F'|' -v s="$system" -v n="$name" -v c="$clients" -v w="$where" -v col="$col" '
    $1 == s && $2 == n && $3 == c && $4 == w { v[++k] = $col }
    END {
      for (i = 2; i <= k; i++) { t = v[i]; for (j = i - 1; j >= 1 && v[j] > t; j--) v[j + 1] = v[j]; v[j + 1] = t }
      if (k == 0) { print "n/a n/a n/a"; exit }
      printf "%s %s %s\n", v[int((k + 1) / 2)], v[1], v[k]
    }' "$RESULTS"
}

echo "Keel (commit $keel_commit) and etcd $etcd_version, 3 members each on 127.0.0.1, $(nproc) CPUs,"
echo "fsync on; load: keelctl bench --protocol grpc (etcd v3 API) on the same machine; $REPS"
echo "repetitions, etcd and Keel alternating, $DURATION per run, $KEYS keys, $VALUE_SIZE-byte values,"
echo "snapshot count: ${SNAPSHOT_COUNT:-the default of each}."
echo "Medians over the repetitions, (min-max) for throughput; CPU is the sum of the 3 servers."
# The watch fan-out has columns of its own: its table follows the others'.
OPS_WORKLOADS=()
WATCH_WORKLOADS=()
for w in ${WORKLOADS[@]+"${WORKLOADS[@]}"}; do
  IFS='|' read -r _ _ _ args <<<"$w"
  if [[ $args == watch* ]]; then WATCH_WORKLOADS+=("$w"); else OPS_WORKLOADS+=("$w"); fi
done
# Events missed over every repetition of (system, workload, clients, where).
missed_of() {
  awk -F'|' -v s="$1" -v n="$2" -v c="$3" -v w="$4" \
    '$1 == s && $2 == n && $3 == c && $4 == w { m += $14 } END { print m + 0 }' "$RESULTS"
}
where_label() {
  case $1 in
    leader) echo "leader" ;;
    leader+all) echo "all 3, writer to the leader" ;;
    *) echo "all 3" ;;
  esac
}
if ((${#OPS_WORKLOADS[@]})); then
echo
echo "| workload | clients | endpoints | etcd ops/s | Keel ops/s | Keel/etcd | etcd p50 / p99 ms | Keel p50 / p99 ms | etcd cores per 1000 ops/s | Keel cores per 1000 ops/s |"
echo "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for w in "${OPS_WORKLOADS[@]}"; do
  IFS='|' read -r name clients where _ <<<"$w"
  read -r eo eomin eomax <<<"$(stat_of etcd "$name" "$clients" "$where" 6)"
  read -r ko komin komax <<<"$(stat_of keel "$name" "$clients" "$where" 6)"
  read -r ep50 _ _ <<<"$(stat_of etcd "$name" "$clients" "$where" 7)"
  read -r kp50 _ _ <<<"$(stat_of keel "$name" "$clients" "$where" 7)"
  read -r ep99 _ _ <<<"$(stat_of etcd "$name" "$clients" "$where" 8)"
  read -r kp99 _ _ <<<"$(stat_of keel "$name" "$clients" "$where" 8)"
  read -r ec _ _ <<<"$(stat_of etcd "$name" "$clients" "$where" 9)"
  read -r kc _ _ <<<"$(stat_of keel "$name" "$clients" "$where" 9)"
  awk -v n="$name" -v c="$clients" -v w="$(where_label "$where")" -v eo="$eo" -v eomin="$eomin" -v eomax="$eomax" \
    -v ko="$ko" -v komin="$komin" -v komax="$komax" -v ep50="$ep50" -v ep99="$ep99" \
    -v kp50="$kp50" -v kp99="$kp99" -v ec="$ec" -v kc="$kc" 'BEGIN {
      printf "| %s | %s | %s | %.0f (%.0f-%.0f) | %.0f (%.0f-%.0f) | %.2f | %.2f / %.2f | %.2f / %.2f | %.3f | %.3f |\n",
        n, c, w, eo, eomin, eomax, ko, komin, komax,
        (eo > 0 ? ko / eo : 0), ep50, ep99, kp50, kp99,
        (eo > 0 ? ec / (eo / 1000) : 0), (ko > 0 ? kc / (ko / 1000) : 0) }'
done
fi
if ((${#WATCH_WORKLOADS[@]})); then
echo
echo "Watch fan-out: events/s is the sum over the watchers; lag is from the writer sending a put to"
echo "a watcher receiving its event; missed is summed over the repetitions (0 when every watcher got"
echo "every acknowledged put). CPU per 1000 events/s."
echo
echo "| workload | writers | watchers | endpoints | etcd writes/s | Keel writes/s | etcd events/s | Keel events/s | Keel/etcd | etcd lag p50 / p99 / max ms | Keel lag p50 / p99 / max ms | missed, etcd / Keel | etcd cores per 1000 events/s | Keel cores per 1000 events/s |"
echo "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for w in "${WATCH_WORKLOADS[@]}"; do
  IFS='|' read -r name clients where args <<<"$w"
  read -r ew _ _ <<<"$(stat_of etcd "$name" "$clients" "$where" 6)"
  read -r kw _ _ <<<"$(stat_of keel "$name" "$clients" "$where" 6)"
  read -r ee eemin eemax <<<"$(stat_of etcd "$name" "$clients" "$where" 10)"
  read -r ke kemin kemax <<<"$(stat_of keel "$name" "$clients" "$where" 10)"
  read -r el50 _ _ <<<"$(stat_of etcd "$name" "$clients" "$where" 11)"
  read -r kl50 _ _ <<<"$(stat_of keel "$name" "$clients" "$where" 11)"
  read -r el99 _ _ <<<"$(stat_of etcd "$name" "$clients" "$where" 12)"
  read -r kl99 _ _ <<<"$(stat_of keel "$name" "$clients" "$where" 12)"
  read -r elmax _ _ <<<"$(stat_of etcd "$name" "$clients" "$where" 13)"
  read -r klmax _ _ <<<"$(stat_of keel "$name" "$clients" "$where" 13)"
  read -r ec _ _ <<<"$(stat_of etcd "$name" "$clients" "$where" 9)"
  read -r kc _ _ <<<"$(stat_of keel "$name" "$clients" "$where" 9)"
  watchers=$(sed -n 's/.*--watchers \([0-9]*\).*/\1/p' <<<"$args")
  awk -v n="$name" -v c="$clients" -v wt="${watchers:-1000}" -v w="$(where_label "$where")" \
    -v ew="$ew" -v kw="$kw" -v ee="$ee" -v eemin="$eemin" -v eemax="$eemax" \
    -v ke="$ke" -v kemin="$kemin" -v kemax="$kemax" -v el50="$el50" -v el99="$el99" \
    -v elmax="$elmax" -v kl50="$kl50" -v kl99="$kl99" -v klmax="$klmax" \
    -v em="$(missed_of etcd "$name" "$clients" "$where")" \
    -v km="$(missed_of keel "$name" "$clients" "$where")" -v ec="$ec" -v kc="$kc" 'BEGIN {
      printf "| %s | %s | %s | %s | %.0f | %.0f | %.0f (%.0f-%.0f) | %.0f (%.0f-%.0f) | %.2f | %.2f / %.2f / %.2f | %.2f / %.2f / %.2f | %d / %d | %.4f | %.4f |\n",
        n, c, wt, w, ew, kw, ee, eemin, eemax, ke, kemin, kemax, (ee > 0 ? ke / ee : 0),
        el50, el99, elmax, kl50, kl99, klmax, em, km,
        (ee > 0 ? ec / (ee / 1000) : 0), (ke > 0 ? kc / (ke / 1000) : 0) }'
done
fi
if ((${#WORKLOADS[@]})); then
echo
echo "RSS after the last run of each repetition (MiB per member, median over members and repetitions):"
for system in etcd keel; do
  awk -F'|' -v s="$system" '$1 == s { v[++k] = $4 }
    END { for (i = 2; i <= k; i++) { t = v[i]; for (j = i - 1; j >= 1 && v[j] > t; j--) v[j + 1] = v[j]; v[j + 1] = t }
          if (k) printf "- %s: %.0f MiB (%.0f-%.0f)\n", s, v[int((k + 1) / 2)] / 1024, v[1] / 1024, v[k] / 1024 }' "$RSS"
done
fi
if [[ -s $LARGES ]]; then
  echo
  echo "$LARGE_KEYS keys of $VALUE_SIZE bytes, once per system on a fresh cluster: the fill (each key written"
  echo "once, 256 clients over the members), each member's RSS once all three serve a key written"
  echo "after the fill, then the lowest-numbered follower stopped with SIGTERM and started again on"
  echo "its data dir; restart is from its start to its first serializable get of that key (polled"
  echo "every 20 ms with etcdctl; nothing was written while it was down)."
  echo
  echo "| | etcd | Keel | Keel/etcd |"
  echo "| --- | ---: | ---: | ---: |"
  # Median (min-max) of metric $1, divided by $2, for system $3.
  large_stat() {
    awk -F'|' -v m="$1" -v d="$2" -v s="$3" '$1 == s && $2 == m { v[++k] = $3 / d }
      END { for (i = 2; i <= k; i++) { t = v[i]; for (j = i - 1; j >= 1 && v[j] > t; j--) v[j + 1] = v[j]; v[j + 1] = t }
            if (k == 0) print "n/a n/a n/a"; else printf "%.0f %.0f %.0f\n", v[int((k + 1) / 2)], v[1], v[k] }' "$LARGES"
  }
  large_row() {
    local label=$1 metric=$2 div=$3 e emin emax k kmin kmax
    read -r e emin emax <<<"$(large_stat "$metric" "$div" etcd)"
    read -r k kmin kmax <<<"$(large_stat "$metric" "$div" keel)"
    awk -v l="$label" -v e="$e" -v emin="$emin" -v emax="$emax" -v k="$k" -v kmin="$kmin" -v kmax="$kmax" 'BEGIN {
      es = (emin == emax) ? e : sprintf("%s (%s-%s)", e, emin, emax)
      ks = (kmin == kmax) ? k : sprintf("%s (%s-%s)", k, kmin, kmax)
      printf "| %s | %s | %s | %s |\n", l, es, ks, (e > 0 ? sprintf("%.2f", k / e) : "n/a") }'
  }
  large_row "fill, keys/s" fill_keys_per_s 1
  large_row "RSS after the fill, MiB per member (median (min-max) of 3)" rss_kb 1024
  large_row "RSS ${RSS_SETTLE_S} s later, nothing written, MiB per member" settled_rss_kb 1024
  large_row "follower stop, SIGTERM to exit, ms" stop_ms 1
  large_row "follower restart to a serializable get, ms" restart_ms 1
  large_row "RSS of the restarted follower, MiB" restart_rss_kb 1024
fi
if [[ -s $FAILOVERS ]]; then
  echo
  echo "Failover, kill -9 of the leader to the first acknowledged put through a survivor ($KILLS kills each):"
  for system in etcd keel keel-defaults; do
    awk -v s="$system" '$1 == s { v[++k] = $2 }
      END { for (i = 2; i <= k; i++) { t = v[i]; for (j = i - 1; j >= 1 && v[j] > t; j--) v[j + 1] = v[j]; v[j + 1] = t }
            if (k) { m = (k % 2) ? v[(k + 1) / 2] : (v[k / 2] + v[k / 2 + 1]) / 2
                     line = ""; for (i = 1; i <= k; i++) line = line " " v[i]
                     printf "- %s: median %d ms, max %d ms (sorted:%s)\n", s, m, v[k], line } }' "$FAILOVERS"
  done
fi
