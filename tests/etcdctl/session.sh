#!/usr/bin/env bash
# A fixed etcdctl (v3 API) session against ENDPOINTS (comma-separated host:port), printing each
# command as `$ etcdctl ...` followed by its stdout and stderr, and `[exit N]` when N != 0.
#
# The raw output holds IDs, terms, sizes, ports and timestamps that differ between servers and
# runs; pipe it through normalize.sh before comparing it with expected.txt. The session expects
# an empty store (revision 1): the first write is revision 2 on etcd and Keel alike, and
# revisions are compared as they are.
#
# Left out: user and role commands (Keel answers them Unimplemented) and member update (it
# would move a running member's peer URL); tests/etcd_client.rs covers member update.
#
# Usage: session.sh ENDPOINTS
set -uo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 ENDPOINTS (e.g. 127.0.0.1:2379,127.0.0.1:22379)" >&2
    exit 2
fi
ENDPOINTS=$1
ETCDCTL=${ETCDCTL:-etcdctl}
export ETCDCTL_API=3
# etcdctl reads its flags from ETCDCTL_* variables too; only ours count.
unset ETCDCTL_ENDPOINTS ETCDCTL_CACERT ETCDCTL_CERT ETCDCTL_KEY ETCDCTL_USER \
    ETCDCTL_PASSWORD ETCDCTL_WRITE_OUT ETCDCTL_INSECURE_TRANSPORT 2>/dev/null || true

# Every command is bounded in time, so a hung server fails the session instead of hanging it.
TIMEOUTS=(--dial-timeout=5s --command-timeout=10s)

ctl() {
    timeout -k 5 60 "$ETCDCTL" --endpoints="$ENDPOINTS" "${TIMEOUTS[@]}" "$@"
}

# Prints a shell-quoted form of the arguments: words as they are, others in double quotes.
show() {
    local out="" a
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./:=,+-]+$ ]]; then
            out+=" $a"
        else
            out+=" \"${a//\"/\\\"}\""
        fi
    done
    printf '%s' "${out# }"
}

# run ARGS...: one etcdctl command.
run() {
    echo "\$ etcdctl $(show "$@")"
    ctl "$@" 2>&1
    local rc=$?
    [ "$rc" -eq 0 ] || echo "[exit $rc]"
    echo
}

# run_pipe FILTER ARGS...: one etcdctl command whose output goes through FILTER (shown).
run_pipe() {
    local filter=$1
    shift
    echo "\$ etcdctl $(show "$@") | $filter"
    ctl "$@" 2>&1 | bash -c "$filter"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || echo "[exit $rc]"
    echo
}

# run_stdin INPUT ARGS...: one etcdctl command reading INPUT on stdin (shown as a here-doc).
run_stdin() {
    local input=$1
    shift
    echo "\$ etcdctl $(show "$@") <<EOF"
    printf '%s' "$input"
    echo "EOF"
    printf '%s' "$input" | ctl "$@" 2>&1
    local rc=$?
    [ "$rc" -eq 0 ] || echo "[exit $rc]"
    echo
}

# run_generated WHAT COMMAND ARGS...: one etcdctl command reading the output of COMMAND (a
# bash function) on stdin; the input is shown as WHAT only. With FILTER set, the output goes
# through it (shown).
run_generated() {
    local what=$1 gen=$2 filter=${FILTER:-cat}
    shift 2
    echo "\$ etcdctl $(show "$@") < $what${FILTER:+ | $FILTER}"
    "$gen" | ctl "$@" 2>&1 | bash -c "$filter"
    local rc=${PIPESTATUS[1]}
    [ "$rc" -eq 0 ] || echo "[exit $rc]"
    echo
}

# Values of N bytes ('v' repeated).
bytes() { head -c "$1" /dev/zero | tr '\0' v; }
just_under_limit() { bytes 1572000; }   # etcd's --max-request-bytes is 1.5 MiB (1572864)
over_limit() { bytes 2000000; }         # under the client's 2 MiB send limit, over the server's
# A txn of N puts on distinct keys (etcd's --max-txn-ops is 128).
txn_of() {
    local i
    echo
    for ((i = 1; i <= $1; i++)); do echo "put many$i v"; done
    echo
    echo
}
txn_128() { txn_of 128; }
txn_129() { txn_of 129; }

# The member ID (hex, as etcdctl prints it) of the leader, or of a follower, from
# `endpoint status` (fields: endpoint, ID, version, DB size, is leader, ...).
member_where_leader_is() {
    ctl endpoint status 2>/dev/null | awk -F', ' -v want="$1" '$5 == want { print $2; exit }'
}

echo "# etcdctl session (ETCDCTL_API=3); revision 1 is the empty store"
echo

echo "## put and get"
run put foo bar
run put foo1 bar1
run put foo2 bar2
run put -w json zoo zebra
run get foo
run get --print-value-only foo
run get --prefix foo
run get --prefix --keys-only foo
run get --prefix --limit 1 foo
run get --prefix --order DESCEND --sort-by KEY foo
run get foo foo2
run get --from-key foo1
run get --from-key --keys-only --limit 2 foo1
run get --consistency s foo
run get nosuch
run get foo -w json
run get --prefix --limit 1 foo -w json
run get --prefix --keys-only foo -w json
run get foo -w fields

echo "## revisions"
run put foo baz
run get foo
run get --rev 2 foo
run get --rev 2 -w json foo
run get --rev 3 --prefix foo
run get --rev 0 foo
run get foo -w json
run put --prev-kv foo qux
run put --prev-kv -w json foo1 bar1-2
run put --ignore-value foo2
run get --prefix foo -w json
run get --sort-by MODIFY --order DESCEND --prefix ""
run get --sort-by VERSION --prefix ""
run get --sort-by CREATE --order DESCEND --prefix ""
run get --sort-by VALUE --prefix ""

