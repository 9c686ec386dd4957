"""``llmpipe prompts eval`` offline: recorded answers through the real stages, numbers by hand.

Six tickets with recorded answers for ticket_triage@3 (fallback policy, accept 0.5,
agreement on the label, support of the summary). Each line says what the stages must do:

t1 right label, rule agrees, faithful summary      -> accepted, right
t2 wrong label, rule disagrees                     -> fallback (rule), right
t3 wrong label, no keyword, invented summary       -> review (rule has no answer)
t4 wrong label, no keyword, faithful summary       -> accepted, WRONG (nothing catches it)
t5 invalid JSON                                    -> fallback (rule), right
t6 right label, no keyword, faithful summary       -> accepted, right
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.evaluation.evaluate import (
    DatasetError,
    LabelledCase,
    evaluate,
    load_dataset,
    metrics,
    replay_mismatches,
    report,
    route_of,
)
from pipeline.prompts.model import schema_has_path
from pipeline.prompts.registry import PromptRegistry

PROMPTS = Path(__file__).resolve().parents[2] / "prompts"


def answer(label: str, summary: str) -> str:
    return json.dumps({"label": label, "priority": "normal", "summary": summary})


CASES: list[dict[str, Any]] = [
    {
        "id": "t1",
        "variables": {"subject": "Charged twice", "body": "My card was charged twice. Refund?"},
        "expected": {"label": "billing"},
        "model_answer": answer("billing", "Card charged twice; asks for a refund."),
    },
    {
        "id": "t2",
        "variables": {"subject": "Refund please", "body": "Please refund the duplicate payment."},
        "expected": {"label": "billing"},
        "model_answer": answer("feature_request", "Refund of the duplicate payment."),
    },
    {
        "id": "t3",
        "variables": {"subject": "Emails arrive twice", "body": "Every alert email comes twice."},
        "expected": {"label": "bug"},
        "model_answer": answer("other", "We offer free shipping to 12 Rue de Rivoli, Paris."),
    },
    {
        "id": "t4",
        "variables": {"subject": "Graph is slow", "body": "The query graph renders slowly."},
        "expected": {"label": "bug"},
        "model_answer": answer("feature_request", "Query graph renders slowly."),
    },
    {
        "id": "t5",
        "variables": {"subject": "Invoice copy", "body": "Please resend the March invoice."},
        "expected": {"label": "billing"},
        "model_answer": "the label is billing",
    },
    {
        "id": "t6",
        "variables": {"subject": "Graph colours", "body": "The query graph colours look odd."},
        "expected": {"label": "bug"},
        "model_answer": answer("bug", "Query graph colours look odd."),
    },
]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "tickets.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CASES))
    return path


async def test_the_numbers_follow_from_the_routes(dataset: Path) -> None:
    registry = PromptRegistry.load(PROMPTS)
    pv = registry.get("ticket_triage", 3)
    evaluation = await evaluate(registry, [pv], load_dataset(dataset), None)
    declared, baseline = evaluation.variants
    assert (declared.label, baseline.label) == ("declared", "components off")
    routes = {r.case.id: r.outcome.route for r in declared.runs}
    assert routes == {
        "t1": "result",
        "t2": "fallback",
        "t3": "review",
        "t4": "result",
        "t5": "fallback",
        "t6": "result",
    }
    assert declared.runs[1].components["agreement"] == 0.25
    m = metrics(declared.runs, "fallback", pv.confidence.accept, declared.declared_weights)
    assert (m.accepted, m.accepted_wrong, m.delivered, m.delivered_wrong, m.reviewed) == (
        3,
        1,
        5,
        1,
        1,
    )
    assert m.coverage == 0.5 and m.review_share == pytest.approx(1 / 6)
    assert m.delivered_error == pytest.approx(1 / 5) and m.accepted_error == pytest.approx(1 / 3)
    # Without components every valid answer is accepted (offline: no logprobs), so the
    # baseline delivers t2's and t3's wrong labels too.
    b = metrics(baseline.runs, "fallback", pv.confidence.accept, baseline.declared_weights)
    assert (b.accepted, b.accepted_wrong, b.delivered_wrong, b.reviewed) == (5, 3, 3, 0)
    data = report(evaluation, target=0.1)
    first = data["versions"][0]
    assert first["mismatches"] == []  # the replay routes exactly as the stages did
    agreement = next(c for c in first["contributions"] if c["component"] == "agreement")
    assert agreement["catches"] == 1 and agreement["false_alarms"] == 0  # t2
    support = next(c for c in first["contributions"] if c["component"] == "support")
    assert support["catches"] == 1  # t3: only the invented summary held it back
    suggestion = first["suggestion"]
    # t4 is wrong and looks right to every component: 1 wrong in 5 delivered unless it is
    # held back, which only a threshold above its confidence (1.0) would do.
    assert suggestion["meets_target"] is False or suggestion["review_share"] >= 0.5


def test_route_replay_at_any_threshold(dataset: Path) -> None:
    registry = PromptRegistry.load(PROMPTS)
    pv = registry.get("ticket_triage", 3)
    import asyncio

    evaluation = asyncio.run(evaluate(registry, [pv], load_dataset(dataset), None))
    runs = evaluation.variants[0].runs
    weights = evaluation.variants[0].declared_weights
    # At threshold 0 every valid answer is accepted; invalid ones still take the fallback.
    assert [route_of(r, "fallback", 0.0, weights) for r in runs] == [
        "accepted",
        "accepted",
        "accepted",
        "accepted",
        "fallback",
        "accepted",
    ]


async def test_a_low_confidence_clarification_is_routed_again_a_models_own_question_is_not() -> (
    None
):
    """cited_answer@3 (policy clarify) sends a low-confidence answer back as a question: the
    replay must route that answer again at other thresholds (it is not the model asking),
    while the model's own clarifying question is its answer whatever the threshold."""
    registry = PromptRegistry.load(PROMPTS)
    sources = [
        {"id": "kb-101", "text": "Refunds can be requested within 30 days of the charge."},
        {"id": "kb-205", "text": "Invoices are issued on the first day of each month."},
    ]
    invented = {
        "answer": "Klaus in Berlin says Zurich refunds take Madrid weeks.",
        "citations": ["kb-205"],
    }
    cases = [
        LabelledCase(
            "low",
            {"question": "How long do I have to ask for a refund?", "sources": sources},
            {"citations": ["kb-101"]},
            model_answer=json.dumps(invented),
        ),
        LabelledCase(
            "asks",
            {"question": "What is the storage limit?", "sources": sources},
            {"needs_clarification": True},
            model_answer=json.dumps({"needs_clarification": True, "question": "Which plan?"}),
        ),
    ]
    evaluation = await evaluate(registry, [registry.get("cited_answer", 3)], cases, None)
    variant = evaluation.variants[0]
    low, asks = variant.runs
    assert (low.outcome.status, low.outcome.reason) == ("needs_clarification", "low_confidence")
    assert not low.asks_back and low.answer == invented
    assert asks.asks_back and asks.outcome.reason == "model_asked_for_clarification"
    assert replay_mismatches(variant) == []
    weights = variant.declared_weights
    assert [route_of(r, "clarify", 0.5, weights) for r in variant.runs] == ["review", "accepted"]
    assert [route_of(r, "clarify", 0.0, weights) for r in variant.runs] == ["accepted"] * 2
    numbers = metrics(variant.runs, "clarify", 0.5, weights)
    assert (numbers.accepted, numbers.accepted_wrong, numbers.reviewed) == (1, 0, 1)


