"""One stage as a Kafka consumer: many messages in flight, offsets committed safely.

The runner takes up to ``max_in_flight`` messages at a time, hands each to the stage,
produces what the stage decided, waits for the broker's acknowledgement, and only then
marks the input done. Commits go up to the lowest offset still in flight (see
:mod:`pipeline.transport.offsets`), so a crash at any moment loses nothing: whatever was
not acknowledged downstream is consumed again. Back-pressure is structural: when all slots
are busy the runner stops fetching, so a backlog stays in Kafka, not in memory.

Telemetry: each message's CONSUMER span is started inside that message's own task, as a
child of the ``traceparent`` it arrived with, so concurrent messages never share a span
context. Every produced message gets a PRODUCER span whose context is what travels on in
``traceparent``, which links the hops of one request into one trace. Metrics are recorded
only after the output is acknowledged (so they count what downstream can actually see) and
before the consumer span ends (so latency samples carry the trace as an exemplar).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from pipeline.contract.codec import Codec
from pipeline.observability import semconv as sc
from pipeline.observability.context import MessageScope, message_scope, parse_prompt_ref
from pipeline.observability.metrics import PipelineMetrics, prompt_attributes
from pipeline.observability.propagation import extract, inject
from pipeline.observability.redact import Redactor
from pipeline.observability.setup import current
from pipeline.stages.decisions import DLQ, DeadLetter, Decision, Emit
from pipeline.transport import headers as h
from pipeline.transport.offsets import OffsetTracker

log = logging.getLogger("llmpipe.runner")

COMMIT_INTERVAL_S = 0.5
REVOKE_GRACE_S = 10.0
# Long enough for the revoke handler to finish in-flight work, short enough that a member
# killed mid-rebalance does not stall the group for long.
REBALANCE_TIMEOUT_MS = 20_000
PRODUCE_RETRY_MAX_S = 5.0
LAG_SAMPLE_INTERVAL_S = 1.0
MAX_KEY_ATTRIBUTE_CHARS = 256


@dataclass(frozen=True)
class Inbound:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]


Handler = Callable[[Inbound], Awaitable[Decision]]


@dataclass
class RunnerStats:
    """What tests and benchmarks read off a runner; operational numbers are OTel metrics."""

    max_in_flight_seen: int = 0


class StageRunner:
    def __init__(
        self,
        *,
        stage: str,
        input_topic: str,
        group: str,
        handler: Handler,
        producer: AIOKafkaProducer,
        codec: Codec,
        redactor: Redactor,
        topic_name: Callable[[str], str],
        kafka_config: dict[str, Any],
        max_in_flight: int = 64,
        metrics: PipelineMetrics | None = None,
    ) -> None:
        self.stage = stage
        self.input_topic = input_topic
        self.group = group
        self._handler = handler
        self._producer = producer
        self._codec = codec
        self._redactor = redactor
        self._topic_name = topic_name
        self._kafka_config = kafka_config
        self._max_in_flight = max_in_flight
        self._tracker = OffsetTracker()
        self._progress = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._key_chains: dict[bytes, asyncio.Task[None]] = {}
        self._consumer: AIOKafkaConsumer | None = None
        telemetry = current()
        self._tracer = telemetry.tracer
        self._metrics = metrics or telemetry.metrics
        self._lag: list[tuple[dict[str, str | int], int]] = []
        self.stats = RunnerStats()
        self.started = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        consumer = AIOKafkaConsumer(
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=1_048_576,
            fetch_max_bytes=8_388_608,
            max_poll_interval_ms=300_000,
            rebalance_timeout_ms=REBALANCE_TIMEOUT_MS,
            **self._kafka_config,
        )
        self._consumer = consumer
        consumer.subscribe([self.input_topic], listener=_Revocations(self))
        await consumer.start()
        self.started.set()
        unwatch_lag = self._metrics.watch_lag(lambda: self._lag)
        lag_sampler = asyncio.create_task(self._sample_lag(consumer, stop))
        last_commit = time.monotonic()
        try:
            while not stop.is_set():
                free = self._max_in_flight - len(self._tasks)
                if free <= 0:
                    await self._wait_for_slot(stop)
                    continue
                batch = await consumer.getmany(timeout_ms=200, max_records=free)
                for tp, records in batch.items():
                    for record in records:
                        self._spawn(tp, record)
                if time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                    await self._commit()
                    last_commit = time.monotonic()
            await self._drain(REVOKE_GRACE_S)
            await self._commit()
        finally:
            unwatch_lag()
            lag_sampler.cancel()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(lag_sampler, *self._tasks, return_exceptions=True)
            await consumer.stop()

    def _spawn(self, tp: TopicPartition, record: Any) -> None:
        inbound = Inbound(
            topic=tp.topic,
            partition=tp.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp,
            key=record.key,
            value=record.value,
            headers=h.as_map(record.headers),
        )
        self._tracker.start(tp.topic, tp.partition, record.offset)
        previous: asyncio.Task[None] | None = None
        if inbound.key is not None and h.ORDERED in inbound.headers:
            previous = self._key_chains.get(inbound.key)
        task = asyncio.create_task(self._process(inbound, previous))
        if inbound.key is not None and h.ORDERED in inbound.headers:
            self._key_chains[inbound.key] = task
        self._tasks.add(task)
        self.stats.max_in_flight_seen = max(self.stats.max_in_flight_seen, len(self._tasks))
        task.add_done_callback(lambda t: self._finished(t, inbound))

    def _finished(self, task: asyncio.Task[None], inbound: Inbound) -> None:
        self._tasks.discard(task)
        if inbound.key is not None and self._key_chains.get(inbound.key) is task:
            del self._key_chains[inbound.key]
        self._progress.set()

    async def _until(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until ``condition`` holds, re-checking whenever a message finishes."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), remaining)
        return True

    async def _wait_for_slot(self, stop: asyncio.Event) -> None:
        await self._until(
            lambda: len(self._tasks) < self._max_in_flight or stop.is_set(), COMMIT_INTERVAL_S
        )
        await self._commit()

    async def _process(self, inbound: Inbound, previous: asyncio.Task[None] | None) -> None:
        """Handle one message; only cancellation (shutdown) leaves it undone, to be redelivered."""
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        prompt = parse_prompt_ref(h.text(inbound.headers, h.PROMPT))
        scope = MessageScope(self.stage, h.text(inbound.headers, h.REQUEST_ID), *prompt)
        started = time.perf_counter()
        self._metrics.stage_started(self.stage)
        try:
            # Started here, inside this message's own task: span and scope are its alone.
            with message_scope(scope), self._consumer_span(inbound, scope) as span:
                decision = await self._decide(inbound, span, scope.request_id)
                decision, encoded = self._encode(decision)
                route = decision.route if isinstance(decision, Emit) else "dead_letter"
                _annotate(span, decision, route, scope)
                await self._deliver(inbound, decision, encoded)
                # Inside the span: latency samples carry it as an exemplar.
                self._record(inbound, decision, time.perf_counter() - started)
        finally:
            self._metrics.stage_finished(self.stage)
        self._tracker.done(inbound.topic, inbound.partition, inbound.offset)

    def _record(self, inbound: Inbound, decision: Decision, duration_s: float) -> None:
        """A metrics bug must never leave a delivered message undone (and its offset stuck)."""
        try:
            self._metrics.record_decision(
                self.stage,
                decision,
                duration_s=duration_s,
                inbound_timestamp_ms=inbound.timestamp_ms,
            )
        except Exception:
            log.exception("stage %s: recording metrics failed", self.stage)

    async def _decide(self, inbound: Inbound, span: Span, request_id: str | None) -> Decision:
        try:
            return await self._handler(inbound)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in a stage must cost one dead letter, not the worker
            log.exception(
                "stage %s failed on %s/%s@%s",
                self.stage,
                inbound.topic,
                inbound.partition,
                inbound.offset,
            )
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            return DeadLetter(
                self.stage, "internal_error", type(exc).__name__, str(exc), request_id
            )

    def _consumer_span(
        self, inbound: Inbound, scope: MessageScope
    ) -> contextlib.AbstractContextManager[Span]:
        """A child of the upstream ``traceparent``; no header (or a bad one) starts a trace."""
        return self._tracer.start_as_current_span(
            sc.consumer_span_name(self.stage),
            context=extract(inbound.headers.items()),
            kind=trace.SpanKind.CONSUMER,
            attributes=self._consumer_attributes(inbound, scope),
            record_exception=False,
        )

    def _consumer_attributes(self, inbound: Inbound, scope: MessageScope) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            sc.MESSAGING_SYSTEM: sc.MESSAGING_SYSTEM_KAFKA,
            sc.MESSAGING_OPERATION_TYPE: sc.OPERATION_PROCESS,
            sc.MESSAGING_OPERATION_NAME: sc.OPERATION_PROCESS,
            sc.MESSAGING_DESTINATION_NAME: inbound.topic,
            sc.MESSAGING_CONSUMER_GROUP_NAME: self.group,
            sc.MESSAGING_DESTINATION_PARTITION_ID: str(inbound.partition),
            sc.MESSAGING_KAFKA_OFFSET: inbound.offset,
            sc.STAGE: self.stage,
            **scope.prompt_attributes(),
        }
        if inbound.key is not None:
            attributes[sc.MESSAGING_KAFKA_MESSAGE_KEY] = _key_text(inbound.key)
        if inbound.value is not None:
            attributes[sc.MESSAGING_MESSAGE_BODY_SIZE] = len(inbound.value)
        if scope.request_id is not None:
            attributes[sc.REQUEST_ID] = scope.request_id
        return attributes

    def _producer_span(
        self, logical_topic: str, topic: str, key: bytes | None, decision: Decision, route: str
    ) -> trace.Span:
        """The span whose context the produced message carries: the next hop's parent.

        Stage, prompt and reason are on its parent (the consumer span) and not repeated:
        the SDK validates and the exporter encodes every attribute of every span, which is
        most of what tracing costs per message.
        """
        attributes: dict[str, Any] = {
            sc.MESSAGING_SYSTEM: sc.MESSAGING_SYSTEM_KAFKA,
            sc.MESSAGING_OPERATION_TYPE: sc.OPERATION_SEND,
            sc.MESSAGING_OPERATION_NAME: sc.OPERATION_SEND,
            sc.MESSAGING_DESTINATION_NAME: topic,
            sc.ROUTE: route,
        }
        if key is not None:
            attributes[sc.MESSAGING_KAFKA_MESSAGE_KEY] = _key_text(key)
        if decision.request_id:
            attributes[sc.REQUEST_ID] = decision.request_id
        return self._tracer.start_span(
            sc.producer_span_name(logical_topic),
            kind=trace.SpanKind.PRODUCER,
            attributes=attributes,
            record_exception=False,
        )

    def _encode(self, decision: Decision) -> tuple[Decision, list[tuple[bytes, str]]]:
        """Encode before routing: a value Avro cannot hold (a lone surrogate from model text,
        a token count beyond a long) turns into a dead letter instead of a stuck offset.
        One encoding per output of ``decision.outputs()``; none for a dead letter."""
        if not isinstance(decision, Emit):
            return decision, []
        try:
            return decision, [self._codec.encode(out.envelope) for out in decision.outputs()]
        except Exception as exc:  # fastavro raises several unrelated types on bad values
            message = f"{decision.topic} envelope cannot be encoded: {exc}"[:500]
            return (
                DeadLetter(
                    self.stage,
                    "unencodable",
                    type(exc).__name__,
                    message,
                    decision.request_id,
                    decision.prompt,
                ),
                [],
            )

    async def _deliver(
        self, inbound: Inbound, decision: Decision, encoded: list[tuple[bytes, str]]
    ) -> None:
        if isinstance(decision, Emit):
            key = inbound.key if inbound.key is not None else decision.request_id.encode()
            for out, (value, content_type) in zip(decision.outputs(), encoded, strict=True):
                topic = self._topic_name(out.topic)
                span = self._producer_span(out.topic, topic, key, out, out.route)
                with trace.use_span(span, end_on_exit=True, record_exception=False):
                    headers = h.output_headers(
                        out.request_id,
                        out.prompt,
                        out.route,
                        content_type,
                        inject(),
                        out.reason,
                        inbound.headers,
                    )
                    _annotate_sent(span, await self._send(topic, key, value, headers))
            return
        span = self._producer_span(DLQ, self._topic_name(DLQ), inbound.key, decision, "dead_letter")
        with trace.use_span(span, end_on_exit=True, record_exception=False):
            await self._dead_letter(inbound, decision)

    async def _dead_letter(self, inbound: Inbound, decision: DeadLetter) -> None:
        headers = h.dead_letter_headers(
            inbound.headers,
            topic=inbound.topic,
            partition=inbound.partition,
            offset=inbound.offset,
            timestamp_ms=inbound.timestamp_ms,
            group=self.group,
            stage=decision.stage,
            reason=decision.reason,
            error_class=decision.error_class,
            error_message=self._redactor.text(decision.message),
            attempts=decision.attempts,
            request_id=decision.request_id,
            prompt=decision.prompt,
        )
        # The dead letter continues the request's trace (same trace id as the original's
        # traceparent, if it had one), so a replay from the DLQ joins that trace too.
        trace_headers = inject()
        if trace_headers:
            headers = [(k, v) for k, v in headers if k not in trace_headers]
            headers += [(k, v.encode()) for k, v in trace_headers.items()]
        log.info(
            "dead-lettered",
            extra={
                "stage": decision.stage,
                "reason": decision.reason,
                "error_class": decision.error_class,
                "detail": decision.message[: h.MAX_ERROR_MESSAGE],
                "request_id": decision.request_id,
            },
        )
        _annotate_sent(
            trace.get_current_span(),
            await self._send(self._topic_name(DLQ), inbound.key, inbound.value, headers),
        )

    async def _send(
        self, topic: str, key: bytes | None, value: bytes | None, headers: h.Headers
    ) -> Any:
        """Retry until the broker acknowledges: a message is only done once it is durable."""
        delay = 0.1
        while True:
            try:
                return await self._producer.send_and_wait(
                    topic, value=value, key=key, headers=headers
                )
            except KafkaError as exc:
                log.warning("produce to %s failed (%s); retrying in %.1fs", topic, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, PRODUCE_RETRY_MAX_S)

    async def _sample_lag(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        """Lag per partition = high watermark - position, sampled on the event loop.

        Both numbers are local to the consumer (the high watermark arrives with every
        fetch), so sampling costs no request to the broker; the metric reader's thread only
        reads the finished snapshot.
        """
        while not stop.is_set():
            samples: list[tuple[dict[str, str | int], int]] = []
            for tp in list(consumer.assignment()):
                highwater = consumer.highwater(tp)
                if highwater is None:
                    continue
                try:
                    position = await asyncio.wait_for(consumer.position(tp), 1.0)
                except Exception:  # revoked meanwhile, or the position is not known yet
                    continue
                attributes: dict[str, str | int] = {
                    sc.STAGE: self.stage,
                    sc.MESSAGING_CONSUMER_GROUP_NAME: self.group,
                    sc.MESSAGING_DESTINATION_NAME: tp.topic,
                    sc.MESSAGING_DESTINATION_PARTITION_ID: str(tp.partition),
                }
                samples.append((attributes, max(0, highwater - position)))
            self._lag = samples
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), LAG_SAMPLE_INTERVAL_S)

    async def _commit(self, only: set[TopicPartition] | None = None) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        owned = consumer.assignment()
        offsets: dict[TopicPartition, int] = {}
        for topic, partition in self._tracker.partitions():
            tp = TopicPartition(topic, partition)
            if tp not in owned or (only is not None and tp not in only):
                continue
            position = self._tracker.committable(topic, partition)
            if position is not None:
                offsets[tp] = position
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            log.warning("commit failed (%s); the messages will be redelivered if needed", exc)
            return
        for tp, position in offsets.items():
            self._tracker.mark_committed(tp.topic, tp.partition, position)

    async def _drain(self, grace_s: float, partitions: set[TopicPartition] | None = None) -> None:
        def idle() -> bool:
            if partitions is None:
                return not self._tasks
            return all(self._tracker.in_flight(tp.topic, tp.partition) == 0 for tp in partitions)

        if not await self._until(idle, grace_s):
            log.warning("stage %s: in-flight work unfinished after %.0fs", self.stage, grace_s)

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Finish what is in flight for the partitions we lose, commit, then forget them."""
        await self._drain(REVOKE_GRACE_S, revoked)
        await self._commit(revoked)
        for tp in revoked:
            self._tracker.forget(tp.topic, tp.partition)


