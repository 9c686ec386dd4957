"""Every envelope survives a real trip through Kafka in Avro (plain and Confluent) and JSON."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import Settings
from pipeline.contract.codec import Codec, load_schemas
from pipeline.contract.envelopes import ENVELOPES, Envelope
from pipeline.transport.batch import BULK_TIMEOUT_S, produce_batch
from pipeline.transport.registry import codec_for
from pipeline.transport.schema_registry import apply_subjects, registry_client, subjects
from tests.contract.test_envelopes import strategy

pytestmark = pytest.mark.kafka

RAW = load_schemas()


def _registry_codec() -> Codec:
    """Confluent frames with ids from confluent-kafka's in-memory Schema Registry."""
    settings = Settings(schema_registry_url="mock://schemas-kafka", output_format="confluent")
    apply_subjects(registry_client(settings), Codec(), "")
    return codec_for(settings)


CODECS = [Codec(), Codec(output_format="json"), _registry_codec()]
ON_TOPICS = set(subjects("").values())


def test_every_schema_round_trips_through_the_broker(kafka_settings: Settings) -> None:
    sent: list[tuple[str, Envelope, str]] = []

    @settings(max_examples=5, suppress_health_check=list(HealthCheck), database=None)
    @given(st.data())
    def draw(data: st.DataObject) -> None:
        for name, model in ENVELOPES.items():
            sent.append(
                (name, model.model_validate(data.draw(strategy(RAW[f"llmpipe.{name}"]))), "")
            )

    draw()
    messages = []
    for i, (name, envelope, _) in enumerate(sent):
        codec = CODECS[i % len(CODECS)]
        if codec is CODECS[-1] and f"llmpipe.{name}" not in ON_TOPICS:
            codec = CODECS[0]  # the registry holds what travels on topics, not its parts
        value, content_type = codec.encode(envelope)
        headers = [("content-type", content_type.encode()), ("x-envelope", name.encode())]
        messages.append((str(i).encode(), value, headers))
    topic = "llm.results"
    produce_batch(kafka_settings, topic, messages, timeout_s=BULK_TIMEOUT_S)

    consumer = Consumer(
        {
            **kafka_settings.kafka_client_config(),
            "group.id": f"rt-{uuid.uuid4()}",
            "enable.auto.commit": False,
        }
    )
    full = kafka_settings.topic(topic)
    partitions = consumer.list_topics(full, timeout=10).topics[full].partitions
    consumer.assign([TopicPartition(full, p, OFFSET_BEGINNING) for p in partitions])
    received: dict[int, Envelope] = {}
    deadline = time.monotonic() + 30
    try:
        while len(received) < len(sent):
            assert time.monotonic() < deadline, f"only {len(received)} of {len(sent)} came back"
            for message in consumer.consume(500, timeout=0.5):
                headers = dict(message.headers() or [])
                model = ENVELOPES[headers["x-envelope"].decode()]
                content_type = headers["content-type"].decode()
                received[int(message.key())] = CODECS[0].decode(
                    message.value(), model, content_type
                )
    finally:
        consumer.close()
    for i, (_, envelope, _) in enumerate(sent):
        assert received[i] == envelope
