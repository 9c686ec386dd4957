"""Stage 3: parse, check, score and route one completion.

A failed parse earns a bounded number of re-asks with the errors fed back (the cheapest
repair there is); a still-invalid answer goes to the fallback path. A valid answer is
scored, and the prompt's thresholds decide: accept into ``llm.results``, or follow the
prompt's low-confidence policy (review, fallback or a clarifying question).

An answer that would be accepted still meets the prompt's review policy
(:mod:`pipeline.stages.policy`): a risk rule that fires sends it to review (``high_risk``),
a version in burn-in holds it for review (``burn_in``), and an audited one is delivered
and copied to review in the same decision (``audit``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

from pipeline.contract.decisions import DeadLetter, Decision, Emit
from pipeline.contract.envelopes import (
    Completion,
    Escalation,
    ModelCall,
    Request,
    Result,
    ResultStatus,
    Usage,
    ValidatedRequest,
    ValidationReport,
    utc_now,
)
from pipeline.contract.topology import ROUTE_FALLBACK, ROUTE_REVIEW, SETTLE
from pipeline.control.state import FORCE_REVIEW, ControlState
from pipeline.llm.protocol import ChatCompletion, ModelError
from pipeline.observability.propagation import current_trace_id
from pipeline.prompts.model import BurnInPolicy, PromptVersion
from pipeline.prompts.registry import PromptRegistry
from pipeline.prompts.render import render_messages
from pipeline.resilience.breaker import QualityBreaker
from pipeline.stages.decisions import bind_prompt, emit_audit, emit_escalation, emit_result
from pipeline.stages.model_call import (
    REASK,
    SAMPLE,
    SELF_CHECK,
    CallingClient,
    calls_of,
    chat_request,
    model_chain,
    usage_of,
)
from pipeline.stages.monitor import DistributionMonitor, Observation
from pipeline.stages.parse import CheckFn, ParseOutcome, extract_json, parse_output
from pipeline.stages.policy import (
    ASKED_BACK,
    AUDIT,
    BURN_IN,
    FORCE_REVIEW_REASON,
    HIGH_RISK,
    LOW_CONFIDENCE,
    BurnInGate,
    RiskRuleError,
    audited,
    risk_hits,
)
from pipeline.stages.score import Evidence, score, second_opinions, weights_of
from pipeline.stages.self_check import grade, grading_request

log = logging.getLogger("llmpipe.settle")

STAGE = SETTLE
DEFAULT_CLARIFY_QUESTION = "Your request is ambiguous. Could you add the missing details?"
REASK_TEMPLATE = (
    "Your previous answer was rejected:\n{errors}\n"
    "Reply again with only a JSON object that satisfies the schema and the rules."
)


class Settler:
    def __init__(
        self,
        registry: PromptRegistry,
        control: ControlState,
        client: CallingClient | None,
        timeout_cap_s: float = 30.0,
        quality: QualityBreaker | None = None,
        burn_in: BurnInGate | None = None,
        monitor: DistributionMonitor | None = None,
    ) -> None:
        """``client`` is None for re-parse replays: then no re-ask is ever made.

        ``quality`` learns from every settled answer (valid and confident, or not); the
        model stage asks it before paying for the next call of the same prompt version.
        ``burn_in`` counts new versions' answers fleet-wide; without one (offline prompt
        tests, shadow runs) no answer is held for burn-in.
        ``monitor`` sees every decision of versions that declare a distribution monitor.
        """
        self._registry = registry
        self._control = control
        self._client = client
        self._timeout_cap_s = timeout_cap_s
        self._quality = quality
        self._burn_in = burn_in
        self._monitor = monitor

    async def _self_check(
        self, pv: PromptVersion, request: Request, output: dict[str, Any], calls: list[ModelCall]
    ) -> tuple[float | None, ChatCompletion | None]:
        """The grader's score; charged to ``<prompt>.self_check``, its own budget. Its tries
        are added to ``calls``."""
        assert self._client is not None
        spec = pv.confidence.self_check_spec
        assert spec is not None
        call = grading_request(
            pv, render_messages(pv, request.variables), output, self._timeout_cap_s, spec
        )
        models = [spec.model] if spec.model is not None else model_chain(pv)
        try:
            answer = await self._client.complete(
                call, deadline=request.deadline, prompt=f"{pv.name}.self_check", models=models
            )
        except ModelError as exc:
            calls += calls_of(SELF_CHECK, exc.calls)
            return None, None
        calls += calls_of(SELF_CHECK, answer.calls)
        return grade(answer), answer

    async def _samples(
        self, pv: PromptVersion, request: Request, calls: list[ModelCall]
    ) -> tuple[list[dict[str, Any] | None], list[ChatCompletion]]:
        """Self-consistency samples: the same prompt at the declared temperature.

        A failed call is not a disagreement: it is left out. An unparsable sample is one
        (None), since the model would have given that answer.
        """
        assert self._client is not None
        spec = pv.confidence.components.consistency
        assert spec is not None
        base = chat_request(pv, render_messages(pv, request.variables), self._timeout_cap_s)
        call = replace(base, temperature=spec.temperature, logprobs=False)
        client = self._client

        async def one() -> ChatCompletion | None:
            try:
                answer = await client.complete(
                    call, deadline=request.deadline, prompt=pv.name, models=model_chain(pv)
                )
            except ModelError as exc:
                calls.extend(calls_of(SAMPLE, exc.calls))
                return None
            calls.extend(calls_of(SAMPLE, answer.calls))
            return answer

        answers = [a for a in await asyncio.gather(*(one() for _ in range(spec.samples))) if a]
        return [extract_json(a.text)[0] for a in answers], answers

    def _opinion(self, pv: PromptVersion, request: Request) -> dict[str, Any] | None:
        """The agreement rule's answer; a crashing rule has no opinion (and says why)."""
        rule = self._registry.resolve_opinion(pv)
        if rule is None:
            return None
        try:
            return rule(request.variables)
        except Exception:  # user code: a broken rule must not break the answer it judges
            log.exception("agreement rule of %s raised; not counted", pv.ref)
            return None

    def _observe(self, pv: PromptVersion, decision: Decision) -> None:
        if self._monitor is None or not isinstance(decision, Emit):
            return
        envelope = decision.envelope
        if isinstance(envelope, Result):
            observation = Observation(envelope.output, envelope.confidence, decision.route)
        elif isinstance(envelope, Escalation):
            # Only a scored answer carries a confidence; an invalid one has no output to count.
            scored = envelope.confidence is not None
            output = envelope.output if scored else None
            observation = Observation(output, envelope.confidence, decision.route)
        else:
            return
        self._monitor.observe(pv, observation)

    def _record_quality(self, pv: PromptVersion, ok: bool) -> None:
        if self._quality is not None:
            self._quality.record(pv.ref, ok)

    def _checks(self, pv: PromptVersion) -> Callable[[str], CheckFn]:
        return lambda ref: self._registry.resolve_check(pv, ref)

    async def __call__(self, completion: Completion, now: datetime | None = None) -> Decision:
        validated = completion.validated
        pv = bind_prompt(self._registry, validated, STAGE, completion.attempts)
        if isinstance(pv, DeadLetter):
            return pv
        decision = await self._settle(pv, completion, now)
        self._observe(pv, decision)
        return decision

    async def _settle(
        self, pv: PromptVersion, completion: Completion, now: datetime | None
    ) -> Decision:
        validated = completion.validated
        request = validated.request
        text = completion.raw_text
        attempts = completion.attempts
        usage = completion.usage
        logprobs = completion.token_logprobs
        tokens = completion.tokens
        finish = completion.finish_reason
        outcome = parse_output(pv, text, request.variables, self._checks(pv))
        calls = list(completion.calls)
        reasks = 0
        while (
            not outcome.ok
            and not outcome.refusal
            and reasks < pv.reask
            and self._client is not None
            and self._control.model_calls_enabled()
        ):
            reasks += 1
            messages = [
                *render_messages(pv, request.variables),
                {"role": "assistant", "content": text[:4000]},
                {
                    "role": "user",
                    "content": REASK_TEMPLATE.format(errors="\n".join(outcome.errors)),
                },
            ]
            try:
                answer = await self._client.complete(
                    chat_request(pv, messages, self._timeout_cap_s),
                    deadline=request.deadline,
                    prompt=pv.name,
                    models=model_chain(pv),
                )
            except ModelError as exc:
                attempts += exc.attempts
                calls += calls_of(REASK, exc.calls)
                break
            attempts += answer.attempts
            calls += calls_of(REASK, answer.calls)
            usage = usage.plus(usage_of(answer))
            text, logprobs, finish = answer.text, answer.token_logprobs, answer.finish_reason
            tokens = answer.tokens
            outcome = parse_output(pv, text, request.variables, self._checks(pv))
        if not outcome.ok:
            self._record_quality(pv, ok=False)
            reason = "refusal" if outcome.refusal else "invalid_output"
            report = ValidationReport(
                checks=outcome.checks, warnings=outcome.warnings, errors=outcome.errors
            )
            return emit_escalation(
                STAGE,
                ROUTE_FALLBACK,
                self._escalation(
                    validated,
                    completion,
                    reason,
                    outcome,
                    report,
                    text,
                    usage,
                    attempts,
                    "; ".join(outcome.errors)[:500] or reason,
                    calls=calls,
                ),
            )
        assert outcome.output is not None
        self_score: float | None = None
        clarify_field = pv.confidence.clarify_field
        asks_back = bool(clarify_field and outcome.output.get(clarify_field))
        may_call = (
            not asks_back and self._client is not None and self._control.model_calls_enabled()
        )
        if pv.confidence.self_check_spec is not None and may_call:
            self_score, grading = await self._self_check(pv, request, outcome.output, calls)
            if grading is not None:
                attempts += grading.attempts
                usage = usage.plus(usage_of(grading))
            if self_score is None:
                outcome.warnings.append("self_check_unusable")
        spec = pv.confidence.components
        samples: list[dict[str, Any] | None] = []
        if spec.consistency is not None and may_call:
            samples, sampled = await self._samples(pv, request, calls)
            for answer in sampled:
                attempts += answer.attempts
                usage = usage.plus(usage_of(answer))
            if not sampled:
                outcome.warnings.append("consistency_unavailable")
        evidence = Evidence(
            output=outcome.output,
            variables=request.variables,
            text=text,
            tokens=tokens,
            token_logprobs=logprobs,
            opinion=self._opinion(pv, request) if spec.agreement is not None else None,
            samples=samples,
        )
        confidence, components = score(
            logprobs,
            outcome.warnings,
            finish,
            validated.flags,
            reasks,
            self_score,
            second_opinions(spec, evidence),
            weights_of(pv.confidence),
        )
        self._record_quality(pv, ok=confidence >= pv.confidence.accept)
        report = ValidationReport(
            checks=outcome.checks, warnings=outcome.warnings, confidence_components=components
        )
        if self._control.flag(FORCE_REVIEW, pv.name):
            esc = self._escalation(
                validated,
                completion,
                FORCE_REVIEW_REASON,
                outcome,
                report,
                text,
                usage,
                attempts,
                "force_review is on for this prompt",
                confidence,
                calls=calls,
            )
            return emit_escalation(STAGE, ROUTE_REVIEW, esc)
        policy = pv.confidence

        def settled(status: ResultStatus, output: dict[str, Any], reason: str | None) -> Emit:
            return emit_result(
                STAGE,
                self._result(
                    validated,
                    completion,
                    status,
                    output,
                    confidence,
                    report,
                    usage,
                    attempts,
                    now,
                    reason,
                    calls,
                ),
            )

        if asks_back:
            return settled("needs_clarification", _question(outcome.output), ASKED_BACK)
        if confidence >= policy.accept:

            def review(reason: str, detail: str, rules: list[str] | None = None) -> Escalation:
                esc = self._escalation(
                    validated,
                    completion,
                    reason,
                    outcome,
                    report,
                    text,
                    usage,
                    attempts,
                    detail,
                    confidence,
                    calls=calls,
                )
                return esc.model_copy(update={"risk_rules": rules}) if rules else esc

            return await self._accepted(
                pv, validated, outcome.output, settled("ok", outcome.output, None), review
            )
        if policy.policy == "clarify":
            return settled("needs_clarification", _question(outcome.output), LOW_CONFIDENCE)
        route = ROUTE_REVIEW if policy.policy == "review" else ROUTE_FALLBACK
        detail = f"confidence {confidence:.3f} below accept threshold {policy.accept}"
        esc = self._escalation(
            validated,
            completion,
            LOW_CONFIDENCE,
            outcome,
            report,
            text,
            usage,
            attempts,
            detail,
            confidence,
            calls=calls,
        )
        return emit_escalation(STAGE, route, esc)

    async def _accepted(
        self,
        pv: PromptVersion,
        validated: ValidatedRequest,
        output: dict[str, Any],
        result: Emit,
        review: Callable[..., Escalation],
    ) -> Decision:
        """An acceptable answer meets the review policy: risk rules, burn-in, audit."""
        request = validated.request
        try:
            hits = risk_hits(pv, output, request.variables, self._checks(pv))
        except RiskRuleError as exc:
            return DeadLetter(
                STAGE,
                "risk_rule_failed",
                exc.error_class,
                str(exc),
                request.request_id,
                validated.prompt,
            )
        if hits:
            detail = "; ".join(f"{h.rule}: {h.detail}" for h in hits)
            return emit_escalation(
                STAGE, ROUTE_REVIEW, review(HIGH_RISK, detail[:2000], [h.rule for h in hits])
            )
        burn_in = pv.review.burn_in
        if (
            burn_in.active
            and self._burn_in is not None
            and await self._burn_in.holds(validated.prompt, burn_in, request.request_id)
        ):
            detail = f"{pv.ref} is in burn-in ({_burn_in_terms(burn_in)})"
            return emit_escalation(STAGE, ROUTE_REVIEW, review(BURN_IN, detail))
        if audited(pv, request.request_id):
            share = pv.review.audit.share
            detail = f"audit sample ({share:.2%} of accepted answers); already delivered"
            return emit_audit(STAGE, result, review(AUDIT, detail))
        return result

    def _result(
        self,
        validated: ValidatedRequest,
        completion: Completion,
        status: ResultStatus,
        output: dict[str, Any],
        confidence: float,
        report: ValidationReport,
        usage: Usage,
        attempts: int,
        now: datetime | None,
        reason: str | None,
        calls: list[ModelCall],
    ) -> Result:
        produced = now or utc_now()
        return Result(
            request_id=validated.request.request_id,
            status=status,
            output=output,
            confidence=confidence,
            source="model",
            prompt=validated.prompt,
            model=completion.model,
            usage=usage,
            latency_ms=_elapsed_ms(validated, produced),
            attempts=attempts,
            validation=report,
            metadata=validated.request.metadata,
            trace_id=current_trace_id(),
            reason=reason,
            produced_at=produced,
            calls=calls,
        )

    @staticmethod
    def _escalation(
        validated: ValidatedRequest,
        completion: Completion,
        reason: str,
        outcome: ParseOutcome,
        report: ValidationReport,
        text: str,
        usage: Usage,
        attempts: int,
        detail: str,
        confidence: float | None = None,
        *,
        calls: list[ModelCall],
    ) -> Escalation:
        return Escalation(
            validated=validated,
            reason=reason,
            detail=detail,
            output=outcome.output,
            raw_text=text[:20_000],
            model=completion.model,
            confidence=confidence,
            validation=report,
            usage=usage,
            attempts=attempts,
            escalated_at=utc_now(),
            calls=calls,
        )


def _burn_in_terms(policy: BurnInPolicy) -> str:
    terms = []
    if policy.answers:
        terms.append(f"first {policy.answers} answers")
    if policy.days:
        terms.append(f"first {policy.days:g} days")
    return " and ".join(terms)


def _question(output: dict[str, Any]) -> dict[str, Any]:
    question = output.get("question")
    if not isinstance(question, str) or not question.strip():
        question = DEFAULT_CLARIFY_QUESTION
    return {"question": question}


def _elapsed_ms(validated: ValidatedRequest, now: datetime) -> float:
    return max(0.0, (now - validated.received_at).total_seconds() * 1000)
