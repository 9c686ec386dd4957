"""``llmpipe prompts stats``: per-version cost, latency, fallback and review rates."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pipeline.cli.prompts import prompts_app
from pipeline.config import Settings
from pipeline.contract.codec import Codec
from pipeline.contract.envelopes import PromptRef, Result, Usage, ValidationReport, utc_now
from pipeline.evaluation.stats import prompt_stats
from tests.support import produce


def _result(
    i: int,
    version: int,
    source: str,
    cost: float | None,
    latency: float,
    confidence: float = 0.9,
) -> Result:
    return Result(
        request_id=f"r-{version}-{i}",
        status="ok",
        output={"label": "bug"},
        confidence=confidence,
        source=source,  # type: ignore[arg-type]
        prompt=PromptRef(name="ticket_triage", version=version, hash="sha256:" + "0" * 64),
        model="gpt-4o-mini" if source == "model" else None,
        usage=Usage(prompt_tokens=100, completion_tokens=20, cost_usd=cost),
        latency_ms=latency,
        attempts=2 if source == "fallback" else 1,
        validation=ValidationReport(),
        produced_at=utc_now(),
    )


RESULTS = [
    _result(0, 1, "model", 0.001, 100.0, 0.8),
    _result(1, 1, "model", 0.003, 300.0, 0.6),
    _result(2, 1, "fallback", 0.002, 200.0),
    _result(3, 1, "human", None, 400.0),
    _result(0, 2, "model", 0.001, 50.0),
]


def test_rates_cost_and_latency_per_prompt_version() -> None:
    v1, v2 = prompt_stats(RESULTS)
    assert (v1.ref, v1.results, v2.ref, v2.results) == ("ticket_triage@1", 4, "ticket_triage@2", 1)
    assert (v1.model_rate, v1.fallback_rate, v1.review_rate) == (0.5, 0.25, 0.25)
    assert v1.mean_confidence == pytest.approx(0.7)  # model answers only
    assert v1.cost_usd == pytest.approx(0.006) and v1.unpriced == 1
    assert v1.cost_per_result_usd == pytest.approx(0.002)
    assert (v1.latency_ms(0.5), v1.latency_ms(0.95)) == (200.0, 400.0)
    assert v1.mean_attempts == 1.25 and v1.models == {"gpt-4o-mini": 2}
    assert prompt_stats(RESULTS, name="cited_answer") == []


def test_stats_read_the_results_topic(kafka_settings: Settings) -> None:
    codec = Codec()
    messages = []
    for result in RESULTS:
        value, content_type = codec.encode(result)
        messages.append(
            (result.request_id.encode(), value, [("content-type", content_type.encode())])
        )
    messages.append((b"junk", b"\xff not a result", []))
    produce(kafka_settings, "llm.results", messages)
    env = {
        "LLMPIPE_BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        "LLMPIPE_TOPIC_PREFIX": kafka_settings.topic_prefix,
    }
    result = CliRunner().invoke(prompts_app, ["stats", "ticket_triage", "--json"], env=env)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["version"], r["results"]) for r in rows] == [(1, 4), (2, 1)]
    assert rows[0]["fallback_rate"] == 0.25 and rows[0]["review_rate"] == 0.25
    assert rows[0]["cost_usd"] == pytest.approx(0.006)
    assert "1 records on llm.results are not results" in result.stderr
    table = CliRunner().invoke(prompts_app, ["stats"], env=env)
    assert table.exit_code == 0 and "ticket_triage@1" in table.stdout
