# Sourced by the scripts that start a local tob cluster and a throwaway PostgreSQL 15 server
# (bench-sql.sh, pgbench-race.sh; bench-etcd.sh uses start_cluster, the demos free_base_port).
# Everything lives under $work; stop_local undoes it all.

pgbin=/usr/lib/postgresql/15/bin

# Prints a base port with nine consecutive free loopback ports (three per node of a 3-node
# `tob cluster up`). Also used by demo.sh and demo-sequencer.sh.
free_base_port() {
    local base
    while :; do
        base=$(( 20000 + RANDOM % 20000 ))
        python3 -c "import socket
for p in range($base, $base + 9): s = socket.socket(); s.bind(('127.0.0.1', p)); s.close()" 2>/dev/null && break
    done
    echo "$base"
}

# Starts `tob cluster up` under $work/cluster on nine consecutive free loopback ports; sets
# cluster_pid and cluster (the client addresses). cluster_nodes (default 3) sets the size.
start_cluster() {
    local base
    base=$(free_base_port)
    ./target/release/tob cluster up --dir "$work/cluster" --base-port "$base" --nodes "${cluster_nodes:-3}" \
        > "$work/up.txt" 2> "$work/cluster.log" &
    cluster_pid=$!
    sleep 1.5
    cluster=$(sed -n 's/^TOB_CLUSTER=//p' "$work/up.txt")
}

# Creates and starts a PostgreSQL server under $work/pg (initdb as the postgres user, a free
# port, its own socket directory) with tob preloaded and pointed at $cluster; the arguments
# are more postgresql.conf lines. Sets port and defines psql for it.
start_postgres() {
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    mkdir -p "$work/pg" && chown postgres:postgres "$work/pg"
    runuser -u postgres -- "$pgbin/initdb" -D "$work/pg/data" -A trust -U postgres > /dev/null
    {
        echo "port = $port"
        echo "listen_addresses = ''"
        echo "unix_socket_directories = '$work/pg'"
        echo "shared_preload_libraries = 'tob'"
        echo "tob.cluster = '$cluster'"
        printf '%s\n' "$@"
    } >> "$work/pg/data/postgresql.conf"
    env -u RUST_BACKTRACE runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w start > /dev/null
}

psql() { command psql -X -q -v ON_ERROR_STOP=1 -h "$work/pg" -p "$port" -U postgres "$@"; }

# Stops the server and every node started under $work (also one restarted by hand), then
# removes $work. For `trap stop_local EXIT`.
stop_local() {
    [ -d "$work/pg/data" ] && runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/pg/data" -m fast stop > /dev/null 2>&1 || true
    [ -n "${cluster_pid:-}" ] && kill "$cluster_pid" 2>/dev/null && wait "$cluster_pid" 2>/dev/null
    pkill -f "tob-sequencer .*--data-dir $work/" 2>/dev/null || true
    rm -rf "$work"
}
