"""Chaos runs: crash workers, the broker and the model mid-stream; then count every request.

Each scenario produces a known mix of requests (:func:`pipeline.harness.scenarios.mixed_requests`),
does damage while many calls are in flight, lets the pipeline recover, and ends with the
ledger (:mod:`pipeline.harness.ledger`): requests in, found in results / review / dead letters,
**missing (must be 0)** and duplicates. Duplicates are expected: delivery is
at-least-once, so work that was in flight, or produced but not yet committed, when
something died is done again. They are counted and bounded, never hidden.

The same functions run in two sizes: ``tests/e2e/test_chaos.py`` calls them small enough for
CI (< 90 s in total), ``python -m bench.chaos`` runs the long versions and writes
``bench/out/chaos.json``. The broker scenario starts its *own* broker (port 9292, data in
``/tmp/bench-kafka-data``) through ``infra/kafka/kafka.sh`` and only ever stops that one;
the shared broker on 9092 is never touched.

Waits are conditions with deadlines (in-flight counts, group membership, topic counts),
never fixed sleeps: the machine is small and shared, and a sleep long enough for a loaded
machine makes an idle one slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bench.common import (
    KAFKA_SCRIPT,
    Proc,
    Report,
    TopicCounter,
    base_args,
    delete_topics,
    finish,
    free_port,
    new_settings,
    stage_groups,
    table,
    wait_groups_stable,
    wait_until,
)
from bench.common import start_worker as _start_worker
from pipeline.config import Settings
from pipeline.contract import topology
from pipeline.harness.environment import create_topics
from pipeline.harness.fakellm import FakeLLMServer
from pipeline.harness.ledger import Ledger, read_terminal
from pipeline.harness.scenarios import DEFAULT_WEIGHTS, PlannedRequest, mixed_requests
from pipeline.transport.batch import BULK_TIMEOUT_S, produce_batch

CHAOS_PORT = 9292
CHAOS_DATA = "/tmp/bench-kafka-data"
GROUP_TIMEOUT_S = 60.0

# Model faults with long timeouts ("hang") are left out of the default chaos mix: they
# hold a slot for timeout x attempts and would only make the runs longer, not harder.
CHAOS_WEIGHTS = {k: v for k, v in DEFAULT_WEIGHTS.items() if k != "hang"}
# The circuit and quality breakers are right to open under this mix (a third of the model
# answers are faults by design), and then valid requests take the fallback path. For the
# crash runs that would hide what is being tested (does every request still take the
# route its own fault implies after a crash?), so they raise the thresholds out of reach.
# The model-outage run keeps the defaults: there, opening is the behaviour under test.
NO_BREAKERS = {
    "LLMPIPE_BREAKER_FAILURE_RATE": "1.0",
    "LLMPIPE_BREAKER_MIN_CALLS": "100",
    "LLMPIPE_QUALITY_BREAKER_FAILURE_RATE": "1.0",
    "LLMPIPE_QUALITY_BREAKER_MIN_CALLS": "100",
}


# -- a fake model that can die and come back on the same port -------------------------------


class RestartableFake:
    """A :class:`FakeLLMServer` on its own loop thread, stoppable and restartable.

    The port is fixed up front so the worker's configured URL stays valid across a
    restart, exactly like a model server that crashes and is brought back by its
    supervisor. While stopped, connections are refused.
    """

    def __init__(self, latency: float = 0.0, jitter: float = 0.0) -> None:
        self.port = free_port()
        self.server = FakeLLMServer(port=self.port, latency=latency, jitter=jitter)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def start(self) -> None:
        self._call(self.server.start())

    def stop(self) -> None:
        """Close the listener and abort every connection, including calls in flight."""
        self._call(self.server.stop())

    def in_flight(self) -> int:
        return int(self.server.counters()["in_flight"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@contextlib.contextmanager
def fake_model(latency: float, jitter: float = 0.2) -> Iterator[RestartableFake]:
    fake = RestartableFake(latency, jitter)
    fake.start()
    try:
        yield fake
    finally:
        fake.close()


# -- outcome of one scenario ----------------------------------------------------------------


@dataclass
class ChaosOutcome:
    """The ledger of one run plus what was done to the pipeline, and when."""

    name: str
    requests: int
    found: int
    missing: int
    duplicates: int
    routes: dict[str, int]
    reasons: dict[str, int]
    unexpected_routes: int
    wrong_outcome: int
    events: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_ledger(
        cls, name: str, planned: Sequence[PlannedRequest], ledger: Ledger, events: list[str]
    ) -> ChaosOutcome:
        wrong = Counter(
            f"{p.fault}->{ledger.first(p.request_id).outcome}/{ledger.first(p.request_id).reason}"
            for p in planned
            if p.request_id in ledger.seen
            and (ledger.first(p.request_id).outcome, ledger.first(p.request_id).reason)
            != (p.expected, p.expected_reason)
        )
        # Outcome only (result source / review / dead letter), ignoring the reason: the
        # reason of a model fault can legitimately change when a breaker intervenes.
        wrong_outcome = sum(
            1
            for p in planned
            if p.request_id in ledger.seen and ledger.first(p.request_id).outcome != p.expected
        )
        summary = ledger.summary()
        return cls(
            name=name,
            requests=summary["requests"],
            found=summary["found"],
            missing=summary["missing"],
            duplicates=summary["duplicates"],
            routes=dict(summary["routes"]),
            reasons={f"{o}/{r}": n for (o, r), n in sorted(ledger.reasons().items())},
            unexpected_routes=sum(wrong.values()),
            wrong_outcome=wrong_outcome,
            events=events,
            details={"unexpected_by_fault": dict(wrong.most_common(10))},
        )

    def line(self) -> str:
        return (
            f"{self.name}: {self.requests} in, {self.found} found, {self.missing} missing, "
            f"{self.duplicates} duplicates, routes {self.routes}"
        )


class Clock:
    """Timestamps for the event log, relative to the start of the scenario."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self.events: list[str] = []

    def log(self, text: str) -> None:
        self.events.append(f"t+{time.monotonic() - self._t0:5.1f}s {text}")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0