def _key_text(key: bytes) -> str:
    return key[:MAX_KEY_ATTRIBUTE_CHARS].decode("utf-8", "replace")


def _annotate(span: Span, decision: Decision, route: str, scope: MessageScope) -> None:
    """What the stage decided; what the headers already told the span is not set twice."""
    span.set_attribute(sc.ROUTE, route)
    if decision.reason:
        span.set_attribute(sc.REASON, decision.reason)
    if decision.request_id and decision.request_id != scope.request_id:
        span.set_attribute(sc.REQUEST_ID, decision.request_id)
    prompt = decision.prompt
    if prompt is not None:
        if (prompt.name, prompt.version) != (scope.prompt_name, scope.prompt_version):
            for name, value in prompt_attributes(prompt).items():
                span.set_attribute(name, value)
        span.set_attribute(sc.PROMPT_ARM, prompt.arm)
    if isinstance(decision, DeadLetter):
        span.set_attribute(sc.ERROR_TYPE, decision.error_class)


def _annotate_sent(span: Span, metadata: Any) -> None:
    """Where the broker put the message (aiokafka's ``RecordMetadata``)."""
    partition = getattr(metadata, "partition", None)
    offset = getattr(metadata, "offset", None)
    if partition is not None:
        span.set_attribute(sc.MESSAGING_DESTINATION_PARTITION_ID, str(partition))
    if offset is not None:
        span.set_attribute(sc.MESSAGING_KAFKA_OFFSET, offset)


class _Revocations(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runner: StageRunner) -> None:
        self._runner = runner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._runner.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        return None
