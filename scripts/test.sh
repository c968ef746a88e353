#!/usr/bin/env bash
# The whole test suite. This is what CI runs (.ci/run calls exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

step() { printf '\n== %s\n' "$*"; }

step "format"
cargo fmt --all -- --check

step "lints (clippy, warnings are errors)"
cargo clippy --workspace --exclude tob --all-targets --all-features -- -D warnings
# The extension builds for PostgreSQL 15 only (its pg13..pg18 features exclude each other).
cargo clippy -p tob --all-targets -- -D warnings

step "unit, checker, scenario, simulation and real-cluster tests (including the planted-bug tests)"
cargo test --workspace --exclude tob --exclude tob-e2e --all-features

step "simulator in release mode: more seeds"
cargo build --release -p tob-sim
./target/release/tob-sim --seeds 0..2000 --nodes 3
./target/release/tob-sim --seeds 0..600 --nodes 5

step "the extension: build and install into PostgreSQL 15"
./scripts/install-extension.sh

step "end-to-end: real PostgreSQL servers with the extension and a real 3-node cluster"
cargo test -p tob-e2e -- --test-threads 2

step "pgbench race: three databases, the leader killed; checked from the tables and the cluster"
./scripts/pgbench-race.sh 20
# The same checks must catch a result known to be wrong.
for plant in duplicate leak; do
    if RACE_PLANT=$plant ./scripts/pgbench-race.sh 8 > "/tmp/tob-race-$plant.txt" 2>&1; then
        cat "/tmp/tob-race-$plant.txt"; echo "the race checks missed a planted $plant"; exit 1
    fi
    grep -q "CHECK FAILED" "/tmp/tob-race-$plant.txt" || { cat "/tmp/tob-race-$plant.txt"; exit 1; }
    echo "planted $plant: caught"
done

step "all tests passed"
