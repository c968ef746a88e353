#!/usr/bin/env bash
# Side by side on this machine (a program that prints figures, not a test): etcd 3.4 as a
# 3-member loopback cluster with default fsync, then a 3-node tob cluster with fsync on, each
# measured by tob-bench with the same workloads (append = put, claim = create-if-absent
# transaction) at the same numbers of requests in flight. Needs Debian's etcd-server (it is
# installed when missing).
# Usage: scripts/bench-etcd.sh [seconds per run, default 3]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-3}
./scripts/setup.sh
command -v etcd > /dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server
cargo build --release -p tob-bench -p tob-cli -p tob-server --quiet
work=$(mktemp -d /tmp/tob-vs-etcd-XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

declare -a client peer
for i in 1 2 3; do client[$i]=$(port); peer[$i]=$(port); done
initial="e1=http://127.0.0.1:${peer[1]},e2=http://127.0.0.1:${peer[2]},e3=http://127.0.0.1:${peer[3]}"
for i in 1 2 3; do
    etcd --name "e$i" --data-dir "$work/etcd$i" \
        --listen-client-urls "http://127.0.0.1:${client[$i]}" --advertise-client-urls "http://127.0.0.1:${client[$i]}" \
        --listen-peer-urls "http://127.0.0.1:${peer[$i]}" --initial-advertise-peer-urls "http://127.0.0.1:${peer[$i]}" \
        --initial-cluster "$initial" --initial-cluster-state new --initial-cluster-token tob-bench \
        --log-level error > "$work/etcd$i.log" 2>&1 &
    pids+=($!)
done
etcd_endpoints="127.0.0.1:${client[1]},127.0.0.1:${client[2]},127.0.0.1:${client[3]}"
sleep 3
echo "== etcd $(etcd --version | awk 'NR == 1 { print $3 }'), 3 members on loopback"
for w in append claim; do
    ./target/release/tob-bench --etcd --cluster "$etcd_endpoints" --workload "$w" --duration "$seconds"
done | awk 'NR == 1 || !/^workload/'
for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
wait 2>/dev/null || true
pids=()

. scripts/lib/local.sh
start_cluster
pids+=("$cluster_pid")
tob_cluster=$cluster
echo
echo "== tob, 3 nodes on loopback"
for w in append claim; do
    ./target/release/tob-bench --cluster "$tob_cluster" --workload "$w" --duration "$seconds"
done | awk 'NR == 1 || !/^workload/'
