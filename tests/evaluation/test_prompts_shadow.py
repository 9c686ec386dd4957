"""Shadow runs: compare a candidate with what served, from real topics, producing nothing."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import UTC, datetime

import pytest
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient
from rich.console import Console
from typer.testing import CliRunner

from pipeline.cli.prompts import prompts_app
from pipeline.config import REPO_ROOT, Settings
from pipeline.contract.envelopes import PromptRef, Request, Usage, ValidatedRequest
from pipeline.evaluation.harness import Outcome, live_client
from pipeline.evaluation.shadow import (
    NOT_FOUND,
    Served,
    ShadowReport,
    arm_stats,
    compare,
    percentile,
    report_renderable,
    resolve_outcome,
    shadow_run,
)
from pipeline.harness.fakellm import running_fake_llm
from pipeline.harness.ledger import read_terminal
from pipeline.prompts import PromptRegistry
from pipeline.transport.topics import load_specs
from tests.support import produce, running_worker

EXAMPLES = REPO_ROOT / "prompts"
REGISTRY = PromptRegistry.load(EXAMPLES)
NAME = "ticket_triage"
LATEST = REGISTRY.get(NAME).version  # what serves when nothing is pinned


def served(rid: str, version: int = 2, outcome: Outcome | None = None, ts: int = 0) -> Served:
    validated = ValidatedRequest(
        request=Request(request_id=rid, prompt=NAME, variables={"subject": "s", "body": "b"}),
        prompt=PromptRef(name=NAME, version=version, hash="sha256:" + "0" * 64, arm="latest"),
        received_at=datetime(2024, 5, 1, tzinfo=UTC),
    )
    return Served(validated, ts, outcome)


def result(label: str, confidence: float = 0.9, tokens: int = 10) -> Outcome:
    return Outcome(
        route="result",
        output={"label": label},
        confidence=confidence,
        usage=Usage(prompt_tokens=tokens, completion_tokens=1),
        answer_valid=True,
    )


FALLBACK = Outcome(route="fallback", output={"label": "other"}, confidence=0.0, reason="x")


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([0.3], 0.9) == 0.3
    values = [float(i) for i in range(1, 11)]
    assert (percentile(values, 0.5), percentile(values, 0.9), percentile(values, 1.0)) == (
        5.0,
        9.0,
        10.0,
    )


def test_arm_stats_count_missing_outcomes_separately() -> None:
    stats = arm_stats("arm", [result("a", 0.5), FALLBACK, None])
    assert (stats.requests, stats.found, stats.answer_valid) == (3, 2, 1)
    assert stats.routes == Counter({"result": 1, "fallback": 1, NOT_FOUND: 1})
    assert stats.confidence_mean == pytest.approx(0.25)
    assert stats.answer_valid_rate == 0.5
    assert stats.prompt_tokens == 10 and stats.tokens_per_request == pytest.approx(5.5)


def test_compare_lists_differences_and_agreement() -> None:
    production = [
        served("a", outcome=result("bug", 0.9)),
        served("b", outcome=FALLBACK),
        served("c", version=1, outcome=None),
    ]
    shadow = {"a": result("bug", 0.7), "b": result("billing"), "c": result("bug")}
    report = compare(NAME, 1, production, shadow, samples=5)
    assert (report.compared, report.agreeing) == (2, 1)
    assert [d.request_id for d in report.differences] == ["b", "c"]
    assert report.serving.label == "ticket_triage@1 (latest) x1, @2 (latest) x2"
    assert report.shadow.routes == Counter({"result": 3})
    assert compare(NAME, 1, production, shadow, samples=1).differences[0].request_id == "b"
    console = Console(record=True, width=200)
    console.print(report_renderable(report))
    text = console.export_text()
    assert "pass rate (valid model answer)" in text and "1/2 (50%)" in text
    assert "differing outputs (first 2)" in text and '{"label": "billing"}' in text


def test_resolve_outcome_prefers_what_the_pipeline_decided() -> None:
    human = Outcome(route="review", output={"label": "bug"}, reason="low_confidence")
    review = Outcome(route="review", reason="low_confidence")
    assert resolve_outcome({}) is None
    assert resolve_outcome({"llm.results": [human], "llm.review": [review]}) is review
    assert resolve_outcome({"llm.results": [human, FALLBACK], "llm.review": [review]}) is FALLBACK
    assert resolve_outcome({"llm.results": [human]}) is human


# -- against the real broker, a real worker and the fake model -----------------------------


def ticket(
    rid: str, answer: dict[str, str], version: int | None = None
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    body = {
        "request_id": rid,
        "prompt": NAME,
        "prompt_version": version,
        "variables": {
            "subject": "Charged twice this month",
            "body": f"My credit card was charged twice.\n[[answer:{json.dumps(answer)}]]",
        },
    }
    return rid.encode(), json.dumps(body).encode(), [("content-type", b"application/json")]


def topic_counts(settings: Settings) -> dict[str, int]:
    consumer = Consumer({**settings.kafka_client_config(), "group.id": "llmpipe-test-counts"})
    try:
        counts = {}
        for spec in load_specs(settings.topics_dir):
            topic = settings.topic(spec.name)
            counts[spec.name] = sum(
                consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in range(spec.partitions)
            )
        return counts
    finally:
        consumer.close()


FINE = {"label": "billing", "priority": "normal", "summary": "Customer was charged twice."}
URGENT = {"label": "billing", "priority": "urgent", "summary": "Customer was charged twice."}


@pytest.mark.kafka
def test_shadow_run_against_real_topics_writes_nothing(kafka_settings: Settings) -> None:
    planned = [ticket(f"fine-{i}", FINE) for i in range(8)]
    planned += [ticket(f"urgent-{i}", URGENT) for i in range(4)]  # v2 rejects, v1 accepts
    planned += [ticket("served-by-v1", FINE, version=1)]  # the candidate: left out
    other = json.dumps({"request_id": "inv-1", "prompt": "invoice_extract", "variables": {}})
    with running_fake_llm() as fake:
        settings = kafka_settings.model_copy(update={"model_base_url": fake.url})
        with running_worker(settings):
            produce(settings, "llm.requests", [*planned, (b"inv-1", other.encode(), [])])
            ledger = read_terminal(settings, [p[0].decode() for p in planned], timeout_s=30)
        assert not ledger.missing
        before = topic_counts(settings)
        groups_before = group_ids(settings)

        async def run() -> ShadowReport:
            client = live_client(settings)
            try:
                return await shadow_run(settings, REGISTRY, NAME, 1, 50, client, samples=3)
            finally:
                await client.aclose()

        report = asyncio.run(run())
        env = {
            "LLMPIPE_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "LLMPIPE_TOPIC_PREFIX": settings.topic_prefix,
            "LLMPIPE_MODEL_BASE_URL": fake.url,
        }
        args = ["shadow", NAME, "--candidate", "1", "--limit", "5", "--prompts-dir", str(EXAMPLES)]
        cli = CliRunner().invoke(prompts_app, args, env=env)
        after = topic_counts(settings)

    assert report.serving.requests == report.shadow.requests == 12
    serving, shadow = report.serving, report.shadow
    assert serving.label == f"ticket_triage@{LATEST} (latest) x12"
    assert serving.routes == Counter({"result": 8, "fallback": 4})
    assert shadow.routes == Counter({"result": 12})
    assert (serving.answer_valid, shadow.answer_valid) == (8, 12)
    assert serving.completion_tokens > 0 and shadow.completion_tokens > 0
    assert (report.compared, report.agreeing) == (12, 8)
    differences = report.differences
    assert len(differences) == 3
    assert all(d.serving.route == "fallback" and d.candidate.route == "result" for d in differences)
    assert all(d.candidate.output["priority"] == "urgent" for d in differences)

    assert cli.exit_code == 0, cli.stderr
    assert (
        "pass rate (valid model answer)" in cli.stdout and "ticket_triage@1 (shadow)" in cli.stdout
    )
    assert after == before, "a shadow run must not produce to any topic"
    assert committed_on_run_topics(settings, groups_before), "the workers' own commits are seen"
    assert not committed_on_run_topics(settings, group_ids(settings) - groups_before), (
        "a shadow run must not commit offsets for any consumer group"
    )


def group_ids(settings: Settings) -> set[str]:
    """Every consumer group on the broker (other tests' groups included)."""
    admin = AdminClient(settings.kafka_client_config())
    listed = admin.list_consumer_groups(request_timeout=60).result(90)
    return {g.group_id for g in listed.valid}


def committed_on_run_topics(settings: Settings, groups: set[str]) -> dict[str, list[str]]:
    """The groups among ``groups`` that committed an offset on one of this run's topics.

    Tests running beside this one create groups of their own; only a commit on
    a topic under this run's prefix can have come from the shadow run.
    """
    admin = AdminClient(settings.kafka_client_config())
    found: dict[str, list[str]] = {}
    for group in sorted(groups):
        futures = admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group)], request_timeout=60
        )
        offsets = futures[group].result(90).topic_partitions or []
        ours = [tp.topic for tp in offsets if tp.topic.startswith(settings.topic_prefix)]
        if ours:
            found[group] = ours
    return found
