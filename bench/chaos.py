"""Chaos runs: crash workers, the broker and the model mid-stream; then count every request.

Each scenario produces a known mix of requests (:func:`pipeline.harness.scenarios.mixed_requests`),
does damage while many calls are in flight, lets the pipeline recover, and ends with the
ledger (:mod:`pipeline.harness.ledger`), read ``read_committed`` over results, review and dead
letters, every sighting of every request checked: **missing**, **duplicates**, requests in
**two terminal places**, sightings **off the route** their fault implies, and **model
calls redone** (calls counted per request at the fake server, minus the same requests'
calls in a fault-free run).

Redone calls and duplicates are not bounded by a worst case but by what each fault
actually put at risk, measured when it happened (:func:`measure_fault`): the calls in
flight at the server (the worker is frozen with SIGSTOP, counted, then SIGKILLed) plus the
work finished but not covered by any commit (the stage groups' committed positions and
metadata, :mod:`pipeline.harness.commits`). Request by request, what was redone must not exceed
what was at risk for it.

The same functions run in two sizes: the tests (``tests/e2e/test_pipeline_crash.py``,
``tests/e2e/test_chaos.py``) call them small enough for CI, ``python -m bench.chaos`` runs the
long versions in both delivery modes and writes ``bench/out/chaos.json``. Broker faults
run on a broker of their own (free ports, a temporary data dir, through
``infra/kafka/kafka.sh``); the shared broker on 9092 is never stopped.

Waits are conditions with deadlines (in-flight counts, group membership, topic counts),
never fixed sleeps: the machine is small and shared, and a sleep long enough for a loaded
machine makes an idle one slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaException

from bench.common import (
    KAFKA_SCRIPT,
    DeadlineExceeded,
    Proc,
    Report,
    TopicCounter,
    base_args,
    finish,
    free_port,
    new_settings,
    stage_groups,
    table,
    topics_of,
    wait_groups_stable,
    wait_until,
)
from bench.common import start_worker as _start_worker
from pipeline.config import Settings
from pipeline.contract import topology
from pipeline.harness.commits import CommitSnapshot, group_commits, read_index
from pipeline.harness.commits import snapshot as commit_snapshot
from pipeline.harness.fakellm import FakeLLMServer
from pipeline.harness.fakellm.server import CallTally
from pipeline.harness.ledger import (
    MODEL_CALL,
    SETTLE_CALL,
    Ledger,
    RequestCalls,
    calls_of,
    fewer_calls,
    pipeline_call_kind,
    read_terminal,
    redone_calls,
)
from pipeline.harness.scenarios import (
    DEFAULT_WEIGHTS,
    SCENARIO_OVERRIDES,
    PlannedRequest,
    mixed_requests,
)
from pipeline.transport.batch import BULK_TIMEOUT_S, produce_batch
from pipeline.transport.clients import KafkaClients

# Waits for a condition (groups stable, calls in flight, fallbacks seen): typically 5-15 s,
# twice that on a loaded 2-core machine; every wait is still cut by the scenario deadline.
GROUP_TIMEOUT_S = 120.0
# A restarted worker: process start, group joins, then enough of its own calls.
BUSY_TIMEOUT_S = 90.0
# A frozen worker's last calls reach the server within this (loopback, a loaded machine).
QUIET_S = 0.3
# After a broker outage: from the broker answering again to a worker's next commit (its
# sessions timed out during the outage, so this includes rejoining every group).
RECOVERY_TIMEOUT_S = 60.0
# After its commits resume, a worker may still be recovering from the outage: its other
# stages' sessions timing out, a transactional call hanging in librdkafka until it is
# replaced (30 s; librdkafka#5456). Each lane's next fault waits until its worker has
# logged no warning for this long (within RECOVERY_TIMEOUT_S), so it hits a worker in its
# stride, not one mid-recovery: a kill 23 s after an outage found finished calls 20 s
# uncommitted behind that recovery (both lanes, CI rehearsal on 2026-12-04).
SETTLE_QUIET_S = 10.0
# A second JVM on a shared machine: smaller than the shared broker's 2 GB.
OWN_BROKER_HEAP = "-Xms256m -Xmx1g"

# Model faults with long timeouts ("hang") are left out of the default chaos mix: they
# hold a slot for timeout x attempts and would only make the runs longer, not harder.
CHAOS_WEIGHTS = {k: v for k, v in DEFAULT_WEIGHTS.items() if k != "hang"}
# The circuit and quality breakers are right to open under this mix (a third of the model
# answers are faults by design), and then valid requests take the fallback path. For the
# crash runs that would hide what is being tested (does every request still take the
# route its own fault implies after a crash?), so they raise the thresholds out of reach.
# The model-outage run keeps the defaults: there, opening is the behaviour under test.
NO_BREAKERS = {f"LLMPIPE_{k.upper()}": str(v) for k, v in SCENARIO_OVERRIDES.items()}


# -- a fake model that can die and come back on the same port -------------------------------


class RestartableFake:
    """A :class:`FakeLLMServer` on its own loop thread, stoppable and restartable.

    The port is fixed up front so the worker's configured URL stays valid across a
    restart, exactly like a model server that crashes and is brought back by its
    supervisor. While stopped, connections are refused. Calls are counted per request
    and per stage (:func:`pipeline.harness.ledger.pipeline_call_kind`), so a run can say exactly
    which calls a fault made the pipeline pay again.
    """

    def __init__(self, latency: float = 0.0, jitter: float = 0.0) -> None:
        self.port = free_port()
        self.server = FakeLLMServer(
            port=self.port, latency=latency, jitter=jitter, call_kind=pipeline_call_kind
        )
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

    def live_in_flight(self) -> int:
        return self.server.live_in_flight()

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


# -- faults and what was at risk when they happened ----------------------------------------


@dataclass
class Fault:
    """One fault, and what a redo after it may repeat, measured when it happened.

    ``at_risk_calls``: request -> model calls of the current epoch whose stage input was
    not committed (calls in flight at the server, plus calls finished but not covered by
    a commit): the most a redo can pay again. ``at_risk_outputs``: request -> stages in
    which it already had an output while its input there was uncommitted: the most
    duplicates a redo can add (at least once; always empty with exactly-once hops, whose
    uncommitted outputs nobody can see). The ages say how long ago that uncommitted work
    finished: much more than a commit interval means finished work was never recorded.
    A duplicate is a new input message for every stage after the one that repeated it,
    which processes it again: its calls there (``DOWNSTREAM_CALLS``) are paid again too.
    """

    kind: str
    at_s: float
    in_flight: int
    at_risk_calls: dict[str, int] = field(default_factory=dict)
    at_risk_outputs: dict[str, int] = field(default_factory=dict)
    # request -> the stages of those outputs (a redo's copy re-runs every stage after it)
    at_risk_output_stages: dict[str, list[str]] = field(default_factory=dict)
    oldest_uncommitted_output_ms: int = 0
    oldest_uncommitted_call_ms: int = 0
    notes: dict[str, Any] = field(default_factory=dict)
    redone: int = 0  # calls redone after this fault (attributed by ChaosOutcome.account)

    @property
    def uncommitted_calls(self) -> int:
        return sum(self.at_risk_calls.values()) - self.in_flight

    def row(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "at_s": round(self.at_s, 1),
            "calls_in_flight": self.in_flight,
            "uncommitted_calls": self.uncommitted_calls,
            "uncommitted_outputs": sum(self.at_risk_outputs.values()),
            "oldest_uncommitted_output_ms": self.oldest_uncommitted_output_ms,
            "oldest_uncommitted_call_ms": self.oldest_uncommitted_call_ms,
            "calls_redone": self.redone,
            **self.notes,
        }


# The model calls each stage's outputs lead to further down the pipeline: what a duplicate
# output of that stage (at least once) makes the stages after it pay again.
DOWNSTREAM_CALLS: dict[str, tuple[str, ...]] = {
    topology.VALIDATE: (MODEL_CALL, SETTLE_CALL),
    topology.MODEL: (SETTLE_CALL,),
}


def duplicate_calls(
    fault_stages: Sequence[Sequence[str]], baseline: Mapping[str, CallTally]
) -> int:
    """The calls a request's duplicates may cost downstream, from its at-risk outputs
    (``fault_stages``: the stages of them, per fault) and its fault-free calls by kind:
    each copy (as many as the duplicate bound allows, ``2**n - 1`` for n at-risk outputs)
    re-runs the stages after the earliest of them."""
    stages = [stage for per_fault in fault_stages for stage in per_fault]
    if not stages:
        return 0
    per_copy = max(
        sum(t.started for k, t in baseline.items() if k in DOWNSTREAM_CALLS.get(stage, ()))
        for stage in stages
    )
    return ((1 << len(stages)) - 1) * per_copy


def _started_since(now: RequestCalls, since: RequestCalls, rid: str, kind: str) -> int:
    before = since.get(rid, {}).get(kind)
    tally = now.get(rid, {}).get(kind)
    return (tally.started if tally else 0) - (before.started if before else 0)


def measure_fault(
    kind: str,
    clock: Clock,
    now: RequestCalls,
    since: RequestCalls,
    in_flight: Mapping[str, int],
    commits: CommitSnapshot,
    epoch_started_ms: int = 0,
) -> Fault:
    """What a fault put at risk: ``now``/``since`` are the server's per-request calls at
    the fault and at the start of the epoch it ends, ``commits`` the stage groups' commits
    read right after it (worker dead or broker about to stop).

    The age of the oldest uncommitted output counts only outputs written in this epoch
    (since ``epoch_started_ms``): an output left uncommitted by an earlier, killed worker
    is at risk until its input is redone, but it says nothing about whether this worker
    commits what it finishes."""
    open_by_kind = {
        MODEL_CALL: commits.uncommitted("model"),
        SETTLE_CALL: commits.uncommitted("settle"),
    }
    at_risk: dict[str, int] = {}
    oldest_call_ms = 0
    for rid in now:
        calls = sum(
            max(0, _started_since(now, since, rid, k))
            for k, open_ids in open_by_kind.items()
            if rid in open_ids
        )
        calls = max(calls, in_flight.get(rid, 0))
        if calls:
            at_risk[rid] = calls
            if rid not in in_flight:
                ended = max((t.last_ended_at for t in now[rid].values()), default=0.0)
                if ended:
                    age = commits.taken_at_ms - int(ended * 1000)
                    oldest_call_ms = max(oldest_call_ms, age)
    outputs: Counter[str] = Counter()
    stages: dict[str, list[str]] = {}
    oldest_output_ms = 0
    for stage in commits.groups:
        for rid, age in commits.finished_uncommitted(stage).items():
            outputs[rid] += 1
            stages.setdefault(rid, []).append(stage)
            if commits.taken_at_ms - age >= epoch_started_ms:
                oldest_output_ms = max(oldest_output_ms, age)
    return Fault(
        kind,
        clock.elapsed,
        sum(in_flight.values()),
        at_risk,
        dict(outputs),
        stages,
        oldest_output_ms,
        oldest_call_ms,
    )


# -- outcome of one scenario ----------------------------------------------------------------


@dataclass
class ChaosOutcome:
    """The ledger of one run plus what was done to the pipeline, and when.

    Every sighting of every request is checked: ``duplicates`` counts copies beyond the
    first anywhere, ``two_places`` requests found in more than one terminal topic,
    ``wrong_route`` requests with any sighting off the route their own fault implies.
    ``redone_calls`` compares the fake server's calls per request with a fault-free run of
    the same requests; ``over_budget`` lists requests that were redone (or duplicated)
    more than what was at risk for them at the faults: each must be empty.
    """

    name: str
    mode: str
    requests: int
    found: int
    missing: int
    duplicates: int
    two_places: int
    wrong_route: int
    routes: dict[str, int]
    reasons: dict[str, int]
    events: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    faults: list[Fault] = field(default_factory=list)
    redone_calls: int | None = None
    redone_over_budget: dict[str, tuple[int, int]] = field(default_factory=dict)
    duplicates_over_budget: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Requests that cost fewer calls than in the fault-free run, and by how many.
    fewer_calls_than_baseline: dict[str, int] = field(default_factory=dict)
    # At least once: request -> the calls its duplicates may make the later stages pay
    # again (part of its redo budget), and how many of the redone calls that explains.
    duplicate_calls_budget: dict[str, int] = field(default_factory=dict)
    duplicate_calls_redone: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_ledger(
        cls,
        name: str,
        mode: str,
        planned: Sequence[PlannedRequest],
        ledger: Ledger,
        events: list[str],
        reasons: bool = True,
        under_way_at_freeze: set[str] | None = None,
    ) -> ChaosOutcome:
        """``reasons=False`` checks outcomes only (breakers may change a model reason).

        ``under_way_at_freeze``: requests whose model work was under way while a worker
        that lived on was stopped (SIGSTOP, to count what was in flight before the broker
        outage). Time ran on while it was stopped: a call in flight timed out late on its
        client, or a retry found its time budget spent, so the model attempts' kinds
        differ and the fallback reason can become ``model_unavailable``. A sighting of
        such a request on its expected outcome with another reason is not off route; it
        is counted in ``details["reasons_changed_by_freeze"]``. Any other change of
        reason, and any change of outcome, stays off route."""
        expected = {p.request_id: (p.expected, p.expected_reason) for p in planned}
        wrong = ledger.wrong_routes(expected, reasons)
        excused = {
            rid
            for rid in wrong.keys() & (under_way_at_freeze or set())
            if all(s.outcome == expected[rid][0] for s in ledger.seen.get(rid, []))
        }
        for rid in excused:
            del wrong[rid]
        summary = ledger.summary()
        outcome = cls(
            name=name,
            mode=mode,
            requests=summary["requests"],
            found=summary["found"],
            missing=summary["missing"],
            duplicates=summary["duplicates"],
            two_places=summary["two_places"],
            wrong_route=len(wrong),
            routes=dict(summary["routes"]),
            reasons={f"{o}/{r}": n for (o, r), n in sorted(ledger.reasons().items())},
            events=events,
        )
        by_fault = Counter(
            f"{p.fault}->{','.join(wrong[p.request_id])}" for p in planned if p.request_id in wrong
        )
        outcome.details["wrong_route_by_fault"] = dict(by_fault.most_common(10))
        if excused:
            outcome.details["reasons_changed_by_freeze"] = len(excused)
        if ledger.two_places:
            outcome.details["two_places_e.g."] = {
                rid: sorted(t) for rid, t in list(ledger.two_places.items())[:5]
            }
        return outcome

    def account(
        self,
        ledger: Ledger,
        faulty: RequestCalls | None,
        baseline: RequestCalls | None,
    ) -> None:
        """Bound the redone calls and the duplicates, request by request, by the faults."""
        calls_budget: Counter[str] = Counter()
        outputs_budget: Counter[str] = Counter()
        for f in self.faults:
            calls_budget.update(f.at_risk_calls)
            outputs_budget.update(f.at_risk_outputs)
        if faulty is not None and baseline is not None:
            ids = sorted(ledger.expected)
            for rid in outputs_budget:
                downstream = duplicate_calls(
                    [f.at_risk_output_stages.get(rid, []) for f in self.faults],
                    baseline.get(rid, {}),
                )
                if downstream:
                    calls_budget[rid] += downstream
                    self.duplicate_calls_budget[rid] = downstream
            redone = redone_calls(faulty, baseline, ids)
            self.redone_calls = sum(redone.values())
            self.redone_over_budget = {
                rid: (n, calls_budget[rid]) for rid, n in redone.items() if n > calls_budget[rid]
            }
            for rid, n in redone.items():  # to the faults that put the calls at risk, in order
                for f in self.faults:
                    take = min(n, f.at_risk_calls.get(rid, 0))
                    f.redone += take
                    n -= take
                # What is left was paid downstream of duplicates (at least once).
                self.duplicate_calls_redone += min(n, self.duplicate_calls_budget.get(rid, 0))
            cheaper = fewer_calls(faulty, baseline, ids)
            self.fewer_calls_than_baseline = {
                rid: calls_of(baseline, rid) - calls_of(faulty, rid) for rid in cheaper
            }
            self.details["calls_faulty"] = sum(calls_of(faulty, rid) for rid in ids)
            self.details["calls_baseline"] = sum(calls_of(baseline, rid) for rid in ids)
        for rid, extra in ledger.duplicates.items():
            allowed = 2 ** outputs_budget[rid] - 1
            if extra > allowed:
                self.duplicates_over_budget[rid] = (extra, allowed)

    @property
    def calls_at_risk(self) -> int:
        return sum(sum(f.at_risk_calls.values()) for f in self.faults)

    @property
    def outputs_at_risk(self) -> int:
        return sum(sum(f.at_risk_outputs.values()) for f in self.faults)

    @property
    def duplicate_calls_at_risk(self) -> int:
        return sum(self.duplicate_calls_budget.values())

    def line(self) -> str:
        redone = "n/a" if self.redone_calls is None else str(self.redone_calls)
        return (
            f"{self.name} [{self.mode}]: {self.requests} in, {self.found} found, "
            f"{self.missing} missing, {self.duplicates} duplicates, {self.two_places} in two "
            f"places, {self.wrong_route} off route, {redone} calls redone "
            f"(at risk: {self.calls_at_risk} calls, {self.outputs_at_risk} outputs"
            + (
                f" and {self.duplicate_calls_at_risk} calls after them, "
                f"{self.duplicate_calls_redone} of those redone"
                if self.duplicate_calls_budget
                else ""
            )
            + "), "
            f"routes {self.routes}"
        )

    def explain(self) -> str:
        """Everything a failing assertion should print."""
        faults = "\n".join(f"  fault {i + 1}: {f.row()}" for i, f in enumerate(self.faults))
        over = ""
        if self.redone_over_budget:
            over += f"\nredone over budget (redone, at risk): {_head(self.redone_over_budget)}"
        if self.duplicates_over_budget:
            over += f"\nduplicates over budget: {_head(self.duplicates_over_budget)}"
        if self.fewer_calls_than_baseline:
            over += f"\nfewer calls than the baseline: {_head(self.fewer_calls_than_baseline)}"
        return f"{self.line()}\n{faults}{over}\n" + "\n".join(self.events) + f"\n{self.details}"

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "faults"}
        data["faults"] = [f.row() for f in self.faults]
        data["redone_over_budget"] = len(self.redone_over_budget)
        data["duplicates_over_budget"] = len(self.duplicates_over_budget)
        data["fewer_calls_than_baseline"] = len(self.fewer_calls_than_baseline)
        return data


def _head(items: Mapping[str, Any], n: int = 5) -> dict[str, Any]:
    return dict(list(items.items())[:n])


class Clock:
    """Timestamps for the event log, relative to the start of the scenario, and the
    scenario's own deadline: every wait takes the smaller of its own timeout and what is
    left (:meth:`left`), so a scenario given ``deadline_s`` fails with its event log before
    a test runner's timeout could kill it without one."""

    def __init__(self, deadline_s: float | None = None) -> None:
        self._t0 = time.monotonic()
        self._deadline = None if deadline_s is None else self._t0 + deadline_s
        self.events: list[str] = []

    def left(self, timeout_s: float) -> float:
        """``timeout_s``, or less if the scenario's deadline is nearer; raises past it."""
        if self._deadline is None:
            return timeout_s
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(
                f"the scenario's deadline passed after {self.elapsed:.0f}s:\n"
                + "\n".join(self.events)
            )
        return min(timeout_s, remaining)

    def log(self, text: str) -> None:
        self.events.append(f"t+{time.monotonic() - self._t0:5.1f}s {text}")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0


