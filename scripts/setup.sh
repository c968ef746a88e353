#!/usr/bin/env bash
# Installs what tob needs on a fresh Debian 12 machine, idempotently. Safe to run again.
# Today that is only a Rust toolchain (1.95, already on this machine) and a C compiler;
# PostgreSQL packages and cargo-pgrx join when the extension lands.
set -euo pipefail

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found. Install Rust 1.95 (rustup) and run again." >&2
    exit 1
fi
if ! command -v cc >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential
    else
        echo "setup: no C compiler; run as root or install build-essential" >&2
        exit 1
    fi
fi
rustc_version=$(rustc --version | awk '{print $2}')
case "$rustc_version" in
    1.95.*) ;;
    *) echo "setup: warning: tob is pinned to Rust 1.95; found $rustc_version" >&2 ;;
esac
