#!/usr/bin/env bash
# A claim race checked from outside, with the sequencer leader killed in the middle (a program
# that prints what it found; it exits 1 if a check fails). One PostgreSQL 15 server with
# several databases ("shards"), each with CREATE EXTENSION tob and a users table whose names
# tob_unique keeps unique across every shard (no local unique index); pgbench runs in every
# shard at once, inserting names from a small shared pool and deleting some; a third of the way
# in, the cluster's leader gets kill -9. Afterwards, straight from the tables and the cluster:
#   1. no name exists twice, within a shard or across shards;
#   2. every row's name is held in the cluster, by that shard;
#   3. no name is held without a row (no claim leaked).
# Usage: scripts/pgbench-race.sh [seconds, default 30]
# RACE_SHARDS (3), RACE_CLIENTS per shard (8) and RACE_POOL of names (2000) change the race.
# RACE_PLANT=duplicate|leak damages the result before the checks, to show that they catch it:
# a second row for a name, written with the trigger switched off; or a name claimed with no
# row.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
shards=${RACE_SHARDS:-3}
clients=${RACE_CLIENTS:-8}
pool=${RACE_POOL:-2000}
./scripts/setup.sh
./scripts/install-extension.sh > /tmp/tob-race-build.log 2>&1 || { cat /tmp/tob-race-build.log; exit 1; }
tob=./target/release/tob
work=$(mktemp -d /tmp/tob-race-XXXXXX)
chmod 755 "$work"
. scripts/lib/local.sh
trap stop_local EXIT
start_cluster
export TOB_CLUSTER=$cluster
start_postgres "cluster_name = 'race'" "max_connections = $(( shards * clients + 20 ))"
for i in $(seq "$shards"); do
    psql -d postgres -c "CREATE DATABASE shard$i"
    psql -d "shard$i" -f sql/race/setup.sql
done
until psql -d shard1 -tAc "SELECT tob_sync()" > /dev/null 2>&1; do sleep 0.2; done
psql -d shard1 -tAc "SELECT tob_create_namespace('race_users')" > /dev/null

echo "== $shards shards x $clients pgbench clients, $seconds s, names user1..user$pool (1 in 4 statements a DELETE)"
for i in $(seq "$shards"); do
    env PGHOST="$work/pg" PGPORT="$port" PGUSER=postgres "$pgbin/pgbench" -n -c "$clients" -j 1 \
        -T "$seconds" -D pool="$pool" -f sql/race/race.sql "shard$i" > "$work/pgbench$i.txt" 2>&1 &
done
sleep $(( seconds / 3 ))
leader() {
    $tob --json status 2> /dev/null | python3 -c 'import json,sys
for line in sys.stdin:
    s = json.loads(line)
    if s.get("role") == "leader": print(s["node"], s["pid"]); break' || true
}
read -r node pid < <(leader)
killed_at=$(date +%s.%N)
kill -9 "$pid"
echo "   kill -9 of the leader, node $node (pid $pid), $(( seconds / 3 )) s in"
for _ in $(seq 200); do
    read -r new _ < <(leader) && [ -n "${new:-}" ] && [ "$new" != "$node" ] && break
    sleep 0.05
done
[ -n "${new:-}" ] && [ "$new" != "$node" ] || { echo "   no new leader within 10 s"; exit 1; }
echo "   node $new leads, $(python3 -c "import time; print(round(time.time() - $killed_at, 2))") s after the kill"
wait $(jobs -p | grep -v "^$cluster_pid$") 2> /dev/null || true

echo "== pgbench"
for i in $(seq "$shards"); do
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$work/pgbench$i.txt")
    done_tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$work/pgbench$i.txt")
    aborted=$(grep -c "aborted in command" "$work/pgbench$i.txt" || true)
    echo "   shard$i: ${done_tx:-?} statements, ${tps:-?} per second, clients stopped by an error: $aborted"
    grep "aborted in command" "$work/pgbench$i.txt" | head -3 | sed 's/^/      /' || true
done

case "${RACE_PLANT:-}" in
    duplicate)
        name=$(psql -d shard1 -tAc "SELECT name FROM users LIMIT 1")
        psql -d shard2 -c "ALTER TABLE users DISABLE TRIGGER users_unique" \
            -c "INSERT INTO users (name) VALUES ('$name')"
        echo "== planted: a second row for $name in shard2, with the trigger off" ;;
    leak)
        name=$(psql -d shard1 -tAc "SELECT 'user' || n FROM generate_series(1, $pool) n
            WHERE NOT EXISTS (SELECT 1 FROM tob_owner('race_users', 'user' || n)) LIMIT 1")
        psql -d shard1 -tAc "SELECT tob_claim('race_users', '$name', 'race/shard1')" > /dev/null
        echo "== planted: $name claimed with no row" ;;
    '') ;;
    *) echo "RACE_PLANT is duplicate or leak"; exit 2 ;;
esac

echo "== checks (from the tables and the cluster)"
failed=0
: > "$work/names"
for i in $(seq "$shards"); do psql -d "shard$i" -tAc "SELECT name FROM users" >> "$work/names"; done
rows=$(wc -l < "$work/names")
names=$(sort -u "$work/names" | wc -l)
twice=$(sort "$work/names" | uniq -d | wc -l)
echo "   rows: $rows across $shards shards ($names names); names found twice: $twice"
[ "$twice" -eq 0 ] || { failed=1; sort "$work/names" | uniq -d | awk 'NR <= 5 { print "      twice: " $0 }'; }
# Claims of transactions that just ended are settled by each instance's background worker.
deadline=$(( $(date +%s) + 30 ))
while :; do
    unsettled=$(psql -d shard1 -tAc "SELECT count(*) FROM generate_series(1, $pool) n,
        tob_owner('race_users', 'user' || n) o WHERE o.state <> 'held'")
    [ "$unsettled" -eq 0 ] || [ "$(date +%s)" -ge "$deadline" ] && break
    sleep 0.5
done
held=$(psql -d shard1 -tAc "SELECT count(*) FROM generate_series(1, $pool) n,
    tob_owner('race_users', 'user' || n) o WHERE o.state = 'held'")
echo "   claims not yet settled (waited up to 30 s): $unsettled; names held in the cluster: $held"
[ "$unsettled" -eq 0 ] || failed=1
for i in $(seq "$shards"); do
    unheld=$(psql -d "shard$i" -tAc "SELECT count(*) FROM users u WHERE NOT EXISTS (
        SELECT 1 FROM tob_owner('race_users', u.name) o
        WHERE o.state = 'held' AND o.owner = 'race/' || current_database())")
    echo "   shard$i rows whose name the cluster does not hold for shard$i: $unheld"
    [ "$unheld" -eq 0 ] || failed=1
done
echo "   names held without a row: $(( held - names ))"
[ "$held" -eq "$names" ] || failed=1
if [ "$failed" -eq 0 ]; then
    echo "== every name exactly once, every row's claim held by its shard, no claim leaked"
else
    echo "== CHECK FAILED"
    exit 1
fi
