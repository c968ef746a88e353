#!/usr/bin/env bash
# Installs what tob needs on a fresh Debian 12 machine, idempotently (safe to run again):
# build tools, Debian's PostgreSQL 15 with its server headers, the pinned cargo-pgrx, and
# pgrx's configuration pointing at Debian's PostgreSQL 15 (nothing is downloaded but packages).
set -euo pipefail

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found. Install Rust 1.95 (rustup) and run again." >&2
    exit 1
fi
rustc_version=$(rustc --version | awk '{print $2}')
case "$rustc_version" in
    1.95.*) ;;
    *) echo "setup: warning: tob is pinned to Rust 1.95; found $rustc_version" >&2 ;;
esac

packages="build-essential pkg-config libssl-dev libclang-dev clang postgresql-15 util-linux"
missing=""
for p in $packages postgresql-server-dev-15; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: missing packages:$missing; run as root" >&2
        exit 1
    fi
    echo "setup: installing$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages
    # The headers must match the installed server exactly: unpinned, apt would upgrade it.
    server=$(dpkg-query -W -f='${Version}' postgresql-15)
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "postgresql-server-dev-15=$server"
fi

pgrx_version=0.18.1
if ! cargo pgrx --version 2>/dev/null | grep -q "cargo-pgrx $pgrx_version"; then
    echo "setup: installing cargo-pgrx $pgrx_version (about 6 minutes on 2 cores)"
    cargo install cargo-pgrx --version "=$pgrx_version" --locked
fi
pg_config=/usr/lib/postgresql/15/bin/pg_config
# Re-running init rewrites the config and makes pgrx rebuild everything: only when missing.
if ! grep -qs "pg15 = \"$pg_config\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    cargo pgrx init --pg15 "$pg_config"
fi
