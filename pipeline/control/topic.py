"""Reading and writing the compacted ``llm.control`` topic from tools (CLI, tests).

Workers fold the topic with :class:`~pipeline.control.listener.ControlListener`;
operators change it with these functions, which record who, when and why in every event.
"""

from __future__ import annotations

import getpass
import time
import uuid
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from pipeline.config import Settings
from pipeline.contract.codec import CONTENT_TYPE_HEADER, Codec, DecodeError
from pipeline.contract.envelopes import ControlEvent, utc_now
from pipeline.contract.topology import CONTROL
from pipeline.control.state import ControlState
from pipeline.transport.batch import produce_batch


def default_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def publish(
    settings: Settings, key: str, value: Any, actor: str | None = None, reason: str = ""
) -> ControlEvent:
    """Write one control event and wait for the broker's acknowledgement."""
    event = ControlEvent(
        key=key, value=value, actor=actor or default_actor(), reason=reason, at=utc_now()
    )
    data, content_type = Codec().encode(event)
    headers = [(CONTENT_TYPE_HEADER, content_type.encode())]
    produce_batch(settings, CONTROL, [(key.encode(), data, headers)])
    return event


def read_history(settings: Settings, timeout_s: float = 10.0) -> list[ControlEvent]:
    """Every control event still on the topic, oldest first (compaction keeps the latest per key
    and whatever has not been compacted yet, which is the recent history)."""
    codec = Codec()
    consumer = Consumer(
        {
            **settings.kafka_client_config(),
            "group.id": f"llmpipe-control-reader-{uuid.uuid4()}",
            "enable.auto.commit": False,
        }
    )
    events: list[ControlEvent] = []
    try:
        topic = settings.topic(CONTROL)
        metadata = consumer.list_topics(topic, timeout=timeout_s)
        partitions = list(metadata.topics[topic].partitions)
        ends = {
            p: _high_watermark(consumer, TopicPartition(topic, p), timeout_s) for p in partitions
        }
        pending = {p for p, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        while pending:
            message = consumer.poll(timeout_s)
            if message is None:
                raise TimeoutError(f"control topic {topic} not fully read within {timeout_s}s")
            if message.error():
                continue
            partition, offset, value = message.partition(), message.offset(), message.value()
            if partition is not None and offset is not None and offset + 1 >= ends[partition]:
                pending.discard(partition)
            if value is None:
                continue
            try:
                events.append(codec.decode(value, ControlEvent))
            except DecodeError:
                continue
    finally:
        consumer.close()
    return events


def _high_watermark(consumer: Consumer, tp: TopicPartition, timeout_s: float) -> int:
    """Retry while a just-created topic's leader is still being elected."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return int(consumer.get_watermark_offsets(tp, timeout=timeout_s)[1])
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def current_state(settings: Settings) -> ControlState:
    state = ControlState()
    for event in read_history(settings):
        state.apply(event)
    return state