def _busy_or_dead(fake: RestartableFake, worker: Proc, in_flight: int) -> bool:
    return fake.in_flight() >= in_flight or not worker.alive()


def _reached(counter: TopicCounter, target: int) -> bool:
    return counter.count() >= target


def _produce(settings: Settings, planned: Sequence[PlannedRequest]) -> None:
    produce_batch(
        settings,
        topology.REQUESTS,
        [(p.key, p.value, p.headers) for p in planned],
        timeout_s=BULK_TIMEOUT_S,
    )


def _worker(settings: Settings, name: str, env: Mapping[str, str] | None = None) -> Proc:
    return _start_worker(settings, name, {"LLMPIPE_MODEL_MAX_ATTEMPTS": "2", **(env or {})})


def _ledger(
    settings: Settings,
    planned: Sequence[PlannedRequest],
    timeout_s: float,
    settle_s: float,
    clock: Clock | None = None,
) -> Ledger:
    """Read the terminal topics until every request is found; log 25/50/75/100 % marks."""
    marks = [0.25, 0.5, 0.75, 1.0]

    def progress(ledger: Ledger) -> None:
        found = len(ledger.expected) - len(ledger.missing)
        while clock is not None and marks and found >= marks[0] * len(ledger.expected):
            clock.log(f"ledger: {marks.pop(0):.0%} of requests found")

    return read_terminal(
        settings,
        [p.request_id for p in planned],
        timeout_s=timeout_s,
        settle_s=settle_s,
        progress=progress,
    )


@contextlib.contextmanager
def _topics(settings: Settings, keep: bool = False) -> Iterator[Settings]:
    create_topics(settings)
    try:
        yield settings
    finally:
        if not keep:
            delete_topics(settings)


# -- scenarios ------------------------------------------------------------------------------


