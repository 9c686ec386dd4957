#!/usr/bin/env bash
# The whole suite: three pytest runs, two steps.
#
# 1. The broker-chaos files (crash, chaos), nothing of equal priority beside them: they SIGKILL
#    workers and stop brokers, and what they prove (no request lost or repeated, every redone
#    call accounted for) needs their workers in their stride when each fault hits. Run beside
#    the rest and the local model server at equal priority, the 2 shared cores left each
#    process an eighth of a core: exactly-once transactions took seconds each, a worker never
#    got 60 calls in flight within 90 s, broker restarts took 30-60 s (CI on 2026-12-02; 5 of
#    6 local runs that day at load 10-20, beside a CI rehearsal).
# 2. Then the rest, split over LLMPIPE_TEST_PROCESSES (2) pytest-xdist workers: it mostly
#    waits on Kafka, timeouts and the fake model.
#
# The real-model tests run through both steps, in a pytest run of their own started first.
# They are bound by the one local model server: a CPU core, one request at a time, about
# 500 s of its CPU for the whole run. Beside the chaos files they run at nice 19, so the model
# takes only the CPU the chaos workers leave idle; once those end, every thread of the run is
# raised back to the suite's own priority (lowering a nice value needs root, as on CI;
# without it they go on at 19, slower). Started after the chaos files instead, they were the
# suite's long pole: chaos 300 s, then 610 s for the real-model tests beside 500 s for the
# rest (2026-12-03, an idle machine).
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
slowest=(--durations=15 --durations-min=5)  # where the time went, in CI's output

# pytest exits 5 when it collected nothing (everything deselected by the arguments).
passed() { [ "$1" -eq 0 ] || [ "$1" -eq 5 ]; }

# Every thread of a process and of its descendants (Linux keeps a nice value per thread).
threads_of() {
  local child
  ls "/proc/$1/task" 2>/dev/null
  for child in $(ps -o pid= --ppid "$1"); do threads_of "${child}"; done
}

own_nice=$(ps -o ni= -p $$ | tr -d ' ')
nice -n 19 "${BIN}/pytest" -q -p no:cacheprovider -m real_model "${slowest[@]}" "$@" \
  >"${log}" 2>&1 &
real_model=$!

echo "--- broker-chaos tests (${chaos_files[*]}; the real-model tests beside them at nice 19) ---"
chaos_status=0
"${BIN}/pytest" -q -p no:cacheprovider -m "not real_model" "${slowest[@]}" "${chaos_files[@]}" \
  "$@" || chaos_status=$?

mapfile -t real_threads < <(threads_of "${real_model}")
if [ "${#real_threads[@]}" -gt 0 ]; then
  renice -n "${own_nice}" -p "${real_threads[@]}" >/dev/null 2>&1 \
    || echo "note: the real-model tests stay at nice 19 (raising a priority needs root)"
fi

ignore=()
for file in "${chaos_files[@]}"; do ignore+=("--ignore=${file}"); done
rest_status=0
"${BIN}/pytest" -q -m "not real_model" -n "${LLMPIPE_TEST_PROCESSES:-2}" --dist loadfile \
  --no-loadscope-reorder "${slowest[@]}" "${ignore[@]}" "$@" || rest_status=$?
real_status=0
wait "${real_model}" || real_status=$?

echo "--- real-model tests (pytest -m real_model) ---"
cat "${log}"
echo "tests: broker-chaos exited ${chaos_status}, rest exited ${rest_status}," \
  "real-model tests exited ${real_status}"
passed "${chaos_status}" && passed "${rest_status}" && passed "${real_status}"
