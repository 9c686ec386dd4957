"""Stage 2: call the model once per validated request and keep the raw answer.

The raw completion goes to ``llm.stage.completions`` before any parsing, so that a parser
fix or a new rule can be replayed over stored answers without paying for the calls again.
A request that cannot be sent (kill switch, disabled prompt, passed deadline) or whose
call fails after its retries goes to the fallback path with the reason: it is never lost.
While every model of its chain has an open circuit, the resilient client holds the call
(bounded, see :mod:`pipeline.resilience.breaker_wait`), and with it this message's slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from pipeline.contract.decisions import DeadLetter, Decision
from pipeline.contract.envelopes import (
    Completion,
    Escalation,
    ModelCall,
    Usage,
    ValidatedRequest,
    ValidationReport,
    utc_now,
)
from pipeline.contract.topology import MODEL, ROUTE_COMPLETION, ROUTE_FALLBACK
from pipeline.control.state import PROMPT_ENABLED, ControlState
from pipeline.llm.genai import chat_span
from pipeline.llm.protocol import CallRecord, ChatCompletion, ChatRequest, ModelError, evolve
from pipeline.prompts.model import PromptVersion
from pipeline.prompts.registry import PromptRegistry
from pipeline.prompts.render import render_messages
from pipeline.resilience.breaker import QualityBreaker
from pipeline.resilience.errors import BudgetExceeded
from pipeline.stages.decisions import bind_prompt, emit, emit_escalation
from pipeline.stages.validate import deadline_escalation

STAGE = MODEL
BUDGET_EXCEEDED = "budget_exceeded"
# Why a model was called (ModelCall.purpose): the first answer, then the settle stage's.
ANSWER = "answer"
REASK = "reask"
SELF_CHECK = "self_check"
SAMPLE = "sample"


class CallingClient(Protocol):
    """The resilient client: knows the deadline, the prompt's budget and the model chain."""

    async def complete(
        self,
        request: ChatRequest,
        deadline: datetime | None = None,
        *,
        prompt: str | None = None,
        models: Sequence[str] | None = None,
    ) -> ChatCompletion: ...


def model_chain(pv: PromptVersion) -> list[str]:
    return [pv.model.model, *pv.model.fallback_models]


def usage_of(answer: ChatCompletion) -> Usage:
    return Usage(
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        cached_prompt_tokens=answer.cached_tokens,
        cost_usd=answer.cost_usd,
    )


def calls_of(purpose: str, calls: Sequence[CallRecord]) -> list[ModelCall]:
    """The resilience layers' record of each try, as the envelopes carry it."""
    return [
        ModelCall(
            purpose=purpose,
            model=c.model,
            attempt=c.attempt,
            outcome=c.outcome,
            latency_ms=round(c.latency_ms, 3),
        )
        for c in calls
    ]


def failure_reason(exc: ModelError) -> str:
    return BUDGET_EXCEEDED if isinstance(exc, BudgetExceeded) else f"model_{exc.kind}"


def chat_request(
    pv: PromptVersion, messages: list[dict[str, str]], timeout_cap_s: float
) -> ChatRequest:
    """The call for ``pv``: its sampling parameters and its output schema, so that the
    endpoint layer can ask for structured output in the form that endpoint takes."""
    params = pv.model
    return ChatRequest(
        model=params.model,
        messages=messages,
        temperature=None if params.reasoning_effort else params.temperature,
        max_tokens=params.max_tokens,
        logprobs=params.logprobs,
        timeout_s=min(params.timeout_s, timeout_cap_s),
        seed=params.seed,
        stop=tuple(params.stop),
        top_p=params.top_p,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        reasoning_effort=params.reasoning_effort,
        extra_body=params.extra_body,
        output_schema=pv.output_schema,
        schema_name=pv.name,
        schema_strict=pv.strict_output.strict,
        structured_output=params.structured_output,
    )


