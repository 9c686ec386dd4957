"""Confidence: several signals combined into one number in [0, 1].

Each signal is a factor in [0, 1] and the confidence is their weighted product
(``factor ** weight``), so any single strong doubt (low token probabilities, hedging, a
truncated answer, a rule that disagrees, an invented figure) is enough to pull the result
under the accept threshold; a weight of 0 records a factor without counting it. The
factors are kept in ``validation.confidence_components`` so a reviewer, the calibration
report and ``llmpipe prompts eval`` can see why a number is what it is.

Two kinds of factor:

* **Self-reports** of the answer itself: token probabilities, format warnings, hedging,
  truncation, suspected injection, re-asks, the optional self-check grade.
* **Second opinions** a prompt declares in ``confidence.components``, which catch the
  answers a small model gives fast, confidently and wrongly (valid JSON, every rule
  passed, token probabilities near 1):

  - ``agreement``: the prompt's deterministic rule answers too; each declared key field
    on which they differ multiplies by :data:`MISMATCH_FACTOR`. A rule with no opinion
    (it returns None, or lacks the field) is not counted.
  - ``grounding``: each extractive value not printed in the input multiplies by
    :data:`MISMATCH_FACTOR` (see :mod:`pipeline.stages.grounding`).
  - ``support``: free text must be supported by the input: content-word overlap, and a
    penalty per invented number or name.
  - ``consistency``: k samples at a temperature above 0; the share agreeing with the
    answer on the key fields, mapped onto ``[MISMATCH_FACTOR, 1]``.
  - ``field_logprob``: the model's probability of the key fields' values, from the
    tokens of those values only. It replaces the whole-answer ``logprob``, which a long
    free-text field drags down whatever the decision's certainty.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.prompts.model import ConfidenceComponents, ConfidencePolicy, SupportSpec
from pipeline.stages.grounding import Source, normalise, support, value_is_printed
from pipeline.stages.parse import field_at

FORMAT_WARNING_FACTOR = {"json_in_code_fence": 0.95, "json_in_prose": 0.8}
HEDGING_FACTOR = 0.5
TRUNCATED_FACTOR = 0.3
INJECTION_FACTOR = 0.5
REASK_FACTOR = 0.85
MISMATCH_FACTOR = 0.25
"""One key field on which a second opinion disagrees (or one unprinted extractive value)."""
MIN_FACTOR = 1e-3
"""Floor under every factor, so that a weight below 1 can still soften a zero."""

SECOND_OPINIONS = ("agreement", "grounding", "support", "consistency", "field_logprob")


def score(
    token_logprobs: Sequence[float],
    warnings: Sequence[str],
    finish_reason: str | None,
    input_flags: Sequence[str],
    reasks: int = 0,
    self_check: float | None = None,
    second_opinions: Mapping[str, float] | None = None,
    weights: Mapping[str, float] | None = None,
) -> tuple[float, dict[str, float]]:
    """``(confidence, components)``; ``weights`` default to 1 for every component."""
    components: dict[str, float] = {}
    if self_check is not None:
        components["self_check"] = self_check
    opinions = dict(second_opinions or {})
    if token_logprobs and "field_logprob" not in opinions:
        mean = sum(token_logprobs) / len(token_logprobs)
        components["logprob"] = math.exp(max(mean, -50.0))
    fmt = 1.0
    for warning in warnings:
        fmt *= FORMAT_WARNING_FACTOR.get(warning, 1.0)
    components["format"] = fmt
    components["hedging"] = HEDGING_FACTOR if "hedging_language" in warnings else 1.0
    components["finish"] = TRUNCATED_FACTOR if finish_reason == "length" else 1.0
    components["input"] = INJECTION_FACTOR if "prompt_injection_suspected" in input_flags else 1.0
    components["reask"] = REASK_FACTOR**reasks
    components.update(opinions)
    return combine(components, weights or {}), components


def combine(components: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """The weighted product, clamped to [0, 1] and rounded as results carry it."""
    confidence = 1.0
    for name, value in components.items():
        weight = weights.get(name, 1.0)
        if weight:
            confidence *= max(MIN_FACTOR, min(1.0, value)) ** weight
    return round(min(1.0, max(0.0, confidence)), 6)


def weights_of(policy: ConfidencePolicy) -> dict[str, float]:
    """The declared weight of each component; undeclared ones weigh 1."""
    weights: dict[str, float] = {}
    spec = policy.components
    for name in SECOND_OPINIONS:
        component = getattr(spec, name)
        if component is not None:
            weights[name] = component.weight
    self_check = policy.self_check_spec
    if self_check is not None:
        weights["self_check"] = self_check.weight
    return weights


# -- second opinions -----------------------------------------------------------------


@dataclass(frozen=True)
class Evidence:
    """What the second opinions look at for one valid answer."""

    output: dict[str, Any]
    variables: dict[str, Any]
    text: str = ""
    tokens: Sequence[str] = ()
    token_logprobs: Sequence[float] = ()
    opinion: dict[str, Any] | None = None
    """The deterministic rule's answer, or None when it has no opinion."""
    samples: Sequence[dict[str, Any] | None] = field(default_factory=tuple)
    """Parsed extra answers for self-consistency; None for an unparsable one."""


