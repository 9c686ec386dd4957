"""A worker process: the stages it was asked to run, wired to Kafka, sharing one producer.

Each stage is its own consumer group on its own input topic, so stages can run together in
one process (the default, simplest to operate) or be scaled separately, e.g. more model
workers than validators.

With ``LLMPIPE_HEALTH_PORT`` set the process serves ``/healthz``, ``/readyz`` and
``/metrics`` (:mod:`pipeline.runtime.health` says what they check).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Sequence
from typing import Any, NoReturn

from pipeline.config import Settings
from pipeline.contract import topology
from pipeline.contract.codec import Codec, DecodeError
from pipeline.contract.decisions import DeadLetter, Decision
from pipeline.contract.topology import Stage
from pipeline.control.burn_in import KafkaBurnInLedger, start_burn_in_ledger
from pipeline.control.listener import ControlListener
from pipeline.control.state import ControlState
from pipeline.errors import did_you_mean
from pipeline.observability import configure_observability, endpoints
from pipeline.observability.hooks import record_distribution_shift
from pipeline.observability.redact import Redactor
from pipeline.prompts.registry import PromptRegistry
from pipeline.resilience.configure import fleet_state, resilient_client
from pipeline.resilience.fleet import FleetState, worker_id
from pipeline.resilience.stack import ResilientClient
from pipeline.runtime.fleet import FleetLink
from pipeline.runtime.health import Heartbeat, WorkerReadiness
from pipeline.stages.monitor import DistributionMonitor
from pipeline.stages.table import RawInput, StageDeps, Step, build_steps
from pipeline.stages.validate import ContentRules, InputLimits
from pipeline.transport import headers as h
from pipeline.transport.clients import KafkaClients
from pipeline.transport.compacted import close_producer
from pipeline.transport.delivery import KafkaFatalError
from pipeline.transport.registry import codec_for, require_schemas
from pipeline.transport.runner import Handler, Inbound, StageRunner

log = logging.getLogger("llmpipe.worker")

CALLING_STAGES = frozenset({topology.MODEL, topology.SETTLE})
"""Stages that call models: a worker running one of them joins the fleet on llm.fleet."""

LEAVE_TELEMETRY_FLUSH_MS = 5_000
"""How long a worker that ends without interpreter shutdown waits for its last spans and
metrics to be exported (see :func:`leave`)."""

THREADS_EXIT_WAIT_S = 3.0
"""How long a stopped worker waits for its last non-daemon threads before it leaves
without them (see :func:`run_worker`). By then every wait that matters is over, each with
its own bound: stages drained and committed, consumers closed, producers flushed and
destroyed. A thread still alive is either on its way out (an executor thread that was let
go with ``shutdown(wait=False)`` ends within milliseconds of its last call) or inside a
call nothing waits for any more (one the delivery watchdog abandoned, a librdkafka call
stuck in a broker outage), which may never return. Long enough for the first kind on a
loaded machine; short against a supervisor's grace period (Kubernetes' default is 30 s),
most of which the drain (``LLMPIPE_REVOKE_GRACE_S``, 10 s) may already have used."""

GC_THRESHOLDS = (200_000, 10, 10)
"""CPython's cyclic collector for a worker: young collections after 200,000 net new tracked
objects instead of 700, the older generations at CPython's ratios; see :func:`tune_gc`."""


def stage_handler(codec: Codec, stage: Stage, step: Step) -> Handler:
    """The Kafka-facing handler of one stage: decode its input envelope (an undecodable one
    is a dead letter, not a crash) or, for a raw stage, hand it the bytes as they came."""

    async def handle(message: Inbound) -> Decision:
        content_type = h.text(message.headers, h.CONTENT_TYPE)
        if stage.raw:
            outcome = step(RawInput(message.value, message.key, content_type))
        else:
            try:
                envelope = codec.decode(message.value or b"", stage.input_envelope, content_type)
            except DecodeError as exc:
                request_id = h.text(message.headers, h.REQUEST_ID)
                return DeadLetter(stage.name, exc.reason, "DecodeError", exc.detail, request_id)
            outcome = step(envelope)
        return await outcome if inspect.isawaitable(outcome) else outcome

    return handle


