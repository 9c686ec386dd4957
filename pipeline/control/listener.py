"""Feeds ``llm.control`` into the worker's :class:`ControlState`.

It reads the compacted topic from the beginning without a consumer group (every worker
needs every event) and signals ``ready`` once it has caught up with the end offsets seen at
start, so that a starting worker never serves a request under stale flags or pins.

The consumer's calls block (librdkafka), so they run on one thread of their own; events
are applied on the event loop, where the stages read the state.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from pipeline.contract.codec import Codec, DecodeError
from pipeline.contract.envelopes import ControlEvent
from pipeline.control.state import ControlState
from pipeline.observability.hooks import record_control_change
from pipeline.transport import headers as h
from pipeline.transport.clients import KafkaClients

log = logging.getLogger("llmpipe.control")
METADATA_ATTEMPTS = 20
METADATA_TIMEOUT_S = 0.5
POLL_TIMEOUT_S = 0.2
BATCH = 500
_NOT_READY = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._TIMED_OUT,
    }
)


class ControlListener:
    def __init__(
        self, topic: str, state: ControlState, codec: Codec, clients: KafkaClients
    ) -> None:
        self._topic = topic
        self._state = state
        self._codec = codec
        self._clients = clients
        self.ready = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kafka-control")

        async def call(fn: Any, *args: Any) -> Any:
            return await loop.run_in_executor(thread, fn, *args)

        consumer = await call(self._clients.consumer, None)
        try:
            partitions = await call(self._partitions, consumer)
            tps = [TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in partitions]
            ends = await call(self._ends, consumer, tps)
            await call(consumer.assign, tps)
            pending = {p for p, end in ends.items() if end > 0}
            if not pending:
                self.ready.set()
            while not stop.is_set():
                messages = await call(self._fetch, consumer)
                for message in messages:
                    if message.error() is None:
                        self._apply(message.value(), message.headers())
                        if message.offset() + 1 >= ends.get(message.partition(), 0):
                            pending.discard(message.partition())
                if pending and not self.ready.is_set():
                    pending = await call(self._still_behind, consumer, pending, ends)
                if not pending and not self.ready.is_set():
                    log.info("control state loaded: %d events", self._state.applied)
                    self.ready.set()
        finally:
            await call(consumer.close)
            thread.shutdown(wait=False)

    def _partitions(self, consumer: Any) -> list[int]:
        """A topic created a moment ago may not be in every broker's metadata yet."""
        for _ in range(METADATA_ATTEMPTS):
            try:
                metadata = consumer.list_topics(self._topic, timeout=METADATA_TIMEOUT_S * 4)
            except KafkaException:
                continue
            topic = metadata.topics.get(self._topic)
            if topic is not None and topic.error is None and topic.partitions:
                return sorted(topic.partitions)
            consumer.poll(METADATA_TIMEOUT_S)
        raise RuntimeError(
            f"control topic {self._topic} does not exist; run `llmpipe topics apply`"
        )

    def _ends(self, consumer: Any, tps: list[TopicPartition]) -> dict[int, int]:
        """The end offsets at start: ready means "read at least up to here"."""
        ends: dict[int, int] = {}
        for tp in tps:
            for attempt in range(METADATA_ATTEMPTS):
                try:
                    _, high = consumer.get_watermark_offsets(
                        TopicPartition(tp.topic, tp.partition), timeout=10.0
                    )
                    break
                except KafkaException as exc:  # a new topic's leader may not be elected yet
                    error = exc.args[0] if exc.args else None
                    retriable = isinstance(error, KafkaError) and error.code() in _NOT_READY
                    if not retriable or attempt == METADATA_ATTEMPTS - 1:
                        raise
                    consumer.poll(METADATA_TIMEOUT_S)
            ends[tp.partition] = high
        return ends

    def _fetch(self, consumer: Any) -> list[Any]:
        messages: list[Any] = consumer.consume(BATCH, 0)
        if not messages:
            first = consumer.poll(POLL_TIMEOUT_S)
            messages = [first] if first is not None else []
        if messages:
            self._clients.health.ok()
        return [
            m
            for m in messages
            if m.error() is None or m.error().code() != KafkaError._PARTITION_EOF
        ]

    def _still_behind(self, consumer: Any, pending: set[int], ends: dict[int, int]) -> set[int]:
        """Compaction and transaction markers leave gaps: compare positions, not offsets."""
        positions = consumer.position([TopicPartition(self._topic, p) for p in sorted(pending)])
        return {tp.partition for tp in positions if tp.offset < ends[tp.partition]}

    def _apply(self, value: bytes | None, headers: Any) -> None:
        if value is None:
            return
        content_type = h.text(h.as_map(headers), h.CONTENT_TYPE)
        try:
            event = self._codec.decode(value, ControlEvent, content_type)
            self._state.apply(event)
            record_control_change(event.key)
            if self.ready.is_set():  # the initial load is summed up in one line instead
                log.info(
                    "control event applied: %s = %s (by %s at %s: %s)",
                    event.key,
                    "default" if event.value is None else event.value,
                    event.actor,
                    event.at.isoformat(),
                    event.reason,
                    extra={"control_key": event.key},
                )
        except (DecodeError, ValueError) as exc:
            log.error("ignoring a bad control event: %s", exc)
