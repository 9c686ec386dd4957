#!/usr/bin/env bash
# The whole suite, in two pytest runs at once: the real-model tests are bound by the
# one local model server (a CPU core, one request at a time), while the rest mostly wait
# on Kafka, timeouts and the fake model (the machine's load stays near 0.5 while they
# run), so the rest is split again over LLMPIPE_TEST_PROCESSES (2) pytest-xdist workers.
# Run one after the other they take the sum; side by side, about the longest, which keeps
# CI's wall time within its budget.
#
# The rest's unit of work is a test file (module-scoped fixtures are set up once), handed
# to whichever worker is free; the broker-chaos files (crash, chaos) are one unit that
# starts first, so they never run side by side (tests/conftest.py). Tests isolate by topic
# prefix and consumer group (tests/support.py), brokers of their own take free ports.
# Both runs must pass; the real-model run's output is printed after the rest's.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-.venv/bin}"
mkdir -p .llmpipe
log=.llmpipe/real-model-tests.log

"${BIN}/pytest" -q -p no:cacheprovider -m real_model "$@" >"${log}" 2>&1 &
real_model=$!
rest_status=0
"${BIN}/pytest" -q -m "not real_model" -n "${LLMPIPE_TEST_PROCESSES:-2}" --dist loadfile \
  --no-loadscope-reorder "$@" || rest_status=$?
real_status=0
wait "${real_model}" || real_status=$?

echo "--- real-model tests (pytest -m real_model) ---"
cat "${log}"
echo "tests: rest exited ${rest_status}, real-model tests exited ${real_status}"
[ "${rest_status}" -eq 0 ] && [ "${real_status}" -eq 0 ]
