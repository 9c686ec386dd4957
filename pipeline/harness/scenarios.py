"""Scripted request mixes with known outcomes, for the demo, the tests and the benchmarks.

Each planned request says which fault it carries and where it must end up, so that a run
can be checked with :mod:`pipeline.harness.ledger`: every request found exactly once, each on the
route its fault implies. Model faults are steered with the fake model server's directives
(``[[fake:...]]``) and answer blocks (``[[answer:...]]``) inside the ticket text.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from pipeline.contract.codec import Codec
from pipeline.contract.envelopes import Request

PROMPT = "ticket_triage"

# fault -> (expected outcome, expected reason) for ticket_triage@2, which every planned
# request names (accept 0.75, low-confidence policy review, one re-ask, keyword fallback +
# safe default): the fault routes stay the same when a newer version ships.
VERSION = 2
OUTCOMES: dict[str, tuple[str, str | None]] = {
    "valid": ("result:model", None),
    "fenced": ("result:model", None),
    "hedge": ("review", "low_confidence"),
    "invalid_json": ("result:fallback", "invalid_output"),
    "wrong_schema": ("result:fallback", "invalid_output"),
    "empty": ("result:fallback", "invalid_output"),
    "garbage": ("result:fallback", "invalid_output"),
    "refusal": ("result:fallback", "refusal"),
    "server_error": ("result:fallback", "model_server_error"),
    "rate_limit": ("result:fallback", "model_rate_limited"),
    "reset": ("result:fallback", "model_connection"),
    "hang": ("result:fallback", "model_timeout"),
    "deadline_passed": ("result:fallback", "deadline_exceeded"),
    "too_large": ("dead_letter", "too_large"),
    "garbage_bytes": ("dead_letter", "decode_error"),
    "missing_id": ("dead_letter", "missing_request_id"),
    "unknown_prompt": ("dead_letter", "unknown_prompt"),
    "unknown_version": ("dead_letter", "unknown_prompt_version"),
    "invalid_variables": ("dead_letter", "invalid_variables"),
}
DIRECTIVES = {"rate_limit": "rate_limit:0.05"}

# A mix fails a fixed share of calls on purpose, spread over time; with breakers at their
# production settings the endpoint breaker would (rightly) open and send everything to the
# fallback path, hiding the per-fault routes these scenarios check. Breakers have their own
# tests; scenario runs set these.
SCENARIO_OVERRIDES: dict[str, int] = {
    "breaker_min_calls": 1_000_000,
    "quality_breaker_min_calls": 1_000_000,
}

DEFAULT_WEIGHTS: dict[str, float] = {
    "valid": 40,
    "fenced": 5,
    "hedge": 5,
    "invalid_json": 5,
    "wrong_schema": 4,
    "empty": 2,
    "garbage": 3,
    "refusal": 3,
    "server_error": 4,
    "rate_limit": 3,
    "reset": 3,
    "hang": 1,
    "deadline_passed": 3,
    "too_large": 2,
    "garbage_bytes": 4,
    "missing_id": 3,
    "unknown_prompt": 3,
    "unknown_version": 2,
    "invalid_variables": 5,
}

TICKETS = [
    (
        "Charged twice this month",
        "My credit card was charged twice for the March invoice.",
        {
            "label": "billing",
            "priority": "normal",
            "summary": "Customer was charged twice for March.",
        },
    ),
    (
        "Cannot log in",
        "After the password reset I am locked out and cannot log in at all.",
        {"label": "account", "priority": "high", "summary": "Locked out after a password reset."},
    ),
    (
        "Dashboard error",
        "The dashboard shows an error and then a timeout when I open it.",
        {
            "label": "bug",
            "priority": "normal",
            "summary": "Dashboard shows an error and times out.",
        },
    ),
    (
        "Dark mode for the console",
        "It would be great to have a dark mode, is it on the roadmap?",
        {
            "label": "feature_request",
            "priority": "low",
            "summary": "Asks for a dark mode in the UI.",
        },
    ),
]


@dataclass(frozen=True)
class PlannedRequest:
    request_id: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    fault: str

    @property
    def expected(self) -> str:
        return OUTCOMES[self.fault][0]

    @property
    def expected_reason(self) -> str | None:
        return OUTCOMES[self.fault][1]


def plan_request(request_id: str, fault: str, rng: random.Random, codec: Codec) -> PlannedRequest:
    subject, body, answer = rng.choice(TICKETS)
    directive = DIRECTIVES.get(fault, fault)
    model_fault = fault in OUTCOMES and fault not in _INPUT_FAULTS
    text = body
    if model_fault and fault != "deadline_passed":
        text = f"{body}\n[[answer:{json.dumps(answer)}]] [[fake:{directive}]]"
    fields: dict[str, object] = {
        "request_id": request_id,
        "prompt": PROMPT,
        "prompt_version": VERSION,
        "variables": {
            "subject": subject,
            "body": text,
            "customer_tier": rng.choice(["free", "pro"]),
        },
        "metadata": {"scenario": fault},
    }
    if fault == "deadline_passed":
        fields["deadline"] = "2020-01-01T00:00:00+00:00"
    elif fault == "unknown_prompt":
        fields["prompt"] = "no_such_prompt"
    elif fault == "unknown_version":
        fields["prompt_version"] = 99
    elif fault == "invalid_variables":
        fields["variables"] = {"subject": subject}
    elif fault == "too_large":
        fields["variables"] = {"subject": subject, "body": "x" * 1_200_000}
    elif fault == "missing_id":
        del fields["request_id"]
    key = request_id.encode()
    if fault == "garbage_bytes":
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        return PlannedRequest(request_id, key, b"\xff" + raw, [], fault)
    as_json = fault in ("missing_id", "too_large") or rng.random() < 0.5
    if as_json:
        value = json.dumps(fields).encode()
        return PlannedRequest(
            request_id, key, value, [("content-type", b"application/json")], fault
        )
    value, content_type = codec.encode(Request.model_validate(fields))
    return PlannedRequest(request_id, key, value, [("content-type", content_type.encode())], fault)


_INPUT_FAULTS = frozenset(
    {
        "too_large",
        "garbage_bytes",
        "missing_id",
        "unknown_prompt",
        "unknown_version",
        "invalid_variables",
    }
)


def mixed_requests(
    count: int, seed: int = 7, weights: dict[str, float] | None = None, prefix: str = "req"
) -> list[PlannedRequest]:
    """A seeded mix; the same arguments always give the same requests and outcomes."""
    rng = random.Random(seed)
    table = weights or DEFAULT_WEIGHTS
    faults = rng.choices(list(table), weights=list(table.values()), k=count)
    codec = Codec()
    return [plan_request(f"{prefix}-{seed}-{i:06d}", f, rng, codec) for i, f in enumerate(faults)]
