#!/usr/bin/env bash
# The whole suite, in two pytest processes at once: the real-model tests are bound by the
# one local model server (a CPU core, one request at a time), while the rest mostly wait
# on Kafka and the fake model. Run one after the other they take the sum of both; side by
# side, about the longer of the two, which keeps CI's wall time within its budget.
# Both must pass; the real-model run's output is printed after the rest's.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-.venv/bin}"
mkdir -p .llmpipe
log=.llmpipe/real-model-tests.log

"${BIN}/pytest" -q -p no:cacheprovider -m real_model "$@" >"${log}" 2>&1 &
real_model=$!
rest_status=0
"${BIN}/pytest" -q -m "not real_model" "$@" || rest_status=$?
real_status=0
wait "${real_model}" || real_status=$?

echo "--- real-model tests (pytest -m real_model) ---"
cat "${log}"
echo "tests: rest exited ${rest_status}, real-model tests exited ${real_status}"
[ "${rest_status}" -eq 0 ] && [ "${real_status}" -eq 0 ]
