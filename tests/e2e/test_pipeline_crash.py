"""Three SIGKILLs with many model calls in flight and one broker stop/start, in ONE run.

1,000 requests of every fault kind, hangs past their timeout included, through a worker
process that is SIGKILLed three times (each time busy: its own calls finishing, and at
least 50 of them in flight at the fake server) and that lives through a 10 s outage of
its broker between the second and third kill (the plan ``kill, kill, outage, kill``). The
broker is this module's own (free ports, temporary data dir): the shared broker on 9092
serves everyone else and is never stopped. Both delivery modes run side by side (one lane
each: own topics, own fake model, own worker), so they share the broker's start and its
outage.

Every figure is measured, not assumed (see :mod:`bench.chaos`): the worker is frozen with
SIGSTOP before each fault so the calls in flight can be counted exactly at the server, the
stage groups' commits are read right after it to name the work finished but uncommitted,
and the fake server counts calls per request, so the calls the faults made the pipeline
pay again are compared, request by request, with a fault-free run of the same requests.

- exactly-once: 0 missing, 0 duplicates, 0 requests in two terminal places, every sighting
  on its fault's route, and no fault redone beyond what was at risk at it: the calls in
  flight plus the finished calls no commit covered (per request too, within the measured
  noise of the fault-free baseline);
- at-least-once: the same, except duplicates: none beyond the stages in which a request
  had an output while its input was uncommitted at a fault, and the redone calls may add
  what those duplicates cost the later stages (a duplicate completion is settled again);
- both: finished work is recorded with the next commit (nothing uncommitted at a kill
  finished long ago, e.g. held back behind a hanging call), the outage costs a few dozen
  log lines, not thousands, and the worker commits again after it.

One run takes about 4 minutes here (2 cores shared with other work), hence this module's
own timeout; the scenario's deadline is below it, so a stuck run fails with its event
log instead of being killed by pytest.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from bench import chaos
from pipeline.harness.ledger import RequestCalls
from pipeline.harness.scenarios import mixed_requests

# The whole run is set up by the first test that uses it; the scenario's own deadline
# (SCENARIO_DEADLINE_S) ends it first, with its event log, if something hangs.
TIMEOUT_S = 600
SCENARIO_DEADLINE_S = 540.0
pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(TIMEOUT_S)]

REQUESTS = 1_000
SEED = 21
KILLS = 3
PLAN = ("kill", "kill", "outage", "kill")
# A worker is killed once it has this many calls of its own in flight and has finished
# FINISHED_BEFORE_KILL; the count taken when it is frozen may be a little lower (calls end
# between the two readings), never below MIN_IN_FLIGHT_AT_KILL. Each fault after the first
# gets 200 more requests (about 170 calls) besides what the killed worker left: both counts
# hold together only while KILL_AT calls are still to come, and with 100 finished that
# window was a few tenths of a second, which a loaded CI machine's polling missed (no lane
# busy for 90 s). 60 finished calls are still several commit intervals of committed work.
KILL_AT = 60
FINISHED_BEFORE_KILL = 60
MIN_IN_FLIGHT_AT_KILL = 50
LATENCY_S = 0.5
MODEL_TIMEOUT_S = 2.0
OUTAGE_S = 10.0
# "A few dozen lines" for a 10 s broker outage (the aiokafka worker logged ~70,000).
MAX_OUTAGE_LOG_LINES = 40
# The fault-free baseline is not exactly reproducible for a few percent of the requests
# (one call more or less each; measured here at load 12-15: 3 + 0 and 6 + 18 requests in
# two runs, the same ids in both lanes, so the baseline is the odd one out).
NOISY_REQUESTS = 30  # 3 % of the requests
NOISY_CALLS = 2
# Finished work must be covered by the next commit (default interval 100 ms): anything
# uncommitted at a kill that finished longer ago than this was held back, not in transit
# (typically under 0.5 s here; the aiokafka runner held finished work back 16-28 s behind
# a hanging call). Generous: on a loaded 2-core machine a commit can wait for the CPU.
MAX_UNCOMMITTED_AGE_MS = 10_000


@pytest.fixture(scope="module")
def broker() -> Iterator[chaos.OwnBroker]:
    with chaos.own_broker() as own:
        yield own


@pytest.fixture(scope="module")
def baseline(kafka_bootstrap: str) -> Iterator[Future[RequestCalls]]:
    """The same requests without faults, on the shared broker, while the runs go on."""
    planned = mixed_requests(REQUESTS, seed=SEED, weights=chaos.KILL_WEIGHTS, prefix="kill")
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(
            chaos.baseline_calls, kafka_bootstrap, planned, LATENCY_S, MODEL_TIMEOUT_S
        )


@pytest.fixture(scope="module")
def faults(
    broker: chaos.OwnBroker, baseline: Future[RequestCalls]
) -> dict[str, chaos.ChaosOutcome]:
    return chaos.kill_run(
        broker,
        chaos.MODES,
        REQUESTS,
        plan=PLAN,
        in_flight_at_kill=KILL_AT,
        finished_before_kill=FINISHED_BEFORE_KILL,
        latency=LATENCY_S,
        model_timeout_s=MODEL_TIMEOUT_S,
        outage_s=OUTAGE_S,
        seed=SEED,
        baseline=baseline.result,
        deadline_s=SCENARIO_DEADLINE_S,
    )


def _check_ledger(outcome: chaos.ChaosOutcome) -> None:
    """Both modes: nothing lost; a redo takes the same route (the fake model answers a
    request the same way every time), so a copy elsewhere would be a bug in any mode. The
    one exception is reported, not excused silently: a request whose model work was half
    done while the worker was frozen before the outage (a call in flight times out late;
    a retry finds its time budget spent) can change its fallback's reason, never its
    outcome (``reasons_changed_by_freeze``)."""
    why = outcome.explain()
    assert outcome.missing == 0, why
    assert outcome.wrong_route == 0, why
    assert outcome.two_places == 0, why
    assert outcome.details["final_worker_alive"], why


def _check_redone(outcome: chaos.ChaosOutcome) -> None:
    """Request by request, then fault by fault: the calls redone never exceed the calls in
    flight plus the finished-but-uncommitted calls (attribution is capped, so the sum is
    checked too); at least once, a request may also pay again, once per duplicate its
    at-risk outputs allow, the calls of the stages after the one that repeated its output
    (a duplicate completion is settled again: its re-asks and gradings are paid twice;
    always 0 with exactly-once hops). The fault-free baseline is not exactly reproducible
    for a few requests (retries with jittered backoff, a slow answer near its timeout on a
    loaded machine, cost one call more or less from run to run, with or without faults),
    so at most
    NOISY_REQUESTS requests may differ from their budget, by at most NOISY_CALLS each, in
    either direction."""
    why = outcome.explain()
    assert outcome.redone_calls is not None
    over = outcome.redone_over_budget
    cheaper = outcome.fewer_calls_than_baseline
    assert len(over) + len(cheaper) <= NOISY_REQUESTS, why
    assert all(n - budget <= NOISY_CALLS for n, budget in over.values()), why
    assert all(n <= NOISY_CALLS for n in cheaper.values()), why
    for i, fault in enumerate(outcome.faults, 1):
        assert fault.redone <= fault.in_flight + fault.uncommitted_calls, f"fault {i}\n{why}"
    noise = sum(n - budget for n, budget in over.values())
    attributed = sum(f.redone for f in outcome.faults) + outcome.duplicate_calls_redone
    assert attributed + noise == outcome.redone_calls, why


def _check_faults(outcome: chaos.ChaosOutcome) -> None:
    """Three kills, each of a busy worker, none finding finished work held back; one
    outage of the broker, with the worker busy, costing a few lines and no restart."""
    why = outcome.explain()
    assert [f.kind for f in outcome.faults] == [
        "sigkill" if step == "kill" else "broker_outage" for step in PLAN
    ], why
    assert outcome.details["workers_started"] == KILLS + 1, why
    for i, fault in enumerate(outcome.faults, 1):
        assert fault.in_flight >= MIN_IN_FLIGHT_AT_KILL, f"fault {i}: {fault.row()}\n{why}"
        if fault.kind == "sigkill":
            assert fault.oldest_uncommitted_call_ms <= MAX_UNCOMMITTED_AGE_MS, f"kill {i}\n{why}"
            assert fault.oldest_uncommitted_output_ms <= MAX_UNCOMMITTED_AGE_MS, f"kill {i}\n{why}"
    (outage,) = [f for f in outcome.faults if f.kind == "broker_outage"]
    assert outage.notes["outage_s"] >= OUTAGE_S, why
    assert outage.notes["recovered"], why
    assert "worker_exit" not in outage.notes, why
    assert outage.notes["log_lines"] <= MAX_OUTAGE_LOG_LINES, why


def test_exactly_once_kills_and_a_broker_outage_lose_and_repeat_nothing(
    faults: dict[str, chaos.ChaosOutcome],
) -> None:
    outcome = faults["exactly_once"]
    print(outcome.explain())
    _check_ledger(outcome)
    _check_faults(outcome)
    why = outcome.explain()
    assert outcome.duplicates == 0, why
    # Nobody downstream can see uncommitted work with transactions.
    assert all(not f.at_risk_outputs for f in outcome.faults), why
    _check_redone(outcome)


def test_at_least_once_kills_and_a_broker_outage_repeat_only_uncommitted_work(
    faults: dict[str, chaos.ChaosOutcome],
) -> None:
    outcome = faults["at_least_once"]
    print(outcome.explain())
    _check_ledger(outcome)
    _check_faults(outcome)
    # Request by request: at most one more copy per stage that had already produced its
    # output when a fault found its input uncommitted (copies multiply downstream). The
    # outage adds none: outputs delivered while the offset commits failed are skipped
    # when the partitions come back.
    assert not outcome.duplicates_over_budget, outcome.explain()
    # Redone calls, request by request and fault by fault: what the faults put at risk,
    # plus the later stages' calls for the duplicates they allow, nothing more.
    _check_redone(outcome)
