#!/usr/bin/env bash
# Benchmarks outbox_pg against baselines measured in the same run (see
# bench/main.rs) and prints a table; `--write docs/BENCHMARKS.md` also
# records it with the machine it ran on; `--quick` runs small sizes.
# Builds and installs the release build of the extension first.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
export PG_CONFIG
unset RUST_BACKTRACE RUST_LIB_BACKTRACE
bash scripts/setup.sh
cargo pgrx install --release --pg-config "$PG_CONFIG"
cargo run --release -q -p outbox_pg_bench --bin outbox-bench -- "$@"
