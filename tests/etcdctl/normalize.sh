#!/usr/bin/env bash
# Makes session.sh's output comparable between servers and runs (stdin to stdout): member and
# cluster IDs, raft terms and indexes, DB sizes, version strings, ports, durations and hashes
# become placeholders, and etcdctl's JSON log lines keep only their level, message and error.
# Revisions are kept: etcd and Keel both start at revision 1 and number writes alike.
#
# Hashes are numbered by first appearance (<HASH-1>, <HASH-2>, ...) so equal hashes stay equal.
# The lines of `endpoint health`, `endpoint status` and `member list` are sorted after
# normalizing: their order follows ports and IDs, which differ from run to run.
#
# POSIX awk only (Debian's default awk is mawk): no gensub, asort or regex intervals.
set -euo pipefail

exec awk '
function flush(   i, j, t) {
    if (sorting) {
        for (i = 2; i <= n; i++) {
            t = buf[i]
            for (j = i - 1; j >= 1 && buf[j] > t; j--) buf[j + 1] = buf[j]
            buf[j + 1] = t
        }
    }
    for (i = 1; i <= n; i++) print buf[i]
    n = 0
}

# The value of "key":"..." in a JSON log line (up to the next unescaped quote).
function jstr(s, key,   v) {
    if (!match(s, "\"" key "\":\"")) return ""
    v = substr(s, RSTART + RLENGTH)
    if (key == "error") {
        sub(/"[,}].*$/, "", v)
        return v
    }
    sub(/".*$/, "", v)
    return v
}

function sortlist(s, sep,   a, k, i, j, t, out) {
    k = split(s, a, sep)
    for (i = 2; i <= k; i++) {
        t = a[i]
        for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]
        a[j + 1] = t
    }
    out = a[1]
    for (i = 2; i <= k; i++) out = out sep a[i]
    return out
}

function hash(h) {
    if (!(h in hashes)) hashes[h] = "<HASH-" (++nhashes) ">"
    return hashes[h]
}

function jnum(s, key, ph) {
    gsub("\"" key "\":[0-9]+", "\"" key "\":" ph, s)
    return s
}

function fnum(s, key, ph) {
    sub("^\"" key "\" : [0-9]+$", "\"" key "\" : " ph, s)
    return s
}

function norm(s,   f, k, v, a, b, rest) {
    # etcdctl client logs (zap JSON on stderr): timestamps, callers, client UUIDs and ports vary.
    if (s ~ /^\{"level":"/) {
        v = "{\"level\":\"" jstr(s, "level") "\",\"msg\":\"" jstr(s, "msg") "\""
        if (s ~ /"error":"/) v = v ",\"error\":\"" jstr(s, "error") "\""
        return v "}"
    }
    gsub(/127\.0\.0\.1:[0-9]+/, "127.0.0.1:<PORT>", s)
    gsub(/localhost:[0-9]+/, "localhost:<PORT>", s)

    # -w json
    s = jnum(s, "cluster_id", "<CLUSTER-ID>")
    s = jnum(s, "member_id", "<MEMBER-ID>")
    s = jnum(s, "leader", "<MEMBER-ID>")
    s = jnum(s, "ID", "<MEMBER-ID>")
    s = jnum(s, "raft_term", "<TERM>")
    s = jnum(s, "raftTerm", "<TERM>")
    s = jnum(s, "raftIndex", "<INDEX>")
    s = jnum(s, "raftAppliedIndex", "<INDEX>")
    s = jnum(s, "dbSize", "<SIZE>")
    s = jnum(s, "dbSizeInUse", "<SIZE>")
    s = jnum(s, "hash", "<HASH>")
    gsub(/"version":"[^"]*"/, "\"version\":\"<VERSION>\"", s)

    # -w fields
    s = fnum(s, "ClusterID", "<CLUSTER-ID>")
    s = fnum(s, "MemberID", "<MEMBER-ID>")
    s = fnum(s, "Leader", "<MEMBER-ID>")
    s = fnum(s, "RaftTerm", "<TERM>")
    s = fnum(s, "RaftIndex", "<INDEX>")
    s = fnum(s, "RaftAppliedIndex", "<INDEX>")
    s = fnum(s, "DBSize", "<SIZE>")
    s = fnum(s, "DBSizeInUse", "<SIZE>")
    s = fnum(s, "Hash", "<HASH>")
    sub(/^"Version" : "[^"]*"$/, "\"Version\" : \"<VERSION>\"", s)

    # endpoint status: endpoint, ID, version, DB size, is leader, is learner, raft term,
    # raft index, raft applied index, errors.
    if (s ~ /^127\.0\.0\.1:<PORT>, [0-9a-f]+, [^,]*, [^,]*, (true|false), (true|false), [0-9]+, [0-9]+, [0-9]+, /) {
        k = split(s, f, ", ")
        f[2] = "<MEMBER-ID>"; f[3] = "<VERSION>"; f[4] = "<SIZE>"
        f[7] = "<TERM>"; f[8] = "<INDEX>"; f[9] = "<INDEX>"
        v = f[1]
        for (a = 2; a <= k; a++) v = v ", " f[a]
        return v
    }
    # endpoint hashkv: endpoint, hash.
    if (s ~ /^127\.0\.0\.1:<PORT>, [0-9]+$/) {
        v = s; sub(/^.*, /, "", v)
        return "127.0.0.1:<PORT>, " hash(v)
    }
    # member list: ID, status, name, peer URLs, client URLs, is learner.
    if (s ~ /^[0-9a-f]+, (started|unstarted), /) {
        sub(/^[0-9a-f]+,/, "<MEMBER-ID>,", s)
        return s
    }
    # member add/remove/promote (etcdctl pads IDs to 16 characters).
    if (s ~ /^Member +[0-9a-f]+ (added to|removed from|promoted in) cluster +[0-9a-f]+$/) {
        sub(/^Member +[0-9a-f]+ /, "Member <MEMBER-ID> ", s)
        sub(/cluster +[0-9a-f]+$/, "cluster <CLUSTER-ID>", s)
        return s
    }
    if (s ~ /^ETCD_INITIAL_CLUSTER="/) {
        v = s; sub(/^ETCD_INITIAL_CLUSTER="/, "", v); sub(/"$/, "", v)
        return "ETCD_INITIAL_CLUSTER=\"" sortlist(v, ",") "\""
    }
    # move-leader
    if (s ~ /^Leadership transferred from [0-9a-f]+ to [0-9a-f]+$/) {
        k = split(s, f, " ")
        return "Leadership transferred from <MEMBER-ID> to " (f[4] == f[6] ? "the same <MEMBER-ID>" : "another <MEMBER-ID>")
    }
    gsub(/took = [0-9.]+[a-zµ]*s/, "took = <DURATION>", s)
    return s
}

/^\$ etcdctl / {
    flush()
    s = $0
    gsub(/127\.0\.0\.1:[0-9]+/, "127.0.0.1:<PORT>", s)
    if (s ~ /^\$ etcdctl (member (remove|promote)|move-leader) [0-9a-f]+$/) sub(/ [0-9a-f]+$/, " <MEMBER-ID>", s)
    print s
    sorting = ($0 ~ /^\$ etcdctl (endpoint (health|status)$|member list)/)
    next
}
/^$/ { flush(); print; next }
{ buf[++n] = norm($0) }
END { flush() }
'
