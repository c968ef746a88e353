#!/usr/bin/env bash
# The sequencer part of the demo (scripts/demo.sh runs it after the PostgreSQL part): a real 3-node
# tob-sequencer cluster on loopback with two "databases" racing to claim the same usernames
# and the leader killed mid-way; then the deterministic simulator attacking the same code with
# faults, and the checkers that judge the result.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -p tob-sim -p tob-cli -p tob-server --quiet
sim=./target/release/tob-sim
tob=./target/release/tob
out=$(mktemp -d)
cluster_pid=
cleanup() {
    [ -n "$cluster_pid" ] && kill "$cluster_pid" 2>/dev/null
    pkill -f "tob-sequencer .*--data-dir $out/" 2>/dev/null || true
    rm -rf "$out"
}
trap cleanup EXIT

. scripts/lib/local.sh   # free_base_port
base=$(free_base_port)
echo "== 0. A real 3-node cluster on loopback (ports $base..$((base + 8)))"
$tob cluster up --dir "$out/cluster" --base-port "$base" --restart-after 1 > "$out/up.txt" 2> "$out/cluster.log" &
cluster_pid=$!
sleep 1.5
export TOB_CLUSTER=$(sed -n 's/^TOB_CLUSTER=//p' "$out/up.txt")
echo "   TOB_CLUSTER=$TOB_CLUSTER"
$tob status | sed 's/^/   /'
echo "   \$ tob create-namespace users   (claims need a declared namespace)"
$tob create-namespace users | sed "s/^/   /"
echo
echo "   Two databases race to claim the same 20 usernames, at the same time:"
for db in db-east db-west; do
    ( for i in $(seq 1 20); do
          if token=$($tob claim users "user$i" "$db" 2>/dev/null); then echo "$db user$i $token"; fi
      done > "$out/won-$db.txt" ) &
done
wait %2 %3 2>/dev/null || wait
east=$(wc -l < "$out/won-db-east.txt"); west=$(wc -l < "$out/won-db-west.txt")
echo "   db-east won $east names, db-west won $west names, together $((east + west)) of 20"
dupes=$(cat "$out"/won-*.txt | awk '{print $2}' | sort | uniq -d | wc -l)
echo "   names won twice: $dupes"
echo "   user7 belongs to: $($tob owner users user7)"
echo
leader_pid=$($tob --json status | python3 -c 'import json,sys
for l in sys.stdin:
    s=json.loads(l)
    if s.get("role")=="leader": print(s["pid"])')
echo "   kill -9 the leader (pid $leader_pid), then claim again:"
kill -9 "$leader_pid"
$tob claim users user7 db-late | sed "s/^/   /" || true
$tob status | sed 's/^/   /'
echo
sleep 1.5   # `tob cluster up --restart-after 1` brings the old leader back
follower=$($tob --json status | python3 -c 'import json,sys
for l in sys.stdin:
    s=json.loads(l)
    if s.get("role")=="follower": print(s["node"], s["pid"]); break')
[ -n "$follower" ] || { echo "   no follower to wipe (tob status found none)" >&2; exit 1; }
set -- $follower
echo "   A follower loses its disk: kill -9 node $1 and delete its data directory; it restarts blank"
echo "   and may not vote until it has heard from every member and caught up:"
rejoins_before=$(grep -c "rejoined: this node votes again" "$out/cluster.log" || true)
kill -9 "$2"
rm -rf "$out/cluster/n$1"
for _ in $(seq 100); do
    [ "$(grep -c "rejoined: this node votes again" "$out/cluster.log" || true)" -gt "$rejoins_before" ] && break
    sleep 0.1
done
grep -o "starting without earlier storage[^:]*\|rejoined: this node votes again" "$out/cluster.log" \
    | tail -2 | sed 's/^/   log: /'
$tob status | sed 's/^/   /'
echo "   user7 still belongs to: $($tob owner users user7)"
echo

echo "== 1. The simulator: six clients race for four usernames on a 3-node cluster while the nemesis"
echo "      partitions, crashes, loses, duplicates and delays. Seed 7, replayable:"
$sim --seed 7 --history "$out/history.jsonl" --verbose | grep -v '^nemesis end' | sed 's/^/   /'

echo
echo "== 2. Who got alice? The first answered claims on alice from the recorded history:"
# awk reads to the end: `| head` would end the pipe early and, under pipefail, the demo.
awk '/"f":"claim","key":"alice"/ && /"type":"ok"/ && n++ < 6 { print "   " $0 }' "$out/history.jsonl"

echo
echo "== 3. The history re-checked from the file (linearizability, total order, fencing, counters):"
$sim check "$out/history.jsonl" --nodes n1,n2,n3 | sed 's/^/   /'

echo
echo "== 4. Forge one result: a claim that was refused ('taken') now says it won too."
python3 - "$out/history.jsonl" "$out/forged.jsonl" <<'PY'
import json, sys
lines = open(sys.argv[1]).read().splitlines()
for i, line in enumerate(lines):
    e = json.loads(line)
    if e.get("type") == "ok" and e.get("f") == "claim" and e["value"].get("result") == "taken":
        e["value"] = {"result": "claimed", "token": 10**9}
        lines[i] = json.dumps(e, separators=(",", ":"))
        print("   forged:", lines[i])
        break
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
PY
if $sim check "$out/forged.jsonl" --nodes n1,n2,n3 | sed 's/^/   /'; then
    echo "   the checker missed the forgery!" >&2
    exit 1
fi
echo "   -> rejected: two owners of one name is not a linearizable history."

echo
echo "== 5. 300 seeds, 3 and 5 nodes:"
$sim --seeds 0..300 --nodes 3 | tail -1 | sed 's/^/   /'
$sim --seeds 0..300 --nodes 5 | tail -1 | sed 's/^/   /'
