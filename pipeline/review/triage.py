"""What a reviewer needs to triage an item without opening it, and to trust its number.

* :func:`preview`: the text the queue shows per item, from the prompt's
  ``review.preview`` (input variables or ``output.`` fields) or, when the prompt
  declares none, the first string variable its input schema requires.
* :func:`explain_confidence`: each confidence component with its weight (from the
  prompt version's ``confidence`` section) and the rule that combined them
  (:func:`pipeline.stages.score.combine`, the scorer's own), checked against the recorded
  confidence, so the page never claims a rule that did not produce the number it shows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.contract.envelopes import Escalation
from pipeline.prompts.model import PromptVersion
from pipeline.review.display import one_line
from pipeline.stages.score import MIN_FACTOR, combine, weights_of

PREVIEW_CHARS = 140
PRODUCT_RULE = (
    "confidence = the product of the components, each a factor in [0, 1] raised to its "
    f"weight (floored at {MIN_FACTOR}; weight 0 records a factor without counting it): "
    "any single strong doubt pulls the result under the threshold"
)


def preview_fields(prompt: PromptVersion | None, variables: Mapping[str, Any]) -> list[str]:
    if prompt is not None and prompt.review.preview:
        return list(prompt.review.preview)
    schema = prompt.input_schema if prompt is not None else {}
    properties = schema.get("properties", {})
    required = [r for r in schema.get("required", []) if isinstance(r, str)]
    for name in [*required, *properties]:
        if isinstance(variables.get(name), str):
            return [name]
    return next(([k] for k, v in variables.items() if isinstance(v, str)), [])


def _lookup(value: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def preview(prompt: PromptVersion | None, escalation: Escalation) -> str:
    """One line, at most ``PREVIEW_CHARS``; empty when nothing fits."""
    variables = escalation.validated.request.variables
    parts: list[str] = []
    for field in preview_fields(prompt, variables):
        if field.startswith("output."):
            value = _lookup(escalation.output or {}, field.removeprefix("output."))
        else:
            value = _lookup(variables, field)
        if value is None:
            continue
        parts.append(value if isinstance(value, str) else str(value))
    return one_line(" \u00b7 ".join(parts), PREVIEW_CHARS)


@dataclass(frozen=True)
class Component:
    name: str
    value: float
    weight: float


@dataclass(frozen=True)
class ConfidenceExplanation:
    components: list[Component]
    rule: str
    combined: float | None
    """What the rule gives for these components."""
    recorded: float | None
    """What the pipeline recorded."""
    threshold: float | None

    @property
    def consistent(self) -> bool:
        if self.combined is None or self.recorded is None:
            return self.recorded is None
        return math.isclose(self.combined, self.recorded, abs_tol=1e-4)


def explain_confidence(
    escalation: Escalation, prompt: PromptVersion | None
) -> ConfidenceExplanation:
    recorded = escalation.validation.confidence_components
    weights = weights_of(prompt.confidence) if prompt is not None else {}
    components = [
        Component(name, value, weights.get(name, 1.0)) for name, value in recorded.items()
    ]
    combined = combine(recorded, weights) if components else None
    return ConfidenceExplanation(
        components=components,
        rule=PRODUCT_RULE,
        combined=combined,
        recorded=escalation.confidence,
        threshold=prompt.confidence.accept if prompt is not None else None,
    )
