"""Audit items: copies of results already delivered, sent to a person for a verdict.

An audit item looks like any review item (reason ``audit``), but its request was settled
when the item was made: the model's answer is on ``llm.results``. So a decision on it
never delivers the answer again. What it produces instead:

* approve: the decision only (the verdict "correct");
* edit: the decision and a ``Correction`` (training data), plus, when the prompt version's
  ``review.audit.supersede`` is on, a superseding ``Result`` with source ``human`` and
  reason ``audit_correction`` for consumers that want the fixed answer;
* reject or clarify: the decision only (the verdict "wrong"; there is no better answer).

Verdicts are what calibration learns from: approve counts as a correct accepted answer,
every other action as an accepted answer that was wrong.
"""

from __future__ import annotations

from pipeline.contract.envelopes import Escalation
from pipeline.prompts.errors import PromptError
from pipeline.prompts.registry import PromptRegistry
from pipeline.stages.policy import AUDIT

AUDIT_CORRECTION = "audit_correction"
VERDICTS = {"approve": "correct", "edit": "corrected", "reject": "wrong", "clarify": "unclear"}


def is_audit(escalation: Escalation) -> bool:
    return escalation.reason == AUDIT


def supersedes(escalation: Escalation, registry: PromptRegistry) -> bool:
    """Whether an edit of this audit item is also published as a superseding result."""
    ref = escalation.validated.prompt
    try:
        return registry.get(ref.name, ref.version).review.audit.supersede
    except PromptError:
        return False


def delivers_result(escalation: Escalation, action: str, registry: PromptRegistry) -> bool:
    """Whether a decision with ``action`` puts a ``Result`` on ``llm.results``."""
    if action not in ("approve", "edit", "clarify"):
        return False
    if not is_audit(escalation):
        return True
    return action == "edit" and supersedes(escalation, registry)
