"""Which codec a process uses, and the Schema Registry check a worker makes at start.

Every process that writes pipeline topics imports this; the Schema Registry edge itself
(:mod:`pipeline.transport.schema_registry`: subjects as code, Confluent frames through
confluent-kafka's Avro serializers) is imported only once ``LLMPIPE_SCHEMA_REGISTRY_URL``
is set. confluent-kafka's registry client brings authlib, httpx and their dependencies:
about 280 modules and 16 MiB of RSS per process (measured), which a worker without a
registry (the default) never loads.
"""

from __future__ import annotations

from pipeline.config import Settings
from pipeline.contract.codec import Codec, load_schemas


def codec_for(settings: Settings) -> Codec:
    """The codec a process that writes pipeline topics uses: ``LLMPIPE_OUTPUT_FORMAT``, and
    Confluent frames read by their writer's schema when a registry is configured."""
    if not settings.schema_registry_url:
        return Codec(output_format=settings.output_format)
    from pipeline.transport.schema_registry import RegistryWire, registry_client

    schemas = load_schemas()
    wire = RegistryWire(registry_client(settings), schemas, settings.topic_prefix)
    return Codec(schemas, settings.output_format, wire)


def require_schemas(settings: Settings) -> None:
    """For a worker writing Confluent frames: the registry has every envelope schema under
    its subjects, or one line says which are missing (before any message is taken)."""
    from pipeline.transport.schema_registry import RegistryWire, registry_client, subjects

    wire = RegistryWire(registry_client(settings), load_schemas(), settings.topic_prefix)
    wire.check(sorted(set(subjects(settings.topic_prefix).values())))
