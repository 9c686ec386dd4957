"""Topics as code: ``topics/*.yaml`` is the desired state, the cluster is made to match.

``plan`` is read-only so an operator can see what ``apply`` will do before it does it.
Partition counts are never lowered (Kafka cannot, and keys would move partitions anyway).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import LlmpipeError

ADMIN_TIMEOUT_S = 30.0


class TopicSpecError(LlmpipeError):
    """A topic file that cannot be read; the message names the file and the field."""


class TopicPlanError(LlmpipeError):
    """A change the cluster cannot make, such as lowering a partition count."""


class TopicSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    partitions: int = Field(ge=1)
    replication_factor: int = Field(ge=1)
    configs: dict[str, str] = Field(default_factory=dict)


def load_specs(directory: Path) -> list[TopicSpec]:
    specs: list[TopicSpec] = []
    for path in sorted(directory.glob("*.yaml")):
        try:
            specs.append(TopicSpec.model_validate(yaml.safe_load(path.read_text())))
        except yaml.YAMLError as exc:
            raise TopicSpecError(f"{path}: invalid YAML: {exc}") from None
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise TopicSpecError(f"{path}: {loc}: {err['msg']}") from None
    return specs


@dataclass
class TopicChange:
    topic: str
    action: str  # create | add_partitions | alter_configs
    detail: str
    partitions: int = 0
    configs: dict[str, str] = field(default_factory=dict)


@dataclass
class Plan:
    changes: list[TopicChange]
    errors: list[str]

    @property
    def empty(self) -> bool:
        return not self.changes and not self.errors


def plan(admin: AdminClient, specs: list[TopicSpec], prefix: str = "") -> Plan:
    """Compare the files with the cluster; configs are compared only for keys the file sets."""
    metadata = admin.list_topics(timeout=ADMIN_TIMEOUT_S)
    changes: list[TopicChange] = []
    errors: list[str] = []
    existing = [s for s in specs if prefix + s.name in metadata.topics]
    current_configs = _describe(admin, [prefix + s.name for s in existing])
    for spec in specs:
        name = prefix + spec.name
        if name not in metadata.topics:
            detail = f"{spec.partitions} partitions, rf {spec.replication_factor}"
            changes.append(TopicChange(name, "create", detail, spec.partitions, spec.configs))
            continue
        have = len(metadata.topics[name].partitions)
        if spec.partitions < have:
            errors.append(
                f"{name}: declared {spec.partitions} partitions but the cluster has {have}; "
                "Kafka cannot lower a partition count (create a new topic instead)"
            )
        elif spec.partitions > have:
            detail = f"partitions {have} -> {spec.partitions}"
            changes.append(TopicChange(name, "add_partitions", detail, spec.partitions))
        live = current_configs.get(name, {})
        drift = {k: v for k, v in spec.configs.items() if live.get(k) != v}
        if drift:
            detail = ", ".join(f"{k}: {live.get(k)} -> {v}" for k, v in sorted(drift.items()))
            changes.append(TopicChange(name, "alter_configs", detail, configs=drift))
    return Plan(changes, errors)


def apply(admin: AdminClient, specs: list[TopicSpec], prefix: str = "") -> Plan:
    """Make the cluster match; refuses the whole run if any change is impossible."""
    result = plan(admin, specs, prefix)
    if result.errors:
        raise TopicPlanError("; ".join(result.errors))
    by_name = {prefix + s.name: s for s in specs}
    creates = [
        NewTopic(
            c.topic,
            num_partitions=c.partitions,
            replication_factor=by_name[c.topic].replication_factor,
            config=dict(c.configs),
        )
        for c in result.changes
        if c.action == "create"
    ]
    if creates:
        _wait(admin.create_topics(creates, operation_timeout=ADMIN_TIMEOUT_S))
    grows = [
        NewPartitions(c.topic, c.partitions) for c in result.changes if c.action == "add_partitions"
    ]
    if grows:
        _wait(admin.create_partitions(grows))
    alters = [
        ConfigResource(
            ConfigResource.Type.TOPIC,
            c.topic,
            incremental_configs=[
                ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
                for k, v in c.configs.items()
            ],
        )
        for c in result.changes
        if c.action == "alter_configs"
    ]
    if alters:
        _wait(admin.incremental_alter_configs(alters))
    if result.changes:
        _converge(admin, specs, prefix)
    return result


def _converge(admin: AdminClient, specs: list[TopicSpec], prefix: str) -> None:
    """Return only once the cluster reports the new state: metadata and configs reach all
    brokers shortly after the admin call succeeds, and callers act on them right away."""
    deadline = time.monotonic() + ADMIN_TIMEOUT_S
    while not plan(admin, specs, prefix).empty:
        if time.monotonic() > deadline:
            raise TopicPlanError(
                f"the cluster did not reflect the changes within {ADMIN_TIMEOUT_S}s"
            )
        time.sleep(0.1)


def _describe(admin: AdminClient, topics: list[str]) -> dict[str, dict[str, str]]:
    if not topics:
        return {}
    resources = [ConfigResource(ConfigResource.Type.TOPIC, t) for t in topics]
    out: dict[str, dict[str, str]] = {}
    for resource, future in admin.describe_configs(resources).items():
        entries = future.result(timeout=ADMIN_TIMEOUT_S)
        out[resource.name] = {k: e.value for k, e in entries.items()}
    return out


def _wait(futures: Mapping[Any, Future[Any]]) -> None:
    for future in futures.values():
        future.result(timeout=ADMIN_TIMEOUT_S)


STRIMZI_API_VERSION = "kafka.strimzi.io/v1"
STRIMZI_HEADER = (
    "# Strimzi KafkaTopic resources for topics/*.yaml, written by\n"
    "# `llmpipe topics export --format strimzi`: regenerate, do not edit.\n"
)


def strimzi_topics(
    specs: list[TopicSpec], prefix: str = "", cluster: str = "my-cluster", namespace: str = ""
) -> str:
    """The topic files as Strimzi ``KafkaTopic`` resources, one YAML document each.

    Why a second rendering of the same files: on Kubernetes the Strimzi topic operator,
    not ``llmpipe topics apply``, owns the topics, and the two must never disagree (the
    Helm chart ships this output; a test compares it with ``topics/*.yaml``).
    ``spec.topicName`` carries the real name because a resource name cannot (``_`` and
    capitals are not allowed in Kubernetes names).
    """
    documents = []
    for spec in specs:
        topic = f"{prefix}{spec.name}"
        metadata: dict[str, Any] = {
            "name": topic.lower().replace("_", "-"),
            "labels": {"strimzi.io/cluster": cluster},
        }
        if namespace:
            metadata["namespace"] = namespace
        resource = {
            "apiVersion": STRIMZI_API_VERSION,
            "kind": "KafkaTopic",
            "metadata": metadata,
            "spec": {
                "topicName": topic,
                "partitions": spec.partitions,
                "replicas": spec.replication_factor,
                "config": dict(spec.configs),
            },
        }
        documents.append("---\n" + yaml.safe_dump(resource, sort_keys=False))
    return STRIMZI_HEADER + "".join(documents)
