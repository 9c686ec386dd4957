"""Humans in the loop by policy: which acceptable answers a person sees anyway.

The settle stage routes an answer to a person for one of these reasons:

* ``low_confidence``: the pipeline is not sure (the confidence policy);
* ``high_risk``: it is sure, but what the answer *says* needs a person (a risk rule);
* ``burn_in``: the prompt version is new and has not earned trust yet (blocking);
* ``audit``: a share of accepted answers, delivered at once and copied for a verdict,
  which is the unbiased sample calibration needs;
* ``force_review``: an operator switched review on for the whole prompt.

Everything here is plain logic. Burn-in counting is the one piece of fleet-wide state, so
it sits behind :class:`BurnInGate`; the Kafka implementation lives in the transport layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.contract.envelopes import PromptRef
from pipeline.prompts.model import BurnInPolicy, PromptVersion, RiskRule
from pipeline.prompts.references import CheckFn
from pipeline.prompts.serving import canary_bucket

LOW_CONFIDENCE = "low_confidence"
HIGH_RISK = "high_risk"
BURN_IN = "burn_in"
AUDIT = "audit"
FORCE_REVIEW_REASON = "force_review"
ASKED_BACK = "model_asked_for_clarification"
"""A result whose question comes from the model itself (it set the clarify field); a
clarification sent because confidence was low (policy ``clarify``) says LOW_CONFIDENCE."""
REVIEW_REASONS = (LOW_CONFIDENCE, HIGH_RISK, BURN_IN, AUDIT, FORCE_REVIEW_REASON)

AUDIT_BUCKETS = 10_000
"""The range of :func:`canary_bucket`; a share of 0.1 audits buckets 0..999."""


@dataclass(frozen=True, slots=True)
class RiskHit:
    rule: str
    detail: str


class RiskRuleError(Exception):
    """A risk rule that raised or returned something other than a list of strings.

    The settle stage turns it into a dead letter naming the rule: an answer whose risk
    cannot be judged must neither be delivered unchecked nor take the worker down.
    """

    def __init__(self, rule: RiskRule, problem: str, cause: BaseException | None = None) -> None:
        super().__init__(f"risk rule {rule.name!r} ({rule.check or rule.when}) {problem}")
        self.rule = rule
        self.error_class = type(cause).__name__ if cause is not None else "RiskRuleError"


def risk_hits(
    prompt: PromptVersion,
    output: dict[str, Any],
    variables: dict[str, Any],
    resolve: Callable[[str], CheckFn],
) -> list[RiskHit]:
    """Every risk rule of ``prompt`` that fires on this answer, in file order."""
    hits: list[RiskHit] = []
    for rule in prompt.review.risk:
        condition = rule.condition
        if condition is not None:
            detail = condition.matches(output, variables)
            if detail is not None:
                hits.append(RiskHit(rule.name, detail))
            continue
        assert rule.check is not None
        function = resolve(rule.check)
        try:
            reasons = function(output, variables)
        except Exception as exc:  # user code: any failure is this rule's failure
            raise RiskRuleError(rule, f"raised {type(exc).__name__}: {exc}", exc) from exc
        if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
            raise RiskRuleError(rule, f"returned {type(reasons).__name__}, expected list[str]")
        if reasons:
            hits.append(RiskHit(rule.name, "; ".join(reasons)))
    return hits


def audit_bucket(prompt: str, request_id: str) -> int:
    """A stable bucket in [0, 10000) for ``request_id``, like a canary bucket but salted
    differently, so the audited requests are independent of the canary arms."""
    return canary_bucket(f"audit:{prompt}", request_id)


def audited(prompt: PromptVersion, request_id: str) -> bool:
    """Whether this accepted answer is copied to review: reproducible from the id alone."""
    share = prompt.review.audit.share
    return share > 0 and audit_bucket(prompt.name, request_id) < share * AUDIT_BUCKETS


class BurnInGate(Protocol):
    """Counts a prompt version's answers across the fleet, durably."""

    async def holds(self, prompt: PromptRef, policy: BurnInPolicy, request_id: str) -> bool:
        """True when this answer is one of the version's burn-in answers (review first).

        Idempotent per request id: asking again for the same request (a redelivery after a
        crash) gives the same answer, so a restart never lets an extra answer through or
        holds back one too many.
        """
        ...
