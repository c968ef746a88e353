#!/usr/bin/env bash
# The main demo: a local 3-node tob cluster, two independent PostgreSQL 15 servers with the
# tob extension, and both racing to insert the same usernames through a tob_unique trigger.
# Every name ends up existing exactly once across both. Then the sequencer demo (a leader
# killed with kill -9, the simulator and its checkers).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
echo "== building and installing the extension and the sequencer (first time: several minutes)"
./scripts/install-extension.sh > /tmp/tob-demo-build.log 2>&1 || { cat /tmp/tob-demo-build.log; exit 1; }
tob=./target/release/tob
pgbin=/usr/lib/postgresql/15/bin
work=$(mktemp -d /tmp/tob-demo-XXXXXX)
chmod 755 "$work"
cluster_pid=
cleanup() {
    for s in east west; do
        [ -d "$work/$s/data" ] && runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/$s/data" -m fast stop >/dev/null 2>&1 || true
    done
    [ -n "$cluster_pid" ] && kill "$cluster_pid" 2>/dev/null && wait "$cluster_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
. scripts/lib/local.sh   # free_base_port (its psql is replaced below)
base=$(free_base_port)

echo "== 1. A 3-node tob cluster on loopback"
$tob cluster up --dir "$work/cluster" --base-port "$base" > "$work/up.txt" 2> "$work/cluster.log" &
cluster_pid=$!
sleep 1.5
cluster=$(sed -n 's/^TOB_CLUSTER=//p' "$work/up.txt")
echo "   TOB_CLUSTER=$cluster"

echo "== 2. Two independent PostgreSQL servers, 'east' and 'west', each with CREATE EXTENSION tob"
for s in east west; do
    mkdir -p "$work/$s" && chown postgres:postgres "$work/$s"
    runuser -u postgres -- "$pgbin/initdb" -D "$work/$s/data" -A trust -U postgres > /dev/null
    port=$(free_port)
    echo "$port" > "$work/$s/port"
    cat >> "$work/$s/data/postgresql.conf" <<CONF
port = $port
listen_addresses = ''
unix_socket_directories = '$work/$s'
cluster_name = '$s'
shared_preload_libraries = 'tob'
tob.cluster = '$cluster'
CONF
    env -u RUST_BACKTRACE runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/$s/data" -l "$work/$s/log" -w start > /dev/null
    psql() { command psql -X -q -v ON_ERROR_STOP=1 -h "$work/$1" -p "$(cat "$work/$1/port")" -U postgres "${@:2}"; }
    psql "$s" -d postgres -c "CREATE DATABASE app"
    psql "$s" -d app <<'SQL'
CREATE EXTENSION tob;
CREATE TABLE users (id bigserial PRIMARY KEY, name text NOT NULL);
CREATE TRIGGER users_name_unique AFTER INSERT OR UPDATE OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION tob_unique('usernames', 'name');
CREATE TRIGGER users_name_truncate BEFORE TRUNCATE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION tob_unique('usernames', 'name');
SQL
    echo "   $s: PostgreSQL on port $(cat "$work/$s/port"), database app, trigger tob_unique('usernames', 'name')"
done
psql() { command psql -X -q -v ON_ERROR_STOP=1 -h "$work/$1" -p "$(cat "$work/$1/port")" -U postgres "${@:2}"; }
for s in east west; do
    until psql "$s" -d app -tAc "SELECT tob_sync()" > /dev/null 2>&1; do sleep 0.2; done
done
psql east -d app -tAc "SELECT tob_create_namespace('usernames')" > /dev/null
echo "   namespace 'usernames' declared once for the whole cluster: SELECT tob_create_namespace('usernames')"
echo "   (a misspelt namespace is refused, not a second uniqueness domain:"
{ psql west -d app -c "SELECT tob_claim('usrenames', 'alice')" 2>&1 || true; } | sed -n 's/^/     /; 1,2p'
echo "   )"

echo
echo "== 3. The race: 4 clients per server insert the same 30 usernames, each in its own order"
names=$(seq 1 30 | sed 's/^/user/')
for s in east west; do
    for c in 1 2 3 4; do
        ( for n in $(echo "$names" | shuf); do
              if psql "$s" -d app -c "INSERT INTO users (name) VALUES ('$n')" 2>/dev/null; then echo "$n"; fi
          done > "$work/won-$s-$c.txt" ) &
    done
done
wait $(jobs -p | grep -v "^$cluster_pid$") 2>/dev/null || true
for s in east west; do
    count=$(psql "$s" -d app -tAc "SELECT count(*) FROM users")
    echo "   $s has $count users"
done
total=$(for s in east west; do psql "$s" -d app -tAc "SELECT name FROM users"; done | sort | uniq | wc -l)
dupes=$(for s in east west; do psql "$s" -d app -tAc "SELECT name FROM users"; done | sort | uniq -d | wc -l)
echo "   distinct names across both: $total of 30; names in both databases: $dupes"
[ "$total" = 30 ] && [ "$dupes" = 0 ] || { echo "DEMO FAILED: duplicates or missing names"; exit 1; }

echo
echo "== 4. What a user sees: user7 is taken, by whichever server won it"
winner=$(psql east -d app -tAc "SELECT count(*) FROM users WHERE name = 'user7'")
loser=west; [ "$winner" = 0 ] && loser=east
psql "$loser" -d app -c "INSERT INTO users (name) VALUES ('user7')" 2>&1 | sed 's/^/   /' || true
psql east -d app -c "SELECT * FROM tob_owner('usernames', 'user7')" | sed 's/^/   /'
echo "   Deleting it on the winner releases it when that transaction commits:"
other=east; [ "$loser" = east ] && other=west
psql "$other" -d app -c "DELETE FROM users WHERE name = 'user7'"
sleep 0.3
psql "$loser" -d app -c "INSERT INTO users (name) VALUES ('user7')" && echo "   $loser now has user7"

echo
echo "== 5. Ordered messages from SQL, the same order from both servers"
psql east -d app -tAc "SELECT tob_append('events', 'hello from east')" > /dev/null
psql west -d app -tAc "SELECT tob_append('events', 'hello from west')" > /dev/null
psql west -d app -c "SELECT seq, payload FROM tob_read(1, 10, 'events')" | sed 's/^/   /'

echo "== 6. Messages that enter the order only if their transaction commits (an outbox)"
psql east -d app -q -c "BEGIN; INSERT INTO users (name) VALUES ('user31');
    SELECT tob_append_on_commit('signups', 'user31 joined east'); ROLLBACK;" > /dev/null
psql east -d app -q -c "BEGIN; INSERT INTO users (name) VALUES ('user32');
    SELECT tob_append_on_commit('signups', 'user32 joined east'); COMMIT;" > /dev/null
echo "   east: user31's transaction rolled back, user32's committed; west reads 'signups':"
# The message is appended when east's background worker settles the commit (tob.settle_delay).
for _ in $(seq 50); do
    [ "$(psql west -d app -tAc "SELECT count(*) FROM tob_read(1, 10, 'signups')")" = 1 ] && break
    sleep 0.1
done
psql west -d app -c "SELECT seq, payload FROM tob_read(1, 10, 'signups')" | sed 's/^/   /'

echo
echo "== PostgreSQL demo done. Now the sequencer on its own."
cleanup
trap - EXIT
exec ./scripts/demo-sequencer.sh
