"""Run one request through the pipeline's own stage code, in process, without Kafka.

``llmpipe prompts test`` and ``llmpipe prompts shadow`` must judge a prompt
exactly as production would, so neither re-implements parsing, re-asks,
scoring, routing or fallbacks: both drive the real ``Validator``,
``ModelCaller``, ``Settler`` and ``FallbackWorker`` and follow the decisions
they return, topic by topic, the way the transport would. Only the model
client differs (a recorded answer offline, a real endpoint with ``--live``)
and nothing is ever produced: the decisions are read, not sent.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from pipeline.config import Settings
from pipeline.contract import topology
from pipeline.contract.decisions import DeadLetter, Decision, Emit
from pipeline.contract.envelopes import (
    Escalation,
    PromptRef,
    Request,
    Result,
    Usage,
)
from pipeline.control.state import ControlState
from pipeline.llm.protocol import ChatCompletion, ChatRequest
from pipeline.prompts.registry import PromptRegistry
from pipeline.resilience.configure import resilient_client
from pipeline.resilience.stack import ResilientClient
from pipeline.stages.model_call import CallingClient
from pipeline.stages.monitor import DistributionMonitor
from pipeline.stages.parse import extract_json
from pipeline.stages.policy import REVIEW_REASONS
from pipeline.stages.table import RawInput, StageDeps, Step, build_steps
from pipeline.stages.validate import estimate_tokens

Route = Literal["result", "fallback", "review", "dead_letter"]
ROUTES: tuple[Route, ...] = ("result", "fallback", "review", "dead_letter")

# Escalation reasons under which the model's answer itself passed every check (it was only
# not confident enough, or a policy or a flag held it back); any other reason: it was invalid.
VALID_ANSWER_REASONS = frozenset(REVIEW_REASONS)
_JSON = "application/json"
# validate -> model -> settle -> fallback -> review is the longest path; more is a loop.
_MAX_HOPS = 8


@dataclass(frozen=True)
class Outcome:
    """Where one request ended and what it carried there, as the pipeline delivered it.

    ``route`` uses the names of ``TestExpectation.route``: "fallback" is a
    result whose source is the fallback. ``answer`` is the model's own parsed
    answer when the model path succeeded; it differs from ``output`` only for
    clarifications, where the pipeline delivers ``{"question": ...}``.
    """

    route: Route
    output: dict[str, Any] | None = None
    confidence: float | None = None
    reason: str | None = None
    detail: str = ""
    status: str | None = None
    prompt: PromptRef | None = None
    usage: Usage = field(default_factory=Usage)
    answer_valid: bool = False
    answer: dict[str, Any] | None = None
    settled: Result | Escalation | None = None
    """What the settle stage decided (its confidence and components), before any fallback;
    None when the request never reached it."""

    @classmethod
    def from_result(cls, result: Result, answer: dict[str, Any] | None = None) -> Outcome:
        if result.source == "model":
            route: Route = "result"
        elif result.source == "fallback":
            route = "fallback"
        else:  # a human decided it: the pipeline itself had routed it to review
            route = "review"
        return cls(
            route=route,
            output=result.output,
            confidence=result.confidence,
            reason=result.reason,
            status=result.status,
            prompt=result.prompt,
            usage=result.usage,
            answer_valid=result.source == "model" or result.reason in VALID_ANSWER_REASONS,
            answer=answer if result.source == "model" else None,
        )

    @classmethod
    def from_review(cls, escalation: Escalation) -> Outcome:
        return cls(
            route="review",
            output=escalation.output,
            confidence=escalation.confidence,
            reason=escalation.reason,
            detail=escalation.detail,
            prompt=escalation.validated.prompt,
            usage=escalation.usage,
            answer_valid=escalation.reason in VALID_ANSWER_REASONS,
        )

    @classmethod
    def from_dead_letter(cls, dead: DeadLetter) -> Outcome:
        return cls(
            route="dead_letter",
            reason=dead.reason,
            detail=f"{dead.stage}: {dead.error_class}: {dead.message}",
            prompt=dead.prompt,
        )

    def checked_output(self) -> dict[str, Any] | None:
        """The object test expectations look at: the delivered output, except clarifications.

        A clarification is delivered as ``{"question": ...}`` with status
        ``needs_clarification``, which is not an instance of the prompt's
        output schema; authors write expectations against that schema (e.g.
        ``needs_clarification: true``), so they see the model's answer with the
        question as delivered.
        """
        if self.status == "needs_clarification" and self.answer is not None:
            return {**self.answer, **(self.output or {})}
        return self.output


class RecordedAnswerClient:
    """A model client that answers every call, re-asks included, with one recorded text.

    Offline tests must be deterministic and free, and a recorded answer
    replayed on a re-ask is exactly what a stubborn model does, which is
    the case re-ask and fallback handling exist for. No token log
    probabilities are recorded, so confidence has no logprob component.
    """

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.calls = 0

    async def complete(
        self,
        request: ChatRequest,
        deadline: datetime | None = None,
        *,
        prompt: str | None = None,
        models: Sequence[str] | None = None,
    ) -> ChatCompletion:
        self.calls += 1
        prompt_text = "\n".join(m["content"] for m in request.messages)
        return ChatCompletion(
            text=self.answer,
            model=request.model,
            finish_reason="stop",
            prompt_tokens=estimate_tokens(prompt_text),
            completion_tokens=estimate_tokens(self.answer),
        )


class _LastAnswer:
    """Wraps a client to remember the last text it returned (what the Settler parsed last)."""

    def __init__(self, inner: CallingClient) -> None:
        self._inner = inner
        self.text: str | None = None

    async def complete(
        self,
        request: ChatRequest,
        deadline: datetime | None = None,
        *,
        prompt: str | None = None,
        models: Sequence[str] | None = None,
    ) -> ChatCompletion:
        answer = await self._inner.complete(request, deadline, prompt=prompt, models=models)
        self.text = answer.text
        return answer


def live_client(settings: Settings, control: ControlState | None = None) -> ResilientClient:
    """The client a worker builds from ``settings``: endpoints, keys, retries, fallback models.

    ``control`` supplies the operators' ``endpoint_enabled`` switches, so a
    tool never calls an endpoint that production has switched off; without
    it every endpoint counts as enabled.
    """
    return resilient_client(settings, control or ControlState())


class StageHarness:
    """Every stage of the topology wired in memory, with an empty control state.

    Control state is deliberately empty (no pins, no flags): a test or a shadow run names
    the version it wants, and a kill switch or ``force_review`` flag active in
    production must not make a prompt's own tests fail or pass. For the same
    reason no quality breaker is attached: evaluation traffic must neither
    be cut short by production's breaker state nor feed it. Input limits and
    content rules are the code defaults (which are also ``Settings``'
    defaults), so a prompt's verdict does not depend on where it is run.

    The steps are the worker's own (:mod:`pipeline.stages.table`), and the next stage is
    the one the topology says reads the topic a decision produced to, so a stage added to
    the table is followed here without a change.
    """

    def __init__(
        self,
        registry: PromptRegistry,
        timeout_cap_s: float = 30.0,
        monitor: DistributionMonitor | None = None,
    ) -> None:
        """``monitor`` watches the settled answers (an evaluation's own, never production's)."""
        self._registry = registry
        self._control = ControlState()
        self._timeout_cap_s = timeout_cap_s
        self._monitor = monitor

    async def run(
        self, request: Request, client: CallingClient, key: bytes | None = None
    ) -> Outcome:
        """Follow ``request`` from validation to its terminal route, as the workers would."""
        recorder = _LastAnswer(client)
        deps = StageDeps(
            self._registry,
            self._control,
            recorder,
            timeout_cap_s=self._timeout_cap_s,
            monitor=self._monitor,
        )
        steps = build_steps(deps)
        first = topology.stage_reading(topology.REQUESTS)
        assert first is not None and first.raw, "the stage reading requests decodes them"
        decision = await _decide(
            steps[first.name], RawInput(request.model_dump_json().encode(), key, _JSON)
        )
        settled: Result | Escalation | None = None
        for _ in range(_MAX_HOPS):
            if isinstance(decision, DeadLetter):
                return replace(Outcome.from_dead_letter(decision), settled=settled)
            envelope = decision.envelope
            stage = topology.stage_reading(decision.topic)
            if stage is not None:
                decision = await _decide(steps[stage.name], envelope)
                if (
                    stage.name == topology.SETTLE
                    and isinstance(decision, Emit)
                    and isinstance(decision.envelope, Result | Escalation)
                ):
                    settled = decision.envelope
            elif isinstance(envelope, Result):
                answer = extract_json(recorder.text)[0] if recorder.text is not None else None
                return replace(Outcome.from_result(envelope, answer), settled=settled)
            elif isinstance(envelope, Escalation):
                return replace(Outcome.from_review(envelope), settled=settled)
            else:
                raise TypeError(f"unexpected {type(envelope).__name__} on {decision.topic}")
        raise RuntimeError(f"request {request.request_id} did not settle in {_MAX_HOPS} stages")


async def _decide(step: Step, value: Any) -> Decision:
    outcome = step(value)
    return await outcome if inspect.isawaitable(outcome) else outcome
