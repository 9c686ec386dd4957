"""The settle stage's review policy: risk rules, audit samples and burn-in, without Kafka."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from pipeline.contract.decisions import DeadLetter, Emit
from pipeline.contract.envelopes import Escalation, PromptRef, Result
from pipeline.contract.topology import RESULTS, REVIEW, ROUTE_AUDIT
from pipeline.control.state import ControlState
from pipeline.evaluation.prompt_tests import run_tests
from pipeline.observability import semconv as sc
from pipeline.observability.metrics import PipelineMetrics
from pipeline.observability.testing import metric_points
from pipeline.prompts.conditions import parse_condition
from pipeline.prompts.errors import PromptLoadError
from pipeline.prompts.model import BurnInPolicy
from pipeline.prompts.registry import PromptRegistry
from pipeline.stages.policy import audit_bucket
from pipeline.stages.settle import Settler
from tests.policy_support import (
    ANSWER,
    NAME,
    completion_for,
    prompt_document,
    validated_for,
    write_prompts,
)


async def settle(
    tmp_path: Path,
    review: dict[str, Any],
    answer: dict[str, Any] | None = None,
    variables: dict[str, Any] | None = None,
    request_id: str = "r-1",
    logprob: float = -0.05,
) -> Emit | DeadLetter:
    registry = write_prompts(tmp_path, review)
    v = validated_for(registry, request_id, variables)
    text = json.dumps(answer or ANSWER)
    return await Settler(registry, ControlState(), None)(completion_for(v, text, logprob))


def review_item(decision: Emit | DeadLetter) -> Escalation:
    assert isinstance(decision, Emit), decision
    assert decision.topic == REVIEW and not decision.also
    assert isinstance(decision.envelope, Escalation)
    return decision.envelope


@pytest.mark.parametrize(
    ("rule", "answer", "fired"),
    [
        ("priority in [urgent]", {**ANSWER, "priority": "urgent"}, True),
        ("priority in [urgent]", ANSWER, False),
        ("total > 1000", {**ANSWER, "total": 4000}, True),
        ("total > 1000", {**ANSWER, "total": 1000}, False),
        ("total >= 1000", {**ANSWER, "total": 1000.0}, True),
        ("total > 1000", {**ANSWER, "total": None}, False),  # unknown is not "true"
        ("label == billing", ANSWER, True),
        ("label != billing", ANSWER, False),
        ("priority not in [low, normal]", {**ANSWER, "priority": "high"}, True),
        ("total == null", {**ANSWER, "total": None}, True),
    ],
)
async def test_field_comparisons_on_the_output(
    tmp_path: Path, rule: str, answer: dict[str, Any], fired: bool
) -> None:
    decision = await settle(tmp_path, {"risk": [{"name": "risky", "when": rule}]}, answer)
    if not fired:
        assert isinstance(decision, Emit) and decision.topic == RESULTS and not decision.also
        return
    item = review_item(decision)
    assert item.reason == "high_risk" and item.risk_rules == ["risky"]
    assert rule in item.detail and item.output == answer
    assert item.confidence is not None and item.confidence > 0.9  # confident, still reviewed


async def test_a_comparison_on_an_input_variable(tmp_path: Path) -> None:
    review = {"risk": [{"name": "enterprise", "when": "input.customer_tier == enterprise"}]}
    body = {"subject": "Refund", "body": "Please refund."}
    item = review_item(
        await settle(tmp_path, review, variables={**body, "customer_tier": "enterprise"})
    )
    assert item.risk_rules == ["enterprise"] and "'enterprise'" in item.detail
    for others in ({**body, "customer_tier": "pro"}, body):  # another tier, or none at all
        decision = await settle(tmp_path, review, variables=others)
        assert isinstance(decision, Emit) and decision.topic == RESULTS


async def test_a_rules_py_function_names_why_and_every_rule_that_fired_is_listed(
    tmp_path: Path,
) -> None:
    review = {
        "risk": [
            {"name": "big_refund", "when": "total > 1000"},
            {"name": "legal", "check": "rules.py:mentions_lawyer"},
        ]
    }
    variables = {"subject": "Refund", "body": "Refund 4000 EUR or my lawyer calls."}
    item = review_item(await settle(tmp_path, review, {**ANSWER, "total": 4000}, variables))
    assert item.risk_rules == ["big_refund", "legal"]
    assert "mentions a lawyer" in item.detail and "total is 4000" in item.detail
    calm = {"subject": "Refund", "body": "Please refund."}
    decision = await settle(tmp_path, review, variables=calm)
    assert isinstance(decision, Emit) and decision.topic == RESULTS


async def test_risk_rules_only_judge_answers_that_would_be_accepted(tmp_path: Path) -> None:
    review = {"risk": [{"name": "any_billing", "when": "label == billing"}]}
    item = review_item(await settle(tmp_path, review, logprob=-3.0))
    assert item.reason == "low_confidence" and item.risk_rules == []


@pytest.mark.parametrize(
    ("check", "error_class", "words"),
    [
        ("rules.py:explodes", "ValueError", "exchange-rate table not loaded"),
        ("rules.py:says_yes", "RiskRuleError", "returned bool, expected list[str]"),
    ],
)
async def test_a_raising_rule_is_a_dead_letter_with_the_reason(
    tmp_path: Path, check: str, error_class: str, words: str
) -> None:
    decision = await settle(tmp_path, {"risk": [{"name": "fx", "check": check}]})
    assert isinstance(decision, DeadLetter)
    assert decision.reason == "risk_rule_failed" and decision.error_class == error_class
    assert "'fx'" in decision.message and words in decision.message
    assert decision.request_id == "r-1" and decision.prompt is not None


@pytest.mark.parametrize(
    ("review", "problem"),
    [
        ({"risk": [{"name": "x", "when": "totl > 1000"}]}, "totl, not a property in output"),
        ({"risk": [{"name": "x", "when": "input.tier == a"}]}, "input.tier, not a property"),
        ({"risk": [{"name": "x", "when": "total > [3]"}]}, "compares with a number"),
        ({"risk": [{"name": "x", "when": "total >> 3"}]}, "not valid YAML"),
        ({"risk": [{"name": "x", "when": "priority in urgent"}]}, "needs a non-empty list"),
        ({"risk": [{"name": "x"}]}, "exactly one of 'when' or 'check'"),
        ({"risk": [{"name": "x", "check": "rules.py:nope"}]}, "nope"),
        ({"risk": [{"name": "x", "when": "a == 1"}, {"name": "x", "when": "b == 1"}]}, "dup"),
        ({"audit": {"share": 1.5}}, "less than or equal to 1"),
        ({"burn_in": {"answers": -1}}, "greater than or equal to 0"),
    ],
)
def test_mistakes_in_the_review_section_fail_the_load(
    tmp_path: Path, review: dict[str, Any], problem: str
) -> None:
    with pytest.raises(PromptLoadError) as caught:
        write_prompts(tmp_path, review)
    assert problem in str(caught.value)


def test_risk_rules_are_part_of_the_content_hash(tmp_path: Path) -> None:
    plain = write_prompts(tmp_path / "a").get(NAME).content_hash
    one = write_prompts(tmp_path / "b", {"risk": [{"name": "r", "when": "total > 1000"}]})
    other = write_prompts(tmp_path / "c", {"risk": [{"name": "r", "when": "total > 2000"}]})
    hashes = {plain, one.get(NAME).content_hash, other.get(NAME).content_hash}
    assert len(hashes) == 3


def test_conditions_compare_like_json() -> None:
    assert parse_condition("total > 10").matches({"total": 10.5}, {}) is not None
    assert parse_condition("total > 10").matches({"total": "11"}, {}) is None  # no coercion
    assert parse_condition("flag == true").matches({"flag": 1}, {}) is None
    assert parse_condition("a.b in [1, 2]").matches({"a": {"b": 2.0}}, {}) is not None
    assert parse_condition("a.b in [1, 2]").matches({"a": 3}, {}) is None


async def test_an_audited_answer_is_delivered_and_copied_in_one_decision(tmp_path: Path) -> None:
    review = {"audit": {"share": 0.1}}
    ids = [f"req-{i}" for i in range(400)]
    expected = {i for i in ids if audit_bucket(NAME, i) < 1000}
    copied: set[str] = set()
    for request_id in ids:
        decision = await settle(tmp_path / request_id, review, request_id=request_id)
        assert isinstance(decision, Emit) and decision.topic == RESULTS
        assert isinstance(decision.envelope, Result)  # delivered either way
        if decision.also:
            (copy,) = decision.also
            assert copy.topic == REVIEW and copy.route == ROUTE_AUDIT and copy.reason == "audit"
            assert isinstance(copy.envelope, Escalation)
            assert copy.envelope.output == decision.envelope.output
            assert copy.envelope.confidence == decision.envelope.confidence
            copied.add(request_id)
    assert copied == expected and 20 < len(copied) < 60


class CountingGate:
    """A one-process burn-in counter: the first ``answers`` distinct request ids are held."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, int], list[str]] = {}

    async def holds(self, prompt: PromptRef, policy: BurnInPolicy, request_id: str) -> bool:
        ids = self.seen.setdefault((prompt.name, prompt.version), [])
        if request_id not in ids:
            ids.append(request_id)
        return ids.index(request_id) < policy.answers