def second_opinions(spec: ConfidenceComponents, evidence: Evidence) -> dict[str, float]:
    """Every declared component that has something to say about this answer."""
    found: dict[str, float] = {}
    source: Source | None = None
    if spec.agreement is not None and evidence.opinion is not None:
        value = agreement(evidence.output, evidence.opinion, spec.agreement.fields)
        if value is not None:
            found["agreement"] = value
    if spec.grounding is not None:
        source = Source.of(evidence.variables)
        value = grounding(evidence.output, source, spec.grounding.fields)
        if value is not None:
            found["grounding"] = value
    if spec.support is not None:
        source = source or Source.of(evidence.variables)
        value = text_support(evidence.output, source, spec.support)
        if value is not None:
            found["support"] = value
    if spec.consistency is not None and evidence.samples:
        found["consistency"] = consistency(
            evidence.output, evidence.samples, spec.consistency.fields
        )
    if spec.field_logprob is not None:
        value = field_logprob(
            evidence.text,
            evidence.tokens,
            evidence.token_logprobs,
            evidence.output,
            spec.field_logprob.fields,
        )
        if value is not None:
            found["field_logprob"] = value
    return found


def same_value(a: Any, b: Any) -> bool:
    """Equal as a reader would judge: strings by normalised text, numbers numerically,
    lists as sets (citation order carries no meaning)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return abs(float(a) - float(b)) < 1e-9
    if isinstance(a, str) and isinstance(b, str):
        return normalise(a) == normalise(b)
    if isinstance(a, list) and isinstance(b, list):
        key = lambda v: json.dumps(v, sort_keys=True)  # noqa: E731
        return sorted(map(key, a)) == sorted(map(key, b))
    return bool(a == b)


def agreement(
    output: dict[str, Any], opinion: dict[str, Any], fields: Sequence[str]
) -> float | None:
    """``MISMATCH_FACTOR ** disagreements`` over the fields the rule has a value for."""
    compared = 0
    disagreements = 0
    for path in fields:
        has_rule, rule_value = field_at(opinion, path)
        has_model, model_value = field_at(output, path)
        if not has_rule or rule_value is None or not has_model:
            continue
        compared += 1
        if not same_value(model_value, rule_value):
            disagreements += 1
    return MISMATCH_FACTOR**disagreements if compared else None


def grounding(output: dict[str, Any], source: Source, fields: Sequence[str]) -> float | None:
    """``MISMATCH_FACTOR ** unprinted`` over the checkable extractive values."""
    checked = 0
    unprinted = 0
    for path in fields:
        found, value = field_at(output, path)
        verdict = value_is_printed(value, source) if found else None
        if verdict is None:
            continue
        checked += 1
        unprinted += not verdict
    return MISMATCH_FACTOR**unprinted if checked else None


def text_support(output: dict[str, Any], source: Source, spec: SupportSpec) -> float | None:
    """The product over the free-text fields of scaled support times the invention penalty."""
    value: float | None = None
    for path in spec.fields:
        found, text = field_at(output, path)
        if not found or not isinstance(text, str):
            continue
        measured = support(text, source)
        ratio = measured.ratio
        if ratio is None and not measured.invented:
            continue
        scaled = 1.0 if ratio is None else min(1.0, ratio / spec.full_support)
        factor = scaled * spec.invented_penalty ** len(measured.invented)
        value = factor if value is None else value * factor
    return None if value is None else round(value, 6)


def consistency(
    output: dict[str, Any], samples: Sequence[dict[str, Any] | None], fields: Sequence[str]
) -> float:
    """Mean share of key fields on which each sample matches the answer, onto [0.25, 1]."""
    shares: list[float] = []
    for sample in samples:
        if sample is None:
            shares.append(0.0)
            continue
        same = 0
        for path in fields:
            has_a, a = field_at(output, path)
            has_b, b = field_at(sample, path)
            same += has_a and has_b and same_value(a, b)
        shares.append(same / len(fields))
    mean = sum(shares) / len(shares)
    return round(MISMATCH_FACTOR + (1 - MISMATCH_FACTOR) * mean, 6)


def field_logprob(
    text: str,
    tokens: Sequence[str],
    token_logprobs: Sequence[float],
    output: dict[str, Any],
    fields: Sequence[str],
) -> float | None:
    """The joint probability of the key fields' values: ``exp`` of the summed logprobs of
    the tokens that spell them. None unless the tokens spell the text exactly (no
    per-token text from the API, or a different answer than the one parsed)."""
    if not tokens or len(tokens) != len(token_logprobs) or "".join(tokens) != text:
        return None
    ends: list[int] = []
    position = 0
    for token in tokens:
        position += len(token)
        ends.append(position)
    total = 0.0
    located = 0
    for path in fields:
        span = value_span(text, path.rsplit(".", 1)[-1], field_at(output, path)[1])
        if span is None:
            continue
        start, end = span
        located += 1
        for index, token_end in enumerate(ends):
            token_start = token_end - len(tokens[index])
            if token_end > start and token_start < end:
                total += token_logprobs[index]
    if not located:
        return None
    return round(math.exp(max(total, -50.0)), 6)


_DECODER = json.JSONDecoder()


def value_span(text: str, key: str, expected: Any) -> tuple[int, int] | None:
    """Character span of the value of ``"key":`` in ``text`` that decodes to ``expected``;
    a string's span excludes its quotes. The first matching occurrence wins."""
    needle = json.dumps(key)
    start = text.find(needle)
    while start != -1:
        colon = start + len(needle)
        while colon < len(text) and text[colon] in " \t\r\n":
            colon += 1
        if colon < len(text) and text[colon] == ":":
            begin = colon + 1
            while begin < len(text) and text[begin] in " \t\r\n":
                begin += 1
            try:
                value, end = _DECODER.raw_decode(text, begin)
            except ValueError:
                value, end = None, begin
            if end > begin and value == expected:
                if isinstance(value, str):
                    return begin + 1, end - 1
                return begin, end
        start = text.find(needle, start + 1)
    return None
