"""The ledger's arithmetic, without a broker: what counts as a duplicate, a second terminal
place, a wrong route, a redone call, and which stage made a call."""

from __future__ import annotations

from pipeline.config import Settings
from pipeline.contract.envelopes import Request
from pipeline.harness.fakellm.server import CallTally
from pipeline.harness.ledger import (
    MODEL_CALL,
    SETTLE_CALL,
    Ledger,
    Sighting,
    calls_of,
    fewer_calls,
    pipeline_call_kind,
    redone_calls,
)
from pipeline.prompts.registry import PromptRegistry
from pipeline.prompts.render import render_messages
from pipeline.stages.self_check import grading_request
from pipeline.stages.settle import REASK_TEMPLATE


def _seen(topic: str, route: str, reason: str | None = None) -> Sighting:
    return Sighting(topic, route, reason, b"", {})


def test_every_sighting_counts() -> None:
    ledger = Ledger({"a", "b", "c", "d"})
    ledger.seen = {
        "a": [_seen("llm.review", "review", "low_confidence")],
        "b": [_seen("llm.review", "review", "low_confidence")] * 3,
        "c": [_seen("llm.review", "review", "low_confidence"), _seen("llm.dlq", "dead_letter")],
        "x": [_seen("llm.dlq", "dead_letter", "decode_error")],
    }
    assert ledger.missing == {"d"}
    assert ledger.unexpected == {"x"}
    assert ledger.duplicates == {"b": 2, "c": 1}
    assert ledger.two_places == {"c": {"llm.review", "llm.dlq"}}
    want = {rid: ("review", "low_confidence") for rid in "abcd"}
    # The second sighting of c is on another route: found although the first is right.
    assert ledger.wrong_routes(want) == {"c": ["dead_letter/None"]}
    assert ledger.wrong_routes({"a": ("review", "other")}) == {"a": ["review/low_confidence"]}
    assert ledger.wrong_routes({"a": ("review", "other")}, reasons=False) == {}
    summary = ledger.summary()
    assert (summary["missing"], summary["duplicates"], summary["two_places"]) == (1, 3, 1)


def _calls(**counts: dict[str, int]) -> dict[str, dict[str, CallTally]]:
    return {
        rid: {kind: CallTally(n, n) for kind, n in kinds.items()} for rid, kinds in counts.items()
    }


def test_redone_calls_are_the_calls_beyond_a_fault_free_run() -> None:
    baseline = _calls(a={"model": 1, "settle": 1}, b={"model": 2}, c={"model": 1})
    faulty = _calls(a={"model": 2, "settle": 2}, b={"model": 2}, c={}, d={"model": 1})
    assert redone_calls(faulty, baseline, "abcd") == {"a": 2, "d": 1}
    assert fewer_calls(faulty, baseline, "abcd") == {"c"}
    assert calls_of(faulty, "a") == 4
    assert calls_of(faulty, "a", SETTLE_CALL) == 2
    assert calls_of(faulty, "zzz") == 0


def test_the_call_kind_names_the_stage_that_made_the_call() -> None:
    pv = PromptRegistry.load(Settings().prompts_dir).get("ticket_triage")
    request = Request(
        request_id="r", prompt="ticket_triage", variables={"subject": "s", "body": "b"}
    )
    first = render_messages(pv, request.variables)
    reask = [
        *first,
        {"role": "assistant", "content": "{}"},
        {"role": "user", "content": REASK_TEMPLATE.format(errors="bad")},
    ]
    grading = grading_request(pv, first, {"label": "bug"}, 5.0).messages
    assert pipeline_call_kind(first) == MODEL_CALL
    assert pipeline_call_kind(reask) == SETTLE_CALL
    assert pipeline_call_kind(grading) == SETTLE_CALL
    assert pipeline_call_kind([]) == MODEL_CALL
