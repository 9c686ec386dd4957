"""A prompts directory with one prompt whose ``review:`` section each test chooses.

The prompt is ticket_triage v2's contract (schemas, rules) plus an invoice-style ``total``
so both string and numeric risk rules have a field to work on.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import yaml

from pipeline.contract.envelopes import (
    Completion,
    PromptRef,
    Request,
    Usage,
    ValidatedRequest,
    utc_now,
)
from pipeline.prompts.registry import PromptRegistry

NAME = "refund_triage"
ANSWER = {"label": "billing", "priority": "normal", "summary": "Asks for a refund.", "total": 40}

RULES_PY = textwrap.dedent(
    '''
    def mentions_lawyer(output, variables):
        """Legal threats go to a person, however sure the model is."""
        if "lawyer" in variables["body"].lower():
            return ["the customer mentions a lawyer"]
        return []

    def explodes(output, variables):
        raise ValueError("exchange-rate table not loaded")

    def says_yes(output, variables):
        return True
    '''
)


def prompt_document(version: int, review: dict[str, Any] | None = None) -> dict[str, Any]:
    document: dict[str, Any] = {
        "name": NAME,
        "version": version,
        "description": "Triage a refund request and read the amount.",
        "model": {"model": "gpt-4o-mini", "logprobs": True},
        "input_schema": {
            "type": "object",
            "required": ["subject", "body"],
            "properties": {
                "subject": {"type": "string"},
                "body": {"type": "string"},
                "customer_tier": {"type": "string", "enum": ["free", "pro", "enterprise"]},
            },
        },
        "output_schema": {
            "type": "object",
            "required": ["label", "priority", "summary", "total"],
            "properties": {
                "label": {"type": "string"},
                "priority": {"type": "string", "enum": ["low", "normal", "high", "urgent"]},
                "summary": {"type": "string"},
                "total": {"type": ["number", "null"]},
            },
        },
        "messages": [{"role": "user", "content": "{{ subject }}\n{{ body }}"}],
        "confidence": {"accept": 0.7, "policy": "review"},
    }
    if review is not None:
        document["review"] = review
    return document


def write_prompts(
    root: Path, review: dict[str, Any] | None = None, versions: tuple[int, ...] = (1,)
) -> PromptRegistry:
    directory = root / "prompts" / NAME
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rules.py").write_text(RULES_PY)
    for version in versions:
        text = yaml.safe_dump(prompt_document(version, review), sort_keys=False)
        (directory / f"v{version}.yaml").write_text(text)
    return PromptRegistry.load(root / "prompts")


def validated_for(
    registry: PromptRegistry,
    request_id: str = "r-1",
    variables: dict[str, Any] | None = None,
    version: int | None = None,
) -> ValidatedRequest:
    pv = registry.get(NAME, version)
    request = Request(
        request_id=request_id,
        prompt=NAME,
        variables=variables or {"subject": "Refund", "body": "Please refund my order."},
    )
    ref = PromptRef(name=pv.name, version=pv.version, hash=pv.content_hash)
    return ValidatedRequest(request=request, prompt=ref, received_at=utc_now())


def completion_for(validated: ValidatedRequest, text: str, logprob: float = -0.05) -> Completion:
    return Completion(
        validated=validated,
        model="gpt-4o-mini",
        raw_text=text,
        finish_reason="stop",
        usage=Usage(prompt_tokens=50, completion_tokens=20),
        token_logprobs=[logprob] * 5,
        latency_ms=5.0,
        attempts=1,
        completed_at=utc_now(),
    )


def prompt_ref(registry: PromptRegistry, version: int | None = None) -> PromptRef:
    pv = registry.get(NAME, version)
    return PromptRef(name=pv.name, version=pv.version, hash=pv.content_hash)
