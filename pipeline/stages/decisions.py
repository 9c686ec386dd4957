"""What a stage decided for one input message.

A decision is either messages to produce (:class:`Emit`) or a dead letter. Keeping this a
value (not a side effect) is what lets the transport produce first and commit after, and
lets tests assert on decisions without a broker.

One input may produce more than one message: an :class:`Emit` carries the request's one
terminal output plus ``also``, copies that must be written with it, atomically (in the same
transaction as the output and the input offset). Today the only copy is the audit item of
an accepted result (route ``audit`` on ``llm.review``): the result is delivered at once and
a person is asked for a verdict on it. A copy is never terminal; ``Emit.outputs()`` is what
a transport produces.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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

AUDIT_ROUTE = "audit"
"""The route of an audit copy on ``llm.review``: a verdict is wanted, the request is done."""

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
    route: str = ""
    """Defaults to the topic's route; only copies (``also``) name another one."""
    also: tuple[Emit, ...] = ()

    def __post_init__(self) -> None:
        if not self.route:
            object.__setattr__(self, "route", ROUTE_BY_TOPIC[self.topic])

    def outputs(self) -> tuple[Emit, ...]:
        """Everything to produce for this input, the terminal output first."""
        return (self, *self.also)


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


def emit_audit(result: Emit, audit: Escalation) -> Emit:
    """``result`` with an audit copy of it for review, produced together."""
    copy = emit_escalation(REVIEW, audit)
    return replace(result, also=(*result.also, replace(copy, route=AUDIT_ROUTE)))


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
