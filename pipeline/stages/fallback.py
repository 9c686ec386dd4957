"""The fallback worker: a deterministic answer when the model path could not give one.

The prompt declares its fallback: a rule function (plain Python, by reference) or a safe
default. A fallback answer is checked against the same schema and rules as a model answer
(a buggy rule must not leak bad output). When there is no fallback, it returns nothing, or
its answer is invalid, the request goes to human review: it is never dropped.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pipeline.contract.decisions import DeadLetter, Decision
from pipeline.contract.envelopes import Escalation, Result, ValidationReport, utc_now
from pipeline.contract.topology import FALLBACK_STAGE, ROUTE_REVIEW
from pipeline.control.state import FORCE_REVIEW, ControlState
from pipeline.observability.propagation import current_trace_id
from pipeline.prompts.registry import PromptRegistry
from pipeline.stages.decisions import bind_prompt, emit_escalation, emit_result
from pipeline.stages.parse import rule_errors, schema_errors

STAGE = FALLBACK_STAGE
# A fallback answer is deterministic but not a model's judgement; these fixed, documented
# values let consumers tell it apart and filter on it.
RULE_CONFIDENCE = 0.5
DEFAULT_CONFIDENCE = 0.0


class FallbackWorker:
    def __init__(self, registry: PromptRegistry, control: ControlState) -> None:
        self._registry = registry
        self._control = control

    def __call__(self, escalation: Escalation, now: datetime | None = None) -> Decision:
        now = now or utc_now()
        validated = escalation.validated
        request = validated.request
        pv = bind_prompt(self._registry, validated, STAGE, escalation.attempts)
        if isinstance(pv, DeadLetter):
            return pv
        checks = ["fallback"]
        problem = ""
        output: dict[str, Any] | None = None
        try:
            output = self._registry.resolve_fallback(pv)(request.variables)
        except Exception as exc:  # a crashing rule sends the request to a human
            problem = f"fallback rule raised {type(exc).__name__}: {str(exc)[:200]}"
        if output is None:
            if not problem:
                problem = "the prompt's fallback has no answer for this request"
            return emit_escalation(
                STAGE, ROUTE_REVIEW, _to_review(escalation, problem, None, checks, [], now)
            )
        is_default = output == pv.fallback.default
        checks.append("fallback_default" if is_default else f"fallback_rule:{pv.fallback.rule}")
        confidence = DEFAULT_CONFIDENCE if is_default else RULE_CONFIDENCE
        errors = schema_errors(pv.output_schema, output)
        if not errors:
            rule_errs, rule_checks = rule_errors(
                pv, output, request.variables, lambda ref: self._registry.resolve_check(pv, ref)
            )
            errors, checks = rule_errs, [*checks, "output_schema", *rule_checks]
        if errors:
            detail = "fallback answer is invalid: " + "; ".join(errors)
            return emit_escalation(
                STAGE, ROUTE_REVIEW, _to_review(escalation, detail, output, checks, errors, now)
            )
        report = ValidationReport(checks=checks, warnings=[f"fallback:{escalation.reason}"])
        if self._control.flag(FORCE_REVIEW, pv.name):
            return emit_escalation(
                STAGE,
                ROUTE_REVIEW,
                _to_review(
                    escalation, "force_review is on for this prompt", output, checks, [], now
                ),
            )
        return emit_result(
            STAGE,
            Result(
                request_id=request.request_id,
                status="ok",
                output=output,
                confidence=confidence,
                source="fallback",
                prompt=validated.prompt,
                model=escalation.model,
                usage=escalation.usage,
                latency_ms=max(0.0, (now - validated.received_at).total_seconds() * 1000),
                attempts=escalation.attempts,
                validation=report,
                metadata=request.metadata,
                trace_id=current_trace_id(),
                reason=escalation.reason,
                produced_at=now,
                calls=escalation.calls,
            ),
        )


def _to_review(
    escalation: Escalation,
    detail: str,
    output: dict[str, Any] | None,
    checks: list[str],
    errors: list[str],
    now: datetime,
) -> Escalation:
    """Keep the original reason: the reviewer needs to know why the model path failed."""
    return escalation.model_copy(
        update={
            "detail": f"{escalation.detail} | {detail}" if escalation.detail else detail,
            "output": output if output is not None else escalation.output,
            "validation": ValidationReport(
                checks=escalation.validation.checks + checks,
                warnings=escalation.validation.warnings,
                errors=escalation.validation.errors + errors,
                confidence_components=escalation.validation.confidence_components,
            ),
            "escalated_at": now,
        }
    )
