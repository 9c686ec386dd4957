"""Confidence: several weak signals combined into one number in [0, 1].

Each signal is a factor in [0, 1] and the confidence is their product, so any single
strong doubt (very low token probabilities, hedging, a truncated answer) is enough to pull
the result under the accept threshold. The factors are kept in the validation report so a
reviewer, and the calibration report, can see why a number is what it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

FORMAT_WARNING_FACTOR = {"json_in_code_fence": 0.95, "json_in_prose": 0.8}
HEDGING_FACTOR = 0.5
TRUNCATED_FACTOR = 0.3
INJECTION_FACTOR = 0.5
REASK_FACTOR = 0.85


def score(
    token_logprobs: Sequence[float],
    warnings: Sequence[str],
    finish_reason: str | None,
    input_flags: Sequence[str],
    reasks: int = 0,
    self_check: float | None = None,
) -> tuple[float, dict[str, float]]:
    components: dict[str, float] = {}
    if self_check is not None:
        components["self_check"] = self_check
    if token_logprobs:
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
    confidence = 1.0
    for value in components.values():
        confidence *= value
    return round(min(1.0, max(0.0, confidence)), 6), components
