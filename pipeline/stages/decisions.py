"""What a stage decided for one input message.

A decision is either messages to produce (:class:`Emit`) or a dead letter. Keeping this a
value (not a side effect) is what lets the transport produce first and commit after, and
lets tests assert on decisions without a broker.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.contract.envelopes import Envelope, Escalation, PromptRef, Result, ValidatedRequest
from pipeline.prompts.errors import UnknownPromptError, UnknownPromptVersionError
from pipeline.prompts.model import PromptVersion
from pipeline.prompts.registry import PromptRegistry

# Logical topic names; the transport adds the configured prefix.
VALIDATED = "llm.stage.validated"
COMPLETIONS = "llm.stage.completions"
RESULTS = "llm.results"
FALLBACK = "llm.fallback"
REVIEW = "llm.review"
DLQ = "llm.dlq"

ROUTE_BY_TOPIC = {
    VALIDATED: "validated",
    COMPLETIONS: "completion",
    RESULTS: "result",
    FALLBACK: "fallback",
    REVIEW: "review",
}


@dataclass(frozen=True)
class Emit:
    topic: str
    envelope: Envelope
    request_id: str
    prompt: PromptRef | None
    reason: str | None = None

    @property
    def route(self) -> str:
        return ROUTE_BY_TOPIC[self.topic]


@dataclass(frozen=True)
class DeadLetter:
    stage: str
    reason: str
    error_class: str
    message: str
    request_id: str | None = None
    prompt: PromptRef | None = None
    attempts: int = 1


Decision = Emit | DeadLetter


def emit_result(result: Result) -> Emit:
    return Emit(RESULTS, result, result.request_id, result.prompt, result.reason)


def emit_escalation(topic: str, escalation: Escalation) -> Emit:
    request = escalation.validated.request
    return Emit(
        topic, escalation, request.request_id, escalation.validated.prompt, escalation.reason
    )


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
