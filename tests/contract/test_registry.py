"""Schema Registry: subjects as code, Confluent frames both ways with confluent-kafka's own
serializers, and a worker writing LLMPIPE_OUTPUT_FORMAT=confluent over the real broker.

The registry is confluent-kafka's in-memory one (``mock://``): no runnable Schema Registry
can be installed here (Apicurio Registry's Maven artifacts are not all served; see the
README's registry section). Its compatibility check is added below with Apache Avro's own
checker (the ``avro`` package the ``avro`` extra installs), BACKWARD like a registry's
default: the new schema must read data written with the latest one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType
from avro.schema import parse
from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from confluent_kafka.schema_registry import Schema
from confluent_kafka.schema_registry._sync.mock_schema_registry_client import (
    MockSchemaRegistryClient,
)
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from bench.common import free_port
from pipeline.config import Settings
from pipeline.contract.codec import (
    CONFLUENT_AVRO,
    Codec,
    DecodeError,
    SchemaUnavailable,
    load_schemas,
    registry_schema,
)
from pipeline.contract.envelopes import PromptRef, Request, Result, Usage, ValidationReport
from pipeline.harness.environment import create_topics
from pipeline.harness.fakellm import running_fake_llm
from pipeline.harness.ledger import read_terminal
from pipeline.harness.scenarios import mixed_requests
from pipeline.transport import schema_registry
from pipeline.transport.clients import KafkaClients
from pipeline.transport.registry import codec_for, require_schemas
from pipeline.transport.schema_registry import (
    RegistryError,
    apply_subjects,
    plan_subjects,
    registry_client,
    subjects,
)
from tests.support import make_settings, produce, running_worker

RAW = load_schemas()


class CheckingRegistry(MockSchemaRegistryClient):
    """The mock, plus a BACKWARD compatibility check by Apache Avro's checker."""

    def __init__(self, conf: dict[str, Any]) -> None:
        super().__init__(conf)
        self.url: str = conf["url"]

    def test_compatibility(self, subject_name: str, schema: Schema, *_: Any, **__: Any) -> bool:
        latest = self.get_latest_version(subject_name)
        checker = ReaderWriterCompatibilityChecker()
        result = checker.get_compatibility(
            parse(schema.schema_str), parse(latest.schema.schema_str)
        )
        return bool(result.compatibility == SchemaCompatibilityType.compatible)

    def get_compatibility(self, subject_name: str | None = None) -> str:
        return "BACKWARD"


@pytest.fixture
def client() -> Iterator[CheckingRegistry]:
    """A fresh registry installed as the process's client for its URL."""
    url = f"mock://llmpipe-{uuid.uuid4().hex[:8]}"
    mock = CheckingRegistry({"url": url})
    schema_registry._clients[(url, None, None)] = mock
    yield mock
    schema_registry._clients.pop((url, None, None), None)


def result(request_id: str = "r-1") -> Result:
    return Result(
        request_id=request_id,
        status="ok",
        output={"label": "bug", "note": "ünïcode ✓"},
        confidence=0.9,
        source="model",
        prompt=PromptRef(name="ticket_triage", version=3, hash="abc"),
        model="m",
        usage=Usage(prompt_tokens=10, completion_tokens=5),
        latency_ms=12.5,
        attempts=1,
        validation=ValidationReport(checks=["schema"]),
        produced_at=datetime(2030, 1, 1, tzinfo=UTC),
    )


def confluent(client: CheckingRegistry, prefix: str = "") -> Codec:
    settings = Settings(
        schema_registry_url=client.url, output_format="confluent", topic_prefix=prefix
    )
    return codec_for(settings)


def test_topics_apply_registers_each_topic_subject_once(client: CheckingRegistry) -> None:
    changes = apply_subjects(client, Codec(), "p.")
    assert {c.subject for c in changes} == set(subjects("p."))
    assert "p.llm.results-value" in {c.subject for c in changes}
    assert all(c.action == "register" and "(id " in c.detail for c in changes)
    assert apply_subjects(client, Codec(), "p.") == [], "a second apply changes nothing"
    stored = json.loads(client.get_latest_version("p.llm.results-value").schema.schema_str)
    assert stored == registry_schema(RAW, "llmpipe.Result")