def sigkill_loop(
    bootstrap: str,
    requests: int = 2_000,
    kills: int = 5,
    in_flight_at_kill: int = 40,
    latency: float = 0.5,
    seed: int = 21,
) -> ChaosOutcome:
    """SIGKILL the only worker again and again while it has many model calls in flight.

    Each new worker must pick up from the committed offsets; everything that was in flight
    at a kill is consumed again (duplicates), nothing may be skipped (missing).
    """
    clock = Clock()
    planned = mixed_requests(requests, seed=seed, weights=CHAOS_WEIGHTS, prefix="kill")
    in_flight_seen: list[int] = []
    with fake_model(latency) as fake:
        settings = new_settings(
            bootstrap, model_base_url=fake.url, model_timeout_s=5.0, max_in_flight=64
        )
        with _topics(settings):
            _produce(settings, planned)
            clock.log(f"produced {requests} requests")
            for i in range(kills):
                worker = _worker(settings, f"chaos-kill{i}", NO_BREAKERS)
                try:
                    wait_until(
                        functools.partial(_busy_or_dead, fake, worker, in_flight_at_kill),
                        GROUP_TIMEOUT_S,
                        f"{in_flight_at_kill} model calls in flight",
                    )
                    in_flight_seen.append(fake.in_flight())
                    worker.kill()
                    clock.log(f"SIGKILL worker {i + 1}/{kills} with {in_flight_seen[-1]} in flight")
                    # The server finishes the orphaned calls on its own clock; wait for them
                    # so the next kill counts only the next worker's calls.
                    wait_until(lambda: fake.in_flight() == 0, 60, "orphaned calls to finish")
                finally:
                    worker.stop()
            survivor = _worker(settings, "chaos-kill-final", NO_BREAKERS)
            clock.log("final worker started")
            try:
                ledger = _ledger(settings, planned, timeout_s=240, settle_s=3, clock=clock)
                clock.log("ledger complete" if not ledger.missing else "ledger timed out")
                alive = survivor.alive()
            finally:
                survivor.stop()
    outcome = ChaosOutcome.from_ledger("sigkill_loop", planned, ledger, clock.events)
    outcome.duration_s = clock.elapsed
    outcome.details.update(
        {
            "kills": kills,
            "in_flight_at_each_kill": in_flight_seen,
            "final_worker_alive": alive,
            "duplicate_bound": kills * 4 * settings.max_in_flight,
        }
    )
    return outcome


def kill_one_of_two(
    bootstrap: str, requests: int = 3_000, latency: float = 0.3, seed: int = 22
) -> ChaosOutcome:
    """Two workers share the partitions; one is SIGKILLed; the other must take over.

    Takeover is observed in the broker's group view (every stage group down to one member
    owning all partitions), then the survivor must finish every request.
    """
    clock = Clock()
    planned = mixed_requests(requests, seed=seed, weights=CHAOS_WEIGHTS, prefix="pair")
    with fake_model(latency) as fake:
        settings = new_settings(
            bootstrap, model_base_url=fake.url, model_timeout_s=5.0, max_in_flight=64
        )
        groups = stage_groups(settings)
        with _topics(settings):
            victim = _worker(settings, "chaos-a", NO_BREAKERS)
            survivor = _worker(settings, "chaos-b", NO_BREAKERS)
            try:
                wait_groups_stable(settings, groups, 2, GROUP_TIMEOUT_S)
                clock.log("both workers own partitions in every stage group")
                _produce(settings, planned)
                clock.log(f"produced {requests} requests")
                with TopicCounter(settings, [topology.RESULTS]) as counter:
                    wait_until(
                        lambda: counter.count() >= requests // 10 and fake.in_flight() >= 32,
                        GROUP_TIMEOUT_S,
                        "10% of results with calls in flight",
                    )
                    in_flight = fake.in_flight()
                    done_at_kill = counter.count()
                victim.kill()
                clock.log(f"SIGKILL worker a ({in_flight} calls in flight, {done_at_kill} done)")
                killed_at = time.monotonic()
                wait_groups_stable(settings, groups, 1, GROUP_TIMEOUT_S)
                takeover_s = time.monotonic() - killed_at
                clock.log(f"worker b owns every partition after {takeover_s:.1f}s")
                ledger = _ledger(settings, planned, timeout_s=240, settle_s=3, clock=clock)
                clock.log("ledger complete" if not ledger.missing else "ledger timed out")
                alive = survivor.alive()
            finally:
                victim.stop()
                survivor.stop()
    outcome = ChaosOutcome.from_ledger("kill_one_of_two", planned, ledger, clock.events)
    outcome.duration_s = clock.elapsed
    outcome.details.update(
        {
            "takeover_s": round(takeover_s, 1),
            "survivor_alive": alive,
            "in_flight_at_kill": in_flight,
        }
    )
    return outcome