def check_stages(stages: Sequence[str] | None) -> list[str]:
    """The stages to run (all when None); ``ValueError`` naming any the topology lacks."""
    known = topology.stage_names()
    chosen = list(known if stages is None else stages)
    unknown = set(chosen) - set(known)
    if unknown:
        close = did_you_mean(sorted(unknown)[0], known)
        raise ValueError(
            f"unknown stages {sorted(unknown)}{close} (choose from {', '.join(known)})"
        )
    return chosen


class Worker:
    def __init__(
        self,
        settings: Settings,
        stages: Sequence[str] | None = None,
        registry: PromptRegistry | None = None,
    ) -> None:
        stages = check_stages(stages)
        self.settings = settings
        self.stage_names = list(stages)
        self.registry = registry or PromptRegistry.load(settings.prompts_dir)
        self.codec = codec_for(settings)
        self.control = ControlState()
        self.redactor = Redactor()
        self.runners: list[StageRunner] = []
        self.burn_in: KafkaBurnInLedger | None = None
        self.fleet: FleetState | None = None
        if CALLING_STAGES & set(self.stage_names):
            self.fleet = fleet_state(settings, worker_id(settings.group_instance_id))

    async def run(self, stop: asyncio.Event) -> None:
        clients = KafkaClients(self.settings)
        readiness = WorkerReadiness(clients, self.settings.topic(topology.CONTROL))
        # Before the telemetry: a Prometheus reader then finds its server already running.
        server = self._serve_endpoints(readiness, stop)
        try:
            await self._run(stop, clients, readiness)
        finally:
            stop.set()
            try:
                await _close_stage_producer(clients)
            finally:
                if server is not None:
                    await server

    async def _run(
        self, stop: asyncio.Event, clients: KafkaClients, readiness: WorkerReadiness
    ) -> None:
        settings = self.settings
        configure_observability()  # tracing + metrics from OTEL_*; idempotent
        if settings.output_format == "confluent":
            await asyncio.to_thread(require_schemas, settings)
        client = resilient_client(settings, self.control, self.fleet)
        listener = ControlListener(
            settings.topic(topology.CONTROL), self.control, self.codec, clients
        )
        readiness.control_read = listener.ready.is_set
        readiness.stopping = stop.is_set
        control_task = asyncio.create_task(listener.run(stop))
        background = [control_task]
        burn_in: KafkaBurnInLedger | None = None
        tasks: list[asyncio.Task[None]] = []
        # The fleet link stops after the stages: the calls they finish while draining
        # report spend and quality outcomes, which it publishes before its lease
        # tombstone. Stopped with them, it left first, and that spend (the final charge
        # of every call in flight at SIGTERM, in place of its reservation) was dropped.
        fleet_stop = asyncio.Event()
        try:
            if not await _first(listener.ready.wait(), control_task, stop):
                return  # stopped while waiting for the broker: nothing started yet
            if self.fleet is not None:
                link = FleetLink(settings, clients, self.codec, self.fleet, client)
                fleet_task = asyncio.create_task(link.run(fleet_stop))
                background.append(fleet_task)
                if not await _first(link.ready.wait(), fleet_task, stop):
                    return
            self.burn_in = burn_in = await self._burn_in()
            handlers = self._handlers(client, burn_in)
            self.runners = [
                StageRunner(
                    stage=name,
                    input_topic=settings.topic(topology.STAGES[name].input_topic),
                    group=settings.group(name),
                    handler=handlers[name],
                    clients=clients,
                    codec=self.codec,
                    redactor=self.redactor,
                    topic_name=settings.topic,
                    max_in_flight=settings.max_in_flight,
                    delivery=settings.delivery,
                    commit_interval_ms=settings.commit_interval_ms,
                    revoke_grace_s=settings.revoke_grace_s,
                    group_instance_id=settings.group_instance_id,
                )
                for name in self.stage_names
            ]
            readiness.members = self.runners
            tasks = [asyncio.create_task(r.run(stop)) for r in self.runners]
            background.append(asyncio.create_task(_after(stop, tasks, fleet_stop)))
            await asyncio.gather(*tasks, *background)
        finally:
            stop.set()
            # One stage failing (a fatal Kafka error) stops the others the way SIGTERM
            # does: they drain and commit before the process exits with that error.
            await asyncio.gather(*tasks, return_exceptions=True)
            fleet_stop.set()
            control_task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await client.aclose()
            if burn_in is not None:
                await burn_in.stop()

    def _serve_endpoints(
        self, readiness: WorkerReadiness, stop: asyncio.Event
    ) -> asyncio.Task[None] | None:
        """Start the endpoints and the heartbeat; the task they return ends with the worker
        and closes the server (``None``: no ``LLMPIPE_HEALTH_PORT``, nothing served)."""
        s = self.settings
        if s.health_port is None:
            return None
        server = endpoints.serve(s.health_host, s.health_port)
        heartbeat = Heartbeat(s.health_stale_s)
        endpoints.set_checks(liveness=heartbeat.verdict, readiness=readiness)

        async def serve() -> None:
            try:
                await heartbeat.run(stop)
            finally:
                endpoints.set_checks()
                await asyncio.to_thread(endpoints.stop, server)

        return asyncio.create_task(serve(), name="endpoints")

    async def _burn_in(self) -> KafkaBurnInLedger | None:
        """The fleet-wide burn-in counter, when this worker settles a version that has one."""
        if topology.SETTLE not in self.stage_names:
            return None
        return await start_burn_in_ledger(self.settings, self.registry, self.codec)

    def _handlers(
        self, client: ResilientClient, burn_in: KafkaBurnInLedger | None = None
    ) -> dict[str, Handler]:
        s = self.settings
        # Fed by the whole fleet's outcomes on llm.fleet; only the model and settle stages
        # (the ones that join the fleet) use it and the monitor that trips it.
        quality = self.fleet.quality if self.fleet is not None else None
        monitor = None
        if quality is not None:
            monitor = DistributionMonitor(
                on_shift=lambda shift: record_distribution_shift(shift.prompt, shift.signal),
                trip=quality.trip,
            )
        deps = StageDeps(
            registry=self.registry,
            control=self.control,
            client=client,
            codec=self.codec,
            redactor=self.redactor,
            timeout_cap_s=s.model_timeout_s,
            limits=InputLimits(s.max_request_bytes, s.max_prompt_chars, s.max_prompt_tokens),
            rules=ContentRules(tuple(re.compile(p) for p in s.deny_patterns), s.pii_policy),
            quality=quality,
            burn_in=burn_in,
            monitor=monitor,
        )
        steps = build_steps(deps, self.stage_names)
        return {
            name: stage_handler(self.codec, topology.STAGES[name], step)
            for name, step in steps.items()
        }


