#!/usr/bin/env bash
# SQL-level benchmark (a program that prints figures, not a test): pgbench inserting fresh
# names through the tob_unique trigger, beside the same insert against a local unique index
# and, as a reference, against a local unique index behind a trigger that only waits 1 ms
# (sql/bench/wait_trigger/: what one more wait per insert costs with no cluster at all), at 1,
# 16 and 64 clients. A 3-node cluster and PostgreSQL 15, fsync on everywhere.
# Usage: scripts/bench-sql.sh [seconds per run, default 10]
# BENCH_CLIENTS="1 16 64" and BENCH_WORKLOADS="local_unique wait_trigger tob_unique" choose
# the rows. BENCH_ROUNDS=N (default 1) runs every row N times, the workloads' order reversed
# every other round (this machine's phases move single runs by tens of percent), then prints
# each workload's median and the ratio of each workload to local_unique per round.
# BENCH_CPU=1 also prints, for every run, the CPU each part used per transaction (from /proc
# over the middle half of the run): backends, nodes, pgbench, the background worker.
# Two knobs for finding a floor, never for the figures in README's targets: BENCH_NODES=N runs
# an N-node cluster (default 3), and BENCH_UNSAFE_NO_FSYNC=1 starts the nodes without fsync
# (acknowledged claims would be lost on power failure; PostgreSQL keeps fsync on). A run with
# either says so at its start and on its summary lines.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
./scripts/setup.sh
./scripts/install-extension.sh > /tmp/tob-bench-build.log 2>&1 || { cat /tmp/tob-bench-build.log; exit 1; }
work=$(mktemp -d /tmp/tob-bench-XXXXXX)
chmod 755 "$work"
. scripts/lib/local.sh
trap stop_local EXIT
workloads=${BENCH_WORKLOADS:-local_unique wait_trigger tob_unique}
# The reference trigger is built into the work directory and loaded from there: never
# installed into PostgreSQL's own directories.
cp -r sql/bench/wait_trigger "$work/wait_trigger"
make -s -C "$work/wait_trigger" with_llvm=no > "$work/wait_trigger/build.log" 2>&1 \
    || { cat "$work/wait_trigger/build.log"; exit 1; }
cluster_nodes=${BENCH_NODES:-3}
label="$cluster_nodes-node cluster, fsync on"
if [ -n "${BENCH_UNSAFE_NO_FSYNC:-}" ]; then
    export TOB_UNSAFE_NO_FSYNC=true
    label="$cluster_nodes-node cluster WITHOUT fsync (benchmark floor only, not durable)"
fi
echo "# $label; PostgreSQL fsync on"
start_cluster
unset TOB_UNSAFE_NO_FSYNC
start_postgres "max_connections = 200"
psql -d postgres -c "CREATE DATABASE bench"
psql -d bench <<'SQL'
CREATE EXTENSION tob;
CREATE TABLE users_local (id bigserial PRIMARY KEY, name text NOT NULL UNIQUE);
CREATE TABLE users_tob (id bigserial PRIMARY KEY, name text NOT NULL);
CREATE TRIGGER users_tob_unique AFTER INSERT OR UPDATE OR DELETE ON users_tob
    FOR EACH ROW EXECUTE FUNCTION tob_unique('bench_usernames', 'name');
CREATE TABLE users_wait (id bigserial PRIMARY KEY, name text NOT NULL UNIQUE);
SQL
psql -d bench <<SQL
CREATE FUNCTION wait_trigger() RETURNS trigger LANGUAGE c
    AS '$work/wait_trigger/wait_trigger.so', 'wait_trigger';
CREATE TRIGGER users_wait_1ms BEFORE INSERT ON users_wait
    FOR EACH ROW EXECUTE FUNCTION wait_trigger('1000');
