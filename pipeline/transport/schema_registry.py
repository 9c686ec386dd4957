"""The Schema Registry edge: subjects as code, and the Confluent wire format through
confluent-kafka's own Avro serializers.

With ``LLMPIPE_SCHEMA_REGISTRY_URL`` set, every topic that carries an envelope has the
subject ``<topic>-value`` (Confluent's default TopicNameStrategy, the one Kafka Connect,
ksqlDB and registry UIs look for), holding that envelope's schema in self-contained form
(:meth:`Codec.registry_schema`). ``llmpipe topics apply`` registers them after asking the
registry whether each is compatible with the subject's latest version (by the subject's
own compatibility level); workers never register (``auto.register.schemas`` off): a worker
whose schema the registry does not know stops at start with one line.

Frames are written by :class:`~confluent_kafka.schema_registry.avro.AvroSerializer` (the
registered id) and read by :class:`~confluent_kafka.schema_registry.avro.AvroDeserializer`
with the local schema as the reader's, so the writer's schema (found by the id) is resolved
against it. An envelope type carried by several topics (an escalation on ``llm.fallback``
and ``llm.review``) has the same schema under each subject, hence the same id.

One client per registry URL per process: the client caches ids and schemas, so only the
first frame of each schema costs a request. Imported only by a process with a registry
configured (:mod:`pipeline.transport.registry`, ``llmpipe topics``): what it imports costs
about 16 MiB per process.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

from pipeline.config import Settings
from pipeline.contract import topology
from pipeline.contract.codec import Codec, DecodeError, SchemaUnavailable, registry_schema
from pipeline.errors import LlmpipeError

AVRO = "AVRO"
_SUBJECT_NOT_FOUND = 40401
_SCHEMA_NOT_FOUND = 40403
_clients: dict[tuple[str, str | None, str | None], SchemaRegistryClient] = {}
_clients_lock = threading.Lock()


class RegistryError(LlmpipeError):
    """The registry refused a schema, or does not have one a worker needs."""

    exit_code = 1


def subjects(prefix: str) -> dict[str, str]:
    """Subject -> envelope schema name, for every topic that carries an envelope."""
    return {
        f"{prefix}{t.name}-value": f"llmpipe.{t.envelope.__name__}"
        for t in topology.TOPICS.values()
        if t.envelope is not None
    }


@dataclass(frozen=True)
class SubjectChange:
    subject: str
    action: str
    detail: str


def registry_client(settings: Settings) -> SchemaRegistryClient:
    """The process's client for ``LLMPIPE_SCHEMA_REGISTRY_URL`` (``mock://...``: the
    in-memory one confluent-kafka ships, for tests)."""
    url = settings.schema_registry_url
    if not url:
        raise RegistryError("LLMPIPE_SCHEMA_REGISTRY_URL is not set")
    auth = settings.schema_registry_basic_auth
    user_info = auth.get_secret_value() if auth else None
    ca = str(settings.schema_registry_cafile) if settings.schema_registry_cafile else None
    key = (url, user_info, ca)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            conf: dict[str, Any] = {"url": url}
            if user_info:
                conf["basic.auth.user.info"] = user_info
            if ca:
                conf["ssl.ca.location"] = ca
            client = _clients[key] = SchemaRegistryClient.new_client(conf)
        return client


def _schema(codec: Codec, name: str) -> Schema:
    return Schema(json.dumps(codec.registry_schema(name)), AVRO)


def _registered(client: SchemaRegistryClient, subject: str, schema: Schema) -> int | None:
    """The id of ``schema`` under ``subject``, None if it is not registered there."""
    try:
        found = client.lookup_schema(subject, schema).schema_id
        return int(found) if found is not None else None
    except SchemaRegistryError as exc:
        if exc.error_code in (_SUBJECT_NOT_FOUND, _SCHEMA_NOT_FOUND) or exc.http_status_code == 404:
            return None
        raise


def _has_versions(client: SchemaRegistryClient, subject: str) -> bool:
    try:
        return bool(client.get_versions(subject))
    except SchemaRegistryError as exc:
        if exc.error_code == _SUBJECT_NOT_FOUND or exc.http_status_code == 404:
            return False
        raise


def plan_subjects(
    client: SchemaRegistryClient, codec: Codec, prefix: str
) -> tuple[list[SubjectChange], list[str]]:
    """What :func:`apply_subjects` would do, and the schemas the registry would refuse."""
    changes: list[SubjectChange] = []
    refused: list[str] = []
    try:
        for subject, name in subjects(prefix).items():
            schema = _schema(codec, name)
            if _registered(client, subject, schema) is not None:
                continue
            if not _has_versions(client, subject):
                changes.append(SubjectChange(subject, "register", f"{name}, first version"))
            elif client.test_compatibility(subject, schema):
                changes.append(SubjectChange(subject, "register", f"{name}, new version"))
            else:
                level = _compatibility(client, subject)
                refused.append(
                    f"{subject}: {name} in schemas/ is not {level}-compatible with the "
                    "subject's latest version"
                )
    except Exception as exc:  # the registry's answer, or the HTTP client's own error
        raise RegistryError(_failed(exc)) from None
    return changes, refused


def apply_subjects(client: SchemaRegistryClient, codec: Codec, prefix: str) -> list[SubjectChange]:
    """Register every envelope's schema under its topics' subjects; refuse (and register
    nothing) if the registry finds any incompatible with what is there."""
    changes, refused = plan_subjects(client, codec, prefix)
    if refused:
        raise RegistryError("; ".join(refused))
    names = subjects(prefix)
    registered = []
    try:
        for change in changes:
            schema_id = client.register_schema(
                change.subject, _schema(codec, names[change.subject])
            )
            registered.append(replace(change, detail=f"{change.detail} (id {schema_id})"))
    except Exception as exc:  # the registry's answer, or the HTTP client's own error
        raise RegistryError(_failed(exc)) from None
    return registered


def _compatibility(client: SchemaRegistryClient, subject: str) -> str:
    try:
        return str(client.get_compatibility(subject))
    except SchemaRegistryError:
        return "the registry's"


def _failed(exc: Exception) -> str:
    """One line for a registry call that failed: its answer, or why there was none."""
    if isinstance(exc, SchemaRegistryError):
        return f"Schema Registry: {exc.error_message} (HTTP {exc.http_status_code})"
    return (
        f"Schema Registry unreachable: {exc} (LLMPIPE_SCHEMA_REGISTRY_URL, "
        "LLMPIPE_SCHEMA_REGISTRY_CAFILE)"
    )


class RegistryWire:
    """:class:`~pipeline.contract.codec.SchemaWire` on confluent-kafka's serializers."""

    def __init__(
        self, client: SchemaRegistryClient, schemas: Mapping[str, dict[str, Any]], prefix: str
    ) -> None:
        self._client = client
        self._schemas = schemas
        # An envelope's frames carry the id of its schema under its first topic's subject.
        self._subject: dict[str, str] = {}
        for subject, name in subjects(prefix).items():
            self._subject.setdefault(name, subject)
        self._serializers: dict[str, AvroSerializer] = {}
        self._deserializers: dict[str, AvroDeserializer] = {}
        self._lock = threading.Lock()

    def _serializer(self, name: str) -> AvroSerializer:
        serializer = self._serializers.get(name)
        if serializer is None:
            subject = self._subject.get(name)
            if subject is None:
                raise ValueError(f"{name} travels on no topic: the registry has no subject for it")
            with self._lock:
                serializer = self._serializers[name] = AvroSerializer(
                    self._client,
                    json.dumps(registry_schema(self._schemas, name)),
                    conf={
                        "auto.register.schemas": False,
                        "subject.name.strategy": lambda _ctx, _record: subject,
                    },
                )
        return serializer

    def _deserializer(self, name: str) -> AvroDeserializer:
        deserializer = self._deserializers.get(name)
        if deserializer is None:
            with self._lock:
                deserializer = self._deserializers[name] = AvroDeserializer(
                    self._client, json.dumps(registry_schema(self._schemas, name))
                )
        return deserializer

    def encode(self, name: str, record: dict[str, Any]) -> bytes:
        serializer = self._serializer(name)
        frame = serializer(record, SerializationContext(self._subject[name], MessageField.VALUE))
        assert frame is not None  # None only for a None record
        return frame

    def decode(self, name: str, data: bytes) -> Any:
        schema_id = int.from_bytes(data[1:5], "big")
        try:
            self._client.get_schema(schema_id)  # cached after the first frame of each id
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                raise DecodeError(
                    "decode_error", f"schema id {schema_id} is not in the Schema Registry"
                ) from None
            raise SchemaUnavailable(_failed(exc)) from None
        except Exception as exc:  # the HTTP client's own errors: refused, timed out, TLS
            raise SchemaUnavailable(_failed(exc)) from None
        return self._deserializer(name)(data, SerializationContext("", MessageField.VALUE))

    def check(self, names: list[str]) -> None:
        """Fail in one line unless the registry has each schema this process writes (the
        lookups also fill the client's cache: the first frames cost no request)."""
        missing = []
        try:
            for name in names:
                subject = self._subject[name]
                schema = Schema(json.dumps(registry_schema(self._schemas, name)), AVRO)
                if _registered(self._client, subject, schema) is None:
                    missing.append(f"{name} under {subject}")
        except Exception as exc:  # the registry's answer, or the HTTP client's own error
            raise RegistryError(_failed(exc)) from None
        if missing:
            raise RegistryError(
                f"the Schema Registry does not have {', '.join(missing)}; run "
                "`llmpipe topics apply` (workers never register schemas)"
            )
