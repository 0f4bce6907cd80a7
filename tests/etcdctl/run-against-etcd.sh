#!/usr/bin/env bash
# Runs session.sh against a real 3-member etcd cluster on free 127.0.0.1 ports and compares its
# normalized output with expected.txt (the file tests/etcdctl.rs holds Keel to).
#
# Usage: run-against-etcd.sh [--update]
#   without flags: exits 1 and prints a unified diff if the output differs from expected.txt
#   --update:      rewrites expected.txt instead
#
# Needs etcd and etcdctl 3.4 (Debian: apt-get install etcd-server etcd-client); ETCD and ETCDCTL
# override the binaries. The members are named node-1..node-3, Keel's default names, so the
# names in `member list` and `member add` compare as they are.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
update=0
case "${1:-}" in
    "") ;;
    --update) update=1 ;;
    *)
        echo "usage: $0 [--update]" >&2
        exit 2
        ;;
esac

ETCD=${ETCD:-etcd}
ETCDCTL=${ETCDCTL:-etcdctl}
export ETCDCTL
for bin in "$ETCD" "$ETCDCTL"; do
    if ! command -v "$bin" >/dev/null 2>&1; then
        echo "$bin not found: apt-get install etcd-server etcd-client (etcd 3.4)" >&2
        exit 2
    fi
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/keel-etcdctl.XXXXXX")
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Sets `port` to a port on 127.0.0.1 nothing listens on and not chosen before in this run.
# Binding is left to etcd, so another process may take the port first: then the cluster does
# not become healthy and is started again on other ports.
declare -A taken=()
port=0
free_port() {
    while :; do
        port=$((20000 + RANDOM % 40000))
        [ -z "${taken[$port]:-}" ] || continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            taken[$port]=1
            return
        fi
    done
}

endpoints=""
start_cluster() {
    local i peer=() client=() initial=""
    for i in 1 2 3; do
        free_port
        peer[i]=$port
        free_port
        client[i]=$port
        initial+="${initial:+,}node-$i=http://127.0.0.1:${peer[i]}"
    done
    endpoints=""
    pids=()
    for i in 1 2 3; do
        "$ETCD" --name "node-$i" --data-dir "$tmp/node-$i" \
            --listen-peer-urls "http://127.0.0.1:${peer[i]}" \
            --initial-advertise-peer-urls "http://127.0.0.1:${peer[i]}" \
            --listen-client-urls "http://127.0.0.1:${client[i]}" \
            --advertise-client-urls "http://127.0.0.1:${client[i]}" \
            --initial-cluster "$initial" --initial-cluster-state new \
            --initial-cluster-token keel-etcdctl \
            --heartbeat-interval 100 --election-timeout 1000 \
            >"$tmp/node-$i.log" 2>&1 &
        pids+=($!)
        endpoints+="${endpoints:+,}127.0.0.1:${client[i]}"
    done
}

# Healthy: every member answers a linearizable read, within 30 seconds.
wait_healthy() {
    local deadline=$((SECONDS + 30)) pid
    while [ "$SECONDS" -lt "$deadline" ]; do
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null || return 1
        done
        if ETCDCTL_API=3 timeout 10 "$ETCDCTL" --endpoints="$endpoints" \
            --dial-timeout=1s --command-timeout=2s endpoint health >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    return 1
}

started=0
for attempt in 1 2 3; do
    start_cluster
    if wait_healthy; then
        started=1
        break
    fi
    echo "etcd cluster did not become healthy (attempt $attempt); logs:" >&2
    tail -n 20 "$tmp"/node-*.log >&2 || true
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    pids=()
    rm -rf "$tmp"/node-*
done
[ "$started" -eq 1 ] || {
    echo "could not start a 3-member etcd cluster" >&2
    exit 1
}
# etcd refuses member changes until every peer has been connected for 5 seconds (its
# HealthInterval, with --strict-reconfig-check on by default): `member add` would fail with
# "unhealthy cluster". Nothing to poll without changing the cluster, so wait it out.
sleep 6
echo "etcd $("$ETCD" --version | sed -n 's/^etcd Version: //p') cluster at $endpoints" >&2

bash "$here/session.sh" "$endpoints" >"$tmp/raw.txt"
bash "$here/normalize.sh" <"$tmp/raw.txt" >"$tmp/actual.txt"

if [ "$update" -eq 1 ]; then
    cp "$tmp/actual.txt" "$here/expected.txt"
    echo "wrote $here/expected.txt" >&2
elif diff -u "$here/expected.txt" "$tmp/actual.txt"; then
    echo "etcd's output matches expected.txt" >&2
else
    echo "etcd's output differs from expected.txt (rerun with --update to accept it)" >&2
    exit 1
fi