SQL
until psql -d bench -tAc "SELECT tob_sync()" > /dev/null 2>&1; do sleep 0.2; done
psql -d bench -tAc "SELECT tob_create_namespace('bench_usernames')" > /dev/null
fsync_mean() {
    # Mean fsync latency of the first node, from its metrics endpoint.
    local status metrics
    metrics=$(TOB_CLUSTER=$cluster ./target/release/tob --json status 2>/dev/null | python3 -c 'import json,sys
for line in sys.stdin:
    d=json.loads(line)
    if d.get("role")=="leader": print(d.get("metrics","")); break' || true)
    [ -n "$metrics" ] || { echo "?"; return; }
    curl -s "http://$metrics/metrics" 2>/dev/null | awk '/^tob_fsync_latency_seconds_sum /{s=$2} /^tob_fsync_latency_seconds_count /{c=$2} END{if(c>0) printf "%.0f", s/c*1e6; else print "?"}'
}
rounds=${BENCH_ROUNDS:-1}
results=$work/results
printf '%-22s %8s %10s %14s\n' workload clients tps "latency_ms"
for clients in ${BENCH_CLIENTS:-1 16 64}; do
    for round in $(seq "$rounds"); do
        order=$workloads
        [ $((round % 2)) = 0 ] && order=$(echo $workloads | tr ' ' '\n' | tac | tr '\n' ' ')
        for workload in $order; do
            sampler=
            if [ -n "${BENCH_CPU:-}" ]; then
                ( sleep $((seconds / 4))
                  python3 scripts/lib/cpu-split.py $(((seconds + 1) / 2)) > "$work/cpu.json" ) &
                sampler=$!
            fi
            out=$(env PGHOST="$work/pg" PGPORT="$port" PGUSER=postgres "$pgbin/pgbench" -n -c "$clients" -j 2 -T "$seconds" \
                  -f "sql/bench/insert_$workload.sql" bench 2>&1)
            tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
            lat=$(echo "$out" | sed -n 's/^latency average = \([0-9.]*\) ms/\1/p')
            failed=$(echo "$out" | sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p')
            printf '%-22s %8s %10s %14s   failed=%s\n' "$workload" "$clients" "$tps" "$lat" "${failed:-0}"
            if [ -n "$sampler" ]; then
                wait "$sampler"
                python3 - "$work/cpu.json" "${tps:-0}" <<'PY'
import json, sys
split = json.load(open(sys.argv[1]))
tps = float(sys.argv[2])
if tps > 0:
    parts = sorted(split["cpu"].items(), key=lambda kv: -kv[1])
    total = sum(used for _, used in parts)
    print("    CPU per transaction, us: " + ", ".join(f"{name} {used / tps * 1e6:.0f}" for name, used in parts if used / tps * 1e6 >= 1)
          + f"; all processes {total / tps * 1e6:.0f}; machine {split['busy']:.0%} busy")
PY
            fi
            echo "$clients $round $workload ${tps:-0}" >> "$results"
        done
    done
done
echo "leader fsync mean over the run: $(fsync_mean) us"
if [ "$rounds" -gt 1 ]; then
    python3 - "$results" "$label" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    clients, rnd, workload, tps = line.split()
    runs.setdefault(int(clients), {}).setdefault(workload, {})[int(rnd)] = float(tps)
for clients, by_workload in sorted(runs.items()):
    medians = {w: statistics.median(r.values()) for w, r in by_workload.items()}
    line = f"[{sys.argv[2]}] {clients} clients, medians over {max(len(r) for r in by_workload.values())} rounds: "
    line += ", ".join(f"{w} {m:,.0f} TPS" for w, m in medians.items())
    local = by_workload.get("local_unique")
    for w, other in by_workload.items():
        if local and w != "local_unique":
            ratios = sorted(other[r] / local[r] for r in local if r in other and local[r] > 0)
            if ratios:
                line += f"; {w}/local_unique per round {ratios[0]:.0%}-{ratios[-1]:.0%}, median {statistics.median(ratios):.0%}"
    print(line)
PY
fi