echo "## delete"
run del foo1
run del nosuch
run del -w json nosuch
run del --prefix --prev-kv foo
run get --prefix foo
run get --rev 9 --prefix foo
run put zz1 1
run put zz2 2
run put zz3 3
run put zz4 4
run del -w json zz1
run del --prev-kv -w json zz2 zz3
run del --from-key zz3
run get --prefix ""

echo "## txn"
# Succeeds: zoo is zebra. Then fails: zoo is lion.
txn='value("zoo") = "zebra"

put zoo lion
get zoo

put zoo tiger
get zoo

'
run_stdin "$txn" txn
run_stdin "$txn" txn
run_stdin 'create("nosuch") = "0"
mod("zoo") > "2"

put nosuch created

get zoo

' txn
run_stdin 'version("nosuch") = "2"

put nosuch twice

del nosuch
get --prefix no

' txn
FILTER='sort | uniq -c' run_generated "(a txn of 128 puts)" txn_128 txn
run del --prefix many
run get --prefix zoo -w json

echo "## compaction"
run compaction 5
run get --rev 4 zoo
run get --rev 5 zoo
run get --rev 6 --prefix ""
run compaction 3
run compaction 5
run compaction 0
run compaction 100
run compaction --physical 7
run get zoo
run endpoint hashkv -w json

echo "## bad input"
run put "" v
run get ""
run del ""
run get --rev 100 zoo
run put --ignore-value nosuch
run put --lease 1234 a v
run_stdin 'value("zoo") = "tiger"

put dup 1
put dup 2

get zoo

' txn
run_generated "(a txn of 129 puts)" txn_129 txn
run_generated "(a value of 1572000 bytes)" just_under_limit put big
run_generated "(a value of 2000000 bytes)" over_limit put big
run del big
run endpoint hashkv --rev 2
run endpoint hashkv --rev 100

echo "## cluster and maintenance"
run endpoint hashkv
run endpoint hashkv --rev 12
run endpoint health
run endpoint status
run endpoint status -w fields
# Only the columns Keel reports like etcd: ID, status, name, peer URLs, is learner.
run_pipe 'cut -d, -f1-4,6' member list
run member add --learner n4 --peer-urls http://127.0.0.1:1
learner=$(ctl member list 2>/dev/null | awk -F', ' '$6 == "true" { print $1; exit }')
run member remove "${learner:-none}"
run member remove "${learner:-none}"
run member promote "$(member_where_leader_is false)"
run alarm list
run alarm disarm
run defrag
follower=$(member_where_leader_is false)
run move-leader "$follower"
run move-leader "$follower"
run get --prefix zoo

echo "## auth (disabled, as on a fresh etcd)"
run auth disable
run auth enable
run --user root:secret get foo
run alarm list -w json

echo "## watch (history only: each watch is stopped after 3 s, before any live write)"
# A watch from an old revision prints the history it replays; `timeout` ends it (exit 124).
run_timed() {
    echo "\$ etcdctl $(show "$@")   # stopped after 3 s"
    timeout -k 2 3 "$ETCDCTL" --endpoints="$ENDPOINTS" --dial-timeout=5s "$@" 2>&1
    echo
}
run_timed watch --rev 2 foo
run_timed watch --rev 10 --prefix zz
run_timed watch --rev 12 --prev-kv zoo
run_timed watch --rev 2 --prefix ""
run watch --rev 3 zoo

echo "## lease"
# Lease IDs differ between servers; the session shows the one granted as $LEASE.
LEASE_ID=none
lease_run() {
    echo "\$ etcdctl $(show "$@" | sed "s/$LEASE_ID/\$LEASE/g")"
    ctl "$@" 2>&1 | sed -e "s/$LEASE_ID/\$LEASE/g" -e 's/remaining([0-9]*s)/remaining(<N>s)/'
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || echo "[exit $rc]"
    echo
}
granted=$(ctl lease grant 300 2>&1)
LEASE_ID=$(echo "$granted" | awk '$1 == "lease" { print $2; exit }')
echo "\$ etcdctl lease grant 300"
echo "$granted" | sed "s/$LEASE_ID/\$LEASE/g"
echo
lease_run put --lease="$LEASE_ID" leased1 v1
lease_run put --lease="$LEASE_ID" leased2 v2
lease_run get --prefix leased
lease_run lease timetolive "$LEASE_ID"
lease_run lease timetolive --keys "$LEASE_ID"
lease_run lease list
lease_run lease keep-alive --once "$LEASE_ID"
lease_run lease revoke "$LEASE_ID"
lease_run get --prefix leased
lease_run lease timetolive "$LEASE_ID"
lease_run lease keep-alive --once "$LEASE_ID"
lease_run lease revoke "$LEASE_ID"
lease_run put --lease="$LEASE_ID" leased3 v3
run lease timetolive 1234abcd
run lease list

echo "## snapshot"
snapdir=$(mktemp -d "${TMPDIR:-/tmp}/keel-snap.XXXXXX")
# A snapshot is asked of one member: etcdctl refuses several endpoints.
echo "\$ etcdctl --endpoints=<FIRST> snapshot save \$DIR/snap.db"
timeout -k 5 60 "$ETCDCTL" --endpoints="${ENDPOINTS%%,*}" "${TIMEOUTS[@]}" \
    snapshot save "$snapdir/snap.db" 2>&1 | sed "s#$snapdir#\$DIR#g"
echo "[exit ${PIPESTATUS[0]}]"
[ -s "$snapdir/snap.db" ] && echo "(the file is not empty)"
rm -rf "$snapdir"
echo