async def _close_stage_producer(clients: KafkaClients) -> None:
    """Destroy the at-least-once stages' shared producer once they have all stopped (each
    flushed it on closing), on a thread: left to the garbage collector, it may outlive the
    event loop into the interpreter's shutdown (see :func:`close_producer`). What it could
    not deliver was never acknowledged, so its inputs' offsets were not committed: the
    partitions' next owner redoes them."""
    producer = clients.take_stage_producer()
    if producer is None:
        return
    dropped = await asyncio.to_thread(close_producer, producer)
    if dropped:
        log.warning(
            "%d stage outputs not delivered at shutdown; dropped (their inputs are redone "
            "by the partitions' next owner)",
            dropped,
        )


async def _after(stop: asyncio.Event, tasks: list[asyncio.Task[None]], then: asyncio.Event) -> None:
    """Set ``then`` once ``stop`` is set and every one of ``tasks`` has ended."""
    await stop.wait()
    await asyncio.gather(*tasks, return_exceptions=True)
    then.set()


async def _first(
    awaitable: Awaitable[Any], failing: asyncio.Task[None], stop: asyncio.Event
) -> bool:
    """Wait for ``awaitable`` unless ``failing`` ends first (then re-raise its error).

    False when ``failing`` ended because the worker was told to stop (e.g. SIGTERM while
    the broker refused it): a clean exit, not an error."""
    waiter = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({waiter, failing}, return_when=asyncio.FIRST_COMPLETED)
    if failing in done:
        waiter.cancel()
        failing.result()
        if stop.is_set():
            return False
        raise RuntimeError("a state listener stopped before it was ready")
    return True


