""":func:`pipeline.transport.compacted.close_producer`: bounded however unreachable the
broker is, and the producer is destroyed when it returns.

librdkafka's ``close()`` alone waits until every queued record is delivered or times out
(``message.timeout.ms``); with nothing listening on the broker's address that was about a
minute. The worker closes its producers this way when it stops, so its stop is bounded.
"""

from __future__ import annotations

import time

import pytest
from confluent_kafka import KafkaError, Producer

from pipeline.transport.compacted import close_producer

NOWHERE = "127.0.0.1:1"
"""A port nothing listens on: every connection is refused, no record is ever delivered."""


def test_a_producer_whose_records_cannot_be_delivered_is_closed_within_the_bound() -> None:
    producer = Producer({"bootstrap.servers": NOWHERE, "log_level": 0})
    reports: list[KafkaError | None] = []
    for i in range(3):
        producer.produce(
            "state", value=b"v", key=f"k{i}", on_delivery=lambda e, _m: reports.append(e)
        )
    started = time.monotonic()
    dropped = close_producer(producer, timeout_s=0.5)
    took_s = time.monotonic() - started
    assert dropped == 3
    assert 0.5 <= took_s < 2.0, took_s
    # Every record was reported (purged), none silently lost ...
    assert [e.code() if e else None for e in reports] == [KafkaError._PURGE_QUEUE] * 3
    # ... and the handle is gone.
    with pytest.raises(RuntimeError, match="closed"):
        producer.poll(0)
