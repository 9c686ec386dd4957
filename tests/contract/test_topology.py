"""The topology is the pipeline's shape, and the only thing to change to add a stage or route.

The ``enrich_stage`` fixture adds a throw-away stage between settle and ``llm.results``
with exactly the edits a real change would make, one per file:

1. the stage's logic (``EnrichStage`` here; ``pipeline/stages/enrich.py`` in real life);
2. ``pipeline/contract/topology.py``: its topic and route, its stage entry, and settle's
   ``result`` outcome wired to it;
3. ``pipeline/stages/table.py``: the factory that builds it;
4. ``topics/llm.stage.enrich.yaml``: the topic itself (the fixture creates it directly).

Every reader then picks it up unchanged: the worker (on a real broker), the prompt test
harness, the DLQ tools, ``llmpipe trace``, the ledger and the metrics.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import pytest
from confluent_kafka.admin import AdminClient, NewTopic
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from pipeline.cli.trace import find_journey
from pipeline.config import Settings
from pipeline.contract import topology
from pipeline.contract.decisions import Decision
from pipeline.contract.envelopes import Request, Result, Usage, ValidationReport, utc_now
from pipeline.contract.topology import RESULTS, ROUTE_RESULT, SETTLE, Stage, Topic
from pipeline.dlq.model import DeadLetterView, build_filter
from pipeline.dlq.replay import ReplaySelector
from pipeline.evaluation.harness import RecordedAnswerClient, StageHarness
from pipeline.harness.fakellm import running_fake_llm
from pipeline.harness.ledger import read_terminal
from pipeline.harness.scenarios import mixed_requests
from pipeline.observability import semconv as sc
from pipeline.observability.metrics import PipelineMetrics
from pipeline.observability.testing import metric_points
from pipeline.stages import table
from pipeline.stages.decisions import emit_result
from pipeline.transport import headers as h
from pipeline.transport.reader import SourceRecord
from tests.stage_support import GOOD_ANSWER, REGISTRY, validated
from tests.support import produce, running_worker

ENRICH = "enrich"
ENRICH_TOPIC = "llm.stage.enrich"
ENRICH_ROUTE = "enriched"


class EnrichStage:
    """Passes every result on, remembering which requests it saw."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, result: Result) -> Decision:
        self.seen.append(result.request_id)
        return emit_result(ENRICH, result)


@pytest.fixture
def enrich_stage(monkeypatch: pytest.MonkeyPatch) -> Iterator[EnrichStage]:
    stage = EnrichStage()
    # In pipeline order, as the line would be written in topology.py (trace sorts by it).
    topics = list(topology.TOPICS.values())
    at = [t.name for t in topics].index(topology.COMPLETIONS) + 1
    topics.insert(at, Topic(ENRICH_TOPIC, Result, ENRICH_ROUTE, step="enriched"))
    monkeypatch.setattr(topology, "TOPICS", {t.name: t for t in topics})
    monkeypatch.setitem(
        topology.STAGES, ENRICH, Stage(ENRICH, ENRICH_TOPIC, Result, {ROUTE_RESULT: RESULTS})
    )
    settle = topology.STAGES[SETTLE]
    rewired = dataclasses.replace(settle, outputs={**settle.outputs, ROUTE_RESULT: ENRICH_TOPIC})
    monkeypatch.setitem(topology.STAGES, SETTLE, rewired)
    monkeypatch.setitem(table.HANDLERS, ENRICH, lambda deps: stage)
    yield stage


# -- the table itself -------------------------------------------------------------------


def test_both_halves_of_the_stage_table_name_the_same_stages() -> None:
    assert list(table.HANDLERS) == list(topology.STAGES)


def test_every_output_is_a_known_topic_and_every_path_ends_in_a_terminal_topic() -> None:
    for stage in topology.STAGES.values():
        assert stage.input_topic in topology.TOPICS, stage.name
        assert topology.TOPICS[stage.input_topic].envelope is stage.input_envelope, stage.name
        for outcome, topic in stage.outputs.items():
            assert topic in topology.TOPICS, (stage.name, outcome)
            assert topology.TOPICS[topic].route is not None, (stage.name, topic)
    # Follow every output from the first stage: each topic is read by a stage or terminal,
    # and no path loops.
    seen: set[str] = set()

    def walk(topic: str, path: tuple[str, ...]) -> None:
        assert topic not in path, f"loop: {' -> '.join((*path, topic))}"
        seen.add(topic)
        reader = topology.stage_reading(topic)
        if reader is None:
            assert topology.TOPICS[topic].terminal, f"nothing reads {topic} and it is not terminal"
            return
        for nxt in reader.outputs.values():
            walk(nxt, (*path, topic))

    walk(topology.REQUESTS, ())
    assert set(topology.terminal_topics()) - {topology.DLQ} <= seen


