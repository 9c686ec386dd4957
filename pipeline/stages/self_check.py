"""The optional self-evaluation call: a second, cheap question that grades the answer.

A model grading its own answer is a weak signal, but it catches answers that are
well-formed and wrong in ways no schema can see. It is one factor of the confidence, never
the decision alone, and it is only paid for when the prompt opts in (``self_check: true``).
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.llm.protocol import ChatCompletion, ChatRequest
from pipeline.prompts.model import PromptVersion, SelfCheckSpec
from pipeline.stages.parse import extract_json

SCORE_SCHEMA = {
    "type": "object",
    "required": ["score"],
    "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
}
GRADER_SYSTEM = (
    "You grade answers produced by another assistant. Judge whether the answer is correct, "
    "complete and supported by the task. Reply with only a JSON object like "
    '{"score": 0.8}, where score is the probability that the answer is right.\n'
    f"OUTPUT_SCHEMA: {json.dumps(SCORE_SCHEMA, separators=(',', ':'))}"
)
MAX_TASK_CHARS = 8_000


def grading_request(
    pv: PromptVersion,
    messages: list[dict[str, str]],
    output: dict[str, Any],
    timeout_s: float,
    spec: SelfCheckSpec | None = None,
) -> ChatRequest:
    """The grading call; ``spec`` picks its own model and token limit (default: the
    prompt's model, 20 tokens)."""
    spec = spec or SelfCheckSpec()
    task = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    answer = json.dumps(output, ensure_ascii=False)
    return ChatRequest(
        model=spec.model or pv.model.model,
        messages=[
            {"role": "system", "content": GRADER_SYSTEM},
            {"role": "user", "content": f"Task:\n{task[:MAX_TASK_CHARS]}\n\nAnswer:\n{answer}"},
        ],
        temperature=0.0,
        max_tokens=spec.max_tokens,
        timeout_s=timeout_s,
    )


def grade(answer: ChatCompletion) -> float | None:
    """The score in [0, 1], or None when the grader's reply is unusable."""
    value, errors, _ = extract_json(answer.text)
    if value is None or errors:
        return None
    score = value.get("score")
    if isinstance(score, bool) or not isinstance(score, int | float):
        return None
    return float(score) if 0.0 <= score <= 1.0 else None
