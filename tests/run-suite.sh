#!/usr/bin/env bash
# The whole suite in two steps.
#
# 1. The broker-chaos files (crash, chaos) alone, nothing else running: they SIGKILL workers
#    and stop brokers, and what they prove (no request lost or repeated, every redone call
#    accounted for) needs their workers in their stride when each fault hits. Run beside
#    the rest and the local model server (llama.cpp takes a core), the 2 shared cores left
#    each process an eighth of a core: exactly-once transactions took seconds each, a
#    worker never got 60 calls in flight within 90 s, broker restarts took 30-60 s
#    (CI on 2026-12-02; 5 of 6 local runs that day at load 10-20, beside a CI rehearsal).
# 2. Then two pytest runs side by side: the real-model tests are bound by the one local
#    model server (a CPU core, one request at a time), while the rest mostly wait on
#    Kafka, timeouts and the fake model, so the rest is split again over
#    LLMPIPE_TEST_PROCESSES (2) pytest-xdist workers. Run one after the other they take
#    the sum; side by side, about the longest.
#
# The rest's unit of work is a test file (module-scoped fixtures are set up once), handed
# to whichever worker is free (tests/conftest.py). Tests isolate by topic prefix and
# consumer group (tests/support.py), brokers of their own take free ports. Every step must
# pass; the real-model run's output is printed after the rest's. Arguments go to every
# pytest run (a selection that leaves one of them nothing to run is not a failure).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-.venv/bin}"
mkdir -p .llmpipe
log=.llmpipe/real-model-tests.log
chaos_files=(tests/e2e/test_pipeline_crash.py tests/e2e/test_chaos.py)

# pytest exits 5 when it collected nothing (everything deselected by the arguments).
passed() { [ "$1" -eq 0 ] || [ "$1" -eq 5 ]; }

echo "--- broker-chaos tests, alone (${chaos_files[*]}) ---"
chaos_status=0
"${BIN}/pytest" -q -p no:cacheprovider -m "not real_model" "${chaos_files[@]}" "$@" \
  || chaos_status=$?

"${BIN}/pytest" -q -p no:cacheprovider -m real_model "$@" >"${log}" 2>&1 &
real_model=$!
ignore=()
for file in "${chaos_files[@]}"; do ignore+=("--ignore=${file}"); done
rest_status=0
"${BIN}/pytest" -q -m "not real_model" -n "${LLMPIPE_TEST_PROCESSES:-2}" --dist loadfile \
  --no-loadscope-reorder "${ignore[@]}" "$@" || rest_status=$?
real_status=0
wait "${real_model}" || real_status=$?

echo "--- real-model tests (pytest -m real_model) ---"
cat "${log}"
echo "tests: broker-chaos exited ${chaos_status}, rest exited ${rest_status}," \
  "real-model tests exited ${real_status}"
passed "${chaos_status}" && passed "${rest_status}" && passed "${real_status}"
