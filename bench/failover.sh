#!/usr/bin/env bash
# Write unavailability after the leader of a local 3-node Keel cluster is killed.
#
# Builds the release binaries and starts a fresh cluster on 127.0.0.1 (free ports, data dirs
# in a temporary dir). Each round finds the leader, kills it with SIGKILL (time T0), then
# PUTs a fresh key to the surviving nodes in turn (curl, 1 s per request, 20 s in all) until
# one answers 204 (time T1). Failover = T1 - T0: election time plus one committed write, as
# a client that retries at once sees it. The killed node is then restarted on its data dir
# and the next round waits until it knows the leader and has applied the leader's commit
# index. Prints every round, then the median and maximum.
#
# Run from anywhere:   bench/failover.sh
#   KILLS=10            rounds
#   TICK_MS=50          --tick-ms of every node (the server's default; etcd's timing is 100)
#   ELECTION_TICKS=6    --election-ticks of every node (the server's default; etcd's is 10)
#   BASE_PORT, SKIP_BUILD=1, KEEP_DATA=1: see bench/lib.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KILLS=${KILLS:-10}
TICK_MS=${TICK_MS:-50}
ELECTION_TICKS=${ELECTION_TICKS:-6}
NODE_FLAGS=(--tick-ms "$TICK_MS" --election-ticks "$ELECTION_TICKS")
WRITE_DEADLINE_MS=20000

# Waits until node $1 knows a leader and has applied that leader's commit index.
wait_caught_up() {
  local node=$1 timeout=$2 st leader applied commit
  local deadline=$(($(date +%s) + timeout))
  while (($(date +%s) < deadline)); do
    check_node "$node"
    if st=$(node_status "$node" 2>/dev/null); then
      read -r leader applied <<<"$(jq -r '"\(.leader) \(.applied)"' <<<"$st")"
      if [[ $leader != 0 ]] && commit=$(node_status "$leader" 2>/dev/null | jq -re .commit) &&
        ((applied >= commit)); then
        return 0
      fi
    fi
    sleep 0.1
  done
  die "node $node did not catch up with the leader within ${timeout}s"
}

build
start_cluster
wait_for_leader 30 "${NODES[@]}" >/dev/null
log "$KILLS rounds, tick ${TICK_MS} ms, election timeout ${ELECTION_TICKS} ticks"

RESULTS=()
for ((round = 1; round <= KILLS; round++)); do
  leader=$(wait_for_leader 30 "${NODES[@]}")
  term=$(node_status "$leader" | jq -r .term)
  survivors=()
  for n in "${NODES[@]}"; do [[ $n == "$leader" ]] || survivors+=("$n"); done

  kill -KILL "${NODE_PIDS[leader]}"
  t0=$(date +%s%N)

  # Try the survivors in turn until one commits a write.
  declare -A replies=()
  attempts=0
  answered=""
  while [[ -z $answered ]]; do
    for n in "${survivors[@]}"; do
      attempts=$((attempts + 1))
      code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 -X PUT \
        --data-binary "round $round" "http://$(client_addr "$n")/failover-r$round-a$attempts") || true
      replies[$code]=$((${replies[$code]:-0} + 1))
      if [[ $code == 204 ]]; then
        t1=$(date +%s%N)
        answered=$n
        break
      fi
      if (($(date +%s%N) - t0 > WRITE_DEADLINE_MS * 1000000)); then
        die "round $round: no write committed within ${WRITE_DEADLINE_MS} ms of killing node $leader"
      fi
    done
  done
  ms=$(((t1 - t0) / 1000000))
  RESULTS+=("$ms")
  read -r new_leader new_term <<<"$(node_status "$answered" | jq -r '"\(.leader) \(.term)"')"
  summary=""
  for code in "${!replies[@]}"; do # curl's 000: no answer within its 1 s
    summary+=" $([[ $code == 000 ]] && echo "none(1s)" || echo "$code") x${replies[$code]}"
  done
  unset replies
  printf 'round %d: killed leader node %s (term %s); write committed via node %s after %d ms;' \
    "$round" "$leader" "$term" "$answered" "$ms"
  printf ' new leader node %s (term %s); %d attempts, HTTP replies:%s\n' \
    "$new_leader" "$new_term" "$attempts" "$summary"

  start_node "$leader"
  wait_caught_up "$leader" 60
done

sorted=$(printf '%s\n' "${RESULTS[@]}" | sort -n)
count=${#RESULTS[@]}
if ((count % 2)); then
  median=$(sed -n "$((count / 2 + 1))p" <<<"$sorted")
else
  median=$((($(sed -n "$((count / 2))p" <<<"$sorted") + $(sed -n "$((count / 2 + 1))p" <<<"$sorted")) / 2))
fi
max=$(tail -n 1 <<<"$sorted")
echo "failover over $count kills (tick ${TICK_MS} ms, election ${ELECTION_TICKS} ticks," \
  "randomized timeout $((TICK_MS * ELECTION_TICKS))..$((2 * TICK_MS * ELECTION_TICKS)) ms):" \
  "median $median ms, max $max ms"
