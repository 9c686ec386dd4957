"""The reason codes a message can carry: one list, so tools can check names against it.

Dead-letter reasons are the ``x-dlq-reason`` of ``llm.dlq``; escalation reasons are the
``x-reason`` of fallback and review items (and of dead letters the settle stage writes for
them). The README lists both; ``tests/test_docs.py`` keeps the lists and the README in step.
"""

from __future__ import annotations

DEAD_LETTER_REASONS: tuple[str, ...] = (
    "decode_error",
    "invalid_envelope",
    "missing_request_id",
    "unknown_prompt",
    "unknown_prompt_version",
    "invalid_variables",
    "too_large",
    "blocked_content",
    "internal_error",
    "unencodable",
    "risk_rule_failed",
)
ESCALATION_REASONS: tuple[str, ...] = (
    "deadline_exceeded",
    "model_calls_disabled",
    "prompt_disabled",
    "model_timeout",
    "model_connection",
    "model_rate_limited",
    "model_server_error",
    "model_client_error",
    "model_bad_response",
    "model_unavailable",
    "budget_exceeded",
    "invalid_output",
    "refusal",
    "low_confidence",
    "force_review",
    "high_risk",
    "burn_in",
    "audit",
)
