"""Topics as code against the real broker: create, no-op, config drift, refused shrink."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest
import yaml
from confluent_kafka.admin import AdminClient, ConfigResource

from pipeline.config import REPO_ROOT
from pipeline.transport.topics import TopicPlanError, apply, load_specs, plan
from tests.support import SESSION

pytestmark = pytest.mark.kafka

REQUIRED = {
    "llm.requests",
    "llm.stage.validated",
    "llm.stage.completions",
    "llm.results",
    "llm.fallback",
    "llm.review",
    "llm.review.decisions",
    "llm.corrections",
    "llm.dlq",
    "llm.control",
    "llm.burn_in",
}


def _configs(admin: AdminClient, topic: str) -> dict[str, str]:
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    entries = admin.describe_configs([resource])[resource].result(timeout=30)
    return {k: e.value for k, e in entries.items()}


@pytest.fixture
def topics_dir(tmp_path: Path) -> Path:
    target = tmp_path / "topics"
    shutil.copytree(REPO_ROOT / "topics", target)
    return target


def test_apply_creates_every_declared_topic_then_changes_nothing(
    kafka_bootstrap: str, topics_dir: Path
) -> None:
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    prefix = f"topics-{SESSION}-{uuid.uuid4().hex[:4]}."
    specs = load_specs(topics_dir)
    assert {s.name for s in specs} >= REQUIRED
    first = apply(admin, specs, prefix)
    assert sorted(c.topic for c in first.changes if c.action == "create") == sorted(
        prefix + s.name for s in specs
    )
    metadata = admin.list_topics(timeout=30)
    for spec in specs:
        assert len(metadata.topics[prefix + spec.name].partitions) == spec.partitions
        live = _configs(admin, prefix + spec.name)
        for key, value in spec.configs.items():
            assert live[key] == value, f"{spec.name}.{key}"
    assert _configs(admin, prefix + "llm.control")["cleanup.policy"] == "compact"
    assert plan(admin, specs, prefix).empty
    assert apply(admin, specs, prefix).empty


def test_config_change_is_applied_and_lowering_partitions_is_refused(
    kafka_bootstrap: str, topics_dir: Path
) -> None:
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    prefix = f"topics-{SESSION}-{uuid.uuid4().hex[:4]}."
    apply(admin, load_specs(topics_dir), prefix)

    results_file = topics_dir / "llm.results.yaml"
    spec = yaml.safe_load(results_file.read_text())
    spec["configs"]["retention.ms"] = "3600000"
    spec["partitions"] = 8
    results_file.write_text(yaml.safe_dump(spec))
    changed = plan(admin, load_specs(topics_dir), prefix)
    assert {(c.topic, c.action) for c in changed.changes} == {
        (prefix + "llm.results", "alter_configs"),
        (prefix + "llm.results", "add_partitions"),
    }
    apply(admin, load_specs(topics_dir), prefix)
    assert _configs(admin, prefix + "llm.results")["retention.ms"] == "3600000"
    assert len(admin.list_topics(timeout=30).topics[prefix + "llm.results"].partitions) == 8

    spec["partitions"] = 2
    results_file.write_text(yaml.safe_dump(spec))
    with pytest.raises(TopicPlanError, match="cannot lower a partition count"):
        apply(admin, load_specs(topics_dir), prefix)
    assert len(admin.list_topics(timeout=30).topics[prefix + "llm.results"].partitions) == 8