def tune_gc() -> None:
    """Freeze what start-up built and collect young objects far less often.

    Every call in flight keeps a few hundred tracked objects (request, span, HTTP
    exchange, envelopes) alive for the model's latency, and the runner starts up to 500
    calls at a time. With the default thresholds the collector scanned them again and
    again while they waited and ran full collections over every module, class, schema and
    prompt loaded at start-up: at 2,048 calls in flight on a 500 ms model that was about
    40 % of the worker's CPU, the main reason CPU per request grew with the calls in
    flight (bench.slow_model). A young threshold of 50,000 still fired on every fetch of
    500 calls (14 % of the CPU at 2,048 in flight); at 200,000 it fires when the set of
    live objects grows by that much, so a steady load is scanned almost never (under 1 %).
    Short-lived garbage is still freed at once by reference counting; cycles are still
    collected, at most 200,000 objects later, and full collections still run every 100
    young ones, without the frozen start-up objects.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def leave(exit_code: int, line: str | None = None) -> NoReturn:
    """End the process now, skipping interpreter shutdown: flush telemetry, the logs and
    stdio, write ``line`` (if any) to stderr last, then ``os._exit(exit_code)``.

    The one way a worker ends without Python's own shutdown, for when that shutdown is the
    hazard (:func:`exit_fatally`) or would never finish (a thread stuck in a call, which
    the interpreter would join for ever: :func:`run_worker`)."""
    with contextlib.suppress(Exception):  # the process ends whatever an exporter does
        configure_observability().force_flush(LEAVE_TELEMETRY_FLUSH_MS)
    logging.shutdown()
    sys.stdout.flush()
    if line is not None:
        sys.stderr.write(f"{line}\n")
    sys.stderr.flush()
    os._exit(exit_code)


def exit_fatally(error: KafkaFatalError) -> NoReturn:
    """End the process with ``error``'s one line and exit code, skipping interpreter
    shutdown (crash-only, :func:`leave`).

    Called once :meth:`Worker.run` has returned, that is after the orderly part of the
    exit: every stage stopped, the stages that could still commit drained and committed
    (one stage's fatal error stops the others the way SIGTERM does), the consumers closed
    and the transactional producers flushed, the fleet's last records flushed. The stage
    that failed holds nothing that may be committed any more: a fenced static member's
    partitions and a fenced producer's transactional id belong to a newer instance, and
    the broker refuses their commits; its unfinished messages are redone by whoever owns
    the partitions now, from the committed offsets. So nothing is lost by not running the
    rest of an ordinary exit, and the process ends here with exit code 1 and the line
    saying why.

    What the rest would do is where the hazard is: interpreter teardown while librdkafka
    threads still run (the error's traceback keeps the failed run's frames, and the
    clients they hold, alive into the teardown) and while the executor threads let go
    with ``shutdown(wait=False)`` finish exiting. A fenced zombie worker
    (``tests/e2e/test_chaos.py``) died there once in CI with SIGABRT (glibc's
    ``tcache_thread_shutdown(): unaligned tcache chunk detected``, a heap check made as a
    thread exits) instead of exiting 1. The corrupting write was not caught (not
    reproduced locally, with or without glibc's tcache), so the window is removed rather
    than one writer fixed.
    """
    # The line is the CLI's for an LlmpipeError (pipeline.cli.console, which this layer
    # cannot import): the one line a supervisor or operator reads.
    leave(error.exit_code, f"error: {error}")


def exit_on_bug(error: Exception) -> NoReturn:
    """End the process after an unexpected exception escaped the worker (a bug): its
    traceback logged, exit code 1 and one ``error:`` line, crash-only (:func:`leave`) like
    :func:`exit_fatally` and for the same reasons. The stages have stopped and committed
    what they could on the way out (``Worker.run``'s ``finally``); the ordinary shutdown
    would add only its hazards: joining a thread stuck in librdkafka for ever (a
    SIGTERMed worker up until SIGKILL), and teardown with the clients the traceback
    keeps alive."""
    log.critical("worker failed: %s: %s", type(error).__name__, error, exc_info=error)
    leave(1, f"error: worker failed: {type(error).__name__}: {error}")


def stuck_threads(timeout_s: float = THREADS_EXIT_WAIT_S) -> list[threading.Thread]:
    """The non-daemon threads (other than this one) still alive after waiting up to
    ``timeout_s`` in all for them to end: the ones the interpreter's shutdown would join."""

    def others() -> list[threading.Thread]:
        me = threading.current_thread()
        return [t for t in threading.enumerate() if t is not me and not t.daemon]

    deadline = time.monotonic() + timeout_s
    for thread in others():
        thread.join(max(0.0, deadline - time.monotonic()))
    return [t for t in others() if t.is_alive()]


def run_worker(settings: Settings, stages: Sequence[str] | None = None) -> None:
    """Blocking entry point for the CLI: SIGTERM and SIGINT stop the worker cleanly; a
    fatal Kafka error ends the process crash-only once it has stopped (:func:`exit_fatally`).

    A clean stop returns (exit code 0, through the interpreter's ordinary shutdown) unless
    a non-daemon thread is still alive :data:`THREADS_EXIT_WAIT_S` after the worker
    stopped: the interpreter would join it for ever (``concurrent.futures`` joins its
    executors' threads at exit), so a call stuck inside librdkafka during a broker outage
    would keep a SIGTERMed worker up until it is SIGKILLed. The worker then leaves with
    exit code 0 anyway (:func:`leave`): the stuck call's result is awaited by nobody, and
    nothing is lost by not waiting for it, since whatever it held uncommitted is redone
    from the committed offsets by the partitions' next owner."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        worker = Worker(settings, stages)
        tune_gc()  # after the imports, prompts and schemas: they are what gets frozen
        if "LLMPIPE_WORKERS" in os.environ:
            log.warning(
                "LLMPIPE_WORKERS is no longer used and is ignored: each worker's share of the "
                "rate limits and budgets follows the fleet's leases on llm.fleet"
            )
        log.info("worker starting stages %s", ",".join(worker.stage_names))
        await worker.run(stop)

    try:
        asyncio.run(main())
    except KafkaFatalError as exc:
        exit_fatally(exc)
    except Exception as exc:  # a bug, not a Kafka failure: the same bounded exit
        exit_on_bug(exc)
    stuck = stuck_threads()
    if stuck:
        log.warning(
            "worker stopped, but threads %s did not end within %.0fs (a call stuck inside "
            "Kafka's client, say); leaving without them: nothing is lost, what they held "
            "uncommitted is redone by the partitions' next owner",
            ",".join(t.name for t in stuck),
            THREADS_EXIT_WAIT_S,
        )
        leave(0)
