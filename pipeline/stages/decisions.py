"""Helpers every stage uses to build its decision (the decision types themselves are the
stage/edge contract in :mod:`pipeline.contract.decisions`).

A stage names the *outcome* (``result``, ``fallback``, ``review``, ...) and the topology
says which topic it goes to, so a stage inserted after another is wired in the topology.
"""

from __future__ import annotations

from dataclasses import replace

from pipeline.contract import topology
from pipeline.contract.decisions import DeadLetter, Emit
from pipeline.contract.envelopes import Envelope, Escalation, PromptRef, Result, ValidatedRequest
from pipeline.contract.topology import ROUTE_AUDIT, ROUTE_RESULT, ROUTE_REVIEW
from pipeline.prompts.errors import UnknownPromptError, UnknownPromptVersionError
from pipeline.prompts.model import PromptVersion
from pipeline.prompts.registry import PromptRegistry


def emit(
    stage: str,
    outcome: str,
    envelope: Envelope,
    request_id: str,
    prompt: PromptRef | None,
    reason: str | None = None,
) -> Emit:
    """Produce ``envelope`` as ``stage``'s ``outcome``: the topology says to which topic."""
    return Emit(topology.output(stage, outcome), envelope, request_id, prompt, reason)


def emit_result(stage: str, result: Result) -> Emit:
    return emit(stage, ROUTE_RESULT, result, result.request_id, result.prompt, result.reason)


def emit_escalation(stage: str, outcome: str, escalation: Escalation) -> Emit:
    request = escalation.validated.request
    return emit(
        stage,
        outcome,
        escalation,
        request.request_id,
        escalation.validated.prompt,
        escalation.reason,
    )


def emit_audit(stage: str, result: Emit, audit: Escalation) -> Emit:
    """``result`` with an audit copy of it for review, produced together."""
    copy = emit_escalation(stage, ROUTE_REVIEW, audit)
    return replace(result, also=(*result.also, replace(copy, route=ROUTE_AUDIT)))


def bind_prompt(
    registry: PromptRegistry, validated: ValidatedRequest, stage: str, attempts: int = 1
) -> PromptVersion | DeadLetter:
    """The prompt version a request was validated against, or a dead letter if this worker
    does not have it (a deploy removed it between stages): never a silent substitute."""
    try:
        return registry.get(validated.prompt.name, validated.prompt.version)
    except (UnknownPromptError, UnknownPromptVersionError) as exc:
        return DeadLetter(
            stage,
            "unknown_prompt_version",
            type(exc).__name__,
            str(exc),
            validated.request.request_id,
            validated.prompt,
            attempts,
        )
