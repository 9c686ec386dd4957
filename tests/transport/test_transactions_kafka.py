"""Exactly-once hops against the real broker: what a killed worker half-did is never seen.

A worker process is frozen inside its first transaction (outputs written, offsets sent,
not committed; see :mod:`tests.transport.hanging_worker`) and SIGKILLed there. A
``read_committed`` reader downstream must not see those outputs, and the worker that takes
over (same static membership id, so it fences the dead one's transaction at once) must
redo exactly those inputs, once: every request then appears exactly once downstream,
while the log itself still holds the aborted copies.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from pipeline.config import Settings
from pipeline.harness.environment import create_topics, worker_environment
from pipeline.harness.scenarios import mixed_requests
from pipeline.transport import headers as h
from pipeline.transport.clients import KafkaClients
from tests.support import make_settings, produce

pytestmark = [pytest.mark.kafka]

STAGE_OUTPUT = "llm.stage.validated"


@contextmanager
def child(
    settings: Settings, argv: list[str], *env: tuple[str, str]
) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", *argv],
        env={**os.environ, **worker_environment(settings), **dict(env)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


def wait_for_line(process: subprocess.Popen[str], line: str, timeout_s: float) -> None:
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if selector.select(timeout=0.5):
            text = process.stdout.readline()
            if text.strip() == line:
                return
            assert text, f"the worker exited (code {process.poll()}) before printing {line}"
    raise AssertionError(f"the worker did not print {line} within {timeout_s}s")


def read_ids(settings: Settings, isolation: str) -> list[str]:
    """Every request id on the stage's output topic, read to its end at this isolation."""
    clients = KafkaClients(settings)
    consumer = clients.consumer(None, **{"isolation.level": isolation})
    topic = settings.topic(STAGE_OUTPUT)
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p) for p in partitions]
        ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in tps}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        ids: list[str] = []
        deadline = time.monotonic() + 30
        while True:
            positions = consumer.position(tps)
            if all(tp.offset >= ends[tp.partition] or ends[tp.partition] == 0 for tp in positions):
                return ids
            assert time.monotonic() < deadline, f"could not read {topic} to its end ({ends})"
            for message in consumer.consume(500, 0.2):
                if message.error() is None:
                    ids.append(h.text(h.as_map(message.headers()), h.REQUEST_ID) or "?")
    finally:
        consumer.close()


def visible_end(settings: Settings) -> int:
    """Sum of the last stable offsets: how far a read_committed reader can get."""
    consumer = KafkaClients(settings).consumer(None)
    topic = settings.topic(STAGE_OUTPUT)
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        )
    finally:
        consumer.close()


def test_a_transaction_killed_before_its_commit_is_invisible_and_redone_once(
    kafka_bootstrap: str,
) -> None:
    planned = mixed_requests(40, seed=13, weights={"valid": 1})
    settings = make_settings(kafka_bootstrap, commit_interval_ms=50)
    create_topics(settings)
    produce(settings, "llm.requests", [(p.key, p.value, p.headers) for p in planned])
    expected = {p.request_id for p in planned}
    static = ("LLMPIPE_GROUP_INSTANCE_ID", "abort-test")

    with child(settings, ["tests.transport.hanging_worker", "validate"], static) as frozen:
        wait_for_line(frozen, "IN-TXN", timeout_s=90)
        half_done = read_ids(settings, "read_uncommitted")
        assert half_done, "the frozen transaction wrote outputs to the log"
        assert read_ids(settings, "read_committed") == [], "nobody downstream sees them"
        assert visible_end(settings) == 0
        os.kill(frozen.pid, signal.SIGKILL)
        frozen.wait(10)

    with child(settings, ["pipeline.cli", "worker", "--stages", "validate"], static) as survivor:
        deadline = time.monotonic() + 90
        while Counter(read_ids(settings, "read_committed")).keys() != expected:
            assert survivor.poll() is None, "the surviving worker exited"
            assert time.monotonic() < deadline, "the survivor did not redo the requests"
            time.sleep(0.2)
        committed = Counter(read_ids(settings, "read_committed"))
    assert set(committed.values()) == {1}, f"duplicates downstream: {committed.most_common(3)}"
    everything = Counter(read_ids(settings, "read_uncommitted"))
    aborted = sum(everything.values()) - sum(committed.values())
    assert aborted == len(half_done), "the aborted copies stay in the log, hidden"
    assert all(everything[rid] == 2 for rid in half_done), "each half-done input redone once"
