#!/usr/bin/env bash
# A soak under faults (see bench/soak.rs): 8 clients publish for SECONDS
# (default 180) while the broker restarts twice, the publisher is terminated
# once and Postgres restarts once; then checks that nothing was lost and
# prints the figures. Not part of the default test run.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
export PG_CONFIG
unset RUST_BACKTRACE RUST_LIB_BACKTRACE
bash scripts/setup.sh
cargo pgrx install --pg-config "$PG_CONFIG"
cargo run -q -p outbox_pg_bench --bin outbox-soak -- "$@"
