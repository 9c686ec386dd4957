"""Requests marked ``x-ordered`` keep their per-key order through every stage."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from pipeline.config import Settings
from pipeline.harness.fakellm import running_fake_llm
from pipeline.harness.scenarios import mixed_requests
from tests.support import produce, running_worker

pytestmark = pytest.mark.kafka


def _result_order(settings: Settings, count: int) -> dict[bytes, list[str]]:
    consumer = Consumer(
        {
            **settings.kafka_client_config(),
            "group.id": f"order-{uuid.uuid4()}",
            "enable.auto.commit": False,
        }
    )
    topic = settings.topic("llm.results")
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    order: dict[bytes, list[str]] = {}
    seen = 0
    deadline = time.monotonic() + 60
    try:
        while seen < count:
            assert time.monotonic() < deadline, f"only {seen} of {count} results arrived"
            for message in consumer.consume(500, timeout=0.5):
                headers = dict(message.headers() or [])
                order.setdefault(message.key() or b"", []).append(headers["x-request-id"].decode())
                seen += 1
    finally:
        consumer.close()
    return order


def test_ordered_keys_keep_their_order_while_others_run_concurrently(
    kafka_settings: Settings,
) -> None:
    planned = mixed_requests(120, seed=9, weights={"valid": 1})
    keys = [b"customer-a", b"customer-b", b"customer-c"]
    messages = []
    for i, p in enumerate(planned):
        if i % 2 == 0:
            key = keys[i % 3]
            messages.append((key, p.value, [*p.headers, ("x-ordered", b"true")]))
        else:
            messages.append((p.key, p.value, p.headers))
    with running_fake_llm(latency=0.05, jitter=0.9) as fake:
        settings = kafka_settings.model_copy(update={"model_base_url": fake.url})
        with running_worker(settings) as worker:
            produce(settings, "llm.requests", messages)
            order = _result_order(settings, len(planned))
        in_flight = max(r.stats.max_in_flight_seen for r in worker.runners if r.stage == "model")
    for key in keys:
        sent = [p.request_id for i, p in enumerate(planned) if i % 2 == 0 and keys[i % 3] == key]
        assert order[key] == sent, f"{key!r} results out of order"
    assert in_flight > 3, "unordered requests should still run concurrently"