def test_an_incompatible_schema_is_refused_and_nothing_is_registered(
    client: CheckingRegistry,
) -> None:
    apply_subjects(client, Codec(), "")
    # A new required field without a default cannot read the data already written.
    changed = {name: json.loads(json.dumps(schema)) for name, schema in RAW.items()}
    changed["llmpipe.Result"]["fields"].append({"name": "tenant", "type": "string"})
    planned, refused = plan_subjects(client, Codec(changed), "")
    assert planned == []
    assert refused == [
        "llm.results-value: llmpipe.Result in schemas/ is not BACKWARD-compatible with the "
        "subject's latest version"
    ]
    with pytest.raises(RegistryError, match=r"llm\.results-value"):
        apply_subjects(client, Codec(changed), "")
    assert client.get_versions("llm.results-value") == [1]
    # A new optional field (with a default) is compatible: a new version.
    changed["llmpipe.Result"]["fields"][-1] = {
        "name": "tenant",
        "type": ["null", "string"],
        "default": None,
    }
    (change,) = apply_subjects(client, Codec(changed), "")
    assert (change.subject, change.detail.split(" (")[0]) == (
        "llm.results-value",
        "llmpipe.Result, new version",
    )
    assert sorted(client.get_versions("llm.results-value")) == [1, 2]


def test_llmpipe_frames_read_with_confluent_kafkas_own_deserializer(
    client: CheckingRegistry,
) -> None:
    apply_subjects(client, Codec(), "")
    data, content_type = confluent(client).encode(result())
    assert content_type == CONFLUENT_AVRO
    registered = client.lookup_schema(
        "llm.results-value", Schema(json.dumps(registry_schema(RAW, "llmpipe.Result")), "AVRO")
    )
    assert data[0] == 0 and int.from_bytes(data[1:5], "big") == registered.schema_id
    read = AvroDeserializer(client)(data, SerializationContext("llm.results", MessageField.VALUE))
    assert read["request_id"] == "r-1" and read["source"] == "model"
    assert json.loads(read["output"]) == {"label": "bug", "note": "ünïcode ✓"}
    assert read["prompt"] == {"name": "ticket_triage", "version": 3, "hash": "abc", "arm": "latest"}


def test_frames_of_an_older_or_newer_producer_are_read_by_their_writer_schema(
    client: CheckingRegistry,
) -> None:
    """A third-party producer on confluent-kafka's AvroSerializer, with the schema as it
    was before `model` existed, and one from after a field was added: llmpipe reads each
    by the id in the frame, resolved against its own schema."""
    current = registry_schema(RAW, "llmpipe.Result")
    older = {**current, "fields": [f for f in current["fields"] if f["name"] != "model"]}
    newer = {
        **current,
        "fields": [*current["fields"], {"name": "tenant", "type": "string", "default": "-"}],
    }
    ids = []
    for writer in (older, newer):
        subject = f"third-party-{len(ids)}-value"
        ids.append(client.register_schema(subject, Schema(json.dumps(writer), "AVRO")))
    codec = confluent(client)
    fields = result().model_dump()
    fields["output"] = json.dumps(fields["output"])
    for n, writer in enumerate((older, newer)):
        record = {k: v for k, v in fields.items() if k != "model"} if writer is older else fields
        if writer is newer:
            record = {**record, "tenant": "acme"}
        serializer = AvroSerializer(
            client, json.dumps(writer), conf={"auto.register.schemas": False}
        )
        frame = serializer(record, SerializationContext(f"third-party-{n}", MessageField.VALUE))
        assert int.from_bytes(frame[1:5], "big") == ids[n]
        decoded = codec.decode(frame, Result)
        assert decoded.request_id == "r-1" and decoded.output == result().output
        assert decoded.model == (None if writer is older else "m"), "default from the reader"


def test_a_worker_without_a_registry_never_loads_the_registry_client() -> None:
    """confluent-kafka's registry client brings authlib, httpx and their dependencies
    (about 280 modules, 16 MiB of RSS, in every worker process): loaded only when a
    registry is configured. A fresh interpreter, as ``llmpipe worker`` starts: the CLI,
    the worker module and a worker built from the default settings."""
    script = (
        "import sys\n"
        "import pipeline.cli.main\n"
        "from pipeline.config import Settings\n"
        "from pipeline.runtime.worker import Worker\n"
        "Worker(Settings())\n"
        "print(sorted(m for m in sys.modules if m.startswith('confluent_kafka.schema_registry')))\n"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("LLMPIPE_SCHEMA_REGISTRY") and k != "LLMPIPE_OUTPUT_FORMAT"
    }
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_a_worker_without_registered_schemas_stops_in_one_line(
    client: CheckingRegistry,
) -> None:
    settings = Settings(schema_registry_url=client.url, output_format="confluent")
    with pytest.raises(RegistryError, match="run `llmpipe topics apply`"):
        require_schemas(settings)