def test_route_lookups_agree_with_the_tables() -> None:
    for topic in topology.TOPICS.values():
        if topic.route is not None:
            assert topology.route_of(topic.name) == topic.route
            assert topology.topic_of(topic.route) == topic.name
    assert topology.terminal_routes() == {"result", "review", "dead_letter"}
    with pytest.raises(topology.UnknownRoute):
        topology.route_of(topology.REQUESTS)
    with pytest.raises(topology.UnknownRoute):
        topology.output(topology.VALIDATE, ROUTE_RESULT)


# -- a throw-away stage: every reader picks it up ---------------------------------------


async def test_the_prompt_harness_runs_the_new_stage(enrich_stage: EnrichStage) -> None:
    request = Request(
        request_id="h-1",
        prompt="ticket_triage",
        variables={"subject": "Charged twice", "body": "My invoice charged me twice."},
    )
    outcome = await StageHarness(REGISTRY).run(
        request, RecordedAnswerClient(json.dumps(GOOD_ANSWER))
    )
    assert outcome.route == "result" and outcome.output == GOOD_ANSWER
    assert enrich_stage.seen == ["h-1"]


def test_dead_letter_tools_know_the_new_stage(enrich_stage: EnrichStage) -> None:
    result = Result(
        request_id="d-1",
        status="ok",
        output=GOOD_ANSWER,
        confidence=0.9,
        source="model",
        prompt=validated().prompt,
        usage=Usage(),
        latency_ms=1.0,
        attempts=1,
        validation=ValidationReport(),
        produced_at=utc_now(),
    )
    headers = h.dead_letter_headers(
        {h.CONTENT_TYPE: b"application/json"},
        topic="",
        partition=0,
        offset=0,
        timestamp_ms=None,
        group="g",
        stage=ENRICH,
        reason="internal_error",
        error_class="RuntimeError",
        error_message="boom",
        attempts=1,
        request_id="d-1",
        prompt=None,
    )
    record = SourceRecord(
        topic="p.llm.dlq",
        partition=0,
        offset=0,
        timestamp_ms=None,
        key=b"d-1",
        value=result.model_dump_json().encode(),
        headers=tuple((k, v) for k, v in headers if k != h.DLQ_TOPIC),
    )
    view = DeadLetterView(record)
    assert view.decoded.envelope == result
    replay = ReplaySelector(Settings(topic_prefix="p."), build_filter(), group="g")
    assert replay.destination(view) == f"p.{ENRICH_TOPIC}"


def test_metrics_count_the_new_route_but_not_as_an_end(enrich_stage: EnrichStage) -> None:
    reader = InMemoryMetricReader()
    metrics = PipelineMetrics(MeterProvider(metric_readers=[reader]).get_meter("t"))
    metrics.record_decision(SETTLE, ENRICH_ROUTE, None, None, duration_s=0.1)
    metrics.record_decision(ENRICH, ROUTE_RESULT, None, None, duration_s=0.1)
    data = reader.get_metrics_data()
    routes = {attrs[sc.ROUTE] for attrs, _ in metric_points(data, sc.STAGE_MESSAGES)}
    assert routes == {ENRICH_ROUTE, ROUTE_RESULT}
    ended = [(attrs[sc.ROUTE], p.value) for attrs, p in metric_points(data, sc.REQUESTS)]
    assert ended == [(ROUTE_RESULT, 1)]


@pytest.mark.kafka
def test_a_worker_runs_the_new_stage_and_trace_and_ledger_follow_it(
    kafka_settings: Settings, enrich_stage: EnrichStage
) -> None:
    admin = AdminClient(kafka_settings.kafka_client_config())
    enrich_topic = kafka_settings.topic(ENRICH_TOPIC)
    admin.create_topics([NewTopic(enrich_topic, 2, 1)])[enrich_topic].result(30)
    planned = mixed_requests(6, seed=5, weights={"valid": 1}, prefix="enrich")
    with running_fake_llm() as fake:
        settings = kafka_settings.model_copy(update={"model_base_url": fake.url})
        with running_worker(settings) as worker:
            assert [r.stage for r in worker.runners] == list(topology.STAGES)
            produce(settings, topology.REQUESTS, [(p.key, p.value, p.headers) for p in planned])
            ids = [p.request_id for p in planned]
            ledger = read_terminal(settings, ids, timeout_s=60)
    assert not ledger.missing and not ledger.duplicates
    assert all(ledger.first(i).outcome == "result:model" for i in ids)
    assert sorted(enrich_stage.seen) == sorted(ids)
    steps = [stop.step for stop in find_journey(settings, ids[0])]
    assert steps == ["request received", "validated", "model answered", "enriched", "result"]