def model_server_restart(
    bootstrap: str,
    requests: int = 3_000,
    latency: float = 0.3,
    outage_fallbacks: int = 20,
    breaker_open_s: float = 2.0,
    seed: int = 23,
) -> ChaosOutcome:
    """Kill the model server mid-stream (connections refused, calls aborted), bring it back.

    Half the requests are produced before the outage, half after the server is back. The
    outage lasts until the pipeline has visibly reacted (``outage_fallbacks`` requests on
    the fallback path), not a fixed time. Requests caught by the outage must end on the
    fallback path with a model reason; none may be lost; and model answers must resume
    once the server is back (counted from ``Result.produced_at``). The endpoint breaker is
    kept on (it is what reacts to an outage) with a short open time, so that it half-opens
    within the run.
    """
    clock = Clock()
    planned = mixed_requests(requests, seed=seed, weights={"valid": 1}, prefix="model")
    first, second = planned[: requests // 2], planned[requests // 2 :]
    env = {"LLMPIPE_BREAKER_OPEN_S": str(breaker_open_s)}
    with fake_model(latency) as fake:
        settings = new_settings(
            bootstrap, model_base_url=fake.url, model_timeout_s=5.0, max_in_flight=64
        )
        with _topics(settings):
            worker = _worker(settings, "chaos-model", env)
            try:
                wait_groups_stable(settings, stage_groups(settings), 1, GROUP_TIMEOUT_S)
                _produce(settings, first)
                clock.log(f"produced {len(first)} requests")
                with TopicCounter(settings, [topology.RESULTS]) as results:
                    wait_until(
                        lambda: results.count() >= len(first) // 5 and fake.in_flight() >= 32,
                        GROUP_TIMEOUT_S,
                        "20% of results with calls in flight",
                    )
                in_flight = fake.in_flight()
                fake.stop()
                clock.log(f"model server stopped with {in_flight} calls in flight")
                with TopicCounter(settings, [topology.FALLBACK]) as fallbacks:
                    wait_until(
                        lambda: fallbacks.count() >= outage_fallbacks,
                        GROUP_TIMEOUT_S,
                        f"{outage_fallbacks} requests on the fallback path",
                    )
                fake.start()
                back_at = datetime.now(UTC)
                clock.log(f"model server back on port {fake.port}")
                canaries = _until_model_answers(settings, GROUP_TIMEOUT_S)
                clock.log(f"model answers again (after {canaries} canary requests)")
                _produce(settings, second)
                clock.log(f"produced {len(second)} more requests")
                ledger = _ledger(settings, planned, timeout_s=240, settle_s=2, clock=clock)
                clock.log("ledger complete" if not ledger.missing else "ledger timed out")
                alive = worker.alive()
            finally:
                worker.stop()
    resumed = sum(
        1
        for sightings in ledger.seen.values()
        if (r := sightings[0].result) is not None
        and r.source == "model"
        and r.produced_at >= back_at
    )
    outcome = ChaosOutcome.from_ledger("model_server_restart", planned, ledger, clock.events)
    outcome.duration_s = clock.elapsed
    outcome.details.update(
        {
            "in_flight_at_stop": in_flight,
            "model_answers_after_restart": resumed,
            "canaries_until_breaker_closed": canaries,
            "breaker_open_s": breaker_open_s,
            "worker_alive": alive,
        }
    )
    return outcome


def _until_model_answers(settings: Settings, timeout_s: float) -> int:
    """Send one canary request at a time until one is answered by the model; return how many.

    After an outage the endpoint breaker stays open for its open time and then lets a
    probe through; a canary loop observes exactly that, instead of sleeping for the
    configured open time and hoping.
    """
    deadline = time.monotonic() + timeout_s
    sent = 0
    while time.monotonic() < deadline:
        canary = mixed_requests(1, seed=sent, weights={"valid": 1}, prefix="canary")[0]
        sent += 1
        _produce(settings, [canary])
        ledger = read_terminal(settings, [canary.request_id], timeout_s=30)
        if not ledger.missing and ledger.first(canary.request_id).outcome == "result:model":
            return sent
    raise TimeoutError(f"no model answer within {timeout_s:.0f}s after the restart")


# -- the broker -----------------------------------------------------------------------------


def _kafka(command: str, port: int, data: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LLMPIPE_KAFKA_PORT": str(port), "LLMPIPE_KAFKA_DATA": data}
    return subprocess.run(
        ["bash", str(KAFKA_SCRIPT), command], env=env, capture_output=True, text=True, check=False
    )


@contextlib.contextmanager
def own_broker(port: int = CHAOS_PORT, data: str = CHAOS_DATA) -> Iterator[str]:
    """A dedicated broker for broker chaos, stopped at the end if this started it.

    Refuses port 9092: that broker belongs to everyone else on the machine.
    """
    if port == 9092:
        raise ValueError("broker chaos must never run against the shared broker on 9092")
    started = _kafka("status", port, data).returncode != 0
    if started:
        up = _kafka("up", port, data)
        if up.returncode != 0:
            raise RuntimeError(f"could not start the chaos broker: {up.stderr[-2000:]}")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        if started:
            _kafka("down", port, data)


def broker_restart(
    port: int = CHAOS_PORT,
    data: str = CHAOS_DATA,
    requests: int = 3_000,
    latency: float = 0.3,
    restarts: int = 2,
    seed: int = 24,
) -> ChaosOutcome:
    """Stop the broker (SIGTERM, controlled shutdown) mid-stream and start it again.

    While it is down the worker cannot produce, fetch or commit: produce retries with
    backoff, commits fail (so the work is redone: duplicates), calls in flight finish and
    wait. After the restart everything must drain with nothing missing.
    """
    clock = Clock()
    planned = mixed_requests(requests, seed=seed, weights=CHAOS_WEIGHTS, prefix="broker")
    down_s: list[float] = []
    with own_broker(port, data) as bootstrap, fake_model(latency) as fake:
        clock.log(f"chaos broker up on {bootstrap}")
        settings = new_settings(
            bootstrap, model_base_url=fake.url, model_timeout_s=5.0, max_in_flight=64
        )
        with _topics(settings):
            worker = _worker(settings, "chaos-broker", NO_BREAKERS)
            try:
                wait_groups_stable(settings, stage_groups(settings), 1, GROUP_TIMEOUT_S)
                _produce(settings, planned)
                clock.log(f"produced {requests} requests")
                for i in range(restarts):
                    target = requests * (i + 1) // (restarts + 2)
                    with TopicCounter(settings, [topology.RESULTS]) as counter:
                        wait_until(
                            functools.partial(_reached, counter, target),
                            120,
                            f"{target} results before restart {i + 1}",
                        )
                    in_flight = fake.in_flight()
                    t_down = time.monotonic()
                    _kafka("down", port, data)
                    clock.log(f"broker stopped ({in_flight} model calls in flight)")
                    up = _kafka("up", port, data)
                    if up.returncode != 0:
                        raise RuntimeError(f"chaos broker did not come back: {up.stderr[-2000:]}")
                    down_s.append(time.monotonic() - t_down)
                    clock.log(f"broker back after {down_s[-1]:.1f}s")
                ledger = _ledger(settings, planned, timeout_s=300, settle_s=3, clock=clock)
                clock.log("ledger complete" if not ledger.missing else "ledger timed out")
                alive = worker.alive()
            finally:
                worker.stop()
    outcome = ChaosOutcome.from_ledger("broker_restart", planned, ledger, clock.events)
    outcome.duration_s = clock.elapsed
    outcome.details.update({"outages_s": [round(d, 1) for d in down_s], "worker_alive": alive})
    return outcome


# -- the long run ---------------------------------------------------------------------------


def outcome_rows(outcomes: Sequence[ChaosOutcome]) -> list[str]:
    rows = table(
        ["run", "requests", "found", "missing", "duplicates", "other route", "other reason", "s"],
        [
            (
                o.name,
                o.requests,
                o.found,
                o.missing,
                o.duplicates,
                o.wrong_outcome,
                o.unexpected_routes - o.wrong_outcome,
                o.duration_s,
            )
            for o in outcomes
        ],
    )
    for o in outcomes:
        rows += ["", f"**{o.name}** routes: {o.routes}", ""]
        rows += [f"    {e}" for e in o.events]
        if o.details:
            rows += ["", f"details: {o.details}"]
    return rows


def run(quick: bool, bootstrap: str, broker: bool = True) -> Report:
    started = time.monotonic()
    scale = 1 if quick else 2
    report = Report(
        "chaos",
        "Chaos: worker kills, takeover, model outage, broker restart",
        {"quick": quick, "broker_chaos": broker, "chaos_broker_port": CHAOS_PORT},
    )
    outcomes = [
        sigkill_loop(bootstrap, requests=1_000 * scale, kills=3 if quick else 5),
        kill_one_of_two(bootstrap, requests=1_500 * scale),
        model_server_restart(bootstrap, requests=1_500 * scale),
    ]
    if broker:
        outcomes.append(broker_restart(requests=1_500 * scale, restarts=1 if quick else 2))
    report.results = {o.name: o.__dict__ for o in outcomes}
    report.markdown += outcome_rows(outcomes)
    lost = sum(o.missing for o in outcomes)
    report.notes.append(
        f"requests lost across all runs: {lost}"
        + (" (PASS)" if lost == 0 else " (FAIL: at-least-once is broken)")
    )
    report.notes.append(
        "duplicates come from at-least-once delivery: messages in flight, or produced but "
        "not yet committed (commits run every 0.5 s), when a worker or the broker died are "
        "processed again; consumers de-duplicate on request_id"
    )
    return finish(report, started, bootstrap)


def main() -> None:
    parser = base_args(__doc__.splitlines()[0])
    parser.add_argument("--no-broker", action="store_true", help="skip the broker restart run")
    args = parser.parse_args()
    run(args.quick, args.bootstrap, broker=not args.no_broker)


if __name__ == "__main__":
    main()