def test_the_cli_writes_the_table_the_json_and_the_curve(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        [
            "prompts",
            "eval",
            "ticket_triage",
            "--version",
            "3",
            "--dataset",
            str(dataset),
            "--prompts-dir",
            str(PROMPTS),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "| ticket_triage@3 | declared | 0.5 (declared) | 50% | 33% | 20% | 17% |" in (
        result.output
    )
    data = json.loads((out / "eval.json").read_text())
    assert data["cases"] == 6 and len(data["versions"]) == 2
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "eval.md").read_text().startswith("# prompts eval: ticket_triage")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not JSON"),
        ('{"variables": {"subject": "x"}}', "needs 'expected'"),
        ('{"variables": 1, "expected": {"label": "bug"}}', "'variables' must be an object"),
        ('{"variables": {}, "expected": {"a": 1}, "colour": 1}', "unknown keys colour"),
    ],
)
def test_a_bad_dataset_line_is_a_clear_error(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DatasetError, match=message) as caught:
        load_dataset(path)
    assert f"{path}:1" in str(caught.value)
    result = CliRunner().invoke(
        app,
        ["prompts", "eval", "ticket_triage", "--dataset", str(path), "--prompts-dir", str(PROMPTS)],
    )
    assert result.exit_code == 2 and message in result.output


def test_the_shipped_datasets_are_labelled_for_their_prompts() -> None:
    registry = PromptRegistry.load(PROMPTS)
    sizes = {"ticket_triage": 60, "invoice_extract": 20, "cited_answer": 20}
    for name, minimum in sizes.items():
        cases = load_dataset(PROMPTS / name / "dataset.jsonl")
        assert len(cases) >= minimum, name
        schema = registry.get(name).output_schema
        for case in cases:
            assert set(case.expected) | set(case.contains), case.id
            for path in case.expected:
                assert schema_has_path(schema, path), f"{name} {case.id}: {path}"
        assert any("hard" in c.tags for c in cases), f"{name} has no hard cases"
