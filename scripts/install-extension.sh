#!/usr/bin/env bash
# Builds the tob extension (release) and installs it into Debian's PostgreSQL 15 directories,
# so `CREATE EXTENSION tob` works in any cluster of that server. Also builds the sequencer.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p tob-server -p tob-cli
(cd extension && cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config)
