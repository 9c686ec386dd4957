"""One stage as a Kafka consumer: many messages in flight, offsets committed safely.

The runner takes up to ``max_in_flight`` messages at a time, hands each to the stage,
produces what the stage decided, waits for the broker's acknowledgement, and only then
marks the input done. Commits go up to the lowest offset still in flight (see
:mod:`pipeline.transport.offsets`), so a crash at any moment loses nothing: whatever was
not acknowledged downstream is consumed again. Back-pressure is structural: when all slots
are busy the runner stops fetching, so a backlog stays in Kafka, not in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from opentelemetry import trace

from pipeline.codec import Codec
from pipeline.redact import Redactor
from pipeline.stages.decisions import DLQ, DeadLetter, Decision, Emit
from pipeline.telemetry import extract, inject, tracer
from pipeline.transport import headers as h
from pipeline.transport.offsets import OffsetTracker

log = logging.getLogger("llmpipe.runner")

COMMIT_INTERVAL_S = 0.5
REVOKE_GRACE_S = 10.0
# Long enough for the revoke handler to finish in-flight work, short enough that a member
# killed mid-rebalance does not stall the group for long.
REBALANCE_TIMEOUT_MS = 20_000
PRODUCE_RETRY_MAX_S = 5.0


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
    consumed: int = 0
    by_route: dict[str, int] = field(default_factory=dict)
    by_reason: dict[str, int] = field(default_factory=dict)
    max_in_flight_seen: int = 0
    commits: int = 0


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
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
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
        self.stats.consumed += 1
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
        attributes: dict[str, str | int] = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.destination.name": inbound.topic,
            "messaging.consumer.group.name": self.group,
            "messaging.destination.partition.id": str(inbound.partition),
            "messaging.kafka.offset": inbound.offset,
        }
        with tracer().start_as_current_span(
            f"{self.stage} process",
            context=extract(inbound.headers.items()),
            kind=trace.SpanKind.CONSUMER,
            attributes=attributes,
        ) as span:
            try:
                decision = await self._handler(inbound)
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
                decision = DeadLetter(self.stage, "internal_error", type(exc).__name__, str(exc))
            route = decision.route if isinstance(decision, Emit) else "dead_letter"
            reason = decision.reason
            span.set_attribute("llmpipe.route", route)
            if reason:
                span.set_attribute("llmpipe.reason", reason)
            await self._deliver(inbound, decision)
        self.stats.by_route[route] = self.stats.by_route.get(route, 0) + 1
        if reason:
            self.stats.by_reason[reason] = self.stats.by_reason.get(reason, 0) + 1
        self._tracker.done(inbound.topic, inbound.partition, inbound.offset)

    async def _deliver(self, inbound: Inbound, decision: Decision) -> None:
        if isinstance(decision, Emit):
            value, content_type = self._codec.encode(decision.envelope)
            headers = h.output_headers(
                decision.request_id,
                decision.prompt,
                decision.route,
                content_type,
                inject(),
                decision.reason,
                inbound.headers,
            )
            key = inbound.key if inbound.key is not None else decision.request_id.encode()
            await self._send(self._topic_name(decision.topic), key, value, headers)
            return
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
        await self._send(self._topic_name(DLQ), inbound.key, inbound.value, headers)

    async def _send(
        self, topic: str, key: bytes | None, value: bytes | None, headers: h.Headers
    ) -> None:
        """Retry until the broker acknowledges: a message is only done once it is durable."""
        delay = 0.1
        while True:
            try:
                await self._producer.send_and_wait(topic, value=value, key=key, headers=headers)
                return
            except KafkaError as exc:
                log.warning("produce to %s failed (%s); retrying in %.1fs", topic, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, PRODUCE_RETRY_MAX_S)

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
        self.stats.commits += 1

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


class _Revocations(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runner: StageRunner) -> None:
        self._runner = runner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._runner.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        return None
