"""The settle stage with declared confidence components: what it calls, records and routes."""

from __future__ import annotations

import json
from typing import Any

from pipeline.contract.decisions import Emit
from pipeline.contract.envelopes import Escalation, Result
from pipeline.contract.topology import FALLBACK, RESULTS
from pipeline.control.state import ControlState
from pipeline.prompts.model import ConsistencySpec, PromptVersion, SelfCheckSpec
from pipeline.resilience.breaker import BreakerState, QualityBreaker
from pipeline.stages.monitor import DistributionMonitor, Shift
from pipeline.stages.settle import Settler
from tests.stage_support import REGISTRY, ScriptedClient, completion, validated

TICKET = {
    "subject": "Charged twice for March",
    "body": "My card was charged twice for the March invoice. Please refund the duplicate.",
}


def ticket_answer(label: str, summary: str = "Card charged twice for the March invoice.") -> str:
    return json.dumps({"label": label, "priority": "normal", "summary": summary})


def with_confidence(pv: PromptVersion, **update: Any) -> PromptVersion:
    return pv.model_copy(update={"confidence": pv.confidence.model_copy(update=update)})


async def settle(
    text: str,
    client: ScriptedClient | None = None,
    pv: PromptVersion | None = None,
    monitor: DistributionMonitor | None = None,
    quality: QualityBreaker | None = None,
) -> Emit:
    pv = pv or REGISTRY.get("ticket_triage", 3)
    registry = REGISTRY.replacing(pv)
    settler = Settler(registry, ControlState(), client, quality=quality, monitor=monitor)
    decision = await settler(completion(text, (), validated(TICKET, version=pv.version)))
    assert isinstance(decision, Emit)
    return decision


async def test_every_component_is_recorded_and_agreement_routes_a_contradicted_label() -> None:
    agreed = await settle(ticket_answer("billing"))
    assert agreed.topic == RESULTS and isinstance(agreed.envelope, Result)
    components = agreed.envelope.validation.confidence_components
    assert components["agreement"] == 1.0 and components["support"] == 1.0
    contradicted = await settle(ticket_answer("feature_request"))
    assert contradicted.topic == FALLBACK and isinstance(contradicted.envelope, Escalation)
    assert contradicted.envelope.validation.confidence_components["agreement"] == 0.25
    assert contradicted.envelope.reason == "low_confidence"


async def test_consistency_samples_at_the_declared_temperature_and_counts_their_cost() -> None:
    pv = REGISTRY.get("ticket_triage", 3)
    components = pv.confidence.components.model_copy(
        update={"consistency": ConsistencySpec(fields=["label"], samples=3, temperature=0.9)}
    )
    pv = with_confidence(pv, components=components)
    client = ScriptedClient([ticket_answer("billing"), ticket_answer("bug"), "not json"])
    decision = await settle(ticket_answer("billing"), client, pv)
    assert [r.temperature for r in client.requests] == [0.9, 0.9, 0.9]
    envelope = decision.envelope
    # One sample of three disagreeing lowers confidence, not below the threshold: accepted.
    assert decision.topic == RESULTS and isinstance(envelope, Result) and envelope.status == "ok"
    # One of three samples agrees: 0.25 + 0.75 / 3.
    assert envelope.validation.confidence_components["consistency"] == 0.5
    assert envelope.attempts == 1 + 3 and envelope.usage.completion_tokens == 20 + 3 * 10


async def test_self_check_uses_its_own_model_token_limit_and_budget() -> None:
    pv = with_confidence(
        REGISTRY.get("ticket_triage", 3),
        self_check=SelfCheckSpec(model="grader-model", max_tokens=12, weight=0.5),
    )
    client = ScriptedClient(['{"score": 0.36}'])
    decision = await settle(ticket_answer("billing"), client, pv)
    [request], [(budget, models)] = client.requests, client.budgets
    assert (request.model, request.max_tokens, budget, models) == (
        "grader-model",
        12,
        "ticket_triage.self_check",
        ["grader-model"],
    )
    envelope = decision.envelope
    assert isinstance(envelope, Result)
    assert envelope.validation.confidence_components["self_check"] == 0.36
    assert envelope.confidence == 0.6  # 0.36 ** 0.5, everything else agrees


async def test_the_monitor_sees_settled_answers_and_trips_the_quality_breaker() -> None:
    shifts: list[Shift] = []
    quality = QualityBreaker()
    monitor = DistributionMonitor(on_shift=shifts.append, trip=quality.trip)
    pv = REGISTRY.get("ticket_triage", 3)
    assert pv.confidence.monitor is not None
    for _ in range(pv.confidence.monitor.window):
        await settle(ticket_answer("billing"), pv=pv, monitor=monitor, quality=quality)
    assert [s.signal for s in shifts] == ["label"]
    assert shifts[0].window == {"billing": 1.0}
    assert quality.state(pv.ref) is BreakerState.OPEN