async def test_burn_in_holds_the_first_answers_then_audit_applies(tmp_path: Path) -> None:
    registry = write_prompts(tmp_path, {"burn_in": {"answers": 3}, "audit": {"share": 1.0}})
    settler = Settler(registry, ControlState(), None, burn_in=CountingGate())
    routes = []
    for request_id in ["a", "b", "a", "c", "d"]:  # "a" again: a redelivery, same verdict
        v = validated_for(registry, request_id)
        decision = await settler(completion_for(v, json.dumps(ANSWER)))
        assert isinstance(decision, Emit)
        routes.append((decision.reason, decision.route, [c.route for c in decision.also]))
    held = ("burn_in", "review", [])
    assert routes == [held, held, held, held, (None, "result", ["audit"])]
    first = await settler(completion_for(validated_for(registry, "b"), json.dumps(ANSWER)))
    assert isinstance(first, Emit) and isinstance(first.envelope, Escalation)
    assert "burn-in (first 3 answers)" in first.envelope.detail


async def test_prompts_test_judges_risk_rules_offline(tmp_path: Path) -> None:
    """Risk rules run in `llmpipe prompts test` like every other rule, raising ones too."""
    review = {
        "risk": [
            {"name": "big_refund", "when": "total > 1000"},
            {"name": "enterprise", "when": "input.customer_tier == enterprise"},
        ]
    }
    document = prompt_document(1, review)
    body = {"subject": "Refund", "body": "Please refund."}
    document["tests"] = [
        {
            "name": "a large refund goes to a person",
            "variables": body,
            "model_answer": json.dumps({**ANSWER, "total": 4000}),
            "expect": {"route": "review"},
        },
        {
            "name": "an enterprise customer goes to a person",
            "variables": {**body, "customer_tier": "enterprise"},
            "model_answer": json.dumps(ANSWER),
            "expect": {"route": "review"},
        },
        {
            "name": "a small refund is delivered (this expectation is wrong on purpose)",
            "variables": body,
            "model_answer": json.dumps(ANSWER),
            "expect": {"route": "review"},
        },
    ]
    directory = tmp_path / "prompts" / NAME
    directory.mkdir(parents=True)
    (directory / "v1.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    registry = PromptRegistry.load(tmp_path / "prompts")
    results = await run_tests(registry, list(registry))
    assert [r.passed for r in results] == [True, True, False]
    assert [r.route_reason for r in results[:2]] == ["high_risk", "high_risk"]
    assert "expected review, got result" in results[2].reason


async def test_metrics_count_reviews_by_reason_audit_verdicts_and_the_error_estimate(
    tmp_path: Path,
) -> None:
    reader = InMemoryMetricReader()
    metrics = PipelineMetrics(MeterProvider(metric_readers=[reader]).get_meter("t"))
    registry = write_prompts(
        tmp_path,
        {"audit": {"share": 1.0}, "risk": [{"name": "urgent", "when": "priority == urgent"}]},
    )
    settler = Settler(registry, ControlState(), None)
    for request_id, answer in (("a", ANSWER), ("b", {**ANSWER, "priority": "urgent"})):
        v = validated_for(registry, request_id)
        decision = await settler(completion_for(v, json.dumps(answer)))
        metrics.record_decision(
            "settle",
            decision.route,
            decision.reason,
            decision.prompt,
            duration_s=0.01,
            copies=decision.copies,
        )
    ref = PromptRef(name=NAME, version=1, hash="h")
    metrics.audit_verdict("corrected", ref)
    unwatch = metrics.watch_accepted_error(lambda: {(NAME, 1): 0.25})
    data = reader.get_metrics_data()
    reviews = {a[sc.REASON]: p.value for a, p in metric_points(data, sc.REVIEWS)}
    assert reviews == {"audit": 1, "high_risk": 1}
    [(labels, verdicts)] = metric_points(data, sc.AUDIT_VERDICTS)
    assert labels[sc.AUDIT_VERDICT] == "corrected" and verdicts.value == 1
    [(labels, rate)] = metric_points(data, sc.ACCEPTED_ERROR_RATE)
    assert labels == {sc.GEN_AI_PROMPT_NAME: NAME, sc.GEN_AI_PROMPT_VERSION: 1}
    assert rate.value == 0.25
    requests = {a.get(sc.ROUTE): p.value for a, p in metric_points(data, sc.REQUESTS)}
    assert requests == {"result": 1, "review": 1}  # the audit copy is not a second request
    unwatch()
