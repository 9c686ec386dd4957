"""Message shapes: one pydantic model per Avro record in ``schemas/``.

These models are the only definition of what travels between stages. They mirror the
Avro schemas field by field (``tests/contract/test_envelopes.py`` keeps both in step), so a
consumer written against the ``.avsc`` files and one written against these classes see
the same thing. Fields the Avro schema stores as JSON text (marked ``"llmpipe.json"``)
are plain Python objects here; the codec turns them into text on the way out.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

JsonObject = dict[str, Any]


def utc_now() -> datetime:
    """Timestamps are millisecond precision because that is what Avro's timestamp-millis keeps.

    Whole milliseconds over 1,000 as a float are read back to the exact millisecond (a
    double is within half a microsecond of it until after 2100), and this costs a third of
    ``datetime.now(UTC).replace(microsecond=...)``: several stamps per request."""
    return datetime.fromtimestamp(time.time_ns() // 1_000_000 / 1000, UTC)


class Envelope(BaseModel):
    """Base for every message: unknown fields are refused so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Usage(Envelope):
    """Tokens and cost of every model call behind one message.

    ``cost_usd`` is None when some call's model has no known price: an unknown cost is
    reported as unknown, never as zero (see ``pipeline.llm.cost``).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cost_usd: float | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def plus(self, other: Usage) -> Usage:
        """Both together (an answer and its re-ask); unknown cost stays unknown."""
        if self.total_tokens == 0 and self.cost_usd is None:
            return other
        if other.total_tokens == 0 and other.cost_usd is None:
            return self
        cost = None
        if self.cost_usd is not None and other.cost_usd is not None:
            cost = self.cost_usd + other.cost_usd
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens + other.cached_prompt_tokens,
            cost_usd=cost,
        )


class ModelCall(Envelope):
    """One attempt at one model, or a model of the fallback chain passed over unasked.

    Carried, in call order, on every completion, escalation and result, so the topics
    themselves say which models a request cost and how each try ended (``llmpipe trace``
    shows them as rows): retries, fallback models, re-asks, self-checks and samples.
    """

    purpose: str
    model: str
    attempt: int
    outcome: str
    latency_ms: float = 0.0


class PromptRef(Envelope):
    name: str
    version: int
    hash: str
    arm: str = "latest"

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class ValidationReport(Envelope):
    checks: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)
    confidence_components: dict[str, float] = Field(default_factory=dict)


class Request(Envelope):
    request_id: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    prompt_version: int | None = None
    variables: JsonObject = Field(default_factory=dict)
    metadata: dict[str, str] = Field(default_factory=dict)
    deadline: datetime | None = None

    @field_validator("deadline")
    @classmethod
    def _deadline_is_aware(cls, value: datetime | None) -> datetime | None:
        """A naive deadline is ambiguous across services in different zones: read it as UTC."""
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class ValidatedRequest(Envelope):
    request: Request
    prompt: PromptRef
    flags: list[str] = Field(default_factory=list)
    received_at: datetime


class Completion(Envelope):
    validated: ValidatedRequest
    model: str
    raw_text: str
    finish_reason: str | None = None
    usage: Usage
    token_logprobs: list[float] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    latency_ms: float
    attempts: int
    completed_at: datetime
    calls: list[ModelCall] = Field(default_factory=list)


ResultStatus = Literal["ok", "needs_clarification"]
ResultSource = Literal["model", "fallback", "human"]


class Result(Envelope):
    request_id: str
    status: ResultStatus
    output: JsonObject
    confidence: float = Field(ge=0.0, le=1.0)
    source: ResultSource
    prompt: PromptRef
    model: str | None = None
    usage: Usage
    latency_ms: float
    attempts: int
    validation: ValidationReport
    metadata: dict[str, str] = Field(default_factory=dict)
    trace_id: str | None = None
    reason: str | None = None
    reviewer: str | None = None
    produced_at: datetime
    calls: list[ModelCall] = Field(default_factory=list)


class Escalation(Envelope):
    validated: ValidatedRequest
    reason: str
    detail: str = ""
    risk_rules: list[str] = Field(default_factory=list)
    output: JsonObject | None = None
    raw_text: str | None = None
    model: str | None = None
    confidence: float | None = None
    validation: ValidationReport = Field(default_factory=ValidationReport)
    usage: Usage = Field(default_factory=Usage)
    attempts: int = 0
    escalated_at: datetime
    calls: list[ModelCall] = Field(default_factory=list)


ReviewAction = Literal["approve", "edit", "reject", "clarify"]


class ReviewDecision(Envelope):
    decision_id: str
    request_id: str
    action: ReviewAction
    reviewer: str
    output: JsonObject | None = None
    reason: str | None = None
    prompt: PromptRef
    decided_at: datetime


class Correction(Envelope):
    request_id: str
    prompt: PromptRef
    variables: JsonObject
    original_output: JsonObject | None = None
    corrected_output: JsonObject
    reviewer: str
    decided_at: datetime


class ControlEvent(Envelope):
    key: str
    value: Any = None
    actor: str
    reason: str = ""
    at: datetime


class FleetEvent(Envelope):
    """Shared protective state on the compacted ``llm.fleet`` topic (see
    :mod:`pipeline.resilience.fleet`): written by workers, folded by every worker."""

    key: str
    worker: str
    value: Any = None
    at: datetime


class BurnInClaim(Envelope):
    prompt: PromptRef
    request_id: str
    claimed_at: datetime


ENVELOPES: dict[str, type[Envelope]] = {
    cls.__name__: cls
    for cls in (
        Usage,
        PromptRef,
        ValidationReport,
        Request,
        ValidatedRequest,
        Completion,
        Result,
        Escalation,
        ReviewDecision,
        Correction,
        ControlEvent,
        FleetEvent,
        BurnInClaim,
    )
}