@pytest.mark.kafka
def test_a_worker_writes_confluent_frames_that_third_parties_read(
    kafka_bootstrap: str, client: CheckingRegistry
) -> None:
    """Requests in as Confluent Avro from a third-party serializer, through every stage in
    LLMPIPE_OUTPUT_FORMAT=confluent, results read by confluent-kafka's AvroDeserializer."""
    planned = mixed_requests(8, seed=4, weights={"valid": 1})
    with running_fake_llm() as fake:
        settings = make_settings(
            kafka_bootstrap,
            model_base_url=fake.url,
            output_format="confluent",
            schema_registry_url=client.url,
        )
        create_topics(settings)
        apply_subjects(client, Codec(), settings.topic_prefix)
        request_serializer = AvroSerializer(
            client,
            json.dumps(registry_schema(RAW, "llmpipe.Request")),
            conf={"auto.register.schemas": False},
        )
        topic = settings.topic("llm.requests")
        messages = []
        for p in planned:
            # What an upstream service has: plain fields (the scenario wrote JSON or Avro).
            record = Codec().decode_fields(
                p.value, Request, dict(p.headers).get("content-type", b"").decode()
            )
            record["variables"] = json.dumps(record["variables"])  # a JSON-text field
            frame = request_serializer(record, SerializationContext(topic, MessageField.VALUE))
            messages.append((p.key, frame, []))  # no content-type: sniffed as Confluent
        with running_worker(settings):
            produce(settings, "llm.requests", messages)
            ledger = read_terminal(settings, [p.request_id for p in planned], timeout_s=90)
            frames = _read_values(settings, settings.topic("llm.results"), len(planned))
    assert not ledger.missing and not ledger.duplicates, ledger.summary()
    deserializer = AvroDeserializer(client)
    read = [
        deserializer(f, SerializationContext("llm.results", MessageField.VALUE)) for f in frames
    ]
    assert sorted(r["request_id"] for r in read) == sorted(p.request_id for p in planned)
    assert all(r["source"] == "model" and json.loads(r["output"]) for r in read)


def _read_values(settings: Settings, topic: str, count: int) -> list[bytes]:
    consumer = KafkaClients(settings).consumer(None)
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        consumer.assign(
            [TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.topics[topic].partitions]
        )
        values: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(values) < count:
            assert time.monotonic() < deadline, f"{len(values)} of {count} results on {topic}"
            for message in consumer.consume(100, timeout=0.5):
                if message.error() is None and message.value() is not None:
                    values.append(message.value())
        return values
    finally:
        consumer.close()


@pytest.mark.kafka
def test_topics_apply_and_plan_handle_subjects_beside_topics(
    kafka_settings: Settings, client: CheckingRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from pipeline.cli.main import app

    env = {
        "LLMPIPE_BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        "LLMPIPE_TOPIC_PREFIX": kafka_settings.topic_prefix,
        "LLMPIPE_SCHEMA_REGISTRY_URL": client.url,
    }
    runner = CliRunner()
    planned = runner.invoke(app, ["topics", "plan"], env=env)
    assert planned.exit_code == 0, planned.output
    assert f"register        {kafka_settings.topic_prefix}llm.results-value" in planned.output
    assert client.get_subjects() == [], "plan registers nothing"
    applied = runner.invoke(app, ["topics", "apply"], env=env)
    assert applied.exit_code == 0, applied.output
    assert set(client.get_subjects()) == set(subjects(kafka_settings.topic_prefix))
    again = runner.invoke(app, ["topics", "apply"], env=env)
    assert "no changes" in again.output, again.output
    # schemas/ changed incompatibly: both commands refuse, in one line each.
    changed = {name: json.loads(json.dumps(schema)) for name, schema in RAW.items()}
    changed["llmpipe.Result"]["fields"].append({"name": "tenant", "type": "string"})
    monkeypatch.setattr("pipeline.contract.codec.load_schemas", lambda *_: changed)
    refused = runner.invoke(app, ["topics", "apply"], env=env)
    assert refused.exit_code == 1, refused.output
    assert "llm.results-value: llmpipe.Result in schemas/ is not BACKWARD-compatible" in (
        refused.output
    )


def test_an_unknown_schema_id_is_a_decode_error_and_an_unreachable_registry_is_not_one(
    client: CheckingRegistry,
) -> None:
    """A frame naming an id the registry never gave is bad input (a dead letter with
    decode_error); a registry that cannot be asked says nothing about the message, so the
    codec raises SchemaUnavailable instead (its handling fails, replayable later)."""
    apply_subjects(client, Codec(), "")
    frame, _ = confluent(client).encode(result())
    unknown = frame[:1] + (10_000).to_bytes(4, "big") + frame[5:]
    with pytest.raises(DecodeError, match="schema id 10000 is not in the Schema Registry"):
        confluent(client).decode(unknown, Result)
    closed = free_port()  # a port nothing listens on
    unreachable = Settings(
        schema_registry_url=f"http://127.0.0.1:{closed}", output_format="confluent"
    )
    with pytest.raises(SchemaUnavailable, match="Schema Registry unreachable"):
        codec_for(unreachable).decode(frame, Result)
    with pytest.raises(RegistryError, match="Schema Registry unreachable"):  # one line, exit 1
        plan_subjects(registry_client(unreachable), Codec(), "")