def _produce(settings: Settings, planned: Sequence[PlannedRequest]) -> None:
    produce_batch(
        settings,
        topology.REQUESTS,
        [(p.key, p.value, p.headers) for p in planned],
        timeout_s=BULK_TIMEOUT_S,
    )


def delivery_env(mode: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A worker's environment for a delivery mode; faults use two attempts per call."""
    return {
        "LLMPIPE_DELIVERY": mode,
        "LLMPIPE_MODEL_MAX_ATTEMPTS": "2",
        **NO_BREAKERS,
        **(extra or {}),
    }


def _worker(settings: Settings, name: str, env: Mapping[str, str]) -> Proc:
    return _start_worker(settings, name, {"LLMPIPE_MODEL_MAX_ATTEMPTS": "2", **env})


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


# -- the broker -----------------------------------------------------------------------------


def _kafka(command: str, port: int, data: str) -> subprocess.CompletedProcess[str]:
    env = {
        "LLMPIPE_KAFKA_HEAP": OWN_BROKER_HEAP,
        **os.environ,
        "LLMPIPE_KAFKA_PORT": str(port),
        "LLMPIPE_KAFKA_DATA": data,
    }
    return subprocess.run(
        ["bash", str(KAFKA_SCRIPT), command], env=env, capture_output=True, text=True, check=False
    )


def _ephemeral_start() -> int:
    """The first port the kernel hands out as a connection's local port (Linux)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_broker_port() -> int:
    """A free port whose neighbour (the KRaft controller's) is free too, both below the
    kernel's ephemeral range: while the broker is down its clients reconnect thousands of
    times, each from a fresh ephemeral port, and one of those took the port the broker
    had to bind again ("Address already in use" for the controller after an outage)."""
    rng = random.Random()
    top = min(_ephemeral_start(), 65535) - 2
    for _ in range(200):
        port = rng.randrange(min(10_000, top - 1), top)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of ports for a broker")


@dataclass
class OwnBroker:
    """A dedicated broker that only this run stops and starts (never the shared 9092)."""

    port: int
    data: str

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def down(self) -> None:
        result = _kafka("down", self.port, self.data)
        if result.returncode != 0:
            raise RuntimeError(f"chaos broker did not stop: {result.stderr[-2000:]}")

    def up(self) -> None:
        result = _kafka("up", self.port, self.data)
        if result.returncode != 0:
            raise RuntimeError(f"chaos broker did not start: {result.stderr[-2000:]}")


@contextlib.contextmanager
def own_broker(port: int | None = None, data: str | None = None) -> Iterator[OwnBroker]:
    """A dedicated broker for broker chaos, on its own ports and data dir; stopped and
    deleted at the end. Refuses port 9092: that broker belongs to everyone else."""
    port = port or free_broker_port()
    if port == 9092:
        raise ValueError("broker chaos must never run against the shared broker on 9092")
    data = data or tempfile.mkdtemp(prefix=f"llmpipe-chaos-kafka-{port}-")
    broker = OwnBroker(port, data)
    broker.up()
    try:
        yield broker
    finally:
        _kafka("down", port, data)
        shutil.rmtree(data, ignore_errors=True)


# -- scenarios ------------------------------------------------------------------------------

# The kill runs: model faults of every kind, hangs included (they hold the lowest offset of
# a partition for timeout x attempts, the case that made every kill re-pay everything
# finished above it), at a rate that keeps some hang in flight at most faults.
KILL_WEIGHTS = {**DEFAULT_WEIGHTS, "hang": 3.0}
MODES = ("exactly_once", "at_least_once")


def baseline_calls(
    bootstrap: str,
    planned: Sequence[PlannedRequest],
    latency: float,
    model_timeout_s: float,
    mode: str = "exactly_once",
) -> RequestCalls:
    """The same requests through one worker without faults: model calls per request."""
    with fake_model(latency) as fake:
        settings = new_settings(
            bootstrap, model_base_url=fake.url, model_timeout_s=model_timeout_s, max_in_flight=64
        )
        with topics_of(settings):
            worker = _worker(settings, "baseline", delivery_env(mode))
            try:
                _produce(settings, planned)
                ledger = read_terminal(settings, [p.request_id for p in planned], timeout_s=180)
                if ledger.missing or ledger.duplicates:
                    raise RuntimeError(f"the fault-free baseline run failed: {ledger.summary()}")
            finally:
                worker.stop()
        return fake.server.request_calls()


def half_done(
    in_flight: Mapping[str, int],
    calls: RequestCalls,
    epoch_start: RequestCalls,
    baseline: RequestCalls | None,
) -> set[str]:
    """Requests whose model work a freeze caught half done: a call in flight, or (given the
    fault-free ``baseline``) some but not all of the request's calls started in the epoch
    (a retry waiting for its next attempt). ``calls`` and ``epoch_start``: the server's
    calls at the freeze and at the start of the worker's epoch."""
    under_way = {rid for rid, n in in_flight.items() if n > 0}
    if baseline is None:
        return under_way
    for rid, kinds in calls.items():
        before = epoch_start.get(rid, {})
        started = sum(t.started - (before.get(k) or CallTally()).started for k, t in kinds.items())
        if 0 < started < sum(t.started for t in baseline.get(rid, {}).values()):
            under_way.add(rid)
    return under_way


@dataclass
class Lane:
    """One pipeline of a kill run: its own fake model, topics, worker and faults.

    Several lanes (one per delivery mode) can share a run: they are killed in turn and
    live through the same broker outage, which halves the cost of a run on a small
    machine without letting them see each other's messages or calls.
    """

    mode: str
    fake: RestartableFake
    settings: Settings
    planned: list[PlannedRequest]
    env: dict[str, str]
    worker: Proc | None = None
    epoch_start: RequestCalls = field(default_factory=dict)
    epoch_started_ms: int = 0
    faults: list[Fault] = field(default_factory=list)
    started_workers: int = 0
    # (in flight, calls, epoch start) at each freeze its worker lived through (the outage's)
    resumed_freezes: list[tuple[dict[str, int], RequestCalls, RequestCalls]] = field(
        default_factory=list
    )

    def start_worker(self, clock: Clock) -> Proc:
        self.worker = _worker(self.settings, f"chaos-{self.mode}-{self.started_workers}", self.env)
        self.started_workers += 1
        clock.log(f"[{self.mode}] worker {self.started_workers} started")
        return self.worker

    def new_epoch(self) -> None:
        self.epoch_start = self.fake.server.request_calls()
        self.epoch_started_ms = int(time.time() * 1000)

    def under_way_at_resumed_freezes(self, baseline: RequestCalls | None) -> set[str]:
        """:func:`half_done` at every freeze the worker lived through."""
        return set().union(*(half_done(*freeze, baseline) for freeze in self.resumed_freezes))

    def ended_this_epoch(self) -> int:
        now = self.fake.server.request_calls()
        return sum(
            t.ended - (self.epoch_start.get(rid, {}).get(k) or CallTally()).ended
            for rid, kinds in now.items()
            for k, t in kinds.items()
        )

    def busy(self, in_flight: int, finished: int) -> bool:
        """The worker is in its stride: ``finished`` calls of its own done (so it has
        committed some work) and ``in_flight`` of its own in flight."""
        worker = self.worker
        assert worker is not None
        if not worker.alive():
            raise RuntimeError(f"{worker.name} died: {worker.log_tail()}")
        return (
            self.ended_this_epoch() >= finished and self.fake.server.live_in_flight() >= in_flight
        )

    def state(self) -> str:
        name = self.worker.name if self.worker is not None else "no worker"
        return (
            f"[{self.mode}] {name}: {self.ended_this_epoch()} calls done, "
            f"{self.fake.server.live_in_flight()} in flight"
        )

    def freeze(self) -> tuple[dict[str, int], RequestCalls]:
        """SIGSTOP: the worker sends and finishes nothing more; read the server's calls."""
        worker = self.worker
        assert worker is not None
        os.kill(worker.pid, signal.SIGSTOP)
        at_freeze = self.fake.server.in_flight_requests()
        # Calls the worker sent just before it froze may still be in the socket, not yet
        # read by the server: wait until the server has seen every call it will see.
        last = -1
        stable_since = time.monotonic()
        while time.monotonic() - stable_since < QUIET_S:
            started = int(self.fake.server.counters()["total_calls"])
            if started != last:
                last, stable_since = started, time.monotonic()
            time.sleep(0.02)
        # In flight at the freeze: what was then, plus what was still on its way.
        later = self.fake.server.in_flight_requests()
        in_flight = {r: max(at_freeze.get(r, 0), later.get(r, 0)) for r in {*at_freeze, *later}}
        return in_flight, self.fake.server.request_calls()

    def kill(
        self, clock: Clock, frozen: tuple[dict[str, int], RequestCalls], kind: str = "sigkill"
    ) -> Fault:
        """SIGKILL the frozen worker, read the stage commits, wait out its orphaned calls."""
        worker = self.worker
        assert worker is not None
        in_flight, calls = frozen
        worker.kill()
        worker.stop()
        commits = commit_snapshot(self.settings)
        fault = measure_fault(
            kind, clock, calls, self.epoch_start, in_flight, commits, self.epoch_started_ms
        )
        clock.log(
            f"[{self.mode}] SIGKILL {worker.name}: {fault.in_flight} calls in flight, "
            f"{fault.uncommitted_calls} finished calls uncommitted, "
            f"{sum(fault.at_risk_outputs.values())} outputs uncommitted"
        )
        self.fake.server.wait_orphans_drained(clock.left(60))
        self.new_epoch()
        self.worker = None
        self.faults.append(fault)
        return fault


def _log_lines(worker: Proc) -> list[bytes]:
    with contextlib.suppress(OSError):
        return worker.log_path.read_bytes().splitlines()
    return []


def _about_the_worker(line: bytes) -> bool:
    """A line about the process (broker health, librdkafka, anything printed raw), not
    about one message: per-message lines (a dead letter logged) carry their stage."""
    try:
        record = json.loads(line)
    except ValueError:
        return bool(line.strip())
    return not (isinstance(record, dict) and "stage" in record)


def _warned_within(worker: Proc, seconds: float) -> bool:
    """Whether the worker's newest warning or error line is less than ``seconds`` old
    (a line that is not JSON counts as one, stamped now)."""
    now = time.time()
    for line in reversed(_log_lines(worker)):
        try:
            record = json.loads(line)
        except ValueError:
            if line.strip():
                return True
            continue
        if not isinstance(record, dict) or record.get("level") not in ("warning", "error"):
            continue
        try:
            stamp = datetime.fromisoformat(str(record.get("ts"))).timestamp()
        except ValueError:
            return True
        return now - stamp < seconds
    return False


def _committed_total(settings: Settings, stage: str) -> int:
    return sum(group_commits(settings, stage).positions.values())


def _commits_resumed(settings: Settings, before: int, worker: Proc) -> bool:
    if not worker.alive():
        return True
    try:
        return _committed_total(settings, "model") > before
    except KafkaException:  # right after a restart the coordinator may not answer yet
        return False


def _freeze_when_busy(
    lanes: Sequence[Lane], in_flight: int, finished: int, clock: Clock
) -> list[tuple[dict[str, int], RequestCalls]]:
    """SIGSTOP each lane's worker as soon as it is busy; return what each had at the server."""
    frozen: dict[int, tuple[dict[str, int], RequestCalls]] = {}

    def all_frozen() -> bool:
        for i, lane in enumerate(lanes):
            if i not in frozen and lane.busy(in_flight, finished):
                frozen[i] = lane.freeze()
        return len(frozen) == len(lanes)

    try:
        wait_until(
            all_frozen,
            clock.left(BUSY_TIMEOUT_S),
            f"{finished} calls done and {in_flight} in flight",
        )
    except DeadlineExceeded as exc:
        states = "; ".join(lane.state() for lane in lanes)
        raise DeadlineExceeded(f"{exc}: {states}\n" + "\n".join(clock.events)) from exc
    return [frozen[i] for i in range(len(lanes))]


def _outage(
    broker: OwnBroker,
    outage_s: float,
    lanes: Sequence[Lane],
    frozen: Sequence[tuple[dict[str, int], RequestCalls]],
    clock: Clock,
    after: Callable[[], None],
) -> None:
    """Stop the broker for ``outage_s``, start it again, wait for every lane to commit.

    The lanes' workers arrive frozen (busy, see :func:`_freeze_when_busy`): their commits
    are read, the broker is stopped and they are resumed. What was at risk in a lane: every
    call of the epoch whose stage input those commits did not cover, including calls made
    while the broker was away (none could commit). Each worker's log lines from the stop
    until its commits resume are counted: an outage must cost a few lines, not one per
    retry. The work the frozen workers had (at least ``in_flight_at_kill`` model calls of
    their own, none of them committable during the outage) is what their resumed commits
    show.

    ``after`` (the next fault's requests) runs once every lane's outage is measured and
    its next epoch started, never earlier: a lane that recovers before another (lanes are
    checked in turn) would otherwise work through the next fault's requests before its
    epoch begins, and then wait, idle with nothing left, for a busy worker to kill (the
    at_least_once "stall after the outage" of session 3: every stage caught up, 0 tasks,
    while the scenario waited for 100 calls done and 60 in flight).
    """
    before = []
    for lane, (in_flight, calls) in zip(lanes, frozen, strict=True):
        assert lane.worker is not None
        lane.resumed_freezes.append((in_flight, calls, lane.epoch_start))
        before.append(
            (
                commit_snapshot(lane.settings),
                _committed_total(lane.settings, "model"),
                in_flight,
                len(_log_lines(lane.worker)),
            )
        )
    # The broker goes down while the workers are still frozen, so nothing they finish
    # after the snapshot above can reach it before the outage: resumed first, a worker
    # delivered outputs (at least once: as soon as decided) while the broker was stopping,
    # and their redo after the outage was a duplicate no snapshot had seen at risk.
    t_down = time.monotonic()
    broker.down()
    for lane in lanes:
        assert lane.worker is not None
        os.kill(lane.worker.pid, signal.SIGCONT)
    clock.log(f"broker stopped ({[sum(b[2].values()) for b in before]} model calls in flight)")
    # The outage is the scenario's subject: it lasts outage_s however fast the JVM stops.
    wait_until(lambda: time.monotonic() - t_down >= outage_s, outage_s + 5, "the outage")
    broker.up()
    down_s = time.monotonic() - t_down
    clock.log(f"broker back after {down_s:.1f}s")
    back_at = time.monotonic()
    for lane, (commits, committed, in_flight, lines_before) in zip(lanes, before, strict=True):
        worker = lane.worker
        assert worker is not None
        resumed = functools.partial(_commits_resumed, lane.settings, committed, worker)
        recovered = True
        try:
            wait_until(
                resumed, clock.left(RECOVERY_TIMEOUT_S - (time.monotonic() - back_at)), "commits"
            )
        except DeadlineExceeded:
            recovered = False
        recovered_s = time.monotonic() - t_down
        written = _log_lines(worker)[lines_before:]
        lines = sum(1 for line in written if _about_the_worker(line))
        clock.log(
            f"[{lane.mode}] "
            + (
                f"commits resumed {recovered_s:.1f}s after the stop"
                if recovered
                else f"NO commit {RECOVERY_TIMEOUT_S:.0f}s after the broker was back"
            )
            + f"; {lines} log lines meanwhile ({len(written)} with per-message lines)"
        )
        for line in [x for x in written if _about_the_worker(x)][:3]:
            clock.log(f"[{lane.mode}]   log: {line.decode(errors='replace')[:160]}")
        fault = measure_fault(
            "broker_outage",
            clock,
            lane.fake.server.request_calls(),
            lane.epoch_start,
            in_flight,
            commits,
            lane.epoch_started_ms,
        )
        fault.notes.update(
            {
                "outage_s": round(down_s, 1),
                "recovered": recovered,
                "recovered_s": round(recovered_s, 1) if recovered else None,
                "log_lines": lines,
                "log_lines_all": len(written),
            }
        )
        lane.faults.append(fault)
        lane.new_epoch()
        if not worker.alive():
            # A fatal Kafka error (a static member fenced by the outage): the worker exits
            # non-zero with one line, and is restarted as its supervisor would.
            fault.notes["worker_exit"] = worker.stop()
            fault.notes["exit_lines"] = [
                x.decode(errors="replace") for x in _log_lines(worker) if x.startswith(b"error:")
            ]
            clock.log(f"[{lane.mode}] worker exited {fault.notes['worker_exit']}: restarted")
            lane.worker = None
        elif not recovered:
            # What a liveness probe would do: kill the stuck worker; a new one takes over.
            clock.log(f"[{lane.mode}] the stuck worker is killed and replaced")
            lane.kill(clock, lane.freeze(), kind="sigkill_stuck")
    for lane in lanes:
        _await_settled(lane, back_at, clock)
    after()


def _await_settled(lane: Lane, back_at: float, clock: Clock) -> None:
    """Wait until the lane's worker has been quiet for :data:`SETTLE_QUIET_S` (see there);
    past :data:`RECOVERY_TIMEOUT_S` after the broker came back the run goes on, and the
    next fault measures whatever the worker still holds back."""
    worker = lane.worker
    if worker is None:
        return
    started = time.monotonic()
    try:
        wait_until(
            lambda: not worker.alive() or not _warned_within(worker, SETTLE_QUIET_S),
            max(0.0, clock.left(RECOVERY_TIMEOUT_S - (started - back_at))),
            f"{worker.name} quiet for {SETTLE_QUIET_S:.0f}s",
            interval_s=0.5,
        )
    except DeadlineExceeded:
        clock.log(
            f"[{lane.mode}] still warning {RECOVERY_TIMEOUT_S:.0f}s after the broker came back"
        )
        return
    clock.log(
        f"[{lane.mode}] quiet for {SETTLE_QUIET_S:.0f}s, {time.monotonic() - started:.1f}s later"
    )


def _chunks(planned: Sequence[PlannedRequest], faults: int) -> list[list[PlannedRequest]]:
    """Requests to produce before each fault and after the last: 35 % first (nothing is
    left over yet), 5 % last, the rest in equal parts; a worker killed busy leaves part of
    its chunk to the next."""
    n = len(planned)
    cuts = [0, int(n * 0.35)]
    middle = n - cuts[1] - int(n * 0.05)
    cuts += [cuts[1] + middle * i // (faults - 1) for i in range(1, faults)] if faults > 1 else []
    cuts.append(n)
    return [list(planned[a:b]) for a, b in itertools.pairwise(cuts)]


def kill_run(
    broker: OwnBroker,
    modes: Sequence[str] = MODES,
    requests: int = 1_000,
    plan: Sequence[str] = ("kill", "kill", "outage", "kill"),
    in_flight_at_kill: int = 60,
    finished_before_kill: int = 100,
    latency: float = 0.5,
    model_timeout_s: float = 2.0,
    outage_s: float = 10.0,
    seed: int = 21,
    baseline: Callable[[], RequestCalls] | None = None,
    static_membership: bool = False,
    deadline_s: float | None = None,
) -> dict[str, ChaosOutcome]:
    """SIGKILL the only worker again and again with many calls in flight, and stop the
    broker once, all on a broker of this run's own; then account for every request and
    every model call. One lane per delivery mode, side by side.

    Before each fault the previous worker's orphaned calls have ended and the current
    worker is in its stride: ``finished_before_kill`` calls of its own done and
    ``in_flight_at_kill`` in flight. ``baseline`` gives the calls each request costs
    without faults; it is called once the run is over, so it can be a fault-free run going
    on meanwhile (a future's ``result``).

    ``static_membership`` gives every worker of a lane the same
    ``LLMPIPE_GROUP_INSTANCE_ID``, as a supervisor restarting a crashed pod does, so a
    restarted worker gets its partitions back at once instead of after the session
    timeout. Off by default: a static member whose session times out during a broker
    outage longer than the session timeout can be fenced by its own rejoin, a fatal
    consumer error (confluentinc/librdkafka#3437); the worker then exits 1 and the run
    restarts it, as a supervisor would.

    ``deadline_s`` bounds the whole scenario: every wait takes what is left of it.
    """
    clock = Clock(deadline_s)
    planned = mixed_requests(requests, seed=seed, weights=KILL_WEIGHTS, prefix="kill")
    with contextlib.ExitStack() as stack:
        lanes: list[Lane] = []
        for mode in modes:
            fake = stack.enter_context(fake_model(latency))
            settings = new_settings(
                broker.bootstrap,
                model_base_url=fake.url,
                model_timeout_s=model_timeout_s,
                max_in_flight=64,
            )
            stack.enter_context(topics_of(settings))
            static = {"LLMPIPE_GROUP_INSTANCE_ID": f"{settings.topic_prefix}w"}
            env = delivery_env(mode, static if static_membership else None)
            lanes.append(Lane(mode, fake, settings, planned, env))
        # A chunk of the requests before each fault and one after the last: every worker
        # finds a backlog, however fast its predecessor drained the last one.
        chunks = _chunks(planned, len(plan))

        produced: set[int] = set()

        def produce_chunk(i: int) -> None:
            if i in produced:
                return
            produced.add(i)
            for lane in lanes:
                _produce(lane.settings, chunks[i])
            clock.log(f"produced {len(chunks[i])} more requests to each of {len(lanes)} lanes")

        try:
            for i, step in enumerate(plan):
                clock.log(f"next fault: {step}")
                produce_chunk(i)
                for lane in lanes:
                    if lane.worker is None:
                        lane.start_worker(clock)
                # Each lane is frozen the moment its worker is busy (its backlog lasts
                # only a second or two at full speed); the fault hits all once all are.
                frozen = _freeze_when_busy(lanes, in_flight_at_kill, finished_before_kill, clock)
                if step == "kill":
                    with ThreadPoolExecutor(len(lanes)) as pool:
                        list(pool.map(Lane.kill, lanes, [clock] * len(lanes), frozen))
                elif step == "outage":
                    _outage(
                        broker,
                        outage_s,
                        lanes,
                        frozen,
                        clock,
                        functools.partial(produce_chunk, i + 1),
                    )
                else:
                    raise ValueError(f"unknown fault {step!r}")
            produce_chunk(len(plan))
            outcomes: dict[str, ChaosOutcome] = {}
            calls_without_faults: RequestCalls | None = None
            for lane in lanes:
                worker = lane.worker or lane.start_worker(clock)
                ledger = _ledger(
                    lane.settings, planned, timeout_s=clock.left(180), settle_s=2, clock=clock
                )
                clock.log(
                    f"[{lane.mode}] ledger " + ("complete" if not ledger.missing else "timed out")
                )
                if calls_without_faults is None and baseline is not None:
                    calls_without_faults = baseline()
                outcome = ChaosOutcome.from_ledger(
                    "kill_run",
                    lane.mode,
                    planned,
                    ledger,
                    clock.events,
                    under_way_at_freeze=lane.under_way_at_resumed_freezes(calls_without_faults),
                )
                outcome.faults = lane.faults
                outcome.account(ledger, lane.fake.server.request_calls(), calls_without_faults)
                outcome.details.update(
                    {
                        "final_worker_alive": worker.alive(),
                        "plan": list(plan),
                        "workers_started": lane.started_workers,
                    }
                )
                outcomes[lane.mode] = outcome
        except Exception as exc:
            if not isinstance(exc, DeadlineExceeded):  # those carry the event log already
                exc.add_note("the scenario's event log:\n" + "\n".join(clock.events))
            raise
        finally:
            for lane in lanes:
                if lane.worker is not None:
                    lane.worker.stop()
    for outcome in outcomes.values():
        outcome.duration_s = clock.elapsed
    return outcomes


def _output_gaps(settings: Settings, since_ms: int, until_ms: int) -> dict[str, float]:
    """Longest stretch (s) without output, per stage, between two wall-clock moments."""
    stage_topics = {
        "validate": [topology.VALIDATED],
        "model": [topology.COMPLETIONS],
        "settle+fallback": [topology.RESULTS, topology.REVIEW],
    }
    gaps: dict[str, float] = {}
    for stage, topics in stage_topics.items():
        stamps = sorted(
            m.timestamp_ms
            for t in topics
            for placed in read_index(settings, t).by_request.values()
            for m in placed
        )
        window = [since_ms, *(s for s in stamps if since_ms <= s <= until_ms)]
        gaps[stage] = round(
            max((b - a for a, b in itertools.pairwise(window)), default=0) / 1000, 2
        )
    return gaps


def scaling(
    bootstrap: str,
    mode: str = "exactly_once",
    requests: int = 1_500,
    latency: float = 0.5,
    max_in_flight: int = 16,
    seed: int = 22,
    deadline_s: float | None = None,
) -> ChaosOutcome:
    """One worker, then a second and a third join mid-stream; then one is stopped with
    SIGTERM and another SIGKILLed. Nothing may be lost or repeated, and the other workers
    must keep producing while partitions move: the longest gap in each stage's output
    between the first join and the end of the run is reported.

    A small ``max_in_flight`` keeps the backlog long enough for four membership changes.
    """
    clock = Clock(deadline_s)
    planned = mixed_requests(requests, seed=seed, weights=CHAOS_WEIGHTS, prefix="scale")
    env = delivery_env(mode)
    membership: list[tuple[str, float]] = []
    with fake_model(latency) as fake:
        settings = new_settings(
            bootstrap, model_base_url=fake.url, model_timeout_s=5.0, max_in_flight=max_in_flight
        )
        groups = stage_groups(settings)
        with topics_of(settings):
            procs = {"a": _worker(settings, "scale-a", env)}
            try:
                wait_groups_stable(settings, groups, 1, clock.left(GROUP_TIMEOUT_S))
                _produce(settings, planned)
                clock.log(f"produced {requests} requests to worker a")
                first_ms = int(time.time() * 1000)
                with TopicCounter(settings, list(topology.terminal_topics())) as done:

                    def reach(share: float) -> None:
                        target = int(share * requests)
                        wait_until(
                            lambda: done.count() >= target, clock.left(120), f"{target} outputs"
                        )

                    reach(0.08)
                    first_ms = int(time.time() * 1000)
                    for name, share in (("b", 0.2), ("c", 0.4)):
                        procs[name] = _worker(settings, f"scale-{name}", env)
                        clock.log(f"worker {name} starts")
                        wait_groups_stable(
                            settings, groups, len(procs), clock.left(GROUP_TIMEOUT_S)
                        )
                        membership.append((f"{name} joined", clock.elapsed))
                        clock.log(f"{len(procs)} workers own partitions in every group")
                        reach(share)
                    code = procs.pop("a").stop()
                    clock.log(f"worker a stopped with SIGTERM (exit {code})")
                    wait_groups_stable(settings, groups, 2, clock.left(GROUP_TIMEOUT_S))
                    membership.append(("a left", clock.elapsed))
                    reach(0.6)
                    in_flight = fake.in_flight()
                    procs["b"].kill()
                    clock.log(f"worker b SIGKILLed ({in_flight} calls in flight)")
                    killed = procs.pop("b")
                    wait_groups_stable(settings, groups, 1, clock.left(GROUP_TIMEOUT_S + 30))
                    membership.append(("b evicted", clock.elapsed))
                    clock.log("worker c owns every partition")
                    del killed
                ledger = _ledger(
                    settings, planned, timeout_s=clock.left(180), settle_s=3, clock=clock
                )
                clock.log("ledger complete" if not ledger.missing else "ledger timed out")
                last_ms = max(
                    (s.timestamp_ms for sightings in ledger.seen.values() for s in sightings),
                    default=first_ms,
                )
                gaps = _output_gaps(settings, first_ms, last_ms)
                alive = all(p.alive() for p in procs.values())
            finally:
                for p in procs.values():
                    p.stop()
    outcome = ChaosOutcome.from_ledger("scaling", mode, planned, ledger, clock.events)
    outcome.account(ledger, None, None)
    outcome.duration_s = clock.elapsed
    outcome.details.update(
        {
            "longest_output_gap_s": gaps,
            "membership_changes": [f"{what} at t+{t:.1f}s" for what, t in membership],
            "survivor_alive": alive,
        }
    )
    return outcome


def _members(settings: Settings, groups: Sequence[str]) -> dict[str, set[str]]:
    """group -> member ids, from the broker's view."""
    admin = KafkaClients(settings).admin()
    out: dict[str, set[str]] = {}
    for group, future in admin.describe_consumer_groups(list(groups)).items():
        with contextlib.suppress(Exception):
            out[group] = {m.member_id for m in future.result(10).members}
    return out


class Supervised:
    """A worker restarted whenever it exits, as its supervisor or orchestrator would
    (``llmpipe worker --processes N``, a Kubernetes restart policy): the fault scenarios
    check that work survives a worker's exit, which in production is followed by a
    restart. Each exit is recorded with its code and its ``error:`` lines."""

    def __init__(self, start: Callable[[], Proc], clock: Clock, name: str) -> None:
        self._start = start
        self._clock = clock
        self._name = name
        self.proc = start()
        self.exits: list[tuple[int, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"supervise-{name}")
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            if self.proc.alive():
                continue
            code = self.proc.stop()
            lines = [x for x in self.proc.log_tail(400).splitlines() if x.startswith("error:")]
            self.proc = self._start()
            self.exits.append((code, lines))  # after the restart: a reader sees both
            self._clock.log(f"{self._name} exited {code} ({'; '.join(lines)[:200]}): restarted")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.proc.stop()


def fencing(
    bootstrap: str,
    mode: str = "exactly_once",
    requests: int = 600,
    latency: float = 1.0,
    in_flight: int = 40,
    seed: int = 25,
    deadline_s: float | None = None,
) -> ChaosOutcome:
    """A zombie: a worker frozen (SIGSTOP) with calls in flight until its partitions have
    moved to a replacement, then resumed (SIGCONT). It must not be able to commit anything
    it finishes: the ledger stays clean while the replacement redoes that work.

    The replacement takes the zombie's static membership (``LLMPIPE_GROUP_INSTANCE_ID``),
    as a rolling restart does, so the partitions move at once instead of after a session
    timeout; the zombie's calls are answered while it is frozen, so on resuming it holds
    finished work that it will try to commit. The replacement runs supervised
    (:class:`Supervised`): a zombie frozen past its session timeout (a loaded machine)
    rejoins on resuming and, a static member, fences the replacement's member in that
    group instead of being fenced (librdkafka#3437); the replacement then exits 1 and is
    restarted, as it would be in production, and the ledger must stay clean all the same.
    """
    clock = Clock(deadline_s)
    planned = mixed_requests(requests, seed=seed, weights={"valid": 1}, prefix="fence")
    env = delivery_env(mode, {"LLMPIPE_GROUP_INSTANCE_ID": f"fence-{seed}"})
    with fake_model(latency) as fake:
        settings = new_settings(
            bootstrap, model_base_url=fake.url, model_timeout_s=10.0, max_in_flight=64
        )
        groups = stage_groups(settings)
        with topics_of(settings):
            zombie = _worker(settings, "zombie", env)
            replacement: Supervised | None = None
            try:
                wait_groups_stable(settings, groups, 1, clock.left(GROUP_TIMEOUT_S))
                before = _members(settings, list(groups))
                _produce(settings, planned)
                fake.server.wait_live_in_flight(in_flight, clock.left(GROUP_TIMEOUT_S))
                os.kill(zombie.pid, signal.SIGSTOP)
                frozen = fake.server.in_flight_requests()
                frozen_calls = sum(frozen.values())
                clock.log(f"zombie frozen with {frozen_calls} calls in flight")
                replacement = Supervised(
                    functools.partial(_worker, settings, "replacement", env), clock, "replacement"
                )

                def moved() -> bool:
                    now = _members(settings, list(groups))
                    return all(now.get(g) and not now[g] & before.get(g, set()) for g in groups)

                wait_until(
                    moved, clock.left(GROUP_TIMEOUT_S), "every group to drop the zombie's member"
                )
                wait_groups_stable(settings, groups, 1, clock.left(GROUP_TIMEOUT_S))
                clock.log("the replacement owns every partition")
                fake.server.wait_live_in_flight(1, clock.left(GROUP_TIMEOUT_S))
                os.kill(zombie.pid, signal.SIGCONT)
                clock.log("zombie resumed")
                ledger = _ledger(
                    settings, planned, timeout_s=clock.left(180), settle_s=5, clock=clock
                )
                clock.log("ledger complete" if not ledger.missing else "ledger timed out")
                # Fenced as a static member (a fatal consumer error), the zombie must exit
                # non-zero by itself rather than stay up consuming nothing.
                with contextlib.suppress(DeadlineExceeded):
                    wait_until(
                        lambda: not zombie.alive(),
                        clock.left(GROUP_TIMEOUT_S),
                        "the zombie to exit",
                    )
                zombie_alive = zombie.alive()
                zombie_exit = zombie.popen.returncode
                zombie_lines = zombie.log_tail(400).splitlines()
                fence_lines = [line for line in zombie_lines if "fenc" in line.lower()]
                error_lines = [line for line in zombie_lines if line.startswith("error:")]
                alive = replacement.proc.alive()
                restarts = replacement.exits
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(zombie.pid, signal.SIGCONT)
                zombie.stop()
                if replacement is not None:
                    replacement.stop()
    calls = fake.server.request_calls()
    outcome = ChaosOutcome.from_ledger("fencing", mode, planned, ledger, clock.events)
    outcome.account(ledger, None, None)
    outcome.duration_s = clock.elapsed
    outcome.details.update(
        {
            "zombie_calls_in_flight_when_frozen": frozen_calls,
            # The replacement redid each of them (a second call), so a copy committed by
            # the zombie would show up as a duplicate.
            "frozen_requests_called_again": sum(
                1 for rid in frozen if calls_of(calls, rid, MODEL_CALL) >= 2
            ),
            "frozen_requests": len(frozen),
            "zombie_alive_after": zombie_alive,
            "zombie_exit_code": zombie_exit,
            "zombie_error_lines": error_lines,
            "zombie_fencing_log_lines": fence_lines[:3],
            "replacement_alive": alive,
            "replacement_restarts": restarts,
        }
    )
    return outcome


def model_server_restart(
    bootstrap: str,
    mode: str = "exactly_once",
    requests: int = 3_000,
    latency: float = 0.3,
    outage_fallbacks: int = 20,
    breaker_open_s: float = 2.0,
    seed: int = 23,
    deadline_s: float | None = None,
) -> ChaosOutcome:
    """Kill the model server mid-stream (connections refused, calls aborted), bring it back.

    Half the requests are produced before the outage, half after the server is back. The
    outage lasts until the pipeline has visibly reacted (``outage_fallbacks`` requests on
    the fallback path), not a fixed time. Requests caught by the outage must end on the
    fallback path with a model reason; none may be lost or repeated (no worker died and no
    commit failed, so nothing is redelivered); and model answers must resume once the
    server is back (counted from ``Result.produced_at``). The endpoint breaker is kept on
    (it is what reacts to an outage) with a short open time, so that it half-opens
    within the run.
    """
    clock = Clock(deadline_s)
    planned = mixed_requests(requests, seed=seed, weights={"valid": 1}, prefix="model")
    first, second = planned[: requests // 2], planned[requests // 2 :]
    env = {"LLMPIPE_DELIVERY": mode, "LLMPIPE_BREAKER_OPEN_S": str(breaker_open_s)}
    with fake_model(latency) as fake:
        settings = new_settings(
            bootstrap, model_base_url=fake.url, model_timeout_s=5.0, max_in_flight=64
        )
        with topics_of(settings):
            worker = _worker(settings, "chaos-model", env)
            try:
                wait_groups_stable(settings, stage_groups(settings), 1, clock.left(GROUP_TIMEOUT_S))
                _produce(settings, first)
                clock.log(f"produced {len(first)} requests")
                with TopicCounter(settings, [topology.RESULTS]) as results:
                    wait_until(
                        lambda: results.count() >= len(first) // 5 and fake.in_flight() >= 32,
                        clock.left(GROUP_TIMEOUT_S),
                        "20% of results with calls in flight",
                    )
                in_flight = fake.in_flight()
                fake.stop()
                clock.log(f"model server stopped with {in_flight} calls in flight")
                with TopicCounter(settings, [topology.FALLBACK]) as fallbacks:
                    wait_until(
                        lambda: fallbacks.count() >= outage_fallbacks,
                        clock.left(GROUP_TIMEOUT_S),
                        f"{outage_fallbacks} requests on the fallback path",
                    )
                fake.start()
                back_at = datetime.now(UTC)
                clock.log(f"model server back on port {fake.port}")
                canaries = _until_model_answers(settings, clock.left(GROUP_TIMEOUT_S))
                clock.log(f"model answers again (after {canaries} canary requests)")
                _produce(settings, second)
                clock.log(f"produced {len(second)} more requests")
                ledger = _ledger(
                    settings, planned, timeout_s=clock.left(240), settle_s=2, clock=clock
                )
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
    outcome = ChaosOutcome.from_ledger(
        "model_server_restart", mode, planned, ledger, clock.events, reasons=False
    )
    outcome.account(ledger, None, None)
    outcome.duration_s = clock.elapsed
    outcome.details.update(
        {
            "in_flight_at_stop": in_flight,
            "model_answers_after_restart": resumed,
            "canaries_until_breaker_closed": canaries,
            "breaker_open_s": breaker_open_s,
            "worker_alive": alive,
            "off_model_reasons": sorted(
                {
                    s.reason or "-"
                    for sightings in ledger.seen.values()
                    for s in sightings
                    if s.outcome == "result:fallback" and not (s.reason or "").startswith("model_")
                }
            ),
            "sighting_outcomes": sorted(
                {s.outcome for sightings in ledger.seen.values() for s in sightings}
            ),
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


# -- the long run ---------------------------------------------------------------------------


def outcome_rows(outcomes: Sequence[ChaosOutcome]) -> list[str]:
    rows = table(
        [
            "run",
            "mode",
            "requests",
            "missing",
            "duplicates",
            "two places",
            "off route",
            "calls redone",
            "calls at risk",
            "s",
        ],
        [
            (
                o.name,
                o.mode,
                o.requests,
                o.missing,
                o.duplicates,
                o.two_places,
                o.wrong_route,
                "-" if o.redone_calls is None else o.redone_calls,
                o.calls_at_risk if o.faults else "-",
                o.duration_s,
            )
            for o in outcomes
        ],
    )
    for o in outcomes:
        rows += ["", f"**{o.name} [{o.mode}]** routes: {o.routes}", ""]
        if o.faults:
            rows += table(
                list(o.faults[0].row()),
                [list(f.row().values()) for f in o.faults],
            )
            rows.append("")
        rows += [f"    {e}" for e in o.events]
        if o.details:
            rows += ["", f"details: {o.details}"]
    return rows


def run(quick: bool, bootstrap: str, broker: bool = True, modes: Sequence[str] = MODES) -> Report:
    started = time.monotonic()
    scale = 1 if quick else 2
    report = Report(
        "chaos",
        "Chaos: worker kills and a broker outage, scaling, fencing, model outage",
        {"quick": quick, "broker_chaos": broker, "modes": list(modes)},
    )
    outcomes: list[ChaosOutcome] = []
    if broker:
        requests = 1_000 * scale
        planned = mixed_requests(requests, seed=21, weights=KILL_WEIGHTS, prefix="kill")
        baseline = baseline_calls(bootstrap, planned, 0.5, 2.0)
        plan = (
            ("kill", "kill", "outage", "kill")
            if quick
            else ("kill", "kill", "kill", "outage", "kill", "kill")
        )
        with own_broker() as own:
            outcomes += kill_run(
                own, modes, requests, plan=plan, baseline=lambda: baseline
            ).values()
            # Static membership through an outage longer than the session: a member fenced
            # by it (a fatal consumer error) must exit and be restarted, not sit idle.
            static = kill_run(own, modes, 1_000, plan=("outage",), static_membership=True)
            for outcome in static.values():
                outcome.name = "static_member_outage"
            outcomes += static.values()
    for mode in modes:
        outcomes.append(scaling(bootstrap, mode, requests=1_500 * scale))
        outcomes.append(fencing(bootstrap, mode))
        outcomes.append(model_server_restart(bootstrap, mode, requests=1_500 * scale))
    report.results = {f"{o.name}[{o.mode}]": o.as_dict() for o in outcomes}
    report.markdown += outcome_rows(outcomes)
    lost = sum(o.missing for o in outcomes)
    report.notes.append(
        f"requests lost across all runs: {lost}"
        + (" (PASS)" if lost == 0 else " (FAIL: a request was lost)")
    )
    report.notes.append(
        "calls redone = model calls at the fake server minus the same requests' calls in a "
        "fault-free run; calls at risk = calls in flight at each fault plus finished calls "
        "whose stage input no commit covered (read from the groups' commits right after it)"
    )
    return finish(report, started, bootstrap)


def main() -> None:
    parser = base_args(__doc__.splitlines()[0])
    parser.add_argument("--no-broker", action="store_true", help="skip the kill+outage runs")
    parser.add_argument(
        "--mode", choices=[*MODES, "both"], default="both", help="delivery mode(s) to run"
    )
    args = parser.parse_args()
    modes = MODES if args.mode == "both" else (args.mode,)
    run(args.quick, args.bootstrap, broker=not args.no_broker, modes=modes)


if __name__ == "__main__":
    main()
