#!/usr/bin/env bash
# Runs every test of outbox_pg and ends with one summary line:
#   1. #[pg_test] and unit tests (cargo pgrx test, in-transaction behaviour)
#   2. end-to-end tests in tests/ (throw-away clusters, the real broker),
#      including the SQL regression files in pg_test/
set -uo pipefail
cd "$(dirname "$0")/.."
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
export PG_CONFIG
# Backtraces would end up in server error messages.
unset RUST_BACKTRACE RUST_LIB_BACKTRACE

bash scripts/setup.sh || { echo "summary: 0 passed, 1 failed"; exit 1; }

logs=$(mktemp -d)
status=0

run_step() {
    local name=$1; shift
    echo "== $name"
    "$@" 2>&1 | tee "$logs/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name failed (exit $rc)"; status=1; }
}

run_step fmt cargo fmt --all --check

pgdata=/tmp/outbox_pg-pgtest
if [ "$(id -u)" -eq 0 ]; then
    install -d -o postgres -g postgres "$pgdata"
    runas=(--runas postgres --pgdata "$pgdata")
else
    runas=(--pgdata "$pgdata")
fi
run_step pg_test cargo pgrx test pg15 "${runas[@]}"
# The e2e clusters load the plain (not pg_test) build.
run_step install cargo pgrx install --pg-config "$PG_CONFIG"
run_step e2e cargo test -p outbox_pg_e2e
# A short coverage-guided run of the STOMP decoder (the long run is
# `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run stomp_decode`).
run_step fuzz bash -c 'cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run stomp_decode -- -max_total_time=20 -seed=1 2>&1 | tail -3'

passed=0; failed=0
for f in "$logs"/*.log; do
    while read -r p fl; do
        passed=$((passed + p)); failed=$((failed + fl))
    done < <(sed -n 's/.*test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed.*/\1 \2/p' "$f")
done
# The fuzz run counts as one test.
if grep -q "Done [0-9]* runs" "$logs/fuzz.log" 2>/dev/null; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
rm -rf "$logs"
[ "$status" -eq 0 ] || [ "$failed" -gt 0 ] || failed=1
echo "summary: $passed passed, $failed failed"
[ "$status" -eq 0 ] && [ "$failed" -eq 0 ]
