"""The breaker wait on a running worker process: an outage is waited out, not drained.

The scenario that once sent all 60 requests to the fallback path within 4 s: a model
server answering 500 to everything, ``LLMPIPE_BREAKER_MIN_CALLS=5``,
``LLMPIPE_BREAKER_WAIT_S=20``, 60 requests. Now the requests are held while both
models' circuits are open (only probes reach the server), and when the server recovers
the next probe closes a circuit and the held requests are answered by the model.

The outage lasts ``OUTAGE_S`` from the first call the server sees, shorter than the wait
bound, so a request that falls back did so because its own calls failed, not because it
gave up waiting. That is bounded by the probe schedule: per model, the calls granted
before its circuit opened (``MIN_CALLS`` counted failures) and one per probe.
"""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from pipeline.harness.environment import create_topics
from pipeline.harness.fakellm import running_fake_llm
from pipeline.harness.ledger import read_terminal
from pipeline.harness.scenarios import mixed_requests
from tests.support import make_settings, produce, worker_process

pytestmark = [pytest.mark.kafka]

REQUESTS = 60
MIN_CALLS = 5
WAIT_S = 20.0
OPEN_S = 4.0
OUTAGE_S = 10.0
MODELS = 2  # ticket_triage v2: gpt-4o-mini, then claude-3-5-haiku-latest


def wait_for(
    condition: Callable[[], bool], what: str, timeout_s: float, worker: subprocess.Popen[bytes]
) -> None:
    """Poll ``condition``; fail with the worker's log if it dies or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if worker.poll() is not None or time.monotonic() >= deadline:
            worker.terminate()
            _, log = worker.communicate(timeout=30)
            tail = log.decode("utf-8", "replace")[-3000:]
            raise AssertionError(
                f"not within {timeout_s}s: {what} (worker exit code {worker.returncode})\n{tail}"
            )
        time.sleep(0.05)


def test_a_worker_holds_requests_through_an_outage_and_the_model_answers_them(
    kafka_bootstrap: str,
) -> None:
    planned = mixed_requests(REQUESTS, seed=31, weights={"valid": 1}, prefix="held")
    with running_fake_llm() as fake:
        fake.configure(force_behavior="server_error")
        settings = make_settings(
            kafka_bootstrap, model_base_url=fake.url, model_timeout_s=5.0, max_in_flight=64
        )
        create_topics(settings)
        env = {
            "LLMPIPE_BREAKER_MIN_CALLS": str(MIN_CALLS),
            "LLMPIPE_BREAKER_WAIT_S": str(WAIT_S),
            "LLMPIPE_BREAKER_OPEN_S": str(OPEN_S),
        }
        with worker_process(settings, *env.items()) as worker:
            produce(settings, "llm.requests", [(p.key, p.value, p.headers) for p in planned])
            wait_for(lambda: fake.counters()["total_calls"] > 0, "the first call", 90, worker)
            outage_ends = time.monotonic() + OUTAGE_S  # the outage's length, measured here
            wait_for(lambda: time.monotonic() >= outage_ends, "the outage", OUTAGE_S + 5, worker)
            calls_in_outage = fake.counters()["total_calls"]
            fake.configure(force_behavior=None)
            recovered_at = datetime.now(UTC)
            ledger = read_terminal(
                settings, [p.request_id for p in planned], timeout_s=120, settle_s=2
            )
            assert worker.poll() is None, "the worker died"
        counters = fake.counters()

    assert not ledger.missing, f"missing: {sorted(ledger.missing)[:5]}"
    assert not ledger.duplicates, ledger.duplicates
    sightings = [s for rid in sorted(ledger.expected) for s in ledger.seen[rid]]
    fallbacks = [s for s in sightings if s.outcome == "result:fallback"]
    answered = [s for s in sightings if s.outcome == "result:model"]
    assert len(fallbacks) + len(answered) == REQUESTS, ledger.routes()
    # Nothing gave up waiting: a fallback can only come from a failed call in the outage.
    late = [s for s in fallbacks if s.result is None or s.result.produced_at >= recovered_at]
    assert late == [], late
    assert {s.reason for s in fallbacks} <= {"model_server_error", "model_unavailable"}
    probes = math.ceil(OUTAGE_S / OPEN_S) + 1
    allowed = MODELS * (MIN_CALLS + probes)
    assert len(fallbacks) <= allowed, (len(fallbacks), allowed, ledger.reasons())
    # Every other request was held and then answered by the model, once, after recovery.
    assert len(answered) == REQUESTS - len(fallbacks) > 0
    early = [s for s in answered if s.result is None or s.result.produced_at < recovered_at]
    assert early == [], early
    assert counters["by_behavior"].get("valid", 0) == len(answered)
    first_answer_s = min(
        (s.result.produced_at - recovered_at).total_seconds() for s in answered if s.result
    )
    print(
        f"breaker wait, live: {len(fallbacks)} fallbacks (allowed {allowed}), "
        f"{calls_in_outage} model calls during the {OUTAGE_S:.0f} s outage, "
        f"{counters['total_calls'] - calls_in_outage} after; {len(answered)} answered by "
        f"the model, the first {first_answer_s:.2f} s after recovery; "
        f"routes {dict(ledger.reasons())}"
    )
