#!/usr/bin/env bash
# The whole test suite. This is what CI runs (.ci/run calls exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

step() { printf '\n== %s\n' "$*"; }

step "format"
cargo fmt --all -- --check

step "lints (clippy, warnings are errors)"
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "unit, checker, scenario and simulation tests (including the planted-bug tests)"
cargo test --workspace --all-features

step "simulator in release mode: more seeds"
cargo build --release -p tob-sim
./target/release/tob-sim --seeds 0..2000 --nodes 3
./target/release/tob-sim --seeds 0..600 --nodes 5

step "all tests passed"
