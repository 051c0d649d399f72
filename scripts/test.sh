#!/usr/bin/env bash
# Runs every test of outbox_pg on each PostgreSQL major (15 and 18) and ends
# with one summary line counting them all:
#   1. #[pg_test] and unit tests (cargo pgrx test, in-transaction behaviour)
#   2. end-to-end tests in tests/ (throw-away clusters, the real brokers),
#      including the SQL regression files in pg_test/ and the UPDATE from
#      every earlier release
#   3. the packages (scripts/package.sh, the release build), each installed
#      by a test (the .deb into Debian's 15, the tarball into 18) that
#      delivers a message from a clean cluster
#   4. once: a short fuzz run of the STOMP decoder
set -uo pipefail
cd "$(dirname "$0")/.."
PG15_CONFIG=${PG15_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
PG18_CONFIG=${PG18_CONFIG:-${PG18_HOME:-/opt/outbox_pg/pg18}/bin/pg_config}
export PG15_CONFIG PG18_CONFIG
# Backtraces would end up in server error messages.
unset RUST_BACKTRACE RUST_LIB_BACKTRACE

bash scripts/setup.sh || { echo "summary: 0 passed, 1 failed"; exit 1; }

logs=$(mktemp -d)
status=0
start=$SECONDS

run_step() {
    local name=$1; shift
    local t=$SECONDS
    echo "== $name"
    "$@" 2>&1 | tee "$logs/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name failed (exit $rc)"; status=1; }
    echo "== $name: $((SECONDS - t)) s"
}

run_step fmt cargo fmt --all --check

for major in 15 18; do
    pgdata=/tmp/outbox_pg-pgtest-$major
    if [ "$(id -u)" -eq 0 ]; then
        install -d -o postgres -g postgres "$pgdata"
        runas=(--runas postgres --pgdata "$pgdata")
    else
        runas=(--pgdata "$pgdata")
    fi
    run_step "pg_test-$major" cargo pgrx test "pg$major" "${runas[@]}"
done

for major in 15 18; do
    pgc=PG${major}_CONFIG
    # The e2e clusters load the plain (not pg_test) debug build.
    run_step "install-$major" cargo pgrx install --pg-config "${!pgc}"
    run_step "e2e-$major" env PG_CONFIG="${!pgc}" cargo test -p outbox_pg_e2e --test e2e
done

run_step package bash scripts/package.sh 15 18
for major in 15 18; do
    pgc=PG${major}_CONFIG
    run_step "package-$major" env PG_CONFIG="${!pgc}" cargo test -p outbox_pg_e2e --test package
done

# A short coverage-guided run of the STOMP decoder (the long run is
# `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run stomp_decode`).
run_step fuzz bash -c 'cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run stomp_decode -- -max_total_time=20 -seed=1 2>&1 | tail -3'

passed=0; failed=0
for f in "$logs"/*.log; do
    while read -r p fl; do
        passed=$((passed + p)); failed=$((failed + fl))
    done < <(sed -n 's/.*test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed.*/\1 \2/p' "$f")
done
for major in 15 18; do
    n=$(sed -n 's/.*test result: [A-Za-z]*\. \([0-9]*\) passed.*/\1/p' "$logs"/*-"$major".log | awk '{ s += $1 } END { print s + 0 }')
    echo "PostgreSQL $major: ${n:-0} passed"
done
# The fuzz run counts as one test.
if grep -q "Done [0-9]* runs" "$logs/fuzz.log" 2>/dev/null; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
rm -rf "$logs"
echo "time: $((SECONDS - start)) s"
[ "$status" -eq 0 ] || [ "$failed" -gt 0 ] || failed=1
echo "summary: $passed passed, $failed failed"
[ "$status" -eq 0 ] && [ "$failed" -eq 0 ]
