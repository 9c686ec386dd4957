"""How :class:`pipeline.transport.compacted.CompactedFollower` reads the end offsets it must
catch up with: "not yet" errors are asked again, never a crash.

A worker follows ``llm.control`` and ``llm.fleet`` before it serves. On a loaded CI machine
(2026-12-03) both settle workers of a fleet test died at start with ``_UNKNOWN_PARTITION``
from ``get_watermark_offsets``, a moment after ``list_topics`` had named the partition: the
client's metadata had not caught up. These tests drive the policy with a scripted stand-in
for the consumer's one call (the follower's Kafka behaviour is covered against the broker by
the control and fleet tests); what they pin is which errors mean "ask again".
"""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from pipeline.transport import compacted
from pipeline.transport.compacted import CompactedFollower


class ScriptedConsumer:
    """Raises the scripted errors in order, then answers ``(0, high)``."""

    def __init__(self, errors: list[int], high: int = 7) -> None:
        self.errors = list(errors)
        self.high = high
        self.calls = 0
        self.polls = 0

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float) -> tuple[int, int]:
        self.calls += 1
        if self.errors:
            raise KafkaException(KafkaError(self.errors.pop(0)))
        return 0, self.high + tp.partition

    def poll(self, timeout: float) -> Any:
        self.polls += 1
        return None


def _ends(consumer: ScriptedConsumer, partitions: int = 2) -> dict[int, int] | None:
    follower = CompactedFollower("t", lambda _r: None, clients=None)  # type: ignore[arg-type]
    return follower._ends(consumer, [TopicPartition("t", p) for p in range(partitions)])


@pytest.mark.parametrize(
    "code",
    [
        KafkaError._UNKNOWN_PARTITION,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
    ],
)
def test_a_partition_not_ready_yet_is_asked_again_until_it_answers(code: int) -> None:
    consumer = ScriptedConsumer([code, code, code])
    assert _ends(consumer) == {0: 7, 1: 8}
    assert consumer.calls == 5  # three refusals, then both partitions
    assert consumer.polls == 3  # librdkafka is served between attempts


def test_a_partition_still_not_ready_after_the_attempts_hands_the_wait_back_to_the_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(compacted, "METADATA_ATTEMPTS", 3)
    consumer = ScriptedConsumer([KafkaError._UNKNOWN_PARTITION] * 3)
    assert _ends(consumer) is None  # the caller asks again between checks of its stop event
    assert consumer.calls == 3
    assert _ends(consumer) == {0: 7, 1: 8}


def test_any_other_error_is_a_fault_and_raised() -> None:
    consumer = ScriptedConsumer([KafkaError.TOPIC_AUTHORIZATION_FAILED])
    with pytest.raises(KafkaException) as raised:
        _ends(consumer)
    assert raised.value.args[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    assert consumer.calls == 1