class ChatRequests:
    """:func:`chat_request` for each prompt version, made once and copied with each call's
    messages: everything else in it comes from the version, and building it again per
    message (twenty fields, a derived strictness lookup) cost 7 us, more than the rest of
    this stage's own work. Kept per version object (held, so its id cannot be reused)."""

    def __init__(self, timeout_cap_s: float) -> None:
        self._timeout_cap_s = timeout_cap_s
        self._made: dict[int, tuple[PromptVersion, ChatRequest]] = {}

    def __call__(self, pv: PromptVersion, messages: list[dict[str, str]]) -> ChatRequest:
        made = self._made.get(id(pv))
        if made is None or made[0] is not pv:
            made = self._made[id(pv)] = (pv, chat_request(pv, [], self._timeout_cap_s))
        return evolve(made[1], messages=messages)


class ModelCaller:
    def __init__(
        self,
        registry: PromptRegistry,
        client: CallingClient,
        control: ControlState,
        timeout_cap_s: float = 30.0,
        quality: QualityBreaker | None = None,
    ) -> None:
        """``quality`` is fed by the settle stage's judgement of output quality: in a worker,
        every settle worker's, through ``llm.fleet`` (:mod:`pipeline.resilience.fleet`)."""
        self._registry = registry
        self._client = client
        self._control = control
        self._requests = ChatRequests(timeout_cap_s)
        self._quality = quality

    async def __call__(self, validated: ValidatedRequest, now: datetime | None = None) -> Decision:
        now = now or utc_now()
        request = validated.request
        pv = bind_prompt(self._registry, validated, STAGE)
        if isinstance(pv, DeadLetter):
            return pv
        if request.deadline is not None and request.deadline <= now:
            return emit_escalation(STAGE, ROUTE_FALLBACK, deadline_escalation(validated, now))
        if not self._control.model_calls_enabled():
            return self._skip(
                validated, "model_calls_disabled", "model calls are switched off", now
            )
        if not self._control.flag(PROMPT_ENABLED, pv.name):
            return self._skip(validated, "prompt_disabled", f"prompt {pv.name} is disabled", now)
        if self._quality is not None and not self._quality.allow(pv.ref):
            detail = f"output quality of {pv.ref} tripped its breaker"
            return self._skip(validated, "quality_breaker_open", detail, now)
        call = self._requests(pv, render_messages(pv, request.variables))
        try:
            answer = await self._call(call, validated, pv)
        except ModelError as exc:
            escalation = Escalation(
                validated=validated,
                reason=failure_reason(exc),
                detail=str(exc)[:500],
                model=call.model,
                attempts=exc.attempts,
                validation=ValidationReport(checks=["model_call"], errors=[failure_reason(exc)]),
                escalated_at=utc_now(),
                calls=calls_of(ANSWER, exc.calls),
            )
            return emit_escalation(STAGE, ROUTE_FALLBACK, escalation)
        completion = Completion(
            validated=validated,
            model=answer.model,
            raw_text=answer.text,
            finish_reason=answer.finish_reason,
            usage=usage_of(answer),
            token_logprobs=answer.token_logprobs,
            tokens=answer.tokens,
            latency_ms=answer.latency_ms,
            attempts=answer.attempts,
            completed_at=utc_now(),
            calls=calls_of(ANSWER, answer.calls),
        )
        return emit(STAGE, ROUTE_COMPLETION, completion, request.request_id, validated.prompt)

    async def _call(
        self, call: ChatRequest, validated: ValidatedRequest, pv: PromptVersion
    ) -> ChatCompletion:
        request = validated.request
        with chat_span(call, validated.prompt, request.request_id) as observed:
            answer = await self._client.complete(
                call, deadline=request.deadline, prompt=pv.name, models=model_chain(pv)
            )
            observed.answered(answer)
        return answer

    def _skip(
        self, validated: ValidatedRequest, reason: str, detail: str, now: datetime
    ) -> Decision:
        escalation = Escalation(
            validated=validated,
            reason=reason,
            detail=detail,
            validation=ValidationReport(checks=["control"], errors=[reason]),
            escalated_at=now,
        )
        return emit_escalation(STAGE, ROUTE_FALLBACK, escalation)
