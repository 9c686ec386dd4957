"""Feeds ``llm.control`` into the worker's :class:`ControlState`.

It reads the compacted topic from the beginning without a consumer group (every worker
needs every event) and signals ``ready`` once it has caught up with the end offsets seen at
start, so that a starting worker never serves a request under stale flags or pins.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.contract.codec import Codec, DecodeError
from pipeline.contract.envelopes import ControlEvent
from pipeline.control.state import ControlState
from pipeline.observability.metrics import record_control_change

log = logging.getLogger("llmpipe.control")
METADATA_ATTEMPTS = 20
METADATA_RETRY_S = 0.25


class ControlListener:
    def __init__(
        self, topic: str, state: ControlState, codec: Codec, kafka_config: dict[str, Any]
    ) -> None:
        self._topic = topic
        self._state = state
        self._codec = codec
        self._kafka_config = kafka_config
        self.ready = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        consumer = AIOKafkaConsumer(enable_auto_commit=False, **self._kafka_config)
        await consumer.start()
        try:
            partitions = await self._partitions(consumer)
            tps = [TopicPartition(self._topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            end = await consumer.end_offsets(tps)
            pending = {tp for tp in tps if end[tp] > 0}
            if not pending:
                self.ready.set()
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    for record in records:
                        self._apply(record.value, record.headers)
                if pending:
                    for tp in list(pending):
                        if await consumer.position(tp) >= end[tp]:
                            pending.discard(tp)
                    if not pending:
                        log.info("control state loaded: %d events", self._state.applied)
                        self.ready.set()
        finally:
            await consumer.stop()

    async def _partitions(self, consumer: AIOKafkaConsumer) -> set[int]:
        """A topic created a moment ago may not be in every broker's metadata yet."""
        for _ in range(METADATA_ATTEMPTS):
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(self._topic)
            if partitions:
                return set(partitions)
            await asyncio.sleep(METADATA_RETRY_S)
        raise RuntimeError(
            f"control topic {self._topic} does not exist; run `llmpipe topics apply`"
        )

    def _apply(self, value: bytes | None, headers: Any) -> None:
        if value is None:
            return
        content_type = next(
            (v.decode() for k, v in headers or () if k == "content-type" and v), None
        )
        try:
            event = self._codec.decode(value, ControlEvent, content_type)
            self._state.apply(event)
            record_control_change(event.key)
        except (DecodeError, ValueError) as exc:
            log.error("ignoring a bad control event: %s", exc)
